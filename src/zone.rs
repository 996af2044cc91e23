//! `edge_zone`: the shared memory holding server health for all workers. Its records outlive
//! route-table reloads (a server still listed keeps its record) and `nginx -s reload` (nginx
//! hands a zone of the same name and size to the new cycle).
//!
//! Layout of the zone's one allocation: `Header`, the store's index, then the records.

use core::ffi::c_void;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_log_t, ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_NOTICE,
    NGX_LOG_WARN, NGX_OK,
};
use ngx::core::SlabPool;
use ngx::{ngx_conf_log_error, ngx_log_error};

use crate::health::{index_len, now_ms, Key, Record, Store, StoreMeta, EMPTY, SLOTS};
use crate::routes::table::{Backend, RouteTable};

pub const DEFAULT_NAME: &str = "nginx_edge";
pub const DEFAULT_SIZE: usize = 1 << 20;

/// A record no table has listed for this long may be reused for another server.
const STALE_MS: u64 = 120_000;

/// How often a worker marks the records of its tables as listed.
pub const TOUCH_MS: u64 = STALE_MS / 4;

const MAGIC: u64 = u64::from_le_bytes(*b"edgezon5");

/// Route tables published through the zone at a time: one per source of each configuration
/// whose workers run (old and new during a reload).
pub const TABLES: usize = 32;

/// URL sources whose files in the state folder the zone vouches for at a time: the one whose
/// files were written longest ago makes room for another.
pub const VOUCHED: usize = 64;

/// Which file of a URL source: the one its feed wrote last, or the one a table accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Candidate,
    Accepted,
}

/// The SHA-256 of the files a URL source's worker wrote in the state folder, the last two of
/// each (a reader may see the file just before it is replaced): a file whose bytes match
/// neither was written by another process, and is not read.
#[repr(C)]
#[derive(Default)]
struct Vouched {
    /// The source's cache key; 0 when free.
    key: AtomicU64,
    /// When it was last written (a count of the zone's vouches).
    used: AtomicU64,
    candidate: [[AtomicU64; 4]; 2],
    accepted: [[AtomicU64; 4]; 2],
}

/// One source's table as the edge serves it: which worker builds it, and where the image it
/// last published is.
#[repr(C)]
#[derive(Default)]
pub struct Published {
    /// The configuration and source it belongs to; 0 when free.
    key: AtomicU64,
    /// The worker process that reads the source and compiles its tables; its pid negated
    /// once it has exited cleanly.
    leader: AtomicI32,
    /// Non-zero once the leader could not publish: every worker then reads the source itself.
    pub on_their_own: AtomicU32,
    /// The generation last published; 0 before the first change.
    pub generation: AtomicU64,
    /// The process that published it, and its descriptor of the sealed memfd that holds it
    /// (see `routes::share`).
    shared_pid: AtomicI32,
    shared_fd: AtomicI32,
}

impl Published {
    /// Whether the worker `me` leads this source: it does already, or the leader has gone
    /// (exited, crashed, or never was) and `me` took its place.
    pub fn lead(&self, me: i32) -> bool {
        let leader = self.leader.load(Relaxed);
        if leader == me {
            return true;
        }
        (leader <= 0 || !process_alive(leader))
            && self
                .leader
                .compare_exchange(leader, me, Relaxed, Relaxed)
                .is_ok()
    }

    /// The published generation, if this entry still belongs to `key` (an entry of a
    /// configuration whose workers have all gone may be reused by another).
    pub fn generation_of(&self, key: u64) -> Option<u64> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        (self.key.load(Relaxed) == key).then_some(generation)
    }

    /// Publishes `generation`, held by this process (`me`) as its descriptor `fd`. Followers
    /// that read the new generation find the memfd of that generation or a later one.
    pub fn publish(&self, me: i32, fd: i32, generation: u64) {
        self.shared_pid.store(me, Relaxed);
        self.shared_fd.store(fd, Relaxed);
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
    }

    /// Where the last generation published is: (process, descriptor).
    pub fn shared(&self) -> (i32, i32) {
        (self.shared_pid.load(Relaxed), self.shared_fd.load(Relaxed))
    }

    /// Gives up the lead at worker exit, so that another worker takes it at once.
    pub fn resign(&self, me: i32) {
        let _ = self.leader.compare_exchange(me, -me, Relaxed, Relaxed);
    }
}

#[repr(C)]
struct Header {
    magic: u64,
    record_size: u64,
    capacity: u64,
    index_len: u64,
    store: StoreMeta,
    /// The pid of the worker process holding each connection-count slot, 0 when free.
    slots: [AtomicI32; SLOTS],
    tables: [Published; TABLES],
    vouched: [Vouched; VOUCHED],
    /// Vouches made: the clock of `Vouched::used`.
    vouches: AtomicU64,
}

fn index_offset() -> usize {
    size_of::<Header>().next_multiple_of(align_of::<AtomicU32>())
}

fn records_offset(index_len: usize) -> usize {
    (index_offset() + index_len * size_of::<AtomicU32>()).next_multiple_of(align_of::<Record>())
}

fn area_size(capacity: usize) -> usize {
    records_offset(index_len(capacity)) + capacity * size_of::<Record>()
}

/// Declares the zone; nginx maps it once the configuration is read.
pub unsafe fn add(
    cf: *mut ngx_conf_t,
    name: &mut ngx_str_t,
    size: usize,
) -> Option<NonNull<ngx_shm_zone_t>> {
    let tag = core::ptr::addr_of_mut!(crate::ngx_stream_edge_module).cast();
    let zone = NonNull::new(ngx_shared_memory_add(cf, name, size, tag))?;
    let z = &mut *zone.as_ptr();
    if z.init.is_some() {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "edge_zone \"{}\" is already declared",
            name
        );
        return None;
    }
    z.init = Some(init_zone);
    Some(zone)
}

unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    let zone = &mut *zone;
    let shpool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    if !data.is_null() {
        // nginx -s reload with the same name and size: keep every record.
        zone.data = data;
        return NGX_OK as ngx_int_t;
    }
    if zone.shm.exists != 0 {
        zone.data = (*shpool).data;
        return NGX_OK as ngx_int_t;
    }
    let free = (*shpool).pfree * ngx_pagesize;
    // The largest capacity whose area fits in the free pages.
    let (mut low, mut high) = (0, free / size_of::<Record>());
    while low < high {
        let mid = (low + high).div_ceil(2);
        if area_size(mid) <= free {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    let mut capacity = low;
    // The slab allocator may need a little room of its own: try smaller until it fits,
    // without its "no memory" message for the tries that do not.
    let log_nomem = (*shpool).log_nomem();
    (*shpool).set_log_nomem(0);
    let mut block = core::ptr::null_mut();
    while capacity > 0 {
        block = ngx_slab_alloc(shpool, area_size(capacity));
        if !block.is_null() {
            break;
        }
        capacity -= capacity / 64 + 1;
    }
    (*shpool).set_log_nomem(log_nomem);
    if block.is_null() {
        ngx_log_error!(
            NGX_LOG_EMERG,
            zone.shm.log,
            "edge_zone \"{}\" is too small",
            zone.shm.name
        );
        return NGX_ERROR as ngx_int_t;
    }
    // All zeroes: every index entry empty, every record free, every slot free.
    core::ptr::write_bytes(block.cast::<u8>(), 0, area_size(capacity));
    let header = &mut *block.cast::<Header>();
    header.magic = MAGIC;
    header.record_size = size_of::<Record>() as u64;
    header.capacity = capacity as u64;
    header.index_len = index_len(capacity) as u64;
    (*shpool).data = block;
    zone.data = block;
    NGX_OK as ngx_int_t
}

/// The zone of this worker process, once it has opened it: for what reads the state folder
/// on a thread (see `caches`).
static CURRENT: std::sync::atomic::AtomicPtr<Zone> =
    std::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// This worker's zone; `None` in the master (configuration time) and without a zone.
pub fn current() -> Option<&'static Zone> {
    // SAFETY: set from the worker's `Arc<Zone>`, which lives until the process exits.
    unsafe { CURRENT.load(std::sync::atomic::Ordering::Acquire).as_ref() }
}

/// Makes `zone` the worker's (see `current`), for as long as the process lives: threads that
/// outlive the worker's state (a feed's writer at exit) may still use it.
pub fn set_current(zone: &std::sync::Arc<Zone>) {
    // The reference is never given back: the zone outlives every thread of the process.
    let kept = std::sync::Arc::into_raw(std::sync::Arc::clone(zone));
    CURRENT.store(kept.cast_mut(), std::sync::atomic::Ordering::Release);
}

/// The zone as a worker uses it, from worker start to exit.
pub struct Zone {
    pub name: String,
    header: &'static Header,
    index: &'static [AtomicU32],
    records: &'static [Record],
    pool: SlabPool,
}

impl Zone {
    /// The zone nginx mapped for this worker; `None`, logged, if another version of the
    /// module made it.
    pub unsafe fn open(zone: NonNull<ngx_shm_zone_t>, log: *mut ngx_log_t) -> Option<Zone> {
        let zone = &*zone.as_ptr();
        let name = String::from_utf8_lossy(zone.shm.name.as_bytes()).into_owned();
        let header = zone.data.cast::<Header>();
        if header.is_null()
            || (*header).magic != MAGIC
            || (*header).record_size != size_of::<Record>() as u64
        {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "edge_zone \"{}\" was made by another version of the module: health stays per worker until nginx restarts",
                name
            );
            return None;
        }
        let header = &*header;
        let base = core::ptr::from_ref(header).cast::<u8>();
        let index_len = header.index_len as usize;
        let index =
            core::slice::from_raw_parts(base.add(index_offset()).cast::<AtomicU32>(), index_len);
        let records = core::slice::from_raw_parts(
            base.add(records_offset(index_len)).cast::<Record>(),
            header.capacity as usize,
        );
        Some(Zone {
            name,
            header,
            index,
            records,
            pool: SlabPool::from_shm_zone(zone)?,
        })
    }

    fn store(&self) -> Store<'static> {
        Store::new(self.records, self.index, &self.header.store)
    }

    pub fn capacity(&self) -> usize {
        self.records.len()
    }

    pub fn live(&self) -> usize {
        self.store().live()
    }

    /// Takes a connection-count slot for this worker (pid `me`), first taking back the
    /// counts of workers that died without releasing theirs. `None` when every slot is held
    /// by a live process: the worker's counts then cannot be taken back if it dies.
    pub fn claim_slot(&self, me: i32, log: *mut ngx_log_t) -> Option<usize> {
        let _lock = self.pool.lock();
        let mut mine = None;
        for (slot, pid) in self.header.slots.iter().enumerate() {
            let holder = pid.load(Relaxed);
            if holder != 0 && holder != me && !process_alive(holder) {
                let n = self.forget(slot);
                pid.store(0, Relaxed);
                ngx_log_error!(
                    NGX_LOG_NOTICE,
                    log,
                    "edge_zone \"{}\": worker process {} exited without releasing its connection counts; {} taken back",
                    self.name,
                    holder,
                    n
                );
            }
            if mine.is_none() && pid.load(Relaxed) == 0 {
                mine = Some(slot);
            }
        }
        if let Some(slot) = mine {
            // A slot is emptied whenever it is freed.
            self.header.slots[slot].store(me, Relaxed);
        }
        mine
    }

    /// Gives the slot back at worker exit, with whatever it still counts.
    pub fn release_slot(&self, slot: usize) {
        let _lock = self.pool.lock();
        self.forget(slot);
        self.header.slots[slot].store(0, Relaxed);
    }

    /// Records that this nginx writes `copy` of the URL source `key` with this digest (the
    /// two last of each are kept). With every entry taken, the source written longest ago
    /// makes room (its files are refused until it writes again).
    pub fn vouch(&self, key: u64, copy: Kept, digest: &[u8; 32]) {
        let _lock = self.pool.lock();
        let entries = &self.header.vouched;
        let entry = match entries.iter().find(|v| v.key.load(Relaxed) == key) {
            Some(entry) => entry,
            None => {
                // A free entry, or the one written longest ago.
                let oldest = entries
                    .iter()
                    .min_by_key(|v| (v.key.load(Relaxed) != 0, v.used.load(Relaxed)));
                let Some(entry) = oldest else { return };
                for w in entry.candidate.iter().chain(&entry.accepted).flatten() {
                    w.store(0, Relaxed);
                }
                entry.key.store(key, Relaxed);
                entry
            }
        };
        entry
            .used
            .store(self.header.vouches.fetch_add(1, Relaxed) + 1, Relaxed);
        let [last, before] = copy_of(entry, copy);
        let want: [u64; 4] = core::array::from_fn(|i| word(digest, i));
        if last.each_ref().map(|w| w.load(Relaxed)) != want {
            for (i, (b, l)) in before.iter().zip(last).enumerate() {
                b.store(l.load(Relaxed), Relaxed);
                l.store(want[i], Relaxed);
            }
        }
    }

    /// Takes back the vouch for `digest`, the last of `copy` of `key`: its file was not
    /// written.
    pub fn unvouch(&self, key: u64, copy: Kept, digest: &[u8; 32]) {
        let _lock = self.pool.lock();
        let Some(entry) = self
            .header
            .vouched
            .iter()
            .find(|v| v.key.load(Relaxed) == key)
        else {
            return;
        };
        let [last, before] = copy_of(entry, copy);
        let want: [u64; 4] = core::array::from_fn(|i| word(digest, i));
        if last.each_ref().map(|w| w.load(Relaxed)) == want {
            for (b, l) in before.iter().zip(last) {
                l.store(b.load(Relaxed), Relaxed);
                b.store(0, Relaxed);
            }
        }
    }

    /// Whether this nginx vouched for `digest` as one of the last two `copy` of the URL source
    /// `key`; `None` when it vouched for none yet.
    pub fn vouches(&self, key: u64, copy: Kept, digest: &[u8; 32]) -> Option<bool> {
        let _lock = self.pool.lock();
        let entry = self
            .header
            .vouched
            .iter()
            .find(|v| v.key.load(Relaxed) == key)?;
        let versions = copy_of(entry, copy);
        let held = |v: &[AtomicU64; 4]| v.each_ref().map(|w| w.load(Relaxed));
        let want: [u64; 4] = core::array::from_fn(|i| word(digest, i));
        let known = versions.iter().any(|v| held(v) != [0; 4]);
        known.then(|| versions.iter().any(|v| held(v) == want))
    }

    /// The publication of the table with `key` (its configuration and source), made if new
    /// with `me` as its leader. An entry whose last leader has gone is reused (the workers of
    /// its configuration, if any are left, make it again). `None` when every entry is in use.
    pub fn published(&self, key: u64, me: i32) -> Option<&'static Published> {
        let _lock = self.pool.lock();
        let tables = &self.header.tables;
        if let Some(p) = tables.iter().find(|p| p.key.load(Relaxed) == key) {
            return Some(p);
        }
        let free = tables.iter().find(|p| {
            let leader = p.leader.load(Relaxed);
            p.key.load(Relaxed) == 0 || (leader != 0 && !process_alive(leader.abs()))
        })?;
        free.leader.store(me, Relaxed);
        free.on_their_own.store(0, Relaxed);
        free.generation.store(0, Relaxed);
        free.shared_pid.store(0, Relaxed);
        free.shared_fd.store(-1, Relaxed);
        free.key.store(key, Relaxed);
        Some(free)
    }

    fn forget(&self, slot: usize) -> u64 {
        self.records
            .iter()
            .filter(|r| r.group() != EMPTY)
            .map(|r| u64::from(r.forget_slot(slot)))
            .sum()
    }

    /// Points every `servers` upstream of `table` at its shared records, making those that
    /// are new; returns how many servers did not fit (they keep per-worker records). Runs on
    /// the thread that built the table: the lock is taken for `ATTACH_BATCH` servers at a
    /// time, so that the event loop (which takes it only to claim or sweep) never waits long.
    pub fn attach(&self, table: &RouteTable) -> usize {
        /// Servers looked up per hold of the zone's lock.
        const ATTACH_BATCH: usize = 512;
        let now = now_ms();
        let stale_before = now.saturating_sub(STALE_MS);
        let mut unattached = 0usize;
        let mut lock = None;
        let mut held = 0;
        for upstream in table.upstreams() {
            let Backend::Servers(pool) = &upstream.kind else {
                continue;
            };
            let policy = pool.policy();
            for (i, server) in pool.servers().iter().enumerate() {
                if held == ATTACH_BATCH {
                    lock = None;
                    held = 0;
                }
                lock.get_or_insert_with(|| self.pool.lock());
                held += 1;
                let key = Key::new(&upstream.name, server.ip, server.port);
                match self
                    .store()
                    .find_or_insert(&key, now, stale_before, policy.start_down)
                {
                    Some(entry) => {
                        if policy.check.is_none() {
                            entry.record.clear_active();
                        }
                        pool.attach(i, entry.record);
                    }
                    None => unattached += 1,
                }
            }
        }
        drop(lock);
        unattached
    }

    /// Says, once per table, that `unattached` servers did not fit.
    pub fn log_full(&self, unattached: usize, log: *mut ngx_log_t) {
        if unattached > 0 {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "edge_zone \"{}\" is full ({} records): {} servers keep per-worker health state; make the zone larger",
                self.name,
                self.capacity(),
                unattached
            );
        }
    }

    /// Marks every record `table` uses as still listed, so that it is not reused.
    pub fn touch(&self, table: &RouteTable) {
        let now = now_ms();
        for upstream in table.upstreams() {
            if let Backend::Servers(pool) = &upstream.kind {
                for i in 0..pool.servers().len() {
                    if pool.is_shared(i) {
                        pool.health(i).touch(now);
                    }
                }
            }
        }
    }
}

fn copy_of(entry: &Vouched, copy: Kept) -> &[[AtomicU64; 4]; 2] {
    match copy {
        Kept::Candidate => &entry.candidate,
        Kept::Accepted => &entry.accepted,
    }
}

/// The `i`-th 64-bit word of a digest.
fn word(digest: &[u8; 32], i: usize) -> u64 {
    u64::from_le_bytes(digest[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]))
}

pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
