//! `edge_counters`: the shared memory that counts traffic per route, the names nobody routes
//! and the connections without a name, for every worker (the logic is in `traffic`). Its
//! counts outlive route-table swaps and `nginx -s reload` (nginx hands a zone of the same
//! name and size to the new cycle); the zone's name carries `routes=`, `unrouted=` and the
//! layout's version, so that changing them makes a new zone, whose counts start afresh.
//!
//! Layout of the zone's one allocation: `Header`, the route index, the route records, the
//! unrouted entries (TLS's, then HTTP's), then the (route, client) pairs of the routes'
//! `max_conns_per_client`.

use core::ffi::c_void;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_log_t, ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::core::SlabPool;
use ngx::ngx_log_error;

use crate::routes::image::LimitSet;
use crate::traffic::limits::{Acquired, ClientSlot, Clients, Refusal, REASONS};
use crate::traffic::routes::index_len;
use crate::traffic::{
    decision_bucket, unrouted, Closed, Fingerprint, Heavy, Nameless, NamelessCounts, Pin,
    RouteKind, RouteRecord, RouteStore, Snapshot, StoreHeader, UnroutedOutcome,
    DECISION_BUCKETS_MS, PROTOCOLS,
};

pub const ZONE_NAME: &str = "nginx_edge_counters";
/// Bumped with any change to the layout below.
const LAYOUT: u32 = 2;
pub const DEFAULT_ROUTES: usize = 10_000;
pub const DEFAULT_UNROUTED: usize = 100;
pub const MAX_ROUTES: usize = 1_000_000;
pub const MAX_UNROUTED: usize = 1_000;
pub const DEFAULT_CLIENTS: usize = 16_384;
pub const MAX_CLIENTS: usize = 1_000_000;

const MAGIC: u64 = u64::from_le_bytes(*b"edgecnt2");

/// What `edge_counters` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub routes: usize,
    pub unrouted: usize,
    /// (route, client) pairs with connections open kept for `max_conns_per_client`.
    pub clients: usize,
}

impl Default for Sizes {
    fn default() -> Sizes {
        Sizes {
            routes: DEFAULT_ROUTES,
            unrouted: DEFAULT_UNROUTED,
            clients: DEFAULT_CLIENTS,
        }
    }
}

#[repr(C)]
struct Header {
    magic: u64,
    routes: u64,
    unrouted: u64,
    record_size: u64,
    /// The secret of route fingerprints, drawn when the zone is made.
    seed: u64,
    store: StoreHeader,
    /// Unrouted connections whose name was not counted: another worker held the lock.
    sampled_out: AtomicU64,
    nameless: NamelessCounts,
    /// Per protocol: connections whose name no route matched, sent to `default`, and closed.
    defaulted: [AtomicU64; PROTOCOLS],
    closed: [AtomicU64; PROTOCOLS],
    /// Per protocol: the routing decision time histogram (not cumulative), and its sum (ms).
    decisions: [[AtomicU64; DECISION_BUCKETS_MS.len() + 1]; PROTOCOLS],
    decision_ms: [AtomicU64; PROTOCOLS],
    clients: u64,
    /// Pairs in the clients' table now (under the lock).
    clients_used: AtomicU32,
    _pad: AtomicU32,
    /// Connections whose (route, client) pair found the table full: refused.
    clients_full: AtomicU64,
    /// Per protocol, connections refused by a route's limits, by `Refusal`.
    refused: [[AtomicU64; REASONS]; PROTOCOLS],
    /// Connections whose route had limits but no record (every record held): refused.
    unlimited: AtomicU64,
}

fn index_offset() -> usize {
    size_of::<Header>().next_multiple_of(align_of::<AtomicU32>())
}

fn records_offset(sizes: Sizes) -> usize {
    (index_offset() + index_len(sizes.routes) * size_of::<AtomicU32>())
        .next_multiple_of(align_of::<RouteRecord>())
}

fn heavy_offset(sizes: Sizes) -> usize {
    (records_offset(sizes) + sizes.routes * size_of::<RouteRecord>())
        .next_multiple_of(align_of::<Heavy>())
}

fn clients_offset(sizes: Sizes) -> usize {
    (heavy_offset(sizes) + PROTOCOLS * sizes.unrouted * size_of::<Heavy>())
        .next_multiple_of(align_of::<ClientSlot>())
}

fn area_size(sizes: Sizes) -> usize {
    clients_offset(sizes) + Clients::slots_for(sizes.clients) * size_of::<ClientSlot>()
}

/// Declares the zone, sized for `sizes`; nginx maps it once the configuration is read.
pub unsafe fn add(cf: *mut ngx_conf_t, sizes: Sizes) -> Option<NonNull<ngx_shm_zone_t>> {
    let area = area_size(sizes);
    // The slab allocator's own pages and page descriptors, with room to spare.
    let size = (area + area / 64 + 16 * ngx_pagesize).next_multiple_of(ngx_pagesize);
    let text = format!(
        "{ZONE_NAME}:{}:{}:{}:v{LAYOUT}",
        sizes.routes, sizes.unrouted, sizes.clients
    );
    // The name must live as long as the cycle: in the configuration's pool.
    let data = nginx_sys::ngx_pnalloc((*cf).pool, text.len()).cast::<u8>();
    if data.is_null() {
        return None;
    }
    core::ptr::copy_nonoverlapping(text.as_ptr(), data, text.len());
    let mut name = ngx_str_t {
        len: text.len(),
        data,
    };
    let tag = core::ptr::addr_of_mut!(crate::ngx_stream_edge_module).cast();
    let zone = NonNull::new(ngx_shared_memory_add(cf, &mut name, size, tag))?;
    let z = &mut *zone.as_ptr();
    // Its sizes, for `init_zone`: a small allocation in the configuration's pool.
    let kept = nginx_sys::ngx_palloc((*cf).pool, size_of::<Sizes>()).cast::<Sizes>();
    if kept.is_null() {
        return None;
    }
    kept.write(sizes);
    z.data = kept.cast();
    z.init = Some(init_zone);
    Some(zone)
}

unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    let zone = &mut *zone;
    let sizes = *zone.data.cast::<Sizes>();
    let shpool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    let fits = |header: *mut Header| {
        !header.is_null()
            && (*header).magic == MAGIC
            && (*header).routes == sizes.routes as u64
            && (*header).unrouted == sizes.unrouted as u64
            && (*header).clients == sizes.clients as u64
            && (*header).record_size == size_of::<RouteRecord>() as u64
    };
    if !data.is_null() && fits(data.cast()) {
        // nginx -s reload with the same sizes: keep every count.
        zone.data = data;
        return NGX_OK as ngx_int_t;
    }
    if zone.shm.exists != 0 && fits((*shpool).data.cast()) {
        zone.data = (*shpool).data;
        return NGX_OK as ngx_int_t;
    }
    let block = ngx_slab_alloc(shpool, area_size(sizes));
    if block.is_null() {
        ngx_log_error!(
            NGX_LOG_EMERG,
            zone.shm.log,
            "edge_counters: no room for {} routes, {} unrouted names and {} clients in \"{}\"",
            sizes.routes,
            sizes.unrouted,
            sizes.clients,
            zone.shm.name
        );
        return NGX_ERROR as ngx_int_t;
    }
    // All zeroes: every index entry empty, every record and entry free.
    core::ptr::write_bytes(block.cast::<u8>(), 0, area_size(sizes));
    let header = &mut *block.cast::<Header>();
    header.magic = MAGIC;
    header.routes = sizes.routes as u64;
    header.unrouted = sizes.unrouted as u64;
    header.clients = sizes.clients as u64;
    header.record_size = size_of::<RouteRecord>() as u64;
    header.seed = seed();
    (*shpool).data = block;
    zone.data = block;
    NGX_OK as ngx_int_t
}

/// A secret from the kernel's generator (the clock's, should it fail).
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: a valid buffer of its length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        u64::from_le_bytes(bytes)
    } else {
        crate::health::mix(crate::health::now_ms() ^ std::process::id() as u64)
    }
}

/// The counters as a worker uses them.
pub struct Counters {
    header: &'static Header,
    index: &'static [AtomicU32],
    records: &'static [RouteRecord],
    heavy: *mut Heavy,
    unrouted: usize,
    clients: &'static [ClientSlot],
    pool: SlabPool,
    shpool: *mut ngx_slab_pool_t,
}

/// Unlocks a mutex taken with `ngx_shmtx_trylock` when dropped.
struct Unlock(*mut nginx_sys::ngx_shmtx_t);

impl Drop for Unlock {
    fn drop(&mut self) {
        // SAFETY: taken by this process just before.
        unsafe { nginx_sys::ngx_shmtx_unlock(self.0) };
    }
}

/// Which protocol a connection is counted under.
pub fn protocol_index(p: crate::sniff::Protocol) -> usize {
    match p {
        crate::sniff::Protocol::Tls => 0,
        crate::sniff::Protocol::Http => 1,
    }
}

impl Counters {
    /// The zone nginx mapped for this worker; `None`, logged, if it cannot be used.
    pub unsafe fn open(zone: NonNull<ngx_shm_zone_t>, log: *mut ngx_log_t) -> Option<Counters> {
        let zone = &*zone.as_ptr();
        let header = zone.data.cast::<Header>();
        if header.is_null()
            || (*header).magic != MAGIC
            || (*header).record_size != size_of::<RouteRecord>() as u64
        {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "edge_counters: the zone was made by another version of the module: no route is counted until nginx restarts"
            );
            return None;
        }
        let header = &*header;
        let sizes = Sizes {
            routes: header.routes as usize,
            unrouted: header.unrouted as usize,
            clients: header.clients as usize,
        };
        let base = core::ptr::from_ref(header).cast::<u8>();
        Some(Counters {
            header,
            index: core::slice::from_raw_parts(
                base.add(index_offset()).cast::<AtomicU32>(),
                index_len(sizes.routes),
            ),
            records: core::slice::from_raw_parts(
                base.add(records_offset(sizes)).cast::<RouteRecord>(),
                sizes.routes,
            ),
            heavy: base.add(heavy_offset(sizes)).cast::<Heavy>().cast_mut(),
            unrouted: sizes.unrouted,
            clients: core::slice::from_raw_parts(
                base.add(clients_offset(sizes)).cast::<ClientSlot>(),
                Clients::slots_for(sizes.clients),
            ),
            pool: SlabPool::from_shm_zone(zone)?,
            shpool: zone.shm.addr.cast(),
        })
    }

    #[inline]
    fn store(&self) -> RouteStore<'static> {
        RouteStore::new(self.records, self.index, &self.header.store)
    }

    /// Pins the record of the route a connection was routed by (`route_opened` or
    /// `route_refused` follows). `None` when the route has no record and none could be made.
    #[inline]
    pub fn route_pin(&self, kind: RouteKind, key: &[u8], now_ms: u64) -> Option<Pin> {
        let store = self.store();
        let fp = Fingerprint::of(self.header.seed, kind, key);
        match store.find(fp) {
            Some(pin) => Some(pin),
            None => {
                let _lock = self.pool.lock();
                store.find_or_insert(fp, kind, key, now_ms)
            }
        }
    }

    /// Counts a connection of `protocol` on its route's record; `admitted` if `route_admit`
    /// let it through.
    #[inline]
    pub fn route_opened(
        &self,
        pin: Pin,
        protocol: usize,
        decision_ms: u64,
        now_ms: u64,
        admitted: bool,
    ) {
        self.store()
            .opened(pin, protocol, decision_ms, now_ms, admitted);
    }

    /// Applies the route's `max_conns`, `max_conns_per_client` (for a client at `client`) and
    /// `rate` for a connection of `protocol`, in that order, at `now_ms` (nginx's monotonic
    /// clock); what one took is given back when a later one refuses. `Ok(pair)`: the (route,
    /// client) pair to release when the connection ends (0: none). A pair that finds the
    /// table full is refused, as nginx's `limit_conn` refuses when its zone is full.
    pub fn route_admit(
        &self,
        pin: Pin,
        protocol: usize,
        limits: &LimitSet,
        client: IpAddr,
        now_ms: u64,
    ) -> Result<u64, Refusal> {
        let store = self.store();
        if !store.admit(pin, protocol, limits.max_conns) {
            return Err(Refusal::MaxConns);
        }
        let mut pair = 0;
        // `clients=0`: the operator turned this limit off.
        if limits.max_conns_per_client > 0 && !self.clients.is_empty() {
            pair = self.pair_key(store.fingerprint(pin), protocol, client);
            let _lock = self.pool.lock();
            let clients = self.clients();
            match clients.acquire(pair, limits.max_conns_per_client) {
                Acquired::Admitted => {}
                Acquired::Refused => {
                    store.unadmit(pin, protocol);
                    return Err(Refusal::MaxConnsPerClient);
                }
                Acquired::Full => {
                    self.header.clients_full.fetch_add(1, Relaxed);
                    store.unadmit(pin, protocol);
                    return Err(Refusal::MaxConnsPerClient);
                }
            }
        }
        let interval = limits.interval_us();
        if interval > 0 && !store.take_token(pin, protocol, now_ms * 1000, interval, limits.burst) {
            self.pair_closed(pair);
            store.unadmit(pin, protocol);
            return Err(Refusal::Rate);
        }
        Ok(pair)
    }

    /// The (route, client) pairs; their functions need the zone's lock.
    fn clients(&self) -> Clients<'static> {
        Clients::new(self.clients, &self.header.clients_used).at_most(self.header.clients as usize)
    }

    /// A (route, protocol, client) key: never 0, not chosen by a client (the zone's secret).
    /// An IPv6 client is its /64: one host has a whole /64 to pick addresses from.
    fn pair_key(&self, route: Fingerprint, protocol: usize, client: IpAddr) -> u64 {
        let mut ip = match client {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        if client.is_ipv6() {
            ip[8..].fill(0);
        }
        let [a, b] = route.words();
        let mut bytes = [0u8; 33];
        bytes[..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..16].copy_from_slice(&b.to_le_bytes());
        bytes[16..32].copy_from_slice(&ip);
        bytes[32] = protocol as u8;
        crate::traffic::hash128(self.header.seed ^ 0x636c_6965_6e74, &bytes)[0] | 1
    }

    /// The end of a connection `route_admit` counted for its client (`pair` 0: nothing).
    pub fn pair_closed(&self, pair: u64) {
        if pair == 0 {
            return;
        }
        let _lock = self.pool.lock();
        self.clients().release(pair);
    }

    /// A connection of `protocol` a limit of its route refused: counted for the route and in
    /// all, and the record unpinned.
    pub fn route_refused(&self, pin: Option<Pin>, protocol: usize, why: Refusal) {
        self.header.refused[protocol][why as usize].fetch_add(1, Relaxed);
        if let Some(pin) = pin {
            self.store().refused(pin, protocol, why);
        }
    }

    /// A connection whose route has limits but no record to keep them in: refused.
    pub fn unlimited(&self) {
        self.header.unlimited.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn route_closed(&self, pin: Pin, protocol: usize, end: Closed) {
        self.store().close(pin, protocol, end);
    }

    /// The time from accept to the routing decision, for the histogram.
    #[inline]
    pub fn decided(&self, protocol: usize, ms: u64) {
        self.header.decisions[protocol][decision_bucket(ms)].fetch_add(1, Relaxed);
        if ms > 0 {
            self.header.decision_ms[protocol].fetch_add(ms, Relaxed);
        }
    }

    /// A connection of `protocol` whose `name` no route matched.
    pub fn unrouted(
        &self,
        protocol: usize,
        name: &[u8],
        outcome: UnroutedOutcome,
        now_s: u64,
        client: IpAddr,
    ) {
        let total = match outcome {
            UnroutedOutcome::Defaulted => &self.header.defaulted,
            UnroutedOutcome::Closed => &self.header.closed,
        };
        total[protocol].fetch_add(1, Relaxed);
        if self.unrouted == 0 {
            return;
        }
        // A scanner's spray must not make every worker wait on this lock: a name that finds
        // it held is counted in the totals only.
        // SAFETY: the zone's slab pool, mapped for the worker's lifetime.
        let mutex = unsafe { core::ptr::addr_of_mut!((*self.shpool).mutex) };
        // SAFETY: as above.
        if unsafe { nginx_sys::ngx_shmtx_trylock(mutex) } == 0 {
            self.header.sampled_out.fetch_add(1, Relaxed);
            return;
        }
        let _unlock = Unlock(mutex);
        // SAFETY: the entries are only ever touched under the zone's lock, held here.
        let entries = unsafe {
            core::slice::from_raw_parts_mut(self.heavy.add(protocol * self.unrouted), self.unrouted)
        };
        unrouted::count(entries, name, outcome, now_s, client);
    }

    /// A connection without a name.
    #[inline]
    pub fn nameless(&self, why: Nameless) {
        self.header.nameless.add(why);
    }

    /// What a report shows, with the `top` busiest routes. Routes are read without the lock.
    pub fn snapshot(&self, top: usize) -> Snapshot {
        let (routes, tracked) = self.store().top(top);
        let failing = self.store().failing(crate::report::METRICS_ROUTES);
        let _lock = self.pool.lock();
        let unrouted = core::array::from_fn(|p| {
            // SAFETY: read under the zone's lock, held here.
            let entries = unsafe {
                core::slice::from_raw_parts(self.heavy.add(p * self.unrouted), self.unrouted)
            };
            unrouted::views(entries)
        });
        let h = self.header;
        let store = self.store();
        Snapshot {
            capacity: store.capacity(),
            tracked,
            evicted: store.evicted(),
            untracked: store.untracked(),
            sampled_out: h.sampled_out.load(Relaxed),
            routes,
            failing,
            unrouted,
            defaulted: core::array::from_fn(|p| h.defaulted[p].load(Relaxed)),
            closed: core::array::from_fn(|p| h.closed[p].load(Relaxed)),
            nameless: Nameless::ALL
                .iter()
                .map(|&k| (k, h.nameless.get(k)))
                .collect(),
            decisions: core::array::from_fn(|p| {
                core::array::from_fn(|b| h.decisions[p][b].load(Relaxed))
            }),
            decision_ms: core::array::from_fn(|p| h.decision_ms[p].load(Relaxed)),
            refused: core::array::from_fn(|p| {
                core::array::from_fn(|k| h.refused[p][k].load(Relaxed))
            }),
            clients_capacity: h.clients as usize,
            clients_used: h.clients_used.load(Relaxed) as usize,
            clients_full: h.clients_full.load(Relaxed),
            unlimited: h.unlimited.load(Relaxed),
        }
    }
}
