//! The preread phase handler: waits for the first bytes, names the route, and fills the
//! session context that the variables and the balancer read. nginx side only; the parsing is
//! in `sniff`, the lookup in `routes`.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;

use nginx_sys::{
    ngx_connection_t, ngx_int_t, ngx_stream_session_t, ngx_uint_t, NGX_AGAIN, NGX_DECLINED,
    NGX_ERROR, NGX_LOG_INFO, NGX_LOG_WARN, NGX_OK, NGX_STREAM_BAD_GATEWAY, NGX_STREAM_FORBIDDEN,
    NGX_STREAM_SERVICE_UNAVAILABLE,
};
use ngx::ngx_log_error;

use crate::conf::{Mode, SrvConf};
use crate::counters::{self, Counters};
use crate::routes::image::LimitSet;
use crate::routes::table::MatchedBy;
use crate::session::{self, RouteKind, SessionCtx};
use crate::sniff::{http, tls, Peek, Protocol};
use crate::traffic::limits::{Refusal, Throttle, REASONS};
use crate::traffic::{Closed, Nameless, RouteKind as CountedKind, UnroutedOutcome};
use crate::{stream, worker};

pub unsafe extern "C" fn preread_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    let conf = stream::srv_conf::<SrvConf>(s);
    let c = &mut *(*s).connection;
    if conf.mode == Mode::Off || conf.mode == Mode::Quic || c.type_ != libc::SOCK_STREAM {
        return NGX_DECLINED as ngx_int_t;
    }
    // Made at the first call, before any byte: the log handler tells by it that the session
    // got as far as this phase.
    let ctx = match session::get_or_attach(s) {
        Some(ctx) if ctx.done => return NGX_DECLINED as ngx_int_t,
        Some(ctx) => ctx,
        None => return NGX_ERROR as ngx_int_t,
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
                if let Some(name) = &hello.server_name {
                    let Some(kept) = session::KeptName::keep(c.pool, name) else {
                        return NGX_ERROR as ngx_int_t;
                    };
                    ctx.name = kept;
                }
                if let Some(list) = hello.alpn {
                    ctx.alpn = session::keep_alpn(c.pool, list);
                    ctx.alpn_wire = ctx.alpn.len > 0;
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
                if let Some(name) = &name {
                    let Some(kept) = session::KeptName::keep(c.pool, name) else {
                        return NGX_ERROR as ngx_int_t;
                    };
                    ctx.name = kept;
                }
                None
            }
            Peek::Invalid(reason) => Some((reason.as_str(), Nameless::Unreadable)),
        },
    };
    ctx.scratch = Vec::new();
    decide(s, conf, c, ctx, protocol, rejected)
}

/// Routes the session by the name its first bytes gave (`ctx.name`, if any), or `rejected`
/// says why they gave none: counts it, applies the route's limits, and leaves in `ctx` what
/// the balancer and the variables read. The preread handler's result.
pub unsafe fn decide(
    s: *mut ngx_stream_session_t,
    conf: &SrvConf,
    c: &mut ngx_connection_t,
    ctx: &mut SessionCtx,
    protocol: Protocol,
    rejected: Option<(&'static str, Nameless)>,
) -> ngx_int_t {
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
            (None, _) if ctx.name().is_some() => {}
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
    let name = ctx.name.get();
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
    let mut refused = None;
    let limits = table.limits(found.limits);
    if let Some(counters) = counters {
        let (kind, key) = match found.by {
            MatchedBy::Exact(key) => (CountedKind::Exact, key.as_bytes()),
            MatchedBy::Wildcard(suffix) => (CountedKind::Wildcard, suffix.as_bytes()),
            MatchedBy::Default => (CountedKind::Default, &b""[..]),
        };
        let now = nginx_sys::ngx_current_msec as u64;
        let pin = counters.route_pin(kind, key, now);
        let verdict = match &limits {
            None => Ok(false),
            Some(l) => {
                let client = client_ip(c);
                if l.has_networks() && !table.image().view().allows(l, client) {
                    Err(Refusal::Denied)
                } else if let Some(pin) = pin {
                    counters.route_admit(pin, p, l, client, now).map(|pair| {
                        ctx.pair = pair;
                        true
                    })
                } else if l.counts() {
                    // No record to keep its counts in (every one has a connection open): as
                    // nginx's limit_conn with its zone full, refused.
                    counters.unlimited();
                    Err(Refusal::MaxConns)
                } else {
                    Ok(false)
                }
            }
        };
        match verdict {
            Ok(admitted) => {
                if let Some(pin) = pin {
                    counters.route_opened(pin, p, decision_ms(s), now, admitted);
                    ctx.counted = Some((pin, p));
                }
            }
            Err(why) => {
                counters.route_refused(pin, p, why);
                refused = Some(why);
            }
        }
        if let (MatchedBy::Default, Some(name)) = (found.by, name) {
            count_unrouted(counters, c, p, name, UnroutedOutcome::Defaulted);
        }
    } else if let Some(l) = &limits {
        // Without counters, only a route's networks can be enforced.
        if !WARNED_UNCOUNTED.replace(true) {
            ngx_log_error!(
                NGX_LOG_WARN,
                c.log,
                "edge: route \"{}\" has limits but edge_counters is off: only its allow and deny lists apply",
                found.by
            );
        }
        if l.has_networks() && !table.image().view().allows(l, client_ip(c)) {
            refused = Some(Refusal::Denied);
        }
    }
    if let Some(why) = refused {
        log_refusal(c, &found.by, protocol, why, &limits.unwrap_or(NO_LIMITS));
        return refuse(c, protocol, why);
    }
    ctx.upstream = found.upstream;
    ctx.table = Some(table);
    NGX_DECLINED as ngx_int_t
}

thread_local! {
    /// The worker warned that limits need `edge_counters`.
    static WARNED_UNCOUNTED: Cell<bool> = const { Cell::new(false) };
    /// The worker's log of refusals, per reason.
    static REFUSALS: Cell<[Throttle; REASONS]> = const { Cell::new([Throttle::new(); REASONS]) };
}

/// A refusal of each reason is logged at most this often by each worker.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

const NO_LIMITS: LimitSet = LimitSet::NONE;

/// Logs a refusal, unless one of the same reason was logged less than
/// `REFUSAL_LOG_INTERVAL_MS` ago: then it is only counted, and the next line says how many.
unsafe fn log_refusal(
    c: &ngx_connection_t,
    by: &MatchedBy,
    protocol: Protocol,
    why: Refusal,
    l: &LimitSet,
) {
    let now = nginx_sys::ngx_current_msec as u64;
    let mut all = REFUSALS.get();
    let hit = all[why as usize].hit(now, REFUSAL_LOG_INTERVAL_MS);
    REFUSALS.set(all);
    let Some(unlogged) = hit else {
        return;
    };
    let limit = match why {
        Refusal::Denied => "the client's address is not allowed".to_owned(),
        Refusal::MaxConns => format!("max_conns {} reached", l.max_conns),
        Refusal::MaxConnsPerClient => {
            format!("max_conns_per_client {} reached", l.max_conns_per_client)
        }
        Refusal::Rate => format!(
            "rate {}r/{} burst {} exceeded",
            l.rate,
            if l.per_minute { "m" } else { "s" },
            l.burst
        ),
    };
    ngx_log_error!(
        NGX_LOG_WARN,
        c.log,
        "edge: {} refused by route \"{}\" ({}): {}; {} more refusal(s) for {}, on any route, since the last such line (logged at most every {} s per worker)",
        client_ip(c),
        by,
        protocol.as_str(),
        limit,
        unlogged,
        why.as_str(),
        REFUSAL_LOG_INTERVAL_MS / 1000
    );
}

/// Closes a refused connection: an HTTP client is answered `429` (a limit) or `403` (its
/// address), a TLS client's connection is closed. What the client sent is read first, so
/// that closing does not reset the connection before the answer is read.
unsafe fn refuse(c: &mut ngx_connection_t, protocol: Protocol, why: Refusal) -> ngx_int_t {
    // A UDP session (QUIC) has no socket of its own: `c.fd` is the listening socket that every
    // client shares. Nothing is read or sent there; the session is closed.
    if c.type_ != libc::SOCK_STREAM {
        return match why {
            Refusal::Denied => NGX_STREAM_FORBIDDEN as ngx_int_t,
            _ => NGX_STREAM_SERVICE_UNAVAILABLE as ngx_int_t,
        };
    }
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        let n = libc::recv(
            c.fd,
            sink.as_mut_ptr().cast(),
            sink.len(),
            libc::MSG_DONTWAIT,
        );
        if n <= 0 {
            break;
        }
    }
    // On a `listen ... ssl` server the connection speaks TLS already: no plain answer there.
    if protocol == Protocol::Http && c.ssl.is_null() {
        let answer = why.http_answer();
        // Small enough for any socket buffer; a client that does not read loses it.
        let _ = libc::send(
            c.fd,
            answer.as_ptr().cast(),
            answer.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
    match why {
        Refusal::Denied => NGX_STREAM_FORBIDDEN as ngx_int_t,
        _ => NGX_STREAM_SERVICE_UNAVAILABLE as ngx_int_t,
    }
}

/// The client's address, as limits see it: the connection's peer, which nginx's stream
/// realip module (`set_real_ip_from`) replaces with a trusted PROXY protocol header's.
unsafe fn client_ip(c: &ngx_connection_t) -> IpAddr {
    stream::sockaddr_ip(c.sockaddr.cast()).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
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
    // Behind a load balancer that sends the PROXY protocol, the client is in its header
    // (shown only: nothing is decided on it).
    let proxied = c.proxy_protocol.as_ref().and_then(|pp| {
        core::str::from_utf8(pp.src_addr.as_bytes())
            .ok()?
            .parse()
            .ok()
    });
    let client = proxied.unwrap_or_else(|| client_ip(c));
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
    if let Some(counters) = counters {
        counters.pair_closed(core::mem::take(&mut ctx.pair));
    }
    if ctx.done || conf.status.is_some() {
        return NGX_OK as ngx_int_t;
    }
    let c = &*(*s).connection;
    let what = match conf.mode {
        Mode::Tls => "ClientHello",
        Mode::Quic => "QUIC ClientHello",
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
