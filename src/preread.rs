//! The preread phase handler: waits for the first bytes, names the route, and fills the
//! session context that the variables and the balancer read. nginx side only; the parsing is
//! in `sniff`, the lookup in `routes`.

use std::rc::Rc;

use nginx_sys::{
    ngx_connection_t, ngx_int_t, ngx_str_t, ngx_stream_session_t, ngx_uint_t, NGX_AGAIN,
    NGX_DECLINED, NGX_ERROR, NGX_LOG_INFO, NGX_OK, NGX_STREAM_BAD_GATEWAY, NGX_STREAM_FORBIDDEN,
};
use ngx::ngx_log_error;

use crate::conf::{Mode, SrvConf};
use crate::counters::{self, Counters};
use crate::routes::table::MatchedBy;
use crate::session::{self, RouteKind, SessionCtx};
use crate::sniff::{http, tls, Peek, Protocol, ServerName};
use crate::traffic::{Closed, Nameless, RouteKind as CountedKind, UnroutedOutcome};
use crate::{stream, worker};

pub unsafe extern "C" fn preread_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    let conf = stream::srv_conf::<SrvConf>(s);
    let c = &mut *(*s).connection;
    if conf.mode == Mode::Off || c.type_ != libc::SOCK_STREAM {
        return NGX_DECLINED as ngx_int_t;
    }
    // Made at the first call, before any byte: the log handler tells by it that the session
    // got as far as this phase.
    let ctx = match session::get(s) {
        Some(ctx) if ctx.done => return NGX_DECLINED as ngx_int_t,
        Some(ctx) => ctx,
        None => {
            let Some(ctx) = SessionCtx::attach(s) else {
                return NGX_ERROR as ngx_int_t;
            };
            ctx
        }
    };
    if c.buffer.is_null() {
        return NGX_AGAIN as ngx_int_t;
    }
    let b = &*c.buffer;
    let data = core::slice::from_raw_parts(b.pos, b.last.offset_from(b.pos) as usize);
    let Some(&first) = data.first() else {
        return NGX_AGAIN as ngx_int_t;
    };
    let protocol = match conf.mode {
        Mode::Tls => Protocol::Tls,
        Mode::Http => Protocol::Http,
        _ => Protocol::detect(first),
    };
    let buffer_full = b.last == b.end;

    let rejected: Option<(&'static str, Nameless)> = match protocol {
        Protocol::Tls => match tls::read_client_hello(data, &mut ctx.scratch) {
            Peek::NeedMore if !buffer_full => return NGX_AGAIN as ngx_int_t,
            Peek::NeedMore => Some((
                "ClientHello larger than preread_buffer_size",
                Nameless::TooLarge,
            )),
            Peek::Done(hello) => {
                ctx.name = hello.server_name;
                if let Some(list) = hello.alpn {
                    ctx.alpn = join_alpn(c.pool, list);
                }
                None
            }
            Peek::Invalid(reason) => Some((reason.as_str(), Nameless::Unreadable)),
        },
        Protocol::Http => match http::read_host(data) {
            Peek::NeedMore if !buffer_full => return NGX_AGAIN as ngx_int_t,
            Peek::NeedMore => Some((
                "HTTP request head larger than preread_buffer_size",
                Nameless::TooLarge,
            )),
            Peek::Done(name) => {
                ctx.name = name;
                None
            }
            Peek::Invalid(reason) => Some((reason.as_str(), Nameless::Unreadable)),
        },
    };
    ctx.scratch = Vec::new();
    ctx.protocol = Some(protocol);
    ctx.done = true;
    if let Some((reason, _)) = rejected {
        ngx_log_error!(
            NGX_LOG_INFO,
            c.log,
            "edge: {}, routing as a connection without a name",
            reason
        );
    }
    let counters = worker::get().and_then(|w| w.counters.as_ref());
    let p = counters::protocol_index(protocol);
    if let Some(counters) = counters {
        match (rejected, protocol) {
            (Some((_, why)), _) => counters.nameless(why),
            (None, _) if ctx.name.is_some() => {}
            (None, Protocol::Tls) => counters.nameless(Nameless::NoSni),
            (None, Protocol::Http) => counters.nameless(Nameless::NoHost),
        }
        counters.decided(p, decision_ms(s));
    }

    let slot = &*conf.source;
    let Some(source) = slot.source.as_ref() else {
        return NGX_ERROR as ngx_int_t;
    };
    let table = Rc::clone(source.table());
    let name = ctx.name.as_ref().map(ServerName::as_str);
    let Some(found) = table.lookup(name, protocol) else {
        if let (Some(counters), Some(name)) = (counters, name) {
            count_unrouted(counters, c, p, name, UnroutedOutcome::Closed);
        }
        ngx_log_error!(
            NGX_LOG_INFO,
            c.log,
            "edge: no route for \"{}\" ({}) and no default, closing",
            name.unwrap_or(""),
            protocol.as_str()
        );
        return NGX_STREAM_FORBIDDEN as ngx_int_t;
    };
    ctx.route = Some(match found.by {
        MatchedBy::Exact(key) => RouteKind::Exact(key),
        MatchedBy::Wildcard(suffix) => RouteKind::Wildcard(suffix),
        MatchedBy::Default => RouteKind::Default,
    });
    if let Some(counters) = counters {
        let (kind, key) = match found.by {
            MatchedBy::Exact(key) => (CountedKind::Exact, key.as_bytes()),
            MatchedBy::Wildcard(suffix) => (CountedKind::Wildcard, suffix.as_bytes()),
            MatchedBy::Default => (CountedKind::Default, &b""[..]),
        };
        let now = nginx_sys::ngx_current_msec as u64;
        ctx.counted = counters
            .route_opened(kind, key, p, decision_ms(s), now)
            .map(|pin| (pin, p));
        if let (MatchedBy::Default, Some(name)) = (found.by, name) {
            count_unrouted(counters, c, p, name, UnroutedOutcome::Defaulted);
        }
    }
    ctx.upstream = found.upstream;
    ctx.table = Some(table);
    NGX_DECLINED as ngx_int_t
}

/// The longest decision time counted; longer is a step of the clock.
const DECISION_MAX_MS: i64 = 3_600_000;

/// Milliseconds from the session's accept to now, on nginx's cached clock.
unsafe fn decision_ms(s: *mut ngx_stream_session_t) -> u64 {
    let tp = &*nginx_sys::ngx_cached_time;
    #[allow(clippy::unnecessary_cast)] // time_t is not i64 everywhere
    let secs = (tp.sec - (*s).start_sec) as i64;
    let ms = secs * 1000 + tp.msec as i64 - (*s).start_msec as i64;
    // The cached clock is the wall clock: a step of the system's time must not count as a
    // decision of hours (a client gets `preread_timeout`, 30 s by default, at most).
    if (0..=DECISION_MAX_MS).contains(&ms) {
        ms as u64
    } else {
        0
    }
}

unsafe fn count_unrouted(
    counters: &Counters,
    c: &ngx_connection_t,
    protocol: usize,
    name: &str,
    outcome: UnroutedOutcome,
) {
    // Behind a load balancer that sends the PROXY protocol, the client is in its header.
    let proxied = c.proxy_protocol.as_ref().and_then(|pp| {
        core::str::from_utf8(pp.src_addr.as_bytes())
            .ok()?
            .parse()
            .ok()
    });
    let client = proxied
        .or_else(|| stream::sockaddr_ip(c.sockaddr.cast()))
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let now_s = (*nginx_sys::ngx_cached_time).sec as u64;
    counters.unrouted(protocol, name.as_bytes(), outcome, now_s, client);
}

/// Log phase: a session of an `edge_route` server that ends in the preread phase before the
/// name was read (the client closed, or `preread_timeout` passed: nginx closes those without
/// a word) is logged once here, with the client address. A session closed before this phase
/// (`deny`, `limit_conn`) has no context, and nginx has logged why.
pub unsafe extern "C" fn log_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    let conf = stream::srv_conf::<SrvConf>(s);
    if conf.mode == Mode::Off {
        return NGX_OK as ngx_int_t;
    }
    let Some(ctx) = session::get(s) else {
        return NGX_OK as ngx_int_t;
    };
    let counters = worker::get().and_then(|w| w.counters.as_ref());
    // First, whatever the server does next: a route's record stays held until this.
    if let (Some(counters), Some((pin, p))) = (counters, ctx.counted.take()) {
        let failed = (*s).status == NGX_STREAM_BAD_GATEWAY as ngx_uint_t;
        // Where nginx read the first bytes into the preread buffer (rather than peeking at
        // them: nginx before 1.25.5, or without epoll), the proxy forwards that buffer without
        // adding it to what it received.
        let c = &*(*s).connection;
        let buffered = c
            .buffer
            .as_ref()
            .map_or(0, |b| b.last.offset_from(b.pos).max(0) as u64);
        counters.route_closed(
            pin,
            p,
            Closed {
                received: (*s).received.max(0) as u64 + buffered,
                sent: (*(*s).connection).sent.max(0) as u64,
                no_server: ctx.no_server,
                failed: failed && !ctx.no_server,
            },
        );
    }
    if ctx.done || conf.status.is_some() {
        return NGX_OK as ngx_int_t;
    }
    let c = &*(*s).connection;
    let what = match conf.mode {
        Mode::Tls => "ClientHello",
        Mode::Http => "HTTP request head",
        _ => "ClientHello or HTTP request head",
    };
    if let Some(counters) = counters {
        counters.nameless(if (*c.read).timedout() != 0 {
            Nameless::TimedOut
        } else {
            Nameless::ClientClosed
        });
    }
    if (*c.read).timedout() != 0 {
        ngx_log_error!(
            NGX_LOG_INFO,
            c.log,
            "edge: no complete {} within preread_timeout, closed",
            what
        );
    } else {
        ngx_log_error!(
            NGX_LOG_INFO,
            c.log,
            "edge: the client closed before sending a complete {}",
            what
        );
    }
    NGX_OK as ngx_int_t
}

/// `h2,http/1.1` from the wire's length-prefixed list, in the connection's pool.
unsafe fn join_alpn(pool: *mut nginx_sys::ngx_pool_t, list: &[u8]) -> ngx_str_t {
    // The joined form is never longer than the wire form: each length byte becomes a comma.
    let p = nginx_sys::ngx_pnalloc(pool, list.len()).cast::<u8>();
    if p.is_null() {
        return ngx_str_t::empty();
    }
    let out = core::slice::from_raw_parts_mut(p, list.len());
    let mut len = 0;
    for proto in tls::alpn_protocols(list) {
        if len > 0 {
            out[len] = b',';
            len += 1;
        }
        out[len..len + proto.len()].copy_from_slice(proto);
        len += proto.len();
    }
    ngx_str_t { len, data: p }
}
