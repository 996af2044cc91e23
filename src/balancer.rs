//! Peer callbacks of the module-owned upstream group (`nginx_edge`): nginx's proxy module asks
//! them for a server, and tells them how the attempt went.

use core::ffi::c_void;

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_peer_connection_t, ngx_str_t, ngx_stream_session_t,
    ngx_stream_upstream_srv_conf_t, ngx_uint_t, sockaddr, sockaddr_in, sockaddr_in6, socklen_t,
    NGX_BUSY, NGX_ERROR, NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK, NGX_PEER_FAILED,
};
use ngx::ngx_log_error;

use crate::balance::{Pool, Tried};
use crate::health::{fnv1a, now_ms, Transition};
use crate::routes::table::{Backend, Upstream};
use crate::upstream::Balance;
use crate::{report, session, worker};

/// Per-session balancer state, in the session context's `PeerRoom` (nothing in it needs
/// dropping).
struct PeerData {
    /// Points into the session's route table, which the session context keeps alive.
    upstream: *const Upstream,
    servers: *const Pool,
    tried: Tried,
    /// The server of the current try, until nginx frees it, and its record's generation.
    current: Option<(usize, u32)>,
    /// The worker's connection-count slot in the zone.
    slot: Option<usize>,
    /// The port the client connected to, for servers listed without one.
    local_port: u16,
    /// A hash of the client address, for `balance: hash`.
    client: u64,
    session: *mut ngx_stream_session_t,
}

const _: () = assert!(
    core::mem::size_of::<PeerData>() <= session::PEER_ROOM
        && core::mem::align_of::<PeerData>() <= core::mem::align_of::<session::PeerRoom>()
        && !core::mem::needs_drop::<PeerData>()
);

pub unsafe extern "C" fn init_upstream(
    _cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    (*us).peer.init = Some(init_peer);
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn init_peer(
    s: *mut ngx_stream_session_t,
    _us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    let c = &*(*s).connection;
    let Some(upstream) = session::get(s).and_then(|ctx| ctx.upstream()) else {
        ngx_log_error!(
            NGX_LOG_ERR,
            c.log,
            "edge: proxy_pass to nginx_edge in a server without edge_route"
        );
        return NGX_ERROR as ngx_int_t;
    };
    // Before anything is set in the session's peer: a block's round robin expects it empty.
    let servers = match &upstream.kind {
        Backend::Servers(pool) => &**pool,
        // `proxy_pass nginx_edge;` and a route to an `upstream {}` block: the block balances,
        // as if `proxy_pass $edge_upstream;` had named it.
        Backend::Nginx(name) => return init_block(s, name),
    };
    // In the room kept beside the session's context: no pool allocation per connection.
    let Some(room) = session::peer_room(s) else {
        return NGX_ERROR as ngx_int_t;
    };
    let data = room.cast::<PeerData>();
    data.write(PeerData {
        upstream,
        servers,
        tried: Tried::default(),
        current: None,
        slot: worker::get().and_then(|w| w.slot),
        local_port: local_port(c.local_sockaddr),
        // Only `hash` balancing reads it.
        client: if servers.policy().balance == Balance::Hash {
            client_hash(c)
        } else {
            0
        },
        session: s,
    });
    let peer = &mut (*(*s).upstream).peer;
    peer.data = data.cast();
    peer.get = Some(get_peer);
    peer.free = Some(free_peer);
    peer.tries = servers.servers().len() as ngx_uint_t;
    // nginx calls these without a NULL check when proxy_ssl is on.
    peer.set_session = Some(set_session);
    peer.save_session = Some(save_session);
    NGX_OK as ngx_int_t
}

/// Hands the session to the `upstream NAME {}` block its route names: its own balancer (round
/// robin, hash, least_conn...) takes over, as nginx's proxy would have set it up.
unsafe fn init_block(s: *mut ngx_stream_session_t, name: &str) -> ngx_int_t {
    let c = &*(*s).connection;
    let block = crate::stream::upstream_block(s, name.as_bytes());
    let init = block.and_then(|b| (*b).peer.init);
    // Never this group itself (a route cannot name it, but a loop here would never end).
    let Some((block, init)) = block
        .zip(init)
        .filter(|&(_, init)| init as *const () != init_peer as *const ())
    else {
        // A table names only blocks nginx.conf has (checked when it loads).
        ngx_log_error!(
            NGX_LOG_ERR,
            c.log,
            "edge: no \"upstream {} {{}}\" block in this configuration",
            name
        );
        return NGX_ERROR as ngx_int_t;
    };
    let u = &mut *(*s).upstream;
    u.upstream = block;
    u.ssl_name = (*block).host;
    init(s, block)
}

/// The client's address, without the port: from the PROXY protocol header when the listener
/// has one (the edge is then behind a load balancer), else from the socket.
unsafe fn client_hash(c: &nginx_sys::ngx_connection_t) -> u64 {
    if let Some(pp) = c.proxy_protocol.as_ref() {
        return fnv1a(pp.src_addr.as_bytes());
    }
    let sa = c.sockaddr;
    if sa.is_null() {
        return 0;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => fnv1a(&(*sa.cast::<sockaddr_in>()).sin_addr.s_addr.to_ne_bytes()),
        libc::AF_INET6 => fnv1a(&(*sa.cast::<sockaddr_in6>()).sin6_addr.__in6_u.__u6_addr8),
        _ => 0,
    }
}

unsafe fn local_port(sa: *mut sockaddr) -> u16 {
    if sa.is_null() {
        return 0;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => u16::from_be((*sa.cast::<sockaddr_in>()).sin_port),
        libc::AF_INET6 => u16::from_be((*sa.cast::<sockaddr_in6>()).sin6_port),
        _ => 0,
    }
}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    let pc = &mut *pc;
    let data = &mut *data.cast::<PeerData>();
    let servers = &*data.servers;
    if servers.port_for(data.local_port).is_none() {
        let c = &*(*data.session).connection;
        ngx_log_error!(
            NGX_LOG_ERR,
            c.log,
            "edge: upstream \"{}\" has no node port for the listener's port {}",
            (*data.upstream).name,
            data.local_port
        );
        return no_server(data);
    }
    let Some(pick) = servers.pick(&data.tried, data.client, loop_now_ms()) else {
        if data.tried.is_empty() {
            return no_server(data);
        }
        return NGX_BUSY as ngx_int_t;
    };
    let i = pick.index;
    if let Some(open) = pick.fail_open {
        let c = &*(*data.session).connection;
        let name = &(*data.upstream).name;
        if let Some(w) = worker::get() {
            w.set_failing_open(name, open);
        }
        if open {
            ngx_log_error!(
                NGX_LOG_WARN,
                c.log,
                "edge: every server of upstream \"{}\" is down, trying them anyway",
                name
            );
        } else {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                c.log,
                "edge: upstream \"{}\" has a server up again, no longer failing open",
                name
            );
        }
    }
    data.tried.insert(i);
    // Made once per table, server and port; the session keeps the table, so it outlives
    // the connection. nginx only reads these.
    let peer = servers.peer(i, data.local_port);
    pc.sockaddr = core::ptr::from_ref(&peer.sockaddr).cast_mut().cast();
    pc.socklen = peer.socklen as socklen_t;
    pc.name = core::ptr::from_ref(&peer.name)
        .cast_mut()
        .cast::<ngx_str_t>();
    let record = servers.health(i);
    record.connected(data.slot);
    data.current = Some((i, record.generation()));
    if let Some(ctx) = session::get(data.session) {
        ctx.server = Some(servers.servers()[i]);
        if let Some(w) = worker::get() {
            w.track(data.session);
        }
    }
    NGX_OK as ngx_int_t
}

/// The session's upstream has no server to try: counted apart from failed connects.
unsafe fn no_server(data: &PeerData) -> ngx_int_t {
    if let Some(ctx) = session::get(data.session) {
        ctx.no_server = true;
    }
    NGX_BUSY as ngx_int_t
}

/// The event loop's clock: nginx reads CLOCK_MONOTONIC once per loop iteration, the clock of
/// `health::now_ms`, so the hot path need not read it again.
fn loop_now_ms() -> u64 {
    // SAFETY: a plain read of nginx's cached time, written by this thread only.
    unsafe { nginx_sys::ngx_current_msec as u64 }
}

/// nginx is done with the current try: `NGX_PEER_FAILED` when the connect failed or timed
/// out (it will ask for the next server), 0 when the session ends.
unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    let pc = &mut *pc;
    let data = &mut *data.cast::<PeerData>();
    // The proxy module stops retrying when this reaches zero.
    pc.tries = pc.tries.saturating_sub(1);
    let Some((i, generation)) = data.current.take() else {
        return;
    };
    let servers = &*data.servers;
    let record = servers.health(i);
    record.released(data.slot, generation);
    if record.generation() != generation {
        // The record was made anew for another server meanwhile: nothing of it is ours.
        return;
    }
    let transition = if state & NGX_PEER_FAILED as ngx_uint_t != 0 {
        let policy = servers.policy();
        record.failed(loop_now_ms(), policy.max_fails, policy.fail_timeout_ms)
    } else if (*(*data.session).upstream).connected() != 0 {
        record.succeeded()
    } else {
        None
    };
    if let Some(t) = transition {
        let c = &*(*data.session).connection;
        log_transition(c.log, &(*data.upstream).name, servers, i, t);
    }
}

/// Logs a server going down or up, once, by the process that changed its state.
pub unsafe fn log_transition(
    log: *mut nginx_sys::ngx_log_t,
    upstream: &str,
    servers: &Pool,
    i: usize,
    t: Transition,
) {
    let address = report::address(&servers.servers()[i]);
    let policy = servers.policy();
    match t {
        Transition::Down(why) => {
            let reason = match why {
                crate::health::Why::Passive => format!(
                    "{} connect failure(s) within {}ms (max_fails), out for {}ms",
                    policy.max_fails, policy.fail_timeout_ms, policy.fail_timeout_ms
                ),
                _ => {
                    let check = policy.check.as_ref();
                    let view = servers.health(i).view(now_ms());
                    format!(
                        "{} check failed {} time(s) in a row, last: {}",
                        check.map_or("", |c| report::check_kind(c.kind)),
                        check.map_or(0, |c| c.fall),
                        view.last_outcome.as_str()
                    )
                }
            };
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "edge: upstream \"{}\" server {} is down: {}",
                upstream,
                address,
                reason
            );
        }
        Transition::Up(why) => {
            let reason = match why {
                crate::health::Why::Passive => "a connect succeeded after fail_timeout".to_owned(),
                _ => {
                    let check = policy.check.as_ref();
                    format!(
                        "{} check passed {} time(s) in a row",
                        check.map_or("", |c| report::check_kind(c.kind)),
                        check.map_or(0, |c| c.rise)
                    )
                }
            };
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "edge: upstream \"{}\" server {} is up: {}",
                upstream,
                address,
                reason
            );
        }
        Transition::CheckedBack => {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "edge: upstream \"{}\" server {} is up: its {} check passed after fail_timeout",
                upstream,
                address,
                policy
                    .check
                    .as_ref()
                    .map_or("", |c| report::check_kind(c.kind))
            );
        }
    }
}

unsafe extern "C" fn set_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn save_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) {}
