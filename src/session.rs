//! What the module keeps per session, in the connection's pool: read by the preread handler,
//! the variables, the balancer and `edge_status`.

use std::rc::Rc;

use nginx_sys::{ngx_str_t, ngx_stream_session_t, ngx_uint_t};

use crate::routes::table::{RouteTable, Upstream};
use crate::sniff::quic::{Initials, Reject};
use crate::sniff::{Host, Peek, Protocol};
use crate::stream;
use crate::upstream::ServerDef;

/// What the module learnt about a session. Lives in the connection's pool; holds its route
/// table so that a table swapped in mid-session cannot pull anything from under it.
pub struct SessionCtx {
    pub protocol: Option<Protocol>,
    /// The name read from the client, lower-cased, in the connection's pool.
    pub name: KeptName,
    /// The client's ALPN protocols, in the connection's pool: as the wire lists them
    /// (length-prefixed) while `alpn_wire`, comma-separated once `$edge_alpn` was read.
    pub alpn: ngx_str_t,
    pub alpn_wire: bool,
    pub route: Option<RouteKind>,
    /// Points into `table`, which this context keeps alive.
    pub upstream: *const Upstream,
    pub table: Option<Rc<RouteTable>>,
    /// The name was read (or the attempt given up): the preread handler is done.
    pub done: bool,
    /// Reassembly space for a ClientHello split over records; empty (no allocation) otherwise.
    pub scratch: Vec<u8>,
    /// The request and answer of an `edge_status` server.
    pub status: Option<StatusExchange>,
    /// The server the balancer chose last.
    pub server: Option<ServerDef>,
    /// With `edge_drain_timeout`: its place in the worker's list of proxied sessions (1-based,
    /// 0 when not listed), the table source it was routed by, and the timer that closes it
    /// once its server or route went away.
    pub drain_index: usize,
    pub drain_source: *const core::ffi::c_void,
    pub drain: Option<Box<nginx_sys::ngx_event_t>>,
    /// The route's counters this session holds (see `counters`), under its protocol.
    pub counted: Option<(crate::traffic::Pin, usize)>,
    /// The (route, client) pair counted for the route's `max_conns_per_client` (0: none).
    pub pair: u64,
    /// The balancer had no server to give: none listed, or none with the listener's port.
    pub no_server: bool,
    /// `edge_route quic`: the client's first flight while it is read (see `quic`).
    pub quic: Option<Box<QuicWait>>,
    /// The session was routed by a QUIC first flight (`$edge_protocol` says `quic`).
    pub quic_flight: bool,
}

/// Datagrams held before the ClientHello is whole, the first one included. Browsers need two.
pub const MAX_DATAGRAMS: usize = 8;
/// Bytes held in the datagrams after the first.
pub const MAX_HELD_BYTES: usize = 16 * 1024;

/// A QUIC session waiting for the rest of its first flight.
pub struct QuicWait {
    pub initials: Initials,
    /// The reader's last word: `None` while it needs more.
    pub outcome: Option<Result<(), Reject>>,
    /// The datagrams after the first, copied into the connection's pool.
    pub held: Vec<(*mut u8, usize)>,
    held_bytes: usize,
    /// The filter handed `held` to the upstream.
    pub sent: bool,
    /// More datagrams came than `MAX_DATAGRAMS` or `MAX_HELD_BYTES` allow before the hello.
    pub overflow: bool,
    /// Counted among the worker's waiting sessions (see `quic::WAITING`).
    pub waiting: bool,
}

thread_local! {
    /// The worker's QUIC sessions waiting for the rest of a first flight.
    pub static QUIC_WAITING: core::cell::Cell<usize> = const { core::cell::Cell::new(0) };
}

impl QuicWait {
    /// Counts the session among the waiting ones, or not.
    pub fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.waiting {
            self.waiting = waiting;
            QUIC_WAITING.set(if waiting {
                QUIC_WAITING.get() + 1
            } else {
                QUIC_WAITING.get().saturating_sub(1)
            });
        }
    }
}

impl Drop for QuicWait {
    fn drop(&mut self) {
        // A session closed while it waited (a shutdown, a pool freed).
        self.set_waiting(false);
    }
}

impl QuicWait {
    pub fn new() -> QuicWait {
        QuicWait {
            initials: Initials::new(),
            outcome: None,
            held: Vec::new(),
            held_bytes: 0,
            sent: false,
            overflow: false,
            waiting: false,
        }
    }

    pub fn push(&mut self, datagram: &[u8]) {
        self.outcome = match self.initials.push(datagram) {
            Peek::NeedMore => None,
            Peek::Done(()) => Some(Ok(())),
            Peek::Invalid(e) => Some(Err(e)),
        };
    }

    /// Whether a datagram of `len` bytes may still be held.
    pub fn has_room(&self, len: usize) -> bool {
        self.held.len() + 1 < MAX_DATAGRAMS && self.held_bytes + len <= MAX_HELD_BYTES
    }

    /// Holds `datagram`, copied at `copy` (in the connection's pool), and reads it.
    pub fn hold(&mut self, copy: *mut u8, datagram: &[u8]) {
        self.held.push((copy, datagram.len()));
        self.held_bytes += datagram.len();
        self.push(datagram);
    }

    /// The bytes of the datagrams after the first (for the counters).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }
}

/// Which route matched; keys point into the session's table.
#[derive(Clone, Copy)]
pub enum RouteKind {
    Exact(*const str),
    Wildcard(*const str),
    Default,
}

/// Room for the balancer's per-session state, allocated with the context: the context is
/// larger than a pool block holds, so it gets an allocation of its own, and a second pool
/// allocation for the balancer would open a new pool block on every connection (about 200
/// instructions, measured).
#[repr(C, align(8))]
pub struct PeerRoom(core::mem::MaybeUninit<[u8; PEER_ROOM]>);

/// The bytes of `PeerRoom`.
pub const PEER_ROOM: usize = 128;

/// What `SessionCtx::attach` allocates: the context first, so that the session's context
/// pointer is this allocation's; the room is only ever reached by `peer_room`, never through
/// a reference to the context.
#[repr(C)]
struct Held {
    ctx: SessionCtx,
    room: PeerRoom,
}

/// The client's ALPN list (checked, as the wire lists it) copied into the connection's pool,
/// for `SessionCtx::alpn`; empty on no memory (the session goes without).
pub unsafe fn keep_alpn(pool: *mut nginx_sys::ngx_pool_t, list: &[u8]) -> ngx_str_t {
    let p = nginx_sys::ngx_pnalloc(pool, list.len()).cast::<u8>();
    if p.is_null() {
        return ngx_str_t::empty();
    }
    core::ptr::copy_nonoverlapping(list.as_ptr(), p, list.len());
    ngx_str_t {
        len: list.len(),
        data: p,
    }
}

impl SessionCtx {
    /// A new, empty context in the session's pool, dropped with it, and the balancer's room.
    pub unsafe fn attach<'a>(s: *mut ngx_stream_session_t) -> Option<&'a mut SessionCtx> {
        let pool = (*(*s).connection).pool;
        // In the pool (aligned as ngx_palloc aligns, enough for `Held`), dropped by a cleanup
        // of the pool: both asked for before anything is written, so a failure leaks nothing.
        let held = nginx_sys::ngx_palloc(pool, core::mem::size_of::<Held>()).cast::<Held>();
        if held.is_null() {
            return None;
        }
        let cleanup = nginx_sys::ngx_pool_cleanup_add(pool, 0);
        if cleanup.is_null() {
            return None;
        }
        held.write(Held {
            room: PeerRoom(core::mem::MaybeUninit::uninit()),
            ctx: SessionCtx {
                protocol: None,
                name: KeptName::NONE,
                alpn: ngx_str_t::empty(),
                alpn_wire: false,
                route: None,
                upstream: core::ptr::null(),
                table: None,
                done: false,
                scratch: Vec::new(),
                status: None,
                server: None,
                drain_index: 0,
                drain_source: core::ptr::null(),
                drain: None,
                counted: None,
                pair: 0,
                no_server: false,
                quic: None,
                quic_flight: false,
            },
        });
        (*cleanup).handler = Some(drop_held);
        (*cleanup).data = held.cast();
        // `ctx` is the first field of a `repr(C)` struct: the same address.
        let ctx = held.cast::<SessionCtx>();
        stream::set_session_ctx(s, ctx);
        Some(&mut *ctx)
    }

    /// The name read from the client, if it sent one.
    #[inline]
    pub fn name(&self) -> Option<&str> {
        self.name.get()
    }

    pub fn upstream(&self) -> Option<&Upstream> {
        // SAFETY: `upstream` points into `self.table`, held for the session's lifetime.
        unsafe { self.upstream.as_ref() }
    }
}

/// A client's name kept in the connection's pool: made only from a checked `Host`, lower-cased
/// into the pool (ASCII), so that reading it back as text is sound.
#[derive(Clone, Copy)]
pub struct KeptName(ngx_str_t);

impl KeptName {
    pub const NONE: KeptName = KeptName(ngx_str_t {
        len: 0,
        data: core::ptr::null_mut(),
    });

    /// Writes `host`'s lower-case form into `pool`; `None` if the pool has no memory left.
    ///
    /// # Safety
    /// `pool` is a live pool that outlives every use of the copy.
    pub unsafe fn keep(pool: *mut nginx_sys::ngx_pool_t, host: &Host) -> Option<KeptName> {
        let len = host.len();
        let p = nginx_sys::ngx_pnalloc(pool, len).cast::<u8>();
        if p.is_null() {
            return None;
        }
        host.lower_into(core::slice::from_raw_parts_mut(p.cast(), len));
        Some(KeptName(ngx_str_t { len, data: p }))
    }

    /// The name; `None` for none (a `Host` is never empty).
    #[inline]
    pub fn get(&self) -> Option<&str> {
        if self.0.len == 0 {
            return None;
        }
        // SAFETY: `keep` copied a checked ASCII name into a pool that outlives the copy.
        unsafe {
            Some(core::str::from_utf8_unchecked(core::slice::from_raw_parts(
                self.0.data,
                self.0.len,
            )))
        }
    }
}

/// One `edge_status` request: the bytes read, then the answer being written.
#[derive(Default)]
pub struct StatusExchange {
    pub request: Vec<u8>,
    /// Once set, the answer is final: later read events never recompute it.
    pub answer: Vec<u8>,
    pub sent: usize,
    pub status: ngx_uint_t,
}

/// The pool's cleanup of a `Held`.
unsafe extern "C" fn drop_held(data: *mut core::ffi::c_void) {
    core::ptr::drop_in_place(data.cast::<Held>());
}

/// The balancer's room in the session's context, if the module made one (see `PeerRoom`).
pub unsafe fn peer_room(s: *mut ngx_stream_session_t) -> Option<*mut PeerRoom> {
    let ctx = stream::session_ctx_ptr::<SessionCtx>(s);
    if ctx.is_null() {
        return None;
    }
    // Every context is the first field of a `Held` (see `SessionCtx::attach`).
    Some(core::ptr::addr_of_mut!((*ctx.cast::<Held>()).room))
}

/// The session's context, made now if the module has none yet; `None` if the pool has no
/// memory left.
pub unsafe fn get_or_attach<'a>(s: *mut ngx_stream_session_t) -> Option<&'a mut SessionCtx> {
    match get(s) {
        Some(ctx) => Some(ctx),
        None => SessionCtx::attach(s),
    }
}

/// The session's context, if the module made one.
pub unsafe fn get<'a>(s: *mut ngx_stream_session_t) -> Option<&'a mut SessionCtx> {
    stream::session_ctx::<SessionCtx>(s)
}
