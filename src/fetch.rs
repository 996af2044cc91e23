//! One HTTP/1.1 GET on nginx's own connections, events and timers, for the URL sources: a
//! peer connection made by `ngx_event_connect_peer`, TLS by nginx's OpenSSL layer (verified
//! against `ca=`, by name or address, before a byte of the request is sent), a response head
//! and a body decoded as it arrives. Nothing here blocks: every step waits for its event.

use core::ffi::{c_char, c_int, c_void};
use core::ptr;
use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};

use nginx_sys::{
    ngx_add_timer, ngx_close_connection, ngx_conf_t, ngx_connection_t, ngx_create_pool,
    ngx_destroy_pool, ngx_event_connect_peer, ngx_event_get_peer, ngx_event_t,
    ngx_handle_read_event, ngx_handle_write_event, ngx_log_t, ngx_msec_t, ngx_peer_connection_t,
    ngx_pool_t, ngx_ssl_t, ngx_str_t, NGX_AGAIN, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};
use ngx::ngx_conf_log_error;

use crate::feed::http::{self, Body, Head};
use crate::feed::Options;

/// Bytes read from the socket per call.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes read per event: past this, the rest waits for the next turn of the event loop, so
/// that a fast server cannot keep a worker from its clients.
const READ_BUDGET: usize = 256 * 1024;

/// nginx's TLS context for one `https://` source: the server must present a certificate from
/// `ca=`; the client certificate is sent when configured.
pub struct Tls {
    ssl: *mut ngx_ssl_t,
}

/// A NUL-terminated copy of `text` in the configuration's pool, as nginx's TLS loaders want.
unsafe fn pool_str(cf: *mut ngx_conf_t, text: &str) -> Option<ngx_str_t> {
    let data = nginx_sys::ngx_pnalloc((*cf).pool, text.len() + 1).cast::<u8>();
    if data.is_null() {
        return None;
    }
    ptr::copy_nonoverlapping(text.as_ptr(), data, text.len());
    *data.add(text.len()) = 0;
    Some(ngx_str_t {
        len: text.len(),
        data,
    })
}

impl Tls {
    /// Made at configuration time; errors are logged against the directive.
    pub unsafe fn new(cf: *mut ngx_conf_t, options: &Options) -> Option<Tls> {
        let ssl = nginx_sys::ngx_pcalloc((*cf).pool, core::mem::size_of::<ngx_ssl_t>())
            .cast::<ngx_ssl_t>();
        if ssl.is_null() {
            return None;
        }
        (*ssl).log = (*cf).log;
        let protocols = (nginx_sys::NGX_SSL_TLSv1_2 | nginx_sys::NGX_SSL_TLSv1_3) as _;
        if nginx_sys::ngx_ssl_create(ssl, protocols, ptr::null_mut()) != NGX_OK as isize {
            return None;
        }
        let cln = nginx_sys::ngx_pool_cleanup_add((*cf).pool, 0);
        if cln.is_null() {
            return None;
        }
        (*cln).handler = Some(nginx_sys::ngx_ssl_cleanup_ctx);
        (*cln).data = ssl.cast();
        // nginx's callback lets every handshake finish; the result is checked after it.
        nginx_sys::SSL_CTX_set_verify((*ssl).ctx.cast(), nginx_sys::SSL_VERIFY_PEER as c_int, None);
        let Some(mut ca) = options.ca.as_deref().and_then(|ca| pool_str(cf, ca)) else {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "edge_routes_url: an https:// URL needs ca="
            );
            return None;
        };
        if nginx_sys::ngx_ssl_trusted_certificate(cf, ssl, &mut ca, 8) != NGX_OK as isize {
            return None;
        }
        if let (Some(cert), Some(key)) = (&options.certificate, &options.certificate_key) {
            let (Some(mut cert), Some(mut key)) = (pool_str(cf, cert), pool_str(cf, key)) else {
                return None;
            };
            if nginx_sys::ngx_ssl_certificate(cf, ssl, &mut cert, &mut key, ptr::null_mut())
                != NGX_OK as isize
            {
                return None;
            }
        }
        Some(Tls { ssl })
    }
}

/// Where an exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Handshaking,
    Sending,
    Reading,
    Done,
}

/// Called when an exchange has news (a head, body bytes, its end); `data` is the owner's.
/// The owner may drop the exchange from it.
pub type Notify = unsafe fn(*mut c_void);

/// One request and its response.
pub struct Exchange {
    pc: ngx_peer_connection_t,
    log: ngx_log_t,
    pool: *mut ngx_pool_t,
    sockaddr: libc::sockaddr_in6,
    peer_name: ngx_str_t,
    peer_text: String,
    tls: *mut ngx_ssl_t,
    /// The name to send as SNI and verify, when the URL has one.
    server_name: Option<CString>,
    server_ip: IpAddr,
    request: Vec<u8>,
    sent: usize,
    stage: Stage,
    head_buf: Vec<u8>,
    head: Option<Head>,
    body: Option<Body>,
    /// Body bytes decoded and not yet taken by the owner.
    decoded: Vec<u8>,
    /// After the head: the longest silence allowed (a watch), else the deadline stands.
    idle_ms: Option<ngx_msec_t>,
    /// Decoded bytes the owner has not taken that end the exchange (an answer too large).
    max_pending: usize,
    too_large: bool,
    outcome: Option<Result<(), String>>,
    /// The request asked to keep the connection, and the answer ended without closing it:
    /// the connection waits, open, for the next request (see `reuse`).
    keep_alive: bool,
    kept: bool,
    /// The answer's head said the server closes the connection after it (the head itself
    /// is taken by the owner as soon as it comes).
    closes: bool,
    /// A request on a connection kept from an earlier one.
    reused: bool,
    notify: Notify,
    owner: *mut c_void,
}

impl Exchange {
    /// Connects and sends `request`; news comes through `notify`, except for what happens
    /// in here (the owner looks at the exchange when it returns). `deadline_ms` bounds the
    /// whole exchange up to the head, and the body too unless `idle_ms` is given; more than
    /// `max_pending` decoded bytes not taken ends it (`too_large`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn start(
        addr: SocketAddr,
        tls: Option<&Tls>,
        server_name: Option<&str>,
        request: Vec<u8>,
        keep_alive: bool,
        deadline_ms: ngx_msec_t,
        idle_ms: Option<ngx_msec_t>,
        max_pending: usize,
        log: *mut ngx_log_t,
        notify: Notify,
        owner: *mut c_void,
    ) -> Result<Box<Exchange>, String> {
        let (sockaddr, socklen) = crate::upstream::socket_address(addr);
        let mut ex = Box::new(Exchange {
            pc: core::mem::zeroed(),
            log: *log,
            pool: ptr::null_mut(),
            sockaddr,
            peer_name: ngx_str_t {
                len: 0,
                data: ptr::null_mut(),
            },
            peer_text: addr.to_string(),
            tls: tls.map_or(ptr::null_mut(), |t| t.ssl),
            server_name: server_name.and_then(|n| CString::new(n).ok()),
            server_ip: addr.ip(),
            request,
            sent: 0,
            stage: Stage::Connecting,
            head_buf: Vec::new(),
            head: None,
            body: None,
            decoded: Vec::new(),
            idle_ms,
            max_pending,
            too_large: false,
            outcome: None,
            keep_alive,
            kept: false,
            closes: true,
            reused: false,
            notify,
            owner,
        });
        ex.peer_name = ngx_str_t {
            len: ex.peer_text.len(),
            data: ex.peer_text.as_ptr().cast_mut(),
        };
        ex.pool = ngx_create_pool(4096, log);
        if ex.pool.is_null() {
            return Err("no memory for a connection".into());
        }
        ex.pc.sockaddr = ptr::from_mut(&mut ex.sockaddr).cast();
        ex.pc.socklen = socklen;
        ex.pc.name = &mut ex.peer_name;
        ex.pc.get = Some(ngx_event_get_peer);
        ex.pc.log = &mut ex.log;
        ex.pc
            .set_log_error(nginx_sys::ngx_connection_log_error_e_NGX_ERROR_INFO);
        let rc = ngx_event_connect_peer(&mut ex.pc);
        if rc == NGX_ERROR as isize
            || rc == nginx_sys::NGX_BUSY as isize
            || rc == nginx_sys::NGX_DECLINED as isize
        {
            let why = std::io::Error::last_os_error();
            ex.close();
            return Err(format!("cannot connect to {} ({why})", ex.peer_text));
        }
        let c = ex.pc.connection;
        (*c).pool = ex.pool;
        (*c).data = ptr::from_mut(&mut *ex).cast();
        (*(*c).read).handler = Some(on_io);
        (*(*c).write).handler = Some(on_io);
        // A worker shutting down does not wait for a watch: its timers are cancelable, and
        // the owner drops the exchange (closing it) when the worker exits.
        (*(*c).read).set_cancelable(1);
        (*(*c).write).set_cancelable(1);
        ngx_add_timer((*c).read, deadline_ms);
        if rc == NGX_OK as isize {
            // Connected at once: the exchange may even be over when this returns, and no
            // event will say so; the owner looks at it (an outcome taken here was lost).
            ex.connected();
        }
        // Otherwise the write event says when the connection is made.
        Ok(ex)
    }

    /// The response head, once it has come (taken once).
    pub fn take_head(&mut self) -> Option<Head> {
        self.head.take()
    }

    /// Body bytes decoded since the last call.
    pub fn body(&mut self) -> &mut Vec<u8> {
        &mut self.decoded
    }

    /// The end of the exchange: `Ok` once the whole body is in.
    pub fn outcome(&self) -> Option<&Result<(), String>> {
        self.outcome.as_ref()
    }

    /// Whether it ended because the answer was larger than it may be.
    pub fn too_large(&self) -> bool {
        self.too_large
    }

    /// Whether it was made on a connection kept from an earlier exchange (which the server
    /// may have closed just before it was used).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The address it talks to.
    pub fn peer(&self) -> IpAddr {
        self.server_ip
    }

    /// Whether it ended well and kept its connection for another request.
    pub fn kept(&self) -> bool {
        self.kept
    }

    /// Makes another request on the connection of this exchange, which ended well and kept
    /// it: `false` (and the connection closed) when it cannot (not kept, or the server closed
    /// it or sent something meanwhile).
    pub unsafe fn reuse(
        &mut self,
        request: Vec<u8>,
        keep_alive: bool,
        deadline_ms: ngx_msec_t,
        idle_ms: Option<ngx_msec_t>,
        max_pending: usize,
    ) -> bool {
        let c = self.pc.connection;
        if !self.kept || c.is_null() || !quiet((*c).fd) {
            self.close();
            return false;
        }
        self.request = request;
        self.sent = 0;
        self.head_buf.clear();
        self.head = None;
        self.body = None;
        self.decoded.clear();
        self.idle_ms = idle_ms;
        self.max_pending = max_pending;
        self.too_large = false;
        self.outcome = None;
        self.keep_alive = keep_alive;
        self.kept = false;
        self.closes = true;
        self.reused = true;
        self.stage = Stage::Sending;
        ngx_add_timer((*c).read, deadline_ms);
        self.send();
        true
    }

    unsafe fn connection(&self) -> *mut ngx_connection_t {
        self.pc.connection
    }

    /// Ends the exchange: closes the connection and records why.
    unsafe fn finish(&mut self, outcome: Result<(), String>) {
        self.close();
        self.stage = Stage::Done;
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }

    /// Ends the exchange well and keeps its connection for the next request: no timer, and
    /// its events are ignored until then (`reuse` looks at the socket first).
    unsafe fn keep(&mut self) {
        let c = self.pc.connection;
        if (*(*c).read).timer_set() != 0 {
            nginx_sys::ngx_del_timer((*c).read);
        }
        self.kept = true;
        self.stage = Stage::Done;
        if self.outcome.is_none() {
            self.outcome = Some(Ok(()));
        }
    }

    unsafe fn close(&mut self) {
        self.kept = false;
        let c = self.pc.connection;
        if !c.is_null() {
            self.pc.connection = ptr::null_mut();
            if !(*c).ssl.is_null() {
                (*(*c).ssl).set_no_wait_shutdown(1);
                nginx_sys::ngx_ssl_shutdown(c);
            }
            ngx_close_connection(c);
        }
        if !self.pool.is_null() {
            ngx_destroy_pool(self.pool);
            self.pool = ptr::null_mut();
        }
    }

    /// The TCP connection is up (or failed: the socket says).
    unsafe fn connected(&mut self) {
        let c = self.connection();
        let mut err: c_int = 0;
        let mut len = core::mem::size_of::<c_int>() as libc::socklen_t;
        if libc::getsockopt(
            (*c).fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            ptr::from_mut(&mut err).cast(),
            &mut len,
        ) == -1
        {
            err = *libc::__errno_location();
        }
        if err != 0 {
            let why = std::io::Error::from_raw_os_error(err);
            return self.finish(Err(format!("cannot connect to {} ({why})", self.peer_text)));
        }
        if self.tls.is_null() {
            self.stage = Stage::Sending;
            return self.send();
        }
        self.handshake();
    }

    unsafe fn handshake(&mut self) {
        let c = self.connection();
        self.stage = Stage::Handshaking;
        let flags = (nginx_sys::NGX_SSL_BUFFER | nginx_sys::NGX_SSL_CLIENT) as usize;
        if nginx_sys::ngx_ssl_create_connection(self.tls, c, flags) != NGX_OK as isize {
            return self.finish(Err("cannot make a TLS connection".into()));
        }
        let ssl = (*(*c).ssl).connection;
        let param = nginx_sys::SSL_get0_param(ssl);
        let pinned = match (&self.server_name, self.server_ip) {
            (Some(name), _) => {
                nginx_sys::SSL_ctrl(
                    ssl,
                    nginx_sys::SSL_CTRL_SET_TLSEXT_HOSTNAME as c_int,
                    0,
                    name.as_ptr().cast_mut().cast(),
                );
                nginx_sys::X509_VERIFY_PARAM_set1_host(param, name.as_ptr(), name.as_bytes().len())
            }
            (None, IpAddr::V4(ip)) => {
                nginx_sys::X509_VERIFY_PARAM_set1_ip(param, ip.octets().as_ptr(), 4)
            }
            (None, IpAddr::V6(ip)) => {
                nginx_sys::X509_VERIFY_PARAM_set1_ip(param, ip.octets().as_ptr(), 16)
            }
        };
        if pinned != 1 {
            return self.finish(Err("cannot set the name to verify".into()));
        }
        let rc = nginx_sys::ngx_ssl_handshake(c);
        if rc == NGX_AGAIN as isize {
            (*(*c).ssl).handler = Some(on_handshake);
            return;
        }
        self.handshaken();
    }

    /// The handshake ended: go on only with a verified server.
    unsafe fn handshaken(&mut self) {
        let c = self.connection();
        if (*(*c).read).timedout() != 0 {
            return self.finish(Err(format!(
                "timed out in the TLS handshake with {}",
                self.peer_text
            )));
        }
        if (*c).ssl.is_null() || (*(*c).ssl).handshaked() == 0 {
            return self.finish(Err(format!("TLS handshake with {} failed", self.peer_text)));
        }
        let ssl = (*(*c).ssl).connection;
        let verified = nginx_sys::SSL_get_verify_result(ssl);
        if verified != nginx_sys::X509_V_OK as libc::c_long {
            let text = nginx_sys::X509_verify_cert_error_string(verified);
            let why = if text.is_null() {
                format!("error {verified}")
            } else {
                core::ffi::CStr::from_ptr(text as *const c_char)
                    .to_string_lossy()
                    .into_owned()
            };
            return self.finish(Err(format!(
                "the certificate of {} is not trusted by ca= ({why}); nothing was sent",
                self.peer_text
            )));
        }
        (*(*c).read).handler = Some(on_io);
        (*(*c).write).handler = Some(on_io);
        self.stage = Stage::Sending;
        self.send();
    }

    unsafe fn send(&mut self) {
        let c = self.connection();
        while self.sent < self.request.len() {
            let rest = &self.request[self.sent..];
            let Some(send) = (*c).send else {
                return self.finish(Err("a connection without a send function".into()));
            };
            let n = send(c, rest.as_ptr().cast_mut(), rest.len());
            if n == NGX_AGAIN as isize {
                if ngx_handle_write_event((*c).write, 0) != NGX_OK as isize {
                    return self.finish(Err("cannot wait to write".into()));
                }
                return;
            }
            if n <= 0 {
                return self.finish(Err(format!(
                    "the request to {} could not be sent",
                    self.peer_text
                )));
            }
            self.sent += n as usize;
        }
        // Everything is sent: wipe the request (it may hold the token).
        self.request.fill(0);
        self.stage = Stage::Reading;
        self.read();
    }

    unsafe fn read(&mut self) {
        let c = self.connection();
        let mut buf = [0u8; READ_CHUNK];
        let mut taken = 0;
        loop {
            if taken >= READ_BUDGET {
                // The rest at the next turn of the loop, after the other connections' events.
                nginx_sys::ngx_post_event(
                    (*c).read,
                    ptr::addr_of_mut!(nginx_sys::ngx_posted_next_events),
                );
                return;
            }
            let Some(recv) = (*c).recv else {
                return self.finish(Err("a connection without a recv function".into()));
            };
            let n = recv(c, buf.as_mut_ptr(), buf.len());
            if n == NGX_AGAIN as isize {
                if ngx_handle_read_event((*c).read, 0) != NGX_OK as isize {
                    return self.finish(Err("cannot wait to read".into()));
                }
                return;
            }
            if n == NGX_ERROR as isize {
                return self.finish(Err(format!("reading from {} failed", self.peer_text)));
            }
            if n == 0 {
                let ended = match (&self.head, &mut self.body) {
                    (_, Some(body)) => body.closed(),
                    _ => false,
                };
                return self.finish(if ended {
                    Ok(())
                } else if self.body.is_none() {
                    Err(format!(
                        "{} closed the connection without an answer",
                        self.peer_text
                    ))
                } else {
                    Err(format!(
                        "{} closed the connection in the middle of the body",
                        self.peer_text
                    ))
                });
            }
            taken += n as usize;
            if let Err(e) = self.received(&buf[..n as usize]) {
                return self.finish(Err(e));
            }
            let announced = match self.head.as_ref().map(|h| h.framing) {
                Some(http::Framing::Length(n)) => n,
                _ => 0,
            };
            if self.decoded.len() > self.max_pending || announced > self.max_pending as u64 {
                self.too_large = true;
                return self.finish(Err(format!(
                    "an answer larger than {} MiB",
                    self.max_pending >> 20
                )));
            }
            if self.body.as_ref().is_some_and(Body::is_done) {
                if self.keep_alive && !self.closes {
                    return self.keep();
                }
                return self.finish(Ok(()));
            }
            if let (Some(idle), true) = (self.idle_ms, self.body.is_some()) {
                ngx_add_timer((*c).read, idle);
            }
        }
    }

    fn received(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.body.is_none() {
            self.head_buf.extend_from_slice(bytes);
            let Some((head, len)) = http::parse_head(&self.head_buf)? else {
                return Ok(());
            };
            let rest = std::mem::take(&mut self.head_buf);
            let mut body = Body::new(head.framing);
            self.closes = head.close;
            self.head = Some(head);
            let decoded = &mut self.decoded;
            let fed = body.feed(&rest[len..], &mut |b| decoded.extend_from_slice(b));
            self.body = Some(body);
            return fed;
        }
        let decoded = &mut self.decoded;
        match self.body.as_mut() {
            Some(body) => body.feed(bytes, &mut |b| decoded.extend_from_slice(b)),
            None => Ok(()),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // SAFETY: closes what `start` opened, once.
        unsafe { self.close() };
    }
}

/// Whether a kept connection's socket is still open with nothing to read: a server that
/// closed it, or sent anything unasked, makes it useless.
unsafe fn quiet(fd: c_int) -> bool {
    let mut byte = 0u8;
    let n = libc::recv(
        fd,
        ptr::from_mut(&mut byte).cast(),
        1,
        libc::MSG_PEEK | libc::MSG_DONTWAIT,
    );
    n < 0 && *libc::__errno_location() == libc::EAGAIN
}

/// Read and write events of an exchange's connection.
unsafe extern "C" fn on_io(ev: *mut ngx_event_t) {
    let c = (*ev).data.cast::<ngx_connection_t>();
    let ex = &mut *(*c).data.cast::<Exchange>();
    if (*ev).timedout() != 0 {
        let what = match ex.stage {
            Stage::Connecting => "connecting to",
            Stage::Reading if ex.idle_ms.is_some() && ex.body.is_some() => "silence from",
            _ => "waiting for",
        };
        let msg = format!("timed out {what} {}", ex.peer_text);
        ex.finish(Err(msg));
    } else {
        match ex.stage {
            Stage::Connecting => ex.connected(),
            Stage::Sending => ex.send(),
            Stage::Reading => ex.read(),
            Stage::Handshaking | Stage::Done => {}
        }
    }
    let (notify, owner) = (ex.notify, ex.owner);
    // The owner may drop the exchange: nothing of it is touched after this.
    notify(owner);
}

/// The end of a TLS handshake that had to wait.
unsafe extern "C" fn on_handshake(c: *mut ngx_connection_t) {
    let ex = &mut *(*c).data.cast::<Exchange>();
    ex.handshaken();
    let (notify, owner) = (ex.notify, ex.owner);
    notify(owner);
}
