//! One worker process's state, owned by one value: made in init_process, dropped in
//! exit_process. It re-checks the route sources on timers and swaps new tables in, keeps the
//! health records of its tables from being reused, frees retired tables off the event loop,
//! and holds the state the callbacks above it share (zone, connection-count slot, checks).

use core::cell::{Cell, RefCell};
use core::ptr::{addr_of_mut, null_mut};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nginx_sys::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_log_t, ngx_msec_t, ngx_stream_session_t,
    NGX_LOG_ALERT, NGX_LOG_CRIT, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::ngx_log_error;

use crate::conf::{log_events, MainConf, SourceSlot};
use crate::feeds;
use crate::health::now_ms;
use crate::routes::document::Document;
use crate::routes::follow::{Action, Failed, Follow, FOLLOW_MS};
use crate::routes::share;
use crate::routes::source::{Done, Retired, Source, Step, Work, SMALL_ROUTES};
use crate::routes::table::{Backend, Gone, RouteTable};
use crate::session;
use crate::stream;
use crate::stream::{arm, cancel_timer as cancel, without_fastbins};
pub use crate::stream::{exiting, spawn_quiet};
use crate::zone::{self, Published, Zone};

/// While a refresh's work runs on a thread, the timer polls it: first after this long, then
/// twice as long each time up to `POLL_MAX_MS`, so that a build of seconds costs the event
/// loop a few dozen polls, not hundreds.
const POLL_MS: ngx_msec_t = 5;
const POLL_MAX_MS: ngx_msec_t = 100;
/// A published table up to this size (about 10,000 routes) is mapped, checked and attached in
/// the event loop, a larger one on a thread: measured, 0.7-1.0 ms at 10,000 routes, 5 ms at
/// 50,000, 12.5 ms at 100,000.
const SMALL_IMAGE_BYTES: u64 = 512 * 1024;

/// The steps of small work a refresh does in the event loop in one go (a read, a merge, and
/// two merges more when a file is refused and the merge tried again without it; each bounded
/// by `Work::is_small`: a couple of milliseconds at most in all) before the rest goes to a
/// thread. Counted rather than timed, so that a loaded machine does not change the path.
const INLINE_STEPS: u32 = 4;

/// How often the state folder is tidied, after the start.
const TIDY_MS: u64 = 12 * 3_600_000;

pub struct Worker {
    pub log: *mut ngx_log_t,
    mcf: *mut MainConf,
    pub zone: Option<Arc<Zone>>,
    /// Per-route traffic, unrouted names (`edge_counters`).
    pub counters: Option<crate::counters::Counters>,
    /// This worker's connection-count slot in the zone.
    pub slot: Option<usize>,
    pid: i32,
    // Boxed: nginx's timer tree points at each one's event.
    #[allow(clippy::vec_box)]
    refreshes: Vec<Box<Refresh>>,
    /// The zone's touch (`upkeep`) on a timer of its own: only when no route source is
    /// re-checked often enough to carry it (see `start`).
    touch: ngx_event_t,
    /// When the zone records were last touched (`upkeep`).
    touched: Cell<u64>,
    /// Table builds without an arena of their own, as last logged.
    arena_fallbacks: Cell<usize>,
    /// State of the active checks (see `check`).
    pub checks: Checks,
    /// Tables replaced while sessions or probes still used them: freed off the event loop
    /// once this is the last holder.
    retiring: RefCell<Vec<RetiringTable>>,
    /// Upstreams this worker is sending connections to although every server is down, by
    /// name, so that a new table generation does not log the same state again.
    failing_open: RefCell<HashSet<Box<str>>>,
    /// The URL sources this worker fetches for the edge (those of the tables it leads).
    #[allow(clippy::vec_box)]
    feeds: Vec<Box<feeds::Feed>>,
    /// Which URL sources (by index) have a feed here.
    fetching: Vec<bool>,
    /// Tables whose URL sources this worker starts fetching once it is set up.
    fetching_for: Vec<usize>,
    /// With `edge_drain_timeout`: the sessions proxied to a server of the module's, checked
    /// against each new table (see `drain_stale`).
    proxied: RefCell<Vec<*mut ngx_stream_session_t>>,
    /// When the state folder was last tidied (`tidy`).
    tidied: Cell<u64>,
}

/// The active checks' per-worker state; the callbacks are in `check`.
pub struct Checks {
    pub ticker: ngx_event_t,
    /// The ticker's period, as the check module set it up.
    pub tick_ms: ngx_msec_t,
    /// The cycle's log, quiet below `crit`: a refused probe is an expected outcome.
    pub probe_log: ngx_log_t,
    pub seed: Cell<u64>,
    /// A probe could not be started for a local reason; logged once until one starts again.
    pub cannot_start: Cell<bool>,
    /// The connections of the probes in flight, each owning its probe (`c->data`).
    pub in_flight: RefCell<Vec<*mut nginx_sys::ngx_connection_t>>,
}

/// A published table mapped and attached on a thread: its generation, the table, and the
/// servers that did not fit in the zone; or why it could not be.
type Loaded = Result<(u64, RouteTable, Option<usize>), String>;

/// Work on a thread for a refresh.
enum Job {
    /// Reading and building the source's table (its leader, or a worker on its own).
    Build(JoinHandle<Built>),
    /// Mapping the table generation (this one, or a later one) the leader published.
    Load(JoinHandle<Loaded>, u64),
}

impl Job {
    fn is_finished(&self) -> bool {
        match self {
            Job::Build(h) => h.is_finished(),
            Job::Load(h, _) => h.is_finished(),
        }
    }
}

/// What a build thread hands back.
struct Built {
    done: Done,
    /// For a table it built: servers that did not fit in the zone.
    unattached: Option<usize>,
    /// For a table it was to publish: the generation and the memfd that holds it, or why it
    /// could not.
    published: Option<Result<(u64, OwnedFd), String>>,
    /// The CPU time the thread spent.
    cpu: Duration,
}

struct RetiringTable {
    table: Rc<RouteTable>,
    generation: u64,
    source: *const SourceSlot,
}

/// The refresh of one route source: its timer, and its work on a thread.
struct Refresh {
    slot: *mut SourceSlot,
    /// The slot's index in the configuration.
    index: usize,
    /// A URL source's file changed while work was under way: look again at once after it.
    kicked: bool,
    timer: ngx_event_t,
    job: Option<Job>,
    /// Where the edge's table of this source is published, when the zone has room; `None`:
    /// this worker reads the source itself.
    published: Option<&'static Published>,
    /// This configuration's and source's key in the zone.
    key: u64,
    /// Whether this worker leads, maps or reads the table, and its failed loads.
    follow: Follow,
    /// The refresh under way publishes what it builds (this worker leads).
    publishing: bool,
    /// The leader's memfd of the generation it published last, open for the others to find.
    shared: Option<OwnedFd>,
    /// URL sources whose candidate the table accepted (the version it read), to keep as their
    /// accepted version.
    to_keep: Vec<(Arc<crate::caches::Files>, crate::caches::Digest)>,
    /// Keeping them, on a thread: why it could not.
    keeping: Option<JoinHandle<Vec<String>>>,
    /// The table generation last attached to the zone.
    attached: u64,
    /// Time the event loop has spent on the refresh under way: wall, and CPU.
    busy: Spent,
    /// The next poll's delay while work runs on a thread.
    poll_ms: ngx_msec_t,
    /// The CPU time the last build of a table took, on its thread.
    build_cpu: Duration,
}

static mut WORKER: *mut Worker = null_mut();

/// The worker's state, once init_process has made it.
pub fn get() -> Option<&'static Worker> {
    // SAFETY: written at worker start and exit only, outside any event handler.
    unsafe { WORKER.as_ref() }
}

/// Makes the worker's state at process start. Returns `false` if the configuration has no
/// route source (nothing to do).
pub unsafe fn start(cycle: *mut ngx_cycle_t) -> bool {
    let Some(mcf) = stream::cycle_main_conf::<MainConf>(cycle) else {
        return false;
    };
    if mcf.sources.is_empty() && mcf.zone.is_none() {
        return false;
    }
    let log = (*cycle).log;
    stream::note_threads();
    let pid = libc::getpid();
    let zone = mcf.zone.and_then(|z| Zone::open(z, log)).map(Arc::new);
    if let Some(zone) = &zone {
        // For the reads of the state folder on threads (see `caches`).
        zone::set_current(zone);
    }
    let slot = zone.as_ref().and_then(|z| {
        let slot = z.claim_slot(pid, log);
        if slot.is_none() {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "edge_zone \"{}\": every connection-count slot is held; this worker's counts cannot be taken back if it dies",
                z.name
            );
        }
        slot
    });
    let mut probe_log = *log;
    probe_log.log_level = NGX_LOG_CRIT as _;
    let mcf_ptr: *mut MainConf = mcf;
    let worker = Box::into_raw(Box::new(Worker {
        log,
        mcf: mcf_ptr,
        zone,
        counters: mcf
            .counters
            .and_then(|z| crate::counters::Counters::open(z, log)),
        slot,
        pid,
        refreshes: Vec::new(),
        touch: core::mem::zeroed(),
        touched: Cell::new(now_ms()),
        arena_fallbacks: Cell::new(crate::ALLOCATOR.fallbacks()),
        checks: Checks {
            ticker: core::mem::zeroed(),
            tick_ms: 0,
            probe_log,
            seed: Cell::new(crate::health::fnv1a(&(pid as u64 ^ now_ms()).to_le_bytes())),
            cannot_start: Cell::new(false),
            in_flight: RefCell::new(Vec::new()),
        },
        retiring: RefCell::new(Vec::new()),
        failing_open: RefCell::new(HashSet::new()),
        feeds: Vec::new(),
        fetching: vec![false; (*mcf_ptr).urls.len()],
        fetching_for: Vec::new(),
        proxied: RefCell::new(Vec::new()),
        tidied: Cell::new(0),
    }));
    WORKER = worker;
    let w = &mut *worker;
    // The URL sources' candidates are named after the master, known now (see `caches`).
    let master = if nginx_sys::ngx_process as u32 == nginx_sys::NGX_PROCESS_SINGLE {
        pid
    } else {
        libc::getppid()
    };
    for url in &(*mcf_ptr).urls {
        if let Some(files) = &url.files {
            files.start(master);
        }
    }
    for slot in (*mcf_ptr).sources.iter_mut() {
        if let Some(source) = slot.source.as_mut() {
            let urls = &(*mcf_ptr).urls;
            source.name_candidates(&|accepted| {
                urls.iter()
                    .filter_map(|u| u.files.as_ref())
                    .find(|f| f.accepted == accepted)
                    .and_then(|f| f.candidate().map(Into::into))
            });
        }
    }
    for (index, slot) in (*mcf_ptr).sources.iter_mut().enumerate() {
        let slot: *mut SourceSlot = &mut **slot;
        let key = crate::health::mix((*mcf_ptr).config_id ^ index as u64).max(1);
        let published = match w.zone.as_ref() {
            Some(zone) => {
                let p = zone.published(key, pid);
                if p.is_none() {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "edge_zone \"{}\": no room to publish the table of {}: this worker reads it itself",
                        zone.name,
                        (*slot).path.display()
                    );
                }
                p
            }
            None => None,
        };
        let mut refresh = Box::new(Refresh {
            slot,
            index,
            kicked: false,
            timer: core::mem::zeroed(),
            job: None,
            published,
            key,
            follow: Follow::default(),
            publishing: false,
            shared: None,
            to_keep: Vec::new(),
            keeping: None,
            attached: 0,
            busy: Spent::default(),
            poll_ms: POLL_MS,
            build_cpu: Duration::ZERO,
        });
        if let (Some(zone), Some(source)) = (w.zone.as_ref(), (*slot).source.as_ref()) {
            zone.log_full(zone.attach(source.table()), log);
            refresh.attached = source.generation();
        }
        // The worker that reads the table fetches its URL sources, from the start.
        if published.is_none_or(|p| p.lead(pid)) {
            w.fetching_for.push(index);
        }
        let data = core::ptr::from_mut(&mut *refresh).cast();
        arm(
            &mut refresh.timer,
            Some(on_refresh),
            data,
            log,
            (*slot).interval,
        );
        w.refreshes.push(refresh);
    }
    for index in core::mem::take(&mut w.fetching_for) {
        start_feeds(index);
    }
    w.tidy();
    // Every permanent timer makes each connection's timer insertions and deletions dearer:
    // a source re-checked at least every TOUCH_MS carries the zone's touch (`on_refresh`),
    // which then comes at most 2 * TOUCH_MS apart, well within the records' STALE_MS.
    if w.zone.is_some() && !w.refreshes.iter().any(|r| carries_upkeep(r)) {
        let data = addr_of_mut!(w.touch).cast();
        arm(&mut w.touch, Some(on_touch), data, log, zone::TOUCH_MS as _);
    }
    true
}

/// Whether a refresh comes often enough to do the worker's upkeep (`on_refresh`).
unsafe fn carries_upkeep(r: &Refresh) -> bool {
    (*r.slot).interval as u64 <= zone::TOUCH_MS
}

/// Sets the check ticker up at worker start (`handler` is the check module's), and arms it if
/// a table has checked upstreams. A worker whose tables check nothing keeps no ticker: every
/// permanent timer makes each connection's timer insertions and deletions dearer.
pub unsafe fn start_checks(handler: nginx_sys::ngx_event_handler_pt, ms: ngx_msec_t) {
    let Some(w) = WORKER.as_mut() else { return };
    w.checks.tick_ms = ms;
    let ticker = &mut w.checks.ticker;
    ticker.handler = handler;
    ticker.data = addr_of_mut!(*ticker).cast();
    ticker.log = w.log;
    ticker.set_cancelable(1);
    if w.has_checks() {
        ngx_add_timer(&mut w.checks.ticker, ms);
    }
}

/// After a table swap: arms the check ticker if it is idle and a table now checks servers.
unsafe fn wake_checks() {
    let w = WORKER;
    if w.is_null() || (*w).checks.ticker.handler.is_none() {
        return;
    }
    let ticker = addr_of_mut!((*w).checks.ticker);
    if (*ticker).timer_set() == 0 && (*w).has_checks() {
        ngx_add_timer(ticker, (*w).checks.tick_ms);
    }
}

/// How long a worker that exits waits for the module's threads (see `wait_for_threads`).
const EXIT_WAIT: Duration = Duration::from_secs(5);
const EXIT_WAIT_FAST: Duration = Duration::from_millis(500);

/// Drops the worker's state at process exit, and waits for the threads still at work.
pub unsafe fn stop() {
    let worker = core::mem::replace(&mut *addr_of_mut!(WORKER), null_mut());
    if worker.is_null() {
        return;
    }
    let mut w = Box::from_raw(worker);
    let pid = w.pid;
    for feed in &mut w.feeds {
        feeds::stop(feed);
    }
    for r in &mut w.refreshes {
        cancel(&mut r.timer);
        if let Some(p) = r.published {
            p.resign(pid);
        }
    }
    cancel(&mut w.touch);
    cancel(&mut w.checks.ticker);
    if let (Some(zone), Some(slot)) = (w.zone.as_ref(), w.slot) {
        zone.release_slot(slot);
    }
    let log = w.log;
    drop(w);
    // A fast shutdown (TERM): the master kills a worker still there after about 3 s.
    let limit = if nginx_sys::ngx_terminate != 0 {
        EXIT_WAIT_FAST
    } else {
        EXIT_WAIT
    };
    let running = crate::stream::wait_for_threads(limit);
    if running > 0 {
        ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "edge: {} thread(s) of the module not ended after {} ms, exiting anyway",
            running,
            limit.as_millis()
        );
    }
}

impl Worker {
    pub fn main_conf(&self) -> &MainConf {
        // SAFETY: the cycle's configuration lives as long as the worker.
        unsafe { &*self.mcf }
    }

    /// One worker (the first to start) tidies the state folder: at start, then twice a day
    /// (see `on_touch`), so that its sources' files are touched daily. In the event loop: the
    /// folder holds a few files per URL source, read and removed in microseconds, where a
    /// thread would cost every later connection of the worker (once a process has started a
    /// thread, glibc's system calls and malloc take their multi-threaded paths for good: about
    /// 1,000-1,200 instructions per proxied connection, see docs/performance.md).
    fn tidy(&self) {
        // SAFETY: the main configuration lives as long as the worker.
        let mcf = unsafe { &*self.mcf };
        if let (Some(0) | None, Some(state)) = (self.slot, mcf.state.as_deref()) {
            self.tidied.set(now_ms());
            let keys: Vec<u64> = mcf.urls.iter().map(|u| u.options.cache_key()).collect();
            crate::feed::state::tidy(state, &zone::process_alive, &keys);
        }
    }

    /// Keeps the zone records of the worker's tables from being reused, and tidies the state
    /// folder twice a day: every `TOUCH_MS`, from `on_refresh` or `on_touch`.
    fn upkeep(&self) {
        self.touched.set(now_ms());
        let Some(zone) = self.zone.as_ref() else {
            return;
        };
        for table in self.tables() {
            zone.touch(table);
        }
        if now_ms().saturating_sub(self.tidied.get()) >= TIDY_MS {
            self.tidy();
        }
    }

    /// Lists a session the balancer sent to a server, with `edge_drain_timeout`: its server
    /// or route may go away in a later table (see `drain_stale`). Taken off the list when its
    /// pool is destroyed.
    pub unsafe fn track(&self, s: *mut ngx_stream_session_t) {
        if (*self.mcf).drain_timeout_ms.is_none() {
            return;
        }
        let Some(ctx) = session::get(s) else { return };
        if ctx.drain_index != 0 {
            return;
        }
        let cleanup = nginx_sys::ngx_pool_cleanup_add((*(*s).connection).pool, 0);
        if cleanup.is_null() {
            return;
        }
        (*cleanup).handler = Some(untrack);
        (*cleanup).data = s.cast();
        let mut list = self.proxied.borrow_mut();
        list.push(s);
        ctx.drain_index = list.len();
        ctx.drain_source = stream::srv_conf::<crate::conf::SrvConf>(s).source as *const _;
    }

    /// After a new table of `source`: each session routed by it whose server was removed or
    /// is draining, or whose route now names another upstream, is closed after
    /// `edge_drain_timeout` unless it ends first. Logged once per server and reason.
    unsafe fn drain_stale(&self, source: *const SourceSlot) {
        let Some(ms) = (*self.mcf).drain_timeout_ms else {
            return;
        };
        let Some(table) = (*source).source.as_ref().map(|s| Rc::clone(s.table())) else {
            return;
        };
        let mut stale: std::collections::BTreeMap<(String, String, Gone), usize> =
            std::collections::BTreeMap::new();
        for &s in self.proxied.borrow().iter() {
            let Some(ctx) = session::get(s) else { continue };
            if ctx.drain_source != source.cast()
                || ctx.table.as_ref().is_some_and(|t| Rc::ptr_eq(t, &table))
            {
                continue;
            }
            let (Some(upstream), Some(server), Some(protocol)) =
                (ctx.upstream(), ctx.server, ctx.protocol)
            else {
                continue;
            };
            let name = ctx.name();
            let why = match table.still_serves(name, protocol, &upstream.name, &server) {
                // Served again (a node back from a blip): its timer is stopped.
                Ok(()) => {
                    if let Some(mut ev) = ctx.drain.take() {
                        cancel(&mut *ev);
                    }
                    continue;
                }
                Err(_) if ctx.drain.is_some() => continue,
                Err(why) => why,
            };
            *stale
                .entry((
                    upstream.name.to_string(),
                    crate::report::address(&server),
                    why,
                ))
                .or_default() += 1;
            let c = (*s).connection;
            let mut ev: Box<ngx_event_t> = Box::new(core::mem::zeroed());
            arm(
                &mut ev,
                Some(on_drained),
                c.cast(),
                (*c).log,
                ms as ngx_msec_t,
            );
            ctx.drain = Some(ev);
        }
        for ((upstream, server, why), n) in stale {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                self.log,
                "edge: upstream \"{}\" server {}: {} open connection(s) to drain ({}), closed in {}ms if still open (edge_drain_timeout)",
                upstream,
                server,
                n,
                why.as_str(),
                ms
            );
        }
    }

    /// Whether the worker is failing open on `upstream`, after a pick said it starts (`true`)
    /// or stops (`false`).
    pub fn set_failing_open(&self, upstream: &str, on: bool) {
        let mut set = self.failing_open.borrow_mut();
        if on {
            set.insert(upstream.into());
        } else {
            set.remove(upstream);
        }
    }

    /// A new table starts in the fail-open state the worker had on the same upstreams.
    fn carry_failing_open(&self, table: &RouteTable) {
        let set = self.failing_open.borrow();
        if set.is_empty() {
            return;
        }
        for upstream in table.upstreams() {
            if let Backend::Servers(pool) = &upstream.kind {
                if set.contains(&upstream.name) {
                    pool.set_failing_open(true);
                }
            }
        }
    }

    /// `replaced` is the generation of the table the swap took out of service.
    fn retire(&self, retired: Retired, replaced: u64, source: *const SourceSlot) {
        if let Some(table) = retired.table {
            // SAFETY: source slots live as long as the cycle's configuration.
            unsafe { self.drain_stale(source) };
            self.retiring.borrow_mut().push(RetiringTable {
                table,
                generation: replaced,
                source,
            });
        }
        self.free_retired(retired.documents);
    }

    /// Frees the retired tables no session or probe uses any more, and `documents`: on a
    /// thread, since freeing a 100,000-route table takes tens of milliseconds, unless they are
    /// small (a worker that starts no thread keeps glibc's single-threaded paths).
    fn free_retired(&self, documents: Vec<Arc<Document>>) {
        let mut tables = Vec::new();
        let mut freed = Vec::new();
        {
            let mut queue = self.retiring.borrow_mut();
            let mut i = 0;
            while i < queue.len() {
                if Rc::strong_count(&queue[i].table) > 1 {
                    i += 1;
                    continue;
                }
                let r = queue.swap_remove(i);
                freed.push((r.source, r.generation));
                match Rc::try_unwrap(r.table) {
                    Ok(table) => tables.push(table),
                    // Only a weak reference could stop it, and none is ever made.
                    Err(table) => drop(table),
                }
            }
        }
        if tables.is_empty() && documents.is_empty() {
            return;
        }
        let weight = tables
            .iter()
            .map(RouteTable::free_weight)
            .chain(documents.iter().map(|d| d.weight()))
            .fold(0usize, usize::saturating_add);
        let inline = weight <= SMALL_ROUTES;
        for (source, generation) in freed {
            // SAFETY: source slots live as long as the cycle's configuration.
            let path = unsafe { (*source).path.display() };
            ngx_log_error!(
                NGX_LOG_INFO,
                self.log,
                "edge_routes: {}: table {} is no longer used, freed{}",
                path,
                generation,
                if inline { "" } else { " off the event loop" }
            );
        }
        let garbage = (tables, documents);
        if inline {
            drop(garbage);
            return;
        }
        // Without a thread, it is dropped here.
        let _ = spawn_quiet("edge-retire", move || {
            // Only when the CPU has nothing else to do: on a busy edge the freeing must not
            // take turns with the event loop.
            idle_priority();
            without_fastbins(|| drop(garbage));
            // Give the freed pages back: the threads' arenas otherwise keep the peak of
            // every build resident.
            // SAFETY: malloc_trim is thread-safe.
            unsafe { libc::malloc_trim(0) };
        });
    }

    /// Whether a table the worker serves has an upstream with active checks.
    pub fn has_checks(&self) -> bool {
        self.tables().any(|t| t.checked().next().is_some())
    }

    /// The route tables the worker serves now, for the checks and the status page.
    pub fn tables(&self) -> impl Iterator<Item = &Rc<RouteTable>> {
        self.main_conf()
            .sources
            .iter()
            .filter_map(|slot| slot.source.as_ref().map(|s| s.table()))
    }
}

/// A session listed by `track` ends: off the list, and its drain timer (if any) stopped.
unsafe extern "C" fn untrack(data: *mut core::ffi::c_void) {
    let s = data.cast::<ngx_stream_session_t>();
    let Some(ctx) = session::get(s) else { return };
    if let Some(ev) = ctx.drain.as_mut() {
        cancel(&mut **ev);
    }
    let index = core::mem::take(&mut ctx.drain_index);
    let Some(w) = get() else { return };
    if index == 0 {
        return;
    }
    let mut list = w.proxied.borrow_mut();
    if index > list.len() || list[index - 1] != s {
        return;
    }
    list.swap_remove(index - 1);
    if let Some(&moved) = list.get(index - 1) {
        if let Some(other) = session::get(moved) {
            other.drain_index = index;
        }
    }
}

/// `edge_drain_timeout` passed for a session whose server or route went away: it is closed
/// the way nginx closes sessions at `worker_shutdown_timeout` (the proxy module sees
/// `c->close` and finalizes the session, upstream side included).
unsafe extern "C" fn on_drained(ev: *mut ngx_event_t) {
    let c = (*ev).data.cast::<nginx_sys::ngx_connection_t>();
    ngx_log_error!(
        NGX_LOG_INFO,
        (*c).log,
        "edge: closing a connection kept past edge_drain_timeout"
    );
    (*c).set_close(1);
    if let Some(handler) = (*(*c).read).handler {
        handler((*c).read);
    }
}

/// The zone's touch on a timer of its own (no route source is re-checked often enough to
/// carry it).
unsafe extern "C" fn on_touch(ev: *mut ngx_event_t) {
    if exiting() {
        return;
    }
    if let Some(w) = get() {
        w.upkeep();
    }
    ngx_add_timer(ev, zone::TOUCH_MS as _);
}

/// Re-checks a source. The slow part of a change (reading, parsing, checking, merging) runs
/// on a thread of its own, so that the worker's event loop only lists the files and, at the
/// end, swaps the new table in.
unsafe extern "C" fn on_refresh(ev: *mut ngx_event_t) {
    if exiting() {
        return;
    }
    let Some(w) = get() else { return };
    let entered = Entered::now();
    let r = &mut *(*ev).data.cast::<Refresh>();
    if w.touch.handler.is_none() && now_ms().saturating_sub(w.touched.get()) >= zone::TOUCH_MS {
        w.upkeep();
    }
    let slot = &mut *r.slot;
    let log = (*ev).log;
    w.free_retired(Vec::new());
    kept(w, r);
    let Some(source) = slot.source.as_mut() else {
        ngx_add_timer(ev, slot.interval);
        return;
    };
    // Servers that did not fit in the zone, when the build attached the table it made.
    let mut attached_by_build = None;
    let mut published = None;
    let mut step = match r.job.take() {
        Some(job) if !job.is_finished() => {
            r.job = Some(job);
            r.busy += entered.spent();
            r.poll_ms = (r.poll_ms * 2).min(POLL_MAX_MS);
            ngx_add_timer(ev, r.poll_ms);
            return;
        }
        Some(Job::Load(handle, generation)) => {
            let result = handle
                .join()
                .map_err(|_| "the thread loading it failed".to_owned());
            loaded(w, r, result, generation, entered);
            ngx_add_timer(ev, FOLLOW_MS as ngx_msec_t);
            return;
        }
        Some(Job::Build(handle)) => match handle.join() {
            Ok(built) => {
                r.build_cpu = built.cpu;
                attached_by_build = built.unattached;
                published = built.published;
                source.resume(built.done)
            }
            Err(_) => return build_failed(ev, &slot.path, slot.interval, source),
        },
        None => {
            r.busy = Spent::default();
            // One worker reads the source for the whole edge and publishes what it builds;
            // the others map it.
            r.publishing = false;
            if let Some(p) = r.published {
                let Some(generation) = p.generation_of(r.key) else {
                    // The entry went to another configuration: make ours again.
                    r.published = w.zone.as_ref().and_then(|z| z.published(r.key, w.pid));
                    ngx_add_timer(ev, slot.interval);
                    return;
                };
                let their_own = p.on_their_own.load(Relaxed) != 0;
                match r
                    .follow
                    .next(generation, p.lead(w.pid), their_own, now_ms())
                {
                    Action::Wait(ms) => {
                        ngx_add_timer(ev, ms as ngx_msec_t);
                        return;
                    }
                    Action::Load(generation) => {
                        let (pid, fd) = p.shared();
                        // Opened here, without blocking: mapped and checked here too when
                        // small, on a thread otherwise.
                        let published = match share::open_published(pid, fd) {
                            Ok(published) => published,
                            Err(e) => {
                                loaded(w, r, Ok(Err(e)), generation, entered);
                                ngx_add_timer(ev, FOLLOW_MS as ngx_msec_t);
                                return;
                            }
                        };
                        if published.len <= SMALL_IMAGE_BYTES {
                            let zone = w.zone.clone();
                            let result =
                                catch_unwind(AssertUnwindSafe(|| load(published, r.key, zone)))
                                    .map_err(|_| "loading it failed".to_owned());
                            loaded(w, r, result, generation, entered);
                            ngx_add_timer(ev, FOLLOW_MS as ngx_msec_t);
                            return;
                        }
                        match spawn_load(published, r.key, w.zone.clone()) {
                            Ok(handle) => {
                                r.job = Some(Job::Load(handle, generation));
                                r.poll_ms = POLL_MS;
                                ngx_add_timer(ev, r.poll_ms);
                            }
                            Err(e) => {
                                let e = format!("no thread to load it ({e})");
                                load_failed(w, r, generation, &e);
                                ngx_add_timer(ev, FOLLOW_MS as ngx_msec_t);
                            }
                        }
                        return;
                    }
                    Action::Read { publish } => r.publishing = publish,
                }
            }
            // The worker that reads the table for the edge fetches its URL sources.
            if r.published.is_none() || r.publishing {
                start_feeds(r.index);
            }
            r.kicked = false;
            source.start()
        }
    };
    let mcf = w.main_conf();
    let mut inline_steps = 0;
    loop {
        match step {
            Step::Finished(events) => {
                log_events(log, &events);
                if let Some(outcome) = published {
                    publish(w, r, source, outcome);
                }
                let generation = source.generation();
                let replaced = r.attached;
                if generation != replaced {
                    r.attached = generation;
                    if let Some(zone) = w.zone.as_ref() {
                        let unattached =
                            attached_by_build.unwrap_or_else(|| zone.attach(source.table()));
                        zone.log_full(unattached, log);
                    }
                    w.carry_failing_open(source.table());
                    w.retire(source.take_retired(), replaced, r.slot);
                    let accepted = source.take_accepted();
                    in_service(log, slot, generation, r.busy + entered.spent());
                    let fallbacks = crate::ALLOCATOR.fallbacks();
                    if fallbacks > w.arena_fallbacks.replace(fallbacks) {
                        ngx_log_error!(
                            NGX_LOG_INFO,
                            log,
                            "edge_routes: {} table build(s) of this process ran without an arena of their own (every mapping in use): memory after changes may stay higher",
                            fallbacks
                        );
                    }
                    wake_checks();
                    keep(w, r, &accepted);
                } else {
                    w.retire(source.take_retired(), replaced, r.slot);
                }
                ngx_add_timer(ev, if r.kicked { 0 } else { slot.interval });
                return;
            }
            Step::NeedWork(work) => {
                let names = Arc::clone(&mcf.nginx_upstreams);
                // The leader publishes what it builds, under the edge's next number.
                let publish = r
                    .published
                    .filter(|_| r.publishing && matches!(work, Work::Merge(..)))
                    .map(|p| {
                        let next = p.generation_of(r.key).unwrap_or(0).max(source.generation()) + 1;
                        (next, r.key)
                    });
                // Small work in the event loop, `INLINE_STEPS` at most per call (a merge that
                // fails is tried again without a file, as often as there are files: the
                // retries past those go to a thread).
                if inline_steps < INLINE_STEPS && work.is_small() {
                    inline_steps += 1;
                    let zone = w.zone.clone();
                    match catch_unwind(AssertUnwindSafe(|| build(work, &names, zone, publish))) {
                        Ok(built) => {
                            r.build_cpu = built.cpu;
                            attached_by_build = built.unattached;
                            published = built.published.or(published);
                            step = source.resume(built.done);
                            continue;
                        }
                        Err(_) => return build_failed(ev, &slot.path, slot.interval, source),
                    }
                }
                match spawn(work, names, w.zone.clone(), publish) {
                    Ok(job) => {
                        r.job = Some(Job::Build(job));
                        r.busy += entered.spent();
                        r.poll_ms = POLL_MS;
                        ngx_add_timer(ev, r.poll_ms);
                        return;
                    }
                    Err(e) => {
                        ngx_log_error!(
                            NGX_LOG_WARN,
                            log,
                            "edge_routes: no thread for the table ({}), building it in the event loop",
                            e
                        );
                        source.abandon();
                        step = Step::Finished(source.refresh(&|n| mcf.upstream_exists(n)));
                    }
                }
            }
        }
    }
}

/// Building a table panicked (on its thread or in the event loop): logged, the refresh given
/// up, the last good table kept.
unsafe fn build_failed(
    ev: *mut ngx_event_t,
    path: &std::path::Path,
    interval: ngx_msec_t,
    source: &mut Source,
) {
    ngx_log_error!(
        NGX_LOG_ALERT,
        (*ev).log,
        "edge_routes: {}: building the table failed; the last good table keeps serving",
        path.display()
    );
    source.abandon();
    ngx_add_timer(ev, interval);
}

/// Starts fetching the URL sources that table `index` is the first to merge, if this worker
/// does not yet.
unsafe fn start_feeds(index: usize) {
    let Some(w) = WORKER.as_mut() else { return };
    let mcf = &*w.mcf;
    for (i, url) in mcf.urls.iter().enumerate() {
        if url.owner == index && !w.fetching[i] {
            w.fetching[i] = true;
            let feed = feeds::start(&**url, w.log, kick, build_cpu, index);
            w.feeds.push(feed);
        }
    }
}

/// A URL source's file changed: table `index` looks at once, or right after the work under
/// way.
unsafe fn kick(index: usize) {
    let Some(w) = WORKER.as_mut() else { return };
    let Some(r) = w.refreshes.iter_mut().find(|r| r.index == index) else {
        return;
    };
    if r.job.is_some() {
        r.kicked = true;
        return;
    }
    cancel(&mut r.timer);
    ngx_add_timer(&mut r.timer, 0);
}

/// The CPU time table `index`'s last build took (for a feed's pace: see `feeds`).
unsafe fn build_cpu(index: usize) -> Duration {
    let Some(w) = WORKER.as_ref() else {
        return Duration::ZERO;
    };
    w.refreshes
        .iter()
        .find(|r| r.index == index)
        .map_or(Duration::ZERO, |r| r.build_cpu)
}

/// Puts the calling thread in the idle scheduling class (Linux `SCHED_IDLE`).
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: applies to the calling thread only; failure leaves its priority as it was.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// Runs `work` on a thread of its own (see `build`).
fn spawn(
    work: Work,
    names: Arc<HashSet<String>>,
    zone: Option<Arc<Zone>>,
    publish: Option<(u64, u64)>,
) -> std::io::Result<JoinHandle<Built>> {
    spawn_quiet("edge-routes", move || {
        // In an arena of its own (see `arena`): what the build frees goes back to the system
        // when it ends, and what it keeps does not pin the pages of a malloc arena that later
        // builds fill with their garbage (after a first change at 100,000 routes, the
        // thread's malloc arena kept 12.6 MB resident, trimmed or not).
        let (built, _) = crate::ALLOCATOR.scoped(|| build(work, &names, zone, publish));
        // Give back the pages the work freed: a thread's malloc arena otherwise keeps the
        // peak of every build (the table it made may be freed later in the event loop, where
        // nothing trims).
        // SAFETY: malloc_trim is thread-safe.
        unsafe { libc::malloc_trim(0) };
        built
    })
}

/// Does `work`, and attaches the table it builds, if any, to the zone: for a large table that
/// is milliseconds of lookups, done on a thread (`spawn`) unless the work is small. With
/// `publish` (generation, key), the table's image is sealed into a memfd and the table served
/// from its mapping: every worker then shares its pages.
fn build(
    work: Work,
    names: &HashSet<String>,
    zone: Option<Arc<Zone>>,
    publish: Option<(u64, u64)>,
) -> Built {
    let started = crate::stream::thread_cpu();
    let mut done = work.run(&|n| names.contains(n));
    let mut published = None;
    let mut unattached = None;
    let merged = match &mut done {
        Done::Merged(merged) => merged.as_mut().as_mut().ok(),
        Done::Parsed(_) => None,
    };
    if let Some((table, _)) = merged {
        if let Some((generation, key)) = publish {
            let shared = share::publish(table.image().bytes(), key, generation);
            published = Some(shared.and_then(|shared| {
                // The same table, served from the memfd: the upstreams stay as built.
                if table.use_image(shared.image) {
                    Ok((generation, shared.fd))
                } else {
                    Err("the image read back differs from the table written".to_owned())
                }
            }));
        }
        unattached = zone.map(|zone| zone.attach(table));
    }
    Built {
        done,
        unattached,
        published,
        cpu: crate::stream::thread_cpu().saturating_sub(started),
    }
}

/// Maps, on a thread of its own, a table another worker published (see `load`).
fn spawn_load(
    published: share::Published,
    key: u64,
    zone: Option<Arc<Zone>>,
) -> std::io::Result<JoinHandle<Loaded>> {
    spawn_quiet("edge-routes", move || {
        let (loaded, _) = crate::ALLOCATOR.scoped(|| load(published, key, zone));
        // As after a build (see `spawn`): what checking the image freed goes back.
        // SAFETY: malloc_trim is thread-safe.
        unsafe { libc::malloc_trim(0) };
        loaded
    })
}

/// Maps a table another worker published, and attaches it to the zone.
fn load(published: share::Published, key: u64, zone: Option<Arc<Zone>>) -> Loaded {
    let (generation, image) = published.map(key)?;
    let table = RouteTable::from_image(image);
    let unattached = zone.map(|zone| zone.attach(&table));
    Ok((generation, table, unattached))
}

/// The leader's table is in service: tell the other workers where it is, and keep its memfd
/// open for them (the previous one is closed: a worker that mapped it keeps its pages). If it
/// could not be published, every worker reads the source itself until the leader can again.
unsafe fn publish(
    w: &Worker,
    r: &mut Refresh,
    source: &mut Source,
    outcome: Result<(u64, OwnedFd), String>,
) {
    let Some(p) = r.published else { return };
    let path = (*r.slot).path.display();
    match outcome {
        Ok((generation, fd)) => {
            source.set_generation(generation);
            p.publish(w.pid, fd.as_raw_fd(), generation);
            r.shared = Some(fd);
            if p.on_their_own.swap(0, Relaxed) != 0 {
                ngx_log_error!(
                    NGX_LOG_NOTICE,
                    w.log,
                    "edge_routes: {}: table {} is published again: the other workers map it",
                    path,
                    generation
                );
            }
        }
        Err(e) => {
            if p.on_their_own.swap(1, Relaxed) == 0 {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    w.log,
                    "edge_routes: {}: the table cannot be published for the other workers ({}): each worker reads the source itself until it can",
                    path,
                    e
                );
            }
        }
    }
}

/// Keeps, on a thread, the URL sources' candidates the table accepted as their accepted
/// versions (see `caches`): what nginx starts from.
unsafe fn keep(w: &Worker, r: &mut Refresh, accepted: &[std::path::PathBuf]) {
    for files in w.main_conf().urls.iter().filter_map(|u| u.files.as_ref()) {
        let merged = files
            .candidate()
            .is_some_and(|c| accepted.iter().any(|a| a == c));
        // The version read for the merge that just ended: a later read may change it.
        if let (true, Some(digest)) = (merged, files.read_digest()) {
            r.to_keep.retain(|(f, _)| !Arc::ptr_eq(f, files));
            r.to_keep.push((Arc::clone(files), digest));
        }
    }
    kept(w, r);
}

/// Logs why keeping accepted candidates failed once its thread is done, and starts the next.
unsafe fn kept(w: &Worker, r: &mut Refresh) {
    match r.keeping.take() {
        Some(job) if job.is_finished() => {
            for e in job.join().unwrap_or_default() {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    w.log,
                    "edge_routes_url: cannot keep the last good table ({}): nginx would start from an older one",
                    e
                );
            }
        }
        Some(job) => {
            r.keeping = Some(job);
            return;
        }
        None => {}
    }
    if r.to_keep.is_empty() {
        return;
    }
    let files = r.to_keep.clone();
    // Without a thread, tried again at the next refresh.
    if let Ok(job) = spawn_quiet("edge-keep", move || {
        files
            .iter()
            .filter_map(|(f, digest)| f.promote(digest).err())
            .collect()
    }) {
        r.to_keep.clear();
        r.keeping = Some(job);
    }
}

/// Says that a table is in service, and what it cost this worker's event loop.
fn in_service(log: *mut ngx_log_t, slot: &SourceSlot, generation: u64, busy: Spent) {
    ngx_log_error!(
        NGX_LOG_NOTICE,
        log,
        "edge_routes: {}: table {} in service; this worker's event loop spent {:.2} ms on it ({:.2} ms of CPU); threads started by this worker: {}",
        slot.path.display(),
        generation,
        busy.wall.as_secs_f64() * 1000.0,
        busy.cpu.as_secs_f64() * 1000.0,
        crate::stream::threads_started()
    );
}

/// Time spent: wall (what clients waited, with the moments the worker waited for a core),
/// and the CPU time of the event loop's thread (what the work cost).
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

impl core::ops::Add for Spent {
    type Output = Spent;
    fn add(self, other: Spent) -> Spent {
        Spent {
            wall: self.wall + other.wall,
            cpu: self.cpu + other.cpu,
        }
    }
}

impl core::ops::AddAssign for Spent {
    fn add_assign(&mut self, other: Spent) {
        *self = *self + other;
    }
}

/// When an event handler was entered, to measure what it spent.
#[derive(Clone, Copy)]
struct Entered {
    at: Instant,
    cpu: Duration,
}

impl Entered {
    fn now() -> Entered {
        Entered {
            at: Instant::now(),
            cpu: crate::stream::thread_cpu(),
        }
    }

    fn spent(&self) -> Spent {
        Spent {
            wall: self.at.elapsed(),
            cpu: crate::stream::thread_cpu().saturating_sub(self.cpu),
        }
    }
}

/// A published generation was mapped (or not): serve it, or keep the last good table and try
/// again, or read the source itself (see `Follow`).
unsafe fn loaded(
    w: &Worker,
    r: &mut Refresh,
    result: Result<Loaded, String>,
    generation: u64,
    entered: Entered,
) {
    let slot = &mut *r.slot;
    let Some(source) = slot.source.as_mut() else {
        return;
    };
    match result {
        Ok(Ok((generation, table, unattached))) => {
            r.follow.loaded(generation);
            source.adopt(table, generation);
            let replaced = core::mem::replace(&mut r.attached, generation);
            if let (Some(zone), Some(n)) = (w.zone.as_ref(), unattached) {
                zone.log_full(n, w.log);
            }
            w.carry_failing_open(source.table());
            w.retire(source.take_retired(), replaced, r.slot);
            in_service(w.log, slot, generation, r.busy + entered.spent());
            wake_checks();
        }
        Ok(Err(e)) | Err(e) => load_failed(w, r, generation, &e),
    }
}

/// Logs a failed load: its first failure, and the worker giving up on it.
unsafe fn load_failed(w: &Worker, r: &mut Refresh, generation: u64, why: &str) {
    let path = (*r.slot).path.display();
    match r.follow.failed(generation, now_ms()) {
        Failed::Retrying { first: true } => {
            ngx_log_error!(
                NGX_LOG_WARN,
                w.log,
                "edge_routes: {}: table {} cannot be loaded ({}); trying again",
                path,
                generation,
                why
            );
        }
        Failed::Retrying { first: false } => {}
        Failed::GaveUp => {
            ngx_log_error!(
                NGX_LOG_ERR,
                w.log,
                "edge_routes: {}: table {} cannot be loaded ({}); this worker reads the source itself until the next one",
                path,
                generation,
                why
            );
        }
    }
}
