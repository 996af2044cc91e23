//! `edge_route quic`: QUIC on a UDP listener, routed by the SNI of the client's first flight.
//!
//! nginx hands a UDP session's first datagram to the phases in a buffer of exactly its size,
//! and its preread phase cannot wait for another datagram (it reads into that full buffer, or
//! peeks at the listening socket that every client shares). So this module reads QUIC in the
//! pre-access phase instead, where a handler may suspend the session: the first datagram is
//! `c->buffer`; each later one, which nginx hands to the connection's read handler, is copied
//! into the session's pool until `sniff::quic::Initials` has the whole ClientHello. The session
//! is then routed as TLS would be (`preread::decide`), and the phases go on. A stream filter
//! sends the datagrams held meanwhile to the upstream right after the first one, in order, each
//! as a datagram of its own; from there on nginx's UDP proxy forwards each datagram as it comes.

use core::ptr;

use nginx_sys::{
    ngx_chain_t, ngx_connection_t, ngx_del_timer, ngx_event_t, ngx_int_t, ngx_stream_session_t,
    ngx_uint_t, NGX_AGAIN, NGX_DECLINED, NGX_ERROR, NGX_LOG_INFO, NGX_LOG_WARN,
};
use ngx::ngx_log_error;

use crate::conf::{Mode, SrvConf};
use crate::preread;
use crate::session::{self, KeptName, QuicWait, SessionCtx, QUIC_WAITING};
use crate::sniff::quic::{Initials, Reject};
use crate::sniff::{Peek, Protocol};
use crate::traffic::Nameless;
use crate::{stream, worker};

/// How long a session waits for the rest of its first flight, at most (`preread_timeout` if
/// shorter).
pub const WAIT_MS: nginx_sys::ngx_msec_t = 3000;
/// Sessions a worker lets wait at once; past that, a first datagram without the whole hello
/// is dropped.
pub const MAX_WAITING: usize = 1024;

/// Pre-access phase handler of `edge_route quic` servers.
pub unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    let conf = stream::srv_conf::<SrvConf>(s);
    if conf.mode != Mode::Quic {
        return NGX_DECLINED as ngx_int_t;
    }
    let c = &mut *(*s).connection;
    if c.type_ != libc::SOCK_DGRAM {
        ngx_log_error!(
            NGX_LOG_WARN,
            c.log,
            "edge: \"edge_route quic\" on a TCP listener: it needs \"listen ... udp\", closing"
        );
        return NGX_ERROR as ngx_int_t;
    }
    let ctx = match session::get_or_attach(s) {
        Some(ctx) if ctx.done => return NGX_DECLINED as ngx_int_t,
        Some(ctx) => ctx,
        None => return NGX_ERROR as ngx_int_t,
    };
    if ctx.quic.is_none() {
        let mut wait = Box::new(QuicWait::new());
        if let Some(b) = c.buffer.as_ref() {
            wait.push(core::slice::from_raw_parts(
                b.pos,
                b.last.offset_from(b.pos) as usize,
            ));
        }
        ctx.quic = Some(wait);
    }
    let wait = ctx.quic.as_mut().expect("made above");
    if wait.outcome.is_none() && !wait.overflow && (*c.read).timedout() == 0 {
        if !wait.waiting && QUIC_WAITING.get() >= MAX_WAITING {
            return dropped(
                c,
                ctx,
                "too many QUIC clients waiting for the rest of their first flight",
                Nameless::TooLarge,
            );
        }
        wait.set_waiting(true);
        // Wait for the next datagram. A client sends its first flight back to back, and sends
        // it again after about a second when a datagram was lost.
        (*c.read).handler = Some(read_handler);
        if (*c.read).timer_set() == 0 {
            // Cancelable: a waiting session does not hold a worker that is shutting down.
            (*c.read).set_cancelable(1);
            nginx_sys::ngx_add_timer(c.read, stream::preread_timeout(s).min(WAIT_MS));
        }
        return NGX_AGAIN as ngx_int_t;
    }
    wait.set_waiting(false);
    if (*c.read).timer_set() != 0 {
        ngx_del_timer(c.read);
    }
    (*c.read).set_cancelable(0);
    (*c.read).handler = Some(nginx_sys::ngx_stream_session_handler);
    if (*c.read).timedout() != 0 {
        // As nginx does for a TCP client that sends no whole hello: closed; the log phase
        // says why.
        return nginx_sys::NGX_STREAM_OK as ngx_int_t;
    }
    // What cannot start a QUIC connection is dropped, as a QUIC server drops it (RFC 9000
    // §5.2.2): sent to a default route, anyone could flood its cluster through the edge with
    // datagrams that cost nothing to send. An unknown version goes on without a name: the
    // server answers it with a Version Negotiation packet.
    let rejected = match wait.outcome {
        Some(Ok(())) => match wait.initials.client_hello() {
            Peek::Done(hello) => {
                if let Some(name) = &hello.server_name {
                    let Some(kept) = KeptName::keep(c.pool, name) else {
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
            Peek::NeedMore => {
                return dropped(c, ctx, "incomplete QUIC ClientHello", Nameless::Unreadable)
            }
            Peek::Invalid(r) => return dropped(c, ctx, r.as_str(), Nameless::Unreadable),
        },
        Some(Err(r @ Reject::UnknownVersion(_))) => Some((r.as_str(), Nameless::Unreadable)),
        Some(Err(r)) => return dropped(c, ctx, r.as_str(), Nameless::Unreadable),
        None => {
            return dropped(
                c,
                ctx,
                "QUIC ClientHello spread over more datagrams than a session holds",
                Nameless::TooLarge,
            )
        }
    };
    ctx.quic_flight = true;
    let rc = preread::decide(s, conf, c, ctx, Protocol::Tls, rejected);
    // The name and ALPN are in the pool now: the reader's buffers go (the held datagrams
    // stay until the filter sent them).
    if let Some(wait) = ctx.quic.as_mut() {
        wait.initials = Initials::new();
    }
    rc
}

/// Ends a session whose datagrams cannot start a QUIC connection: counted, logged at `info`
/// with the client address, and closed (the access log says 400).
unsafe fn dropped(
    c: &ngx_connection_t,
    ctx: &mut SessionCtx,
    reason: &str,
    why: Nameless,
) -> ngx_int_t {
    ctx.done = true;
    if let Some(counters) = worker::get().and_then(|w| w.counters.as_ref()) {
        counters.nameless(why);
    }
    ngx_log_error!(NGX_LOG_INFO, c.log, "edge: {}, dropped", reason);
    nginx_sys::NGX_STREAM_BAD_REQUEST as ngx_int_t
}

/// The connection's read handler while the session waits: nginx calls it with each datagram
/// of this client (`c->udp->buffer`), and when preread_timeout passes.
unsafe extern "C" fn read_handler(ev: *mut ngx_event_t) {
    let c = (*ev).data.cast::<ngx_connection_t>();
    let s = (*c).data.cast::<ngx_stream_session_t>();
    let Some(ctx) = session::get(s) else {
        return;
    };
    let Some(wait) = ctx.quic.as_mut() else {
        return;
    };
    if (*c).close() != 0 || nginx_sys::ngx_exiting != 0 {
        // worker_shutdown_timeout, or a worker leaving: the session ends here.
        wait.set_waiting(false);
        nginx_sys::ngx_stream_finalize_session(s, nginx_sys::NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    if (*ev).timedout() == 0 {
        // nginx hands the datagram over through the connection's recv (`ngx_udp_shared_recv`,
        // whose buffer is not part of nginx's public headers); its buffer is reused for the
        // next datagram, so the session keeps a copy.
        let Some(recv) = (*c).recv else {
            return;
        };
        let room = &mut *ptr::addr_of_mut!(RECV);
        let n = recv(c, room.as_mut_ptr(), room.len());
        if n <= 0 {
            return;
        }
        let datagram = &room[..n as usize];
        if !wait.has_room(datagram.len()) {
            wait.overflow = true;
        } else {
            let copy = nginx_sys::ngx_pnalloc((*c).pool, datagram.len().max(1)).cast::<u8>();
            if copy.is_null() {
                nginx_sys::ngx_stream_finalize_session(
                    s,
                    nginx_sys::NGX_STREAM_INTERNAL_SERVER_ERROR as ngx_uint_t,
                );
                return;
            }
            ptr::copy_nonoverlapping(datagram.as_ptr(), copy, datagram.len());
            wait.hold(copy, datagram);
        }
        if wait.outcome.is_none() && !wait.overflow {
            return;
        }
    }
    // Decided (or timed out): the phases go on from the handler above.
    nginx_sys::ngx_stream_core_run_phases(s);
}

/// Where a waiting session's next datagram is read (the largest UDP payload).
static mut RECV: [u8; 65536] = [0; 65536];

/// At configuration time: with several workers, a stream UDP listener without `reuseport`
/// lets the kernel hand one client's datagrams to different workers. Said once per such
/// listener when some server has `edge_route quic` (which servers listen where is not in
/// nginx's public structures the same way in every version, so every such listener is named).
pub unsafe fn check_listeners(cycle: *mut nginx_sys::ngx_cycle_t) {
    let Some(mcf) = stream::cycle_main_conf::<crate::conf::MainConf>(cycle) else {
        return;
    };
    let workers = stream::worker_processes_of(cycle);
    if !mcf.quic || workers <= 1 {
        return;
    }
    let listening = &(*cycle).listening;
    let all = core::slice::from_raw_parts(
        listening.elts.cast::<nginx_sys::ngx_listening_t>(),
        listening.nelts,
    );
    for ls in all {
        // A stream listener (not an HTTP/3 one of the http module): by its handler.
        let stream = ls.handler.map(|h| h as *const () as usize)
            == Some(nginx_sys::ngx_stream_init_connection as *const () as usize);
        if ls.type_ != libc::SOCK_DGRAM || ls.reuseport() != 0 || !stream {
            continue;
        }
        ngx_log_error!(
            NGX_LOG_WARN,
            (*cycle).log,
            "edge_route quic: the udp listener on {} has no \"reuseport\" and there are {} workers: a QUIC client's datagrams may reach several workers there, and its connection fail; add \"reuseport\" to its listen directive",
            String::from_utf8_lossy(ls.addr_text.as_bytes()),
            workers
        );
    }
}

static mut NEXT_FILTER: nginx_sys::ngx_stream_filter_pt = None;

/// Puts the module's filter on top of the stream filters (once, in postconfiguration).
pub unsafe fn install_filter() {
    NEXT_FILTER = nginx_sys::ngx_stream_top_filter;
    nginx_sys::ngx_stream_top_filter = Some(filter);
}

/// The first chain to the upstream of a QUIC session gets the datagrams held while its
/// ClientHello was read, right after the first datagram (which the proxy sends from the
/// preread buffer), each one flushed: a datagram of its own.
unsafe extern "C" fn filter(
    s: *mut ngx_stream_session_t,
    chain: *mut ngx_chain_t,
    from_upstream: ngx_uint_t,
) -> ngx_int_t {
    let next = NEXT_FILTER.expect("installed over a filter");
    if from_upstream != 0 {
        return next(s, chain, from_upstream);
    }
    let Some(wait) = session::get(s).and_then(|ctx| ctx.quic.as_mut()) else {
        return next(s, chain, from_upstream);
    };
    if wait.sent || wait.held.is_empty() {
        return next(s, chain, from_upstream);
    }
    wait.sent = true;
    let c = &*(*s).connection;
    // Right after the link of the preread buffer (the first datagram), which a PROXY protocol
    // header may precede; first when the chain has no such link. The proxy's own links are
    // left as they are: the chain handed on is made of new links up to that point.
    let mut preread_at = None;
    let mut cl = chain;
    let mut i = 0;
    while !cl.is_null() && !c.buffer.is_null() {
        if !(*cl).buf.is_null() && (*(*cl).buf).start == (*c.buffer).start {
            preread_at = Some(i);
            break;
        }
        cl = (*cl).next;
        i += 1;
    }
    let mut head: *mut ngx_chain_t = ptr::null_mut();
    let mut tail: *mut *mut ngx_chain_t = &mut head;
    let mut rest = chain;
    if let Some(upto) = preread_at {
        for _ in 0..=upto {
            let link = nginx_sys::ngx_alloc_chain_link(c.pool);
            if link.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            (*link).buf = (*rest).buf;
            (*link).next = ptr::null_mut();
            *tail = link;
            tail = &mut (*link).next;
            rest = (*rest).next;
        }
    }
    for &(data, len) in &wait.held {
        let link = nginx_sys::ngx_alloc_chain_link(c.pool);
        let b = nginx_sys::ngx_pcalloc(c.pool, core::mem::size_of::<nginx_sys::ngx_buf_t>())
            .cast::<nginx_sys::ngx_buf_t>();
        if link.is_null() || b.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*b).start = data;
        (*b).pos = data;
        (*b).last = data.add(len);
        (*b).end = data.add(len);
        (*b).set_temporary(1);
        (*b).set_flush(1);
        (*b).tag = ptr::addr_of!(crate::ngx_stream_edge_module) as nginx_sys::ngx_buf_tag_t;
        (*link).buf = b;
        (*link).next = ptr::null_mut();
        *tail = link;
        tail = &mut (*link).next;
    }
    *tail = rest;
    // The proxy counts what it read itself; these it did not.
    (*s).received += wait.held_bytes() as i64;
    next(s, head, from_upstream)
}
