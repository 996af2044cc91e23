//! `edge_status`: a stream server that answers one HTTP/1.1 GET with the worker's view of the
//! route sources and the health of every server (`/` or `/status` as JSON, `/metrics` as
//! Prometheus text), then closes. It reads nothing but the request line and headers.

use core::ffi::{c_char, c_void};
use std::time::SystemTime;

use nginx_sys::{
    ngx_add_timer, ngx_command_t, ngx_conf_t, ngx_connection_t, ngx_event_t,
    ngx_stream_core_module, ngx_stream_core_srv_conf_t, ngx_stream_finalize_session,
    ngx_stream_session_t, NGX_LOG_INFO, NGX_STREAM_BAD_REQUEST, NGX_STREAM_INTERNAL_SERVER_ERROR,
    NGX_STREAM_OK,
};
use ngx::core::NGX_CONF_OK;
use ngx::ngx_log_error;

use crate::conf::SrvConf;
use crate::health::now_ms;
use crate::io::{self, Received, Sent};
use crate::report::{self, Clock, Request, SourceInfo, ZoneInfo};
use crate::session::{self, SessionCtx, StatusExchange};
use crate::{stream, worker};

/// Longest request head read.
const REQUEST_MAX: usize = 16 * 1024;
/// Time a client has to send its request, and then to take the answer.
const TIMEOUT_MS: usize = 10_000;

/// `edge_status;`
pub unsafe extern "C" fn set_edge_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let scf = &mut *conf.cast::<SrvConf>();
    if scf.status.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    scf.status = Some(handler);
    let cscf = core_srv_conf(cf);
    if cscf.handler.is_some() {
        return c"cannot be used with proxy_pass or return in the same server"
            .as_ptr()
            .cast_mut();
    }
    cscf.handler = Some(handler);
    NGX_CONF_OK
}

unsafe fn core_srv_conf<'a>(cf: *mut ngx_conf_t) -> &'a mut ngx_stream_core_srv_conf_t {
    stream::cf_srv_conf_of(cf, &*core::ptr::addr_of!(ngx_stream_core_module))
}

unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) {
    let c = &mut *(*s).connection;
    let ctx = match session::get(s) {
        Some(ctx) => ctx,
        None => match SessionCtx::attach(s) {
            Some(ctx) => ctx,
            None => return ngx_stream_finalize_session(s, NGX_STREAM_INTERNAL_SERVER_ERROR as _),
        },
    };
    let mut exchange = StatusExchange::default();
    // Bytes a preread handler may already have taken off the socket.
    if let Some(b) = c.buffer.as_mut() {
        let n = b.last.offset_from(b.pos) as usize;
        if n > 0 {
            exchange
                .request
                .extend_from_slice(core::slice::from_raw_parts(b.pos, n.min(REQUEST_MAX)));
            b.pos = b.last;
        }
    }
    ctx.status = Some(exchange);
    (*c.read).handler = Some(on_read);
    (*c.write).handler = Some(on_write);
    on_read(c.read);
}

/// The session and its exchange; `None` (the session is closed) if the handler never made one.
unsafe fn exchange<'a>(
    c: *mut ngx_connection_t,
) -> Option<(*mut ngx_stream_session_t, &'a mut StatusExchange)> {
    let s = (*c).data.cast::<ngx_stream_session_t>();
    match session::get(s).and_then(|ctx| ctx.status.as_mut()) {
        Some(ex) => Some((s, ex)),
        None => {
            ngx_stream_finalize_session(s, NGX_STREAM_INTERNAL_SERVER_ERROR as _);
            None
        }
    }
}

unsafe extern "C" fn on_read(rev: *mut ngx_event_t) {
    let c = (*rev).data.cast::<ngx_connection_t>();
    let Some((s, ex)) = exchange(c) else { return };
    if !ex.answer.is_empty() {
        // The answer is being written: bytes or a half-close after the request change
        // nothing. They are read and dropped, so that closing with them unread does not
        // reset the connection under the end of the answer.
        let mut sink = [0u8; 512];
        while let Received::Bytes(_) = io::recv(c, &mut sink) {}
        return;
    }
    if (*rev).timedout() != 0 {
        ngx_log_error!(NGX_LOG_INFO, (*c).log, "edge_status: client timed out");
        return ngx_stream_finalize_session(s, NGX_STREAM_OK as _);
    }
    loop {
        match report::parse_request(&ex.request) {
            Request::Get(path, html) => {
                let path = path.to_owned();
                return answer(c, &path, html);
            }
            Request::Bad(code) => {
                let (status, text) = if code == 405 {
                    ("405 Method Not Allowed", "only GET is answered\n")
                } else {
                    ("400 Bad Request", "not an HTTP request\n")
                };
                ex.answer = report::http_response(status, "text/plain", text);
                ex.status = NGX_STREAM_BAD_REQUEST as _;
                return on_write((*c).write);
            }
            Request::Incomplete if ex.request.len() >= REQUEST_MAX => {
                ex.answer = report::http_response(
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "request head too large\n",
                );
                ex.status = NGX_STREAM_BAD_REQUEST as _;
                return on_write((*c).write);
            }
            Request::Incomplete => {}
        }
        let mut chunk = [0u8; 1024];
        let room = (REQUEST_MAX - ex.request.len()).min(chunk.len());
        match io::recv(c, &mut chunk[..room]) {
            Received::Bytes(n) => ex.request.extend_from_slice(&chunk[..n]),
            Received::Again => {
                if (*rev).timer_set() == 0 {
                    ngx_add_timer(rev, TIMEOUT_MS as _);
                }
                return;
            }
            // Closed or reset before a whole request: nothing to answer.
            Received::Closed => return ngx_stream_finalize_session(s, NGX_STREAM_OK as _),
        }
    }
}

unsafe fn answer(c: *mut ngx_connection_t, path: &str, html: bool) {
    let Some((_, ex)) = exchange(c) else { return };
    let w = worker::get();
    let sources: Vec<SourceInfo> = w
        .map(|w| {
            w.main_conf()
                .sources
                .iter()
                .filter_map(|slot| {
                    let source = slot.source.as_ref()?;
                    Some(SourceInfo {
                        path: slot.path.to_str().unwrap_or("?"),
                        generation: source.generation(),
                        loaded_at: source.loaded_at(),
                        last_error: source.last_error(),
                        table: source.table(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let zone = w.and_then(|w| w.zone.as_ref()).map(|z| ZoneInfo {
        name: &z.name,
        capacity: z.capacity(),
        used: z.live(),
    });
    let clock = Clock {
        monotonic_ms: now_ms(),
        wall: SystemTime::now(),
    };
    let urls: Vec<serde_json::Value> = w
        .map(|w| {
            w.main_conf()
                .urls
                .iter()
                .map(|u| crate::feeds::read_status(u))
                .collect()
        })
        .unwrap_or_default();
    let traffic = w
        .and_then(|w| w.counters.as_ref())
        .map(|c| c.snapshot(report::routes_wanted(path)));
    ex.answer = report::respond(path, html, &sources, &urls, zone, traffic.as_ref(), clock);
    ex.status = NGX_STREAM_OK as _;
    on_write((*c).write);
}

unsafe extern "C" fn on_write(wev: *mut ngx_event_t) {
    let c = (*wev).data.cast::<ngx_connection_t>();
    let Some((s, ex)) = exchange(c) else { return };
    if (*wev).timedout() != 0 {
        ngx_log_error!(NGX_LOG_INFO, (*c).log, "edge_status: client timed out");
        return ngx_stream_finalize_session(s, NGX_STREAM_OK as _);
    }
    if ex.answer.is_empty() {
        return; // still reading the request
    }
    match io::send_rest(c, &ex.answer, &mut ex.sent) {
        Sent::All => ngx_stream_finalize_session(s, ex.status),
        Sent::Again => {
            if (*wev).timer_set() == 0 {
                ngx_add_timer(wev, TIMEOUT_MS as _);
            }
        }
        Sent::Failed => ngx_stream_finalize_session(s, NGX_STREAM_OK as _),
    }
}
