//! Active checks. Each worker ticks every `TICK_MS`; for every server of an upstream with a
//! `check`, the first worker to claim the record's due time (a compare-and-swap in the shared
//! zone) probes it, so a server gets one probe per interval whatever the number of workers.
//! A probe is a non-blocking connection in the worker's event loop, bounded by its timeout.

use core::ffi::c_void;
use core::ptr::{addr_of_mut, null_mut};
use std::net::SocketAddr;
use std::rc::Rc;

use nginx_sys::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_event_connect_peer,
    ngx_event_get_peer, ngx_event_t, ngx_handle_read_event, ngx_log_t, ngx_peer_connection_t,
    ngx_str_t, NGX_DECLINED, NGX_ERROR, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK,
};
use ngx::ngx_log_error;

use crate::balancer::log_transition;
use crate::health::probe::{client_hello, http_request, judge, proxy_header};
use crate::health::{now_ms, Outcome};
use crate::io::{self, Received, Sent};
use crate::routes::table::{Backend, RouteTable};
use crate::upstream::{socket_address, CheckKind};
use crate::worker::{self, Worker};

/// How often a worker looks for due checks; a probe starts at most this late.
const TICK_MS: u64 = 100;
/// Bytes of an answer read before judging it: a status line or a record header suffices.
const ANSWER_MAX: usize = 64;

/// Arms the worker's check ticker.
pub unsafe fn start() {
    worker::start_checks(Some(tick), TICK_MS as _);
}

unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    if worker::exiting() {
        return;
    }
    let Some(w) = worker::get() else { return };
    let now = now_ms();
    for table in w.tables() {
        for u in table.checked() {
            let Backend::Servers(pool) = &table.upstreams()[u].kind else {
                continue;
            };
            let Some(check) = &pool.policy().check else {
                continue;
            };
            for i in 0..pool.servers().len() {
                if pool.health(i).claim_check(now, check.interval_ms) {
                    start_probe(w, Rc::clone(table), u, i, now);
                }
            }
        }
    }
    // Idle while no table checks anything: a table swap wakes it (`worker::wake_checks`).
    if w.has_checks() {
        ngx_add_timer(ev, TICK_MS as _);
    }
}

/// One probe in flight; owned by its connection (`c->data`) until `finish`.
struct Probe {
    table: Rc<RouteTable>,
    upstream: usize,
    server: usize,
    /// The record's generation when the probe started: the outcome is written only into
    /// the record of the same server.
    generation: u32,
    kind: CheckKind,
    expect: u8,
    /// The PROXY protocol header, if any, then the check's request.
    request: Vec<u8>,
    sent: usize,
    answer: [u8; ANSWER_MAX],
    got: usize,
    connected: bool,
    peer: ngx_peer_connection_t,
    /// Its place in the worker's list of probes in flight.
    at: usize,
    sockaddr: libc::sockaddr_in6,
    name: ngx_str_t,
    name_text: String,
    log: *mut ngx_log_t,
}

unsafe fn start_probe(w: &Worker, table: Rc<RouteTable>, u: usize, i: usize, now: u64) {
    let Backend::Servers(pool) = &table.upstreams()[u].kind else {
        return;
    };
    let Some(check) = pool.policy().check.as_ref() else {
        return;
    };
    let server = &pool.servers()[i];
    // A Service's node ports map the check's port as they map a listener's.
    let port = check.default_port();
    let addr = SocketAddr::new(
        server.ip,
        server.port.or_else(|| pool.port_for(port)).unwrap_or(port),
    );
    let name_text = addr.to_string();
    let mut request = check
        .proxy_protocol
        .map_or(Vec::new(), |v| proxy_header(v).to_vec());
    match check.kind {
        CheckKind::Tcp => {}
        CheckKind::Tls => {
            let seed = w.checks.seed.get().wrapping_add(1);
            w.checks.seed.set(seed);
            request.extend_from_slice(&client_hello(pool.check_name(), seed ^ now));
        }
        CheckKind::Http => request.extend_from_slice(&http_request(
            &check.path,
            pool.check_name().unwrap_or(&name_text),
        )),
    }
    let mut probe = Box::new(Probe {
        kind: check.kind,
        expect: check.expect,
        request,
        sent: 0,
        answer: [0; ANSWER_MAX],
        got: 0,
        connected: false,
        peer: core::mem::zeroed(),
        at: 0,
        sockaddr: core::mem::zeroed(),
        name: ngx_str_t::default(),
        name_text,
        log: w.log,
        generation: pool.health(i).generation(),
        table: Rc::clone(&table),
        upstream: u,
        server: i,
    });
    let (sockaddr, socklen) = socket_address(addr);
    probe.sockaddr = sockaddr;
    probe.name = ngx_str_t {
        len: probe.name_text.len(),
        data: probe.name_text.as_ptr().cast_mut(),
    };
    let p = &mut *probe;
    p.peer.sockaddr = addr_of_mut!(p.sockaddr).cast();
    p.peer.socklen = socklen;
    p.peer.name = addr_of_mut!(p.name);
    p.peer.get = Some(ngx_event_get_peer);
    p.peer.log = core::ptr::from_ref(&w.checks.probe_log).cast_mut();
    p.peer.set_log_error(1); // NGX_ERROR_ERR: connect errors at `err`, which probe_log drops

    let rc = ngx_event_connect_peer(&mut p.peer);
    if rc == NGX_ERROR as isize {
        // No socket or no free connection here: the server is not to blame.
        if !w.checks.cannot_start.replace(true) {
            ngx_log_error!(
                NGX_LOG_WARN,
                w.log,
                "edge: a check of upstream \"{}\" server {} could not be started here (no free connection or socket, see above); not counted against the server",
                table.upstreams()[u].name,
                p.name_text
            );
        }
        return;
    }
    if w.checks.cannot_start.replace(false) {
        ngx_log_error!(NGX_LOG_NOTICE, w.log, "edge: checks start again");
    }
    if rc == NGX_DECLINED as isize || p.peer.connection.is_null() {
        return finish(probe, null_mut(), Outcome::Refused);
    }
    let c = &mut *p.peer.connection;
    {
        let mut in_flight = w.checks.in_flight.borrow_mut();
        p.at = in_flight.len();
        in_flight.push(c);
    }
    c.data = Box::into_raw(probe).cast();
    (*c.read).handler = Some(on_read);
    (*c.write).handler = Some(on_write);
    // One deadline for the whole probe, on the write event; cancelable so that a worker
    // shutting down does not wait for it.
    (*c.write).set_cancelable(1);
    ngx_add_timer(c.write, check.timeout_ms as _);
    if rc == NGX_OK as isize {
        on_write(c.write);
    }
}

unsafe fn probe_of<'a>(c: *mut ngx_connection_t) -> &'a mut Probe {
    &mut *(*c).data.cast::<Probe>()
}

unsafe extern "C" fn on_write(wev: *mut ngx_event_t) {
    let c = (*wev).data.cast::<ngx_connection_t>();
    let p = probe_of(c);
    if (*wev).timedout() != 0 {
        return finish_conn(c, Outcome::Timeout);
    }
    if !p.connected {
        match socket_error(c) {
            0 => p.connected = true,
            libc::ECONNREFUSED => return finish_conn(c, Outcome::Refused),
            libc::ETIMEDOUT => return finish_conn(c, Outcome::Timeout),
            _ => return finish_conn(c, Outcome::Error),
        }
    }
    match io::send_rest(c, &p.request, &mut p.sent) {
        Sent::All => {}
        Sent::Again => return,
        Sent::Failed => return finish_conn(c, Outcome::Closed),
    }
    if p.kind == CheckKind::Tcp {
        // Connected, and the PROXY header (if any) is out: nothing to wait for.
        return finish_conn(c, Outcome::Ok);
    }
    if ngx_handle_read_event((*c).read, 0) != NGX_OK as isize {
        return finish_conn(c, Outcome::Error);
    }
    if (*(*c).read).ready() != 0 {
        on_read((*c).read);
    }
}

unsafe extern "C" fn on_read(rev: *mut ngx_event_t) {
    let c = (*rev).data.cast::<ngx_connection_t>();
    let p = probe_of(c);
    if !p.connected || p.sent < p.request.len() {
        // epoll reports a failed connect on both events: find out, or go on sending.
        return on_write((*c).write);
    }
    loop {
        let room = &mut p.answer[p.got..];
        if room.is_empty() {
            return finish_conn(c, Outcome::BadAnswer);
        }
        match io::recv(c, room) {
            Received::Bytes(n) => p.got += n,
            Received::Again => return,
            Received::Closed => return finish_conn(c, Outcome::Closed),
        }
        if let Some(outcome) = judge(p.kind, p.expect, &p.answer[..p.got]) {
            return finish_conn(c, outcome);
        }
    }
}

unsafe fn socket_error(c: *mut ngx_connection_t) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
    if libc::getsockopt(
        (*c).fd,
        libc::SOL_SOCKET,
        libc::SO_ERROR,
        core::ptr::from_mut(&mut err).cast::<c_void>(),
        &mut len,
    ) == -1
    {
        return *libc::__errno_location();
    }
    err
}

unsafe fn finish_conn(c: *mut ngx_connection_t, outcome: Outcome) {
    let probe = Box::from_raw((*c).data.cast::<Probe>());
    forget(&probe);
    finish(probe, c, outcome);
}

/// Takes a probe off the worker's list of probes in flight.
unsafe fn forget(probe: &Probe) {
    let Some(w) = worker::get() else { return };
    let mut in_flight = w.checks.in_flight.borrow_mut();
    if probe.at >= in_flight.len() {
        return;
    }
    in_flight.swap_remove(probe.at);
    if let Some(&moved) = in_flight.get(probe.at) {
        probe_of(moved).at = probe.at;
    }
}

/// Closes the probes in flight at worker exit: nginx would otherwise find their sockets open
/// (`open socket left in connection`). Their outcome is not recorded.
pub unsafe fn stop() {
    let Some(w) = worker::get() else { return };
    let probes = core::mem::take(&mut *w.checks.in_flight.borrow_mut());
    for c in probes {
        drop(Box::from_raw((*c).data.cast::<Probe>()));
        ngx_close_connection(c);
    }
}

/// Closes the probe's connection and records the outcome, logging a state change.
unsafe fn finish(probe: Box<Probe>, c: *mut ngx_connection_t, outcome: Outcome) {
    if !c.is_null() {
        ngx_close_connection(c);
    }
    let upstream = &probe.table.upstreams()[probe.upstream];
    let Backend::Servers(pool) = &upstream.kind else {
        return;
    };
    let Some(check) = pool.policy().check.as_ref() else {
        return;
    };
    let record = pool.health(probe.server);
    let now = now_ms();
    if let Some(t) = record.checked_as(probe.generation, now, outcome, check.rise, check.fall) {
        log_transition(probe.log, &upstream.name, pool, probe.server, t);
    }
}
