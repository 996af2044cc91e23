//! The URL sources, fetched by one worker for the whole edge: the worker that leads the table
//! a source is merged into (see `worker`). A feed starts from what the source brought before
//! (its files in the state folder, see `caches`), so that a kind that has not answered yet
//! keeps its objects. Each resource of a source (a Kubernetes kind, or the polled document)
//! has its own connection, driven by nginx events (`fetch`); what it brings is parsed off the
//! event loop when large, gathered into the source's catalog (a kind replaced only by its own
//! full list), and written, on a thread, as the source's candidate. The table's refresh then
//! reads that file as it reads any route file, and keeps it as the accepted version once it
//! has merged it: the last good version survives every error and every restart, and the other
//! workers get the table the leader publishes.

use core::ffi::c_void;
use core::ptr;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use nginx_sys::{
    ngx_add_timer, ngx_event_t, ngx_log_t, ngx_msec_t, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE,
};
use ngx::ngx_log_error;
use serde_json::{json, Value};

use crate::caches::Files;
use crate::conf::UrlSlot;
use crate::feed::http;
use crate::feed::kube::{
    self, Cache, Catalog, Event, Kind, Object, Page, CACHE_MAGIC, MAX_BODY, MAX_EVENT, MAX_OBJECTS,
};
use crate::feed::plan::{Body, Mode, Resource, State};
use crate::feed::state::write_atomically;
use crate::feed::Format;
use crate::fetch::Exchange;
use crate::stream::{cancel_timer, spawn_quiet as spawn, thread_cpu};

/// Distinct problems remembered per failure, to log each once.
const MAX_LOGGED: usize = 8;

/// While a thread parses or writes, its result is looked for this often.
const POLL_MS: ngx_msec_t = 5;

/// After a delete makes room for objects refused before, the kind is listed again after this
/// long (deletes come in bursts).
const RELIST_MS: u64 = 1000;

/// A write of the catalog costs the whole source (making its routes, serialising it), and
/// the table's build that follows (merge and image) about as much again; the other workers'
/// mapping of it and keeping it as accepted add less. The next write waits this many times
/// the CPU time of the last write and build, so that under a stream of events a source costs
/// the edge about a tenth of a core whatever its size, the events of the meantime written
/// together (as kube-proxy's `--iptables-min-sync-period`, but scaled to the cost).
const WRITE_GAP_FACTOR: u32 = 12;
/// Bounds of that wait: a small source's events are written at once, a huge one's within a
/// second.
const WRITE_GAP_MIN_MS: u64 = 20;
const WRITE_GAP_MAX_MS: u64 = 1000;

/// Addresses of a URL's host name tried in turn, at most.
const MAX_RESOLVED: usize = 16;

/// Tells the table that merges a source that its file changed.
pub type Kick = unsafe fn(usize);
/// The CPU time the table's last build took (its merge and image, on a thread).
pub type Cost = unsafe fn(usize) -> std::time::Duration;

/// One URL source, in the worker that fetches it.
pub struct Feed {
    url: *const UrlSlot,
    log: *mut ngx_log_t,
    // Boxed: events point at each one.
    #[allow(clippy::vec_box)]
    resources: Vec<Box<Res>>,
    catalog: Catalog,
    /// `format=edge`: the last good document's bytes, not yet written.
    edge_doc: Option<Vec<u8>>,
    /// The catalog changed since it was last written.
    dirty: bool,
    /// The status changed since it was last written.
    status_dirty: bool,
    writer: Option<JoinHandle<Written>>,
    /// Reading what the source brought before, on a thread: no request is made until then.
    seeding: Option<JoinHandle<Seeded>>,
    seeded: bool,
    /// Of the candidate's bytes last written, to skip writing the same again.
    written_hash: u64,
    flush: ngx_event_t,
    token: Token,
    kick: Kick,
    cost: Cost,
    owner: usize,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    /// The problems logged since the source last answered well, so that each is logged once.
    logged: Vec<String>,
    /// The objects refused for want of room when that was last logged.
    refused_logged: usize,
    /// Failed writes in a row: they back off.
    write_failures: u32,
    /// The catalog is not written again before then (see `WRITE_GAP_FACTOR`).
    next_write_ms: u64,
    /// What the source discovered when last written (see `Discovery`).
    discovery: Option<kube::Discovery>,
    /// The cluster's default IngressClass, as the catalog last written said.
    default_class: Option<String>,
    stats: Stats,
    seed: u64,
    /// The longest the event loop has spent in one step of this source (a callback), in CPU
    /// time of the worker's thread: a step preempted by the machine's other work does not
    /// count what it waited.
    longest: std::time::Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    routes: usize,
    invalid: usize,
    repeated: usize,
    unrouted: usize,
    /// Objects that route nothing because of a problem of their own.
    problems: usize,
    /// Ingresses of a class the edge does not serve; routes no Gateway accepted.
    other_class: usize,
    unaccepted: usize,
    /// Objects past the source's limits of routes and upstreams.
    over_limit: usize,
    ambiguous_class: bool,
}

/// What a writer thread did.
struct Written {
    result: Result<Option<u64>, String>,
    stats: Option<Stats>,
    first_invalid: Option<String>,
    first_problem: Option<String>,
    default_class: Option<String>,
    first_over_limit: Option<String>,
    /// The CPU time the thread spent.
    cpu: std::time::Duration,
    /// What the source discovers, when made again (see `Discovery`).
    discovery: Option<kube::Discovery>,
}

/// What a feed starts from: the catalog of a Kubernetes source's last candidate (or accepted
/// version), if it has one that this nginx can trust.
type Seeded = Result<Option<Catalog>, String>;

/// One resource: its protocol state, its connection, its timer.
struct Res {
    feed: *mut Feed,
    /// Its place in `Feed::resources`.
    index: usize,
    plan: Resource,
    ex: Option<Box<Exchange>>,
    mode: Mode,
    /// The answer to a request: read whole, or line by line.
    streaming: bool,
    collecting: bool,
    line: Vec<u8>,
    first_line: bool,
    timer: ngx_event_t,
    parsing: Option<JoinHandle<Parsed>>,
    /// What went wrong with it last, until it answers well.
    error: Option<String>,
    /// A name resolution under way, for a URL with a host name.
    resolving: *mut nginx_sys::ngx_resolver_ctx_t,
    /// Its answer: the addresses of the URL's host name, tried in turn by the request about
    /// to be made until one answers (see `next_address`).
    addresses: Vec<std::net::IpAddr>,
    /// The one being tried.
    address: usize,
    /// The address that answered last: tried first while the name has it (the resolver
    /// rotates its answers, and an address that never answers costs a whole timeout).
    answered_by: Option<std::net::IpAddr>,
    /// The connection of the last list page, kept for the next request.
    idle: Option<Box<Exchange>>,
    absent_logged: bool,
    /// Its objects are known: listed since the feed started, absent, or read back from the
    /// source's last candidate. The catalog is written only once every kind is known, so
    /// that a kind that has not answered yet keeps its routes.
    known: bool,
}

enum Parsed {
    Page(Result<Page, String>),
    Edge(Result<Vec<u8>, String>),
}

/// The bearer token, re-read when its file changes (projected tokens rotate).
struct Token {
    path: Option<String>,
    stamp: (u64, u64, i64, i64),
    value: Option<String>,
}

impl Token {
    fn current(&mut self) -> Result<Option<&str>, String> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        // Follows symlinks: kubelet swaps a `..data` link.
        let meta = std::fs::metadata(path).map_err(|e| format!("token_file {path}: {e}"))?;
        let stamp = (meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec());
        if self.value.is_none() || stamp != self.stamp {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("token_file {path}: {e}"))?;
            let token = text.trim();
            if token.is_empty()
                || token.len() > 16 * 1024
                || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!("token_file {path}: not a bearer token"));
            }
            self.value = Some(token.to_owned());
            self.stamp = stamp;
        }
        Ok(self.value.as_deref())
    }
}

impl Feed {
    fn options(&self) -> &'static crate::feed::Options {
        &self.slot().options
    }

    /// The source's files in the state folder (every URL source of a table has them).
    fn files(&self) -> Option<&'static Arc<Files>> {
        self.slot().files.as_ref()
    }

    /// Not tied to a borrow of the feed: the configuration outlives it.
    fn slot(&self) -> &'static UrlSlot {
        // SAFETY: URL slots live as long as the cycle's configuration, which outlives the
        // worker's feeds.
        unsafe { &*self.url }
    }

    fn jitter(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    /// A problem, logged once for the source until it changes or the source answers again
    /// (the resources of one API server mostly fail together).
    fn problem(&mut self, res: usize, why: String) {
        // Once per distinct problem until the source answers again: its kinds fail one after
        // another, with messages that may interleave.
        if !self.logged.contains(&why) {
            ngx_log_error!(
                NGX_LOG_ERR,
                self.log,
                "edge_routes_url {}: {}; the last good table keeps serving",
                self.options().name,
                why
            );
            if self.logged.len() == MAX_LOGGED {
                self.logged.remove(0);
            }
            self.logged.push(why.clone());
        }
        self.resources[res].error = Some(why.clone());
        self.last_error = Some(why);
        self.status_dirty = true;
    }

    fn answered(&mut self, res: usize) {
        let was_failing = self.resources[res].error.take().is_some();
        if was_failing {
            // The server is back: the other resources waiting out a backoff try again now.
            for i in 0..self.resources.len() {
                let wait = self.jitter() % 250;
                let r = &mut self.resources[i];
                if i != res
                    && r.plan.state == State::Backoff
                    && r.ex.is_none()
                    && r.parsing.is_none()
                {
                    // SAFETY: the resource's timer event lives in the boxed resource.
                    unsafe { schedule(r, wait) };
                }
            }
        }
        if !self.logged.is_empty() && self.resources.iter().all(|r| r.error.is_none()) {
            self.logged.clear();
            ngx_log_error!(
                NGX_LOG_NOTICE,
                self.log,
                "edge_routes_url {}: answers again",
                self.options().name
            );
        }
        self.last_success = Some(SystemTime::now());
        self.status_dirty = true;
    }

    /// The source's state, as `edge_status` shows it.
    fn status(&self) -> Value {
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| (d.as_millis() as f64) / 1000.0)
        };
        let resources: Vec<Value> = self
            .resources
            .iter()
            .map(|r| {
                json!({
                    "path": r.plan.path(),
                    "kind": r.plan.kind.map(|k| format!("{k:?}")),
                    "state": r.plan.state.as_str(),
                    "resource_version": r.plan.resource_version,
                    "error": r.error,
                })
            })
            .collect();
        let states: Vec<State> = self
            .resources
            .iter()
            .map(|r| r.plan.state)
            .filter(|s| *s != State::Absent)
            .collect();
        let state = [
            State::Backoff,
            State::Listing,
            State::Polling,
            State::Watching,
        ]
        .into_iter()
        .find(|s| states.contains(s))
        .unwrap_or(State::Absent);
        json!({
            "name": self.options().name,
            "url": self.options().url.to_string(),
            "state": state.as_str(),
            "pid": std::process::id(),
            "last_success": unix(self.last_success),
            "last_error": self.last_error,
            "objects": self.catalog.len(),
            "routes": self.stats.routes,
            "invalid_hosts": self.stats.invalid,
            "repeated_hosts": self.stats.repeated,
            "unrouted_objects": self.stats.unrouted,
            "invalid_objects": self.stats.problems,
            "other_class_ingresses": self.stats.other_class,
            "unaccepted_routes": self.stats.unaccepted,
            "over_limit_objects": self.stats.over_limit,
            "default_ingress_class": self.default_class,
            "refused_objects": self.catalog.refused(),
            "longest_step_ms": (self.longest.as_secs_f64() * 1e4).round() / 10.0,
            "resources": resources,
        })
    }
}

/// Starts fetching `url` in this worker. `owner` is the table it is merged into, for `kick`.
pub unsafe fn start(
    url: *const UrlSlot,
    log: *mut ngx_log_t,
    kick: Kick,
    cost: Cost,
    owner: usize,
) -> Box<Feed> {
    let options = &(*url).options;
    let k8s = options.format == Format::K8s;
    let seed = crate::health::fnv1a(
        &[u64::from(std::process::id()), crate::health::now_ms()]
            .map(u64::to_le_bytes)
            .concat(),
    ) | 1;
    let mut feed = Box::new(Feed {
        url,
        log,
        resources: Vec::new(),
        catalog: Catalog::default(),
        edge_doc: None,
        dirty: false,
        status_dirty: true,
        writer: None,
        seeding: None,
        seeded: false,
        written_hash: 0,
        flush: core::mem::zeroed(),
        token: Token {
            path: options.token_file.clone(),
            stamp: (0, 0, 0, 0),
            value: None,
        },
        kick,
        cost,
        owner,
        last_success: None,
        last_error: None,
        logged: Vec::new(),
        refused_logged: 0,
        write_failures: 0,
        next_write_ms: 0,
        discovery: None,
        default_class: None,
        stats: Stats::default(),
        seed,
        longest: std::time::Duration::ZERO,
    });
    let feed_ptr: *mut Feed = &mut *feed;
    let mut plans = Resource::for_url(&options.url, k8s, options.interval_ms, seed);
    for (wanted, kind) in [
        (options.discover.nodes, Kind::Node),
        (options.discover.endpoints, Kind::EndpointSlice),
        (options.discover.services, Kind::Service),
    ] {
        if wanted {
            plans.push(Resource::discovered(
                &options.url,
                kind,
                options.interval_ms,
                seed,
            ));
        }
    }
    for (index, plan) in plans.into_iter().enumerate() {
        let mut res = Box::new(Res {
            feed: feed_ptr,
            index,
            plan,
            ex: None,
            mode: Mode::List,
            streaming: false,
            collecting: false,
            line: Vec::new(),
            first_line: true,
            timer: core::mem::zeroed(),
            parsing: None,
            error: None,
            resolving: ptr::null_mut(),
            addresses: Vec::new(),
            address: 0,
            answered_by: None,
            idle: None,
            absent_logged: false,
            known: false,
        });
        // Armed once the feed has read what the source brought before (see `seeded`).
        res.timer.handler = Some(on_timer);
        res.timer.data = ptr::from_mut(&mut *res).cast();
        res.timer.log = log;
        res.timer.set_cancelable(1);
        feed.resources.push(res);
    }
    feed.flush.handler = Some(on_flush);
    feed.flush.data = feed_ptr.cast();
    feed.flush.log = log;
    feed.flush.set_cancelable(1);
    read_before(&mut feed);
    ngx_log_error!(
        NGX_LOG_INFO,
        log,
        "edge_routes_url {}: this worker fetches it for the edge",
        options.name
    );
    feed
}

/// Stops a feed: its connections close, its timers go.
pub unsafe fn stop(feed: &mut Feed) {
    for r in &mut feed.resources {
        cancel_timer(&mut r.timer);
        r.ex = None;
        if !r.resolving.is_null() {
            nginx_sys::ngx_resolve_name_done(core::mem::replace(&mut r.resolving, ptr::null_mut()));
        }
    }
    cancel_timer(&mut feed.flush);
}

/// Reads, on a thread, what the source brought before: the feed starts from it.
unsafe fn read_before(feed: &mut Feed) {
    let Some(files) = feed.files().cloned() else {
        return seeded(feed, Ok(None));
    };
    let job = spawn("edge-feed", move || -> Seeded {
        let Some(bytes) = files.seed()? else {
            return Ok(None);
        };
        if !bytes.starts_with(CACHE_MAGIC) {
            // A native document: fetched whole at every change, nothing to start from.
            return Ok(None);
        }
        Cache::parse(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", files.accepted.display()))
    });
    match job {
        Ok(job) => feed.seeding = Some(job),
        Err(e) => {
            ngx_log_error!(
                NGX_LOG_ERR,
                feed.log,
                "edge_routes_url {}: no thread to read its last good table ({}); trying again",
                feed.options().name,
                e
            );
        }
    }
    ngx_add_timer(&mut feed.flush, POLL_MS);
}

/// The feed starts from `catalog` (if any), and makes its first requests.
unsafe fn seeded(feed: &mut Feed, catalog: Seeded) {
    feed.seeded = true;
    match catalog {
        // Every kind is known: from the last good table, or there was none (nothing to keep).
        Ok(catalog) => {
            if let Some(catalog) = catalog {
                feed.catalog = catalog;
            }
            for r in &mut feed.resources {
                r.known = true;
            }
        }
        Err(e) => {
            ngx_log_error!(
                nginx_sys::NGX_LOG_WARN,
                feed.log,
                "edge_routes_url {}: its last good table cannot be used ({}): the source's routes are kept as they are until every kind has answered",
                feed.options().name,
                e
            );
        }
    }
    for r in &mut feed.resources {
        ngx_add_timer(&mut r.timer, 0);
    }
}

unsafe fn schedule(r: &mut Res, ms: u64) {
    cancel_timer(&mut r.timer);
    ngx_add_timer(&mut r.timer, ms as ngx_msec_t);
}

/// A resource's timer: its next request, or a look at the thread parsing its last answer.
unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    if crate::stream::exiting() {
        return;
    }
    let entered = thread_cpu();
    let r = &mut *(*ev).data.cast::<Res>();
    let feed = &mut *r.feed;
    let index = r.index;
    timer_step(feed, index);
    feed.longest = feed.longest.max(thread_cpu().saturating_sub(entered));
}

unsafe fn timer_step(feed: &mut Feed, index: usize) {
    let r = &mut feed.resources[index];
    if let Some(job) = r.parsing.take() {
        if !job.is_finished() {
            r.parsing = Some(job);
            ngx_add_timer(&mut r.timer, POLL_MS);
            return;
        }
        let parsed = job
            .join()
            .unwrap_or_else(|_| Parsed::Page(Err("the thread parsing the answer failed".into())));
        return parsed_answer(feed, index, parsed);
    }
    request(feed, index);
}

/// Makes a resource's next request.
unsafe fn request(feed: &mut Feed, index: usize) {
    let token = match feed.token.current() {
        Ok(t) => t.map(str::to_owned),
        Err(e) => {
            feed.problem(index, e.clone());
            let j = feed.jitter();
            let r = &mut feed.resources[index];
            if let Body::Fail(_, ms) = r.plan.fail(e, j) {
                schedule(r, ms);
            }
            flush(feed);
            return;
        }
    };
    let options = feed.options();
    let tls = feed.slot().ssl.as_ref();
    let log = feed.log;
    let r = &mut feed.resources[index];
    let q = r.plan.request();
    r.mode = q.mode;
    r.streaming = false;
    r.collecting = false;
    r.line.clear();
    r.first_line = true;
    // A list's pages, and the watch after them, on one connection: the server closes it
    // after the watch.
    let keep_alive = q.mode == Mode::List;
    let request_bytes = || {
        http::request(
            &q.target,
            &options.url.authority(),
            token.as_deref(),
            q.etag.as_deref(),
            keep_alive,
        )
    };
    let idle = q.idle_ms.map(|ms| ms as ngx_msec_t);
    let deadline = options.timeout_ms as ngx_msec_t;
    // A watch is taken line by line; a list or a document whole.
    let max_pending = if q.mode == Mode::Watch {
        MAX_EVENT
    } else {
        MAX_BODY
    };
    if let Some(mut kept) = r.idle.take() {
        if kept.reuse(request_bytes(), keep_alive, deadline, idle, max_pending) {
            r.ex = Some(kept);
            feed.status_dirty = true;
            news(feed, index);
            flush(feed);
            return;
        }
    }
    let ip = match options.url.ip() {
        Some(ip) => ip,
        None => match r.addresses.get(r.address) {
            Some(&ip) => ip,
            None => return resolve(feed, index),
        },
    };
    let bytes = request_bytes();
    let server_name = options
        .url
        .ip()
        .is_none()
        .then_some(options.url.host.as_str());
    let owner = ptr::from_mut(&mut **r).cast();
    let started = Exchange::start(
        std::net::SocketAddr::new(ip, options.url.port),
        tls,
        server_name,
        bytes,
        keep_alive,
        deadline,
        idle,
        max_pending,
        log,
        on_news,
        owner,
    );
    match started {
        Ok(ex) => {
            r.ex = Some(ex);
            feed.status_dirty = true;
            // It may have made progress, or even ended, before any event: look now.
            news(feed, index);
            flush(feed);
        }
        Err(e) if next_address(feed, index, &e) => {}
        Err(e) => failed(feed, index, e),
    }
}

/// Resolves the URL's host name with nginx's resolver; the request follows.
unsafe fn resolve(feed: &mut Feed, index: usize) {
    let slot = feed.slot();
    let Some(resolver) = slot.resolver() else {
        return failed(feed, index, "no resolver for the host name".into());
    };
    let ctx = nginx_sys::ngx_resolve_start(resolver, ptr::null_mut());
    if ctx.is_null() || ctx as usize == usize::MAX {
        return failed(feed, index, "cannot start resolving the host name".into());
    }
    let host = &slot.options.url.host;
    (*ctx).name = nginx_sys::ngx_str_t {
        len: host.len(),
        data: host.as_ptr().cast_mut(),
    };
    (*ctx).handler = Some(on_resolved);
    (*ctx).data = ptr::from_mut(&mut *feed.resources[index]).cast();
    (*ctx).timeout = slot.options.timeout_ms as ngx_msec_t;
    feed.resources[index].resolving = ctx;
    if nginx_sys::ngx_resolve_name(ctx) != nginx_sys::NGX_OK as isize {
        // nginx freed the context.
        feed.resources[index].resolving = ptr::null_mut();
        failed(feed, index, "cannot resolve the host name".into());
    }
}

/// The resolver's answer: the first address, then the request.
unsafe extern "C" fn on_resolved(ctx: *mut nginx_sys::ngx_resolver_ctx_t) {
    let r = &mut *(*ctx).data.cast::<Res>();
    let feed = &mut *r.feed;
    let index = r.index;
    r.resolving = ptr::null_mut();
    let state = (*ctx).state;
    let mut addresses = Vec::new();
    if state == 0 {
        for i in 0..(*ctx).naddrs.min(MAX_RESOLVED) {
            if let Some(ip) = crate::stream::sockaddr_ip((*(*ctx).addrs.add(i)).sockaddr.cast()) {
                addresses.push(ip);
            }
        }
    }
    let host = &feed.options().url.host;
    let why = if state != 0 {
        let text = nginx_sys::ngx_resolver_strerror(state);
        let text = if text.is_null() {
            String::new()
        } else {
            core::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        };
        format!("cannot resolve \"{host}\": {text}")
    } else {
        format!("\"{host}\" has no address")
    };
    nginx_sys::ngx_resolve_name_done(ctx);
    if crate::stream::exiting() {
        return;
    }
    if addresses.is_empty() {
        failed(feed, index, why);
    } else {
        let r = &mut feed.resources[index];
        if let Some(at) = addresses.iter().position(|&a| Some(a) == r.answered_by) {
            addresses[..=at].rotate_right(1);
        }
        r.addresses = addresses;
        r.address = 0;
        request(feed, index);
    }
    flush(feed);
}

/// A connection to one address of the URL's host name failed before any answer: the next
/// one is tried at once (an API server behind a name with an address per control-plane node,
/// one of them down). `false` once each was tried: the name is resolved again next time.
unsafe fn next_address(feed: &mut Feed, index: usize, why: &str) -> bool {
    let log = feed.log;
    let name = &feed.slot().options.name;
    let r = &mut feed.resources[index];
    if r.address + 1 >= r.addresses.len() {
        r.addresses.clear();
        r.address = 0;
        return false;
    }
    r.ex = None;
    r.address += 1;
    ngx_log_error!(
        NGX_LOG_INFO,
        log,
        "edge_routes_url {}: {}: trying {}",
        name,
        why,
        r.addresses[r.address]
    );
    request(feed, index);
    true
}

/// The exchange under way failed, or its answer was refused: back off.
unsafe fn failed(feed: &mut Feed, index: usize, why: String) {
    feed.problem(index, why.clone());
    let j = feed.jitter();
    let r = &mut feed.resources[index];
    r.ex = None;
    if let Body::Fail(_, ms) = r.plan.fail(why, j) {
        schedule(r, ms);
    }
    flush(feed);
}

/// News from a resource's exchange.
unsafe fn on_news(data: *mut c_void) {
    let entered = thread_cpu();
    let r = &mut *data.cast::<Res>();
    let feed = &mut *r.feed;
    let index = r.index;
    news(feed, index);
    flush(feed);
    feed.longest = feed.longest.max(thread_cpu().saturating_sub(entered));
}

unsafe fn news(feed: &mut Feed, index: usize) {
    let j = feed.jitter();
    let options = feed.options();
    let log = feed.log;
    let r = &mut feed.resources[index];
    let Some(ex) = r.ex.as_mut() else { return };
    if let Some(head) = ex.take_head() {
        // Answered: the next request resolves the name again (nginx's resolver caches it).
        r.addresses.clear();
        r.address = 0;
        r.answered_by = Some(ex.peer());
        match r.plan.head(r.mode, head.status, head.etag, j) {
            Body::Stream => r.streaming = true,
            Body::Collect => r.collecting = true,
            Body::Again(ms) => {
                r.ex = None;
                if head.status == 304 {
                    feed.answered(index);
                }
                return schedule(&mut feed.resources[index], ms);
            }
            Body::Fail(why, ms) => {
                let why = format!("{}: {why}", r.plan.path());
                feed.problem(index, why);
                let r = &mut feed.resources[index];
                r.ex = None;
                return schedule(r, ms);
            }
            Body::Absent => {
                r.ex = None;
                r.known = true;
                let retry = r.plan.absent_retry();
                // The kind is not served (its CRDs were removed, or never installed), or the
                // edge's role may not read it: the source has none of it. Nodes and Services
                // are core: a 403 there is the role's, and what was known of them keeps
                // making servers. Not EndpointSlices: a pod's address goes to another pod
                // within minutes.
                let discovered = matches!(r.plan.kind, Some(Kind::Node | Kind::Service));
                if let Some(kind) = r.plan.kind.filter(|_| !discovered) {
                    if feed.catalog.objects.keys().any(|k| k.0 == kind) {
                        feed.catalog.replace_kind(kind, Vec::new());
                        feed.dirty = true;
                    }
                }
                let r = &mut feed.resources[index];
                if !r.absent_logged {
                    r.absent_logged = true;
                    if head.status == 403 {
                        ngx_log_error!(
                            nginx_sys::NGX_LOG_WARN,
                            log,
                            "edge_routes_url {}: the token's role may not read {} (403): read without it",
                            options.name,
                            r.plan.path()
                        );
                    } else {
                        ngx_log_error!(
                            NGX_LOG_INFO,
                            log,
                            "edge_routes_url {}: the API server does not serve {} (404): not read",
                            options.name,
                            r.plan.path()
                        );
                    }
                }
                feed.status_dirty = true;
                return schedule(&mut feed.resources[index], retry);
            }
        }
    }
    if r.streaming {
        if let Err(e) = stream(feed, index) {
            return failed(feed, index, e);
        }
    }
    let r = &mut feed.resources[index];
    let Some(ex) = r.ex.as_mut() else { return };
    let Some(outcome) = ex.outcome().cloned() else {
        return;
    };
    // Failed before any answer: the connection, at one address of a host name.
    if let (Err(e), false, false) = (&outcome, r.streaming, r.collecting) {
        if ex.reused() {
            // A kept connection the server closed as it was used: the request again, on a
            // connection of its own.
            r.ex = None;
            return request(feed, index);
        }
        let e = e.clone();
        if next_address(feed, index, &e) {
            return;
        }
    }
    let r = &mut feed.resources[index];
    let Some(ex) = r.ex.as_mut() else { return };
    match outcome {
        // A list page too large to take: ask for smaller pages, at once.
        Err(e) if ex.too_large() && r.mode == Mode::List && r.plan.too_large() => {
            r.ex = None;
            let why = format!("{}: {e}: asking for smaller pages", r.plan.path());
            if !feed.logged.contains(&why) {
                ngx_log_error!(
                    NGX_LOG_NOTICE,
                    log,
                    "edge_routes_url {}: {}",
                    options.name,
                    why
                );
                feed.logged.push(why);
            }
            schedule(&mut feed.resources[index], 0);
        }
        Err(e) => failed(feed, index, e),
        Ok(()) if r.collecting => {
            let body = std::mem::take(ex.body());
            // Its connection, when kept, for the next page.
            r.idle = r.ex.take().filter(|ex| ex.kept());
            let kind = r.plan.kind;
            let auto = options.format == Format::Auto;
            let polled_document = r.mode == Mode::Poll && kind.is_none();
            let job = spawn("edge-feed", move || {
                if polled_document {
                    if auto && kube::looks_like_list(&body) {
                        return Parsed::Page(kube::parse_list(&body, None));
                    }
                    return Parsed::Edge(
                        crate::routes::source::parse_document(&body)
                            .map(|_| body)
                            .map_err(|e| format!("not a route document: {e}")),
                    );
                }
                Parsed::Page(kube::parse_list(&body, kind))
            });
            let r = &mut feed.resources[index];
            match job {
                Ok(job) => {
                    r.parsing = Some(job);
                    schedule(r, POLL_MS as u64);
                }
                Err(e) => failed(feed, index, format!("no thread to parse the answer ({e})")),
            }
        }
        Ok(()) => {
            // The last line may end with the body rather than a newline.
            if !r.line.is_empty() {
                ex.body().push(b'\n');
                if let Err(e) = stream(feed, index) {
                    return failed(feed, index, e);
                }
            }
            // A watch ends when the server says (timeoutSeconds): watch again. A server that
            // answered with a list instead is polled.
            feed.answered(index);
            let r = &mut feed.resources[index];
            r.ex = None;
            let ms = if r.plan.polling {
                r.plan.polled(true)
            } else {
                r.plan.watch_ended()
            };
            schedule(r, ms);
        }
    }
}

/// Takes the watch events that arrived, one per line. An event that cannot be applied (it
/// cannot be read, or is larger than `MAX_EVENT`) lists the kind again, after the failure's
/// backoff: the watch would only replay it.
unsafe fn stream(feed: &mut Feed, index: usize) -> Result<(), String> {
    let r = &mut feed.resources[index];
    let Some(ex) = r.ex.as_mut() else {
        return Ok(());
    };
    let bytes = std::mem::take(ex.body());
    let kind = r.plan.kind.unwrap_or(Kind::Ingress);
    let mut rest = &bytes[..];
    let mut changed = false;
    let mut refused = false;
    let mut room = false;
    while let Some(at) = rest.iter().position(|&b| b == b'\n') {
        let r = &mut feed.resources[index];
        let line: Vec<u8>;
        let piece = if r.line.is_empty() {
            &rest[..at]
        } else {
            r.line.extend_from_slice(&rest[..at]);
            line = std::mem::take(&mut r.line);
            &line[..]
        };
        rest = &rest[at + 1..];
        if piece.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if r.first_line {
            r.first_line = false;
            if kube::looks_like_list(piece) {
                // Not a watch: a list, whole on one line. Take it, and poll from now on.
                r.plan.cannot_watch();
                let page = kube::parse_list(piece, Some(kind))?;
                if let Some(listed) = r.plan.listed(page)? {
                    took_list(feed, index, listed);
                    changed = true;
                }
                continue;
            }
        }
        let event = match kube::parse_event(piece, kind) {
            Ok(event) => event,
            Err(e) => {
                r.plan.relist();
                return Err(format!("{}: {e}: listing again", r.plan.path()));
            }
        };
        if !r.plan.event(&event) {
            let path = r.plan.path().to_owned();
            r.ex = None;
            return match event {
                Event::Error(e) => Err(format!("{path}: the watch failed ({e})")),
                Event::Unreadable(e) => Err(format!(
                    "{path}: an event that cannot be read ({e}): listing again"
                )),
                _ => {
                    // 410 Gone: list again, now.
                    schedule(r, 0);
                    Ok(())
                }
            };
        }
        match event {
            Event::Put(o, _) => {
                refused |= !feed.catalog.put(o);
                changed = true;
            }
            Event::Delete(o, _) => {
                room |= feed.catalog.delete(&o);
                changed = true;
            }
            _ => {}
        }
    }
    let r = &mut feed.resources[index];
    r.line.extend_from_slice(rest);
    if r.line.len() > MAX_EVENT {
        r.line = Vec::new();
        r.plan.relist();
        return Err(format!(
            "{}: a watch event larger than {} MiB: listing again",
            r.plan.path(),
            MAX_EVENT >> 20
        ));
    }
    if changed {
        feed.dirty = true;
    }
    if refused {
        log_refused(feed);
    }
    feed.answered(index);
    if room {
        // Objects refused for want of room may fit now: the lists take them, of every kind
        // that had some refused.
        for i in 0..feed.resources.len() {
            let refused = feed.resources[i]
                .plan
                .kind
                .is_some_and(|k| feed.catalog.refused.get(&k).is_some_and(|&n| n > 0));
            if i == index || refused {
                let r = &mut feed.resources[i];
                r.plan.relist();
                r.ex = None;
                schedule(r, RELIST_MS);
            }
        }
    }
    Ok(())
}

/// Says, when it grows, how many objects the catalog refused for want of room.
unsafe fn log_refused(feed: &mut Feed) {
    let refused = feed.catalog.refused();
    if refused > feed.refused_logged {
        ngx_log_error!(
            nginx_sys::NGX_LOG_WARN,
            feed.log,
            "edge_routes_url {}: more than {} objects: {} refused (they route nothing; the source is listed again when some go)",
            feed.options().name,
            MAX_OBJECTS,
            refused
        );
    }
    feed.refused_logged = refused;
    feed.status_dirty = true;
}

/// A full list of a kind arrived: it replaces the kind's objects in the catalog.
unsafe fn took_list(feed: &mut Feed, index: usize, listed: crate::feed::plan::Listed) {
    let kind = listed.kind;
    let (refused, old) = feed.catalog.swap_kind(kind, listed.objects);
    let refused = refused + listed.beyond;
    if !old.is_empty() {
        // Freed on a thread: a large kind's objects take milliseconds (without a thread, here).
        let _ = spawn("edge-feed", move || {
            crate::stream::without_fastbins(|| drop(old))
        });
    }
    *feed.catalog.refused.entry(kind).or_default() = refused;
    log_refused(feed);
    if listed.unreadable > 0 {
        let why = format!(
            "{}: {} object(s) cannot be read and are skipped, e.g. {}",
            feed.resources[index].plan.path(),
            listed.unreadable,
            listed.first_unreadable.as_deref().unwrap_or("?")
        );
        if !feed.logged.contains(&why) {
            ngx_log_error!(
                nginx_sys::NGX_LOG_WARN,
                feed.log,
                "edge_routes_url {}: {}",
                feed.options().name,
                why
            );
            feed.logged.push(why);
        }
    }
    feed.resources[index].known = true;
    feed.dirty = true;
}

/// What a thread made of a collected answer.
unsafe fn parsed_answer(feed: &mut Feed, index: usize, parsed: Parsed) {
    match parsed {
        Parsed::Page(Ok(page)) => {
            let r = &mut feed.resources[index];
            let listed = match r.plan.listed(page) {
                Ok(listed) => listed,
                Err(e) => {
                    let why = format!("{}: {e}", r.plan.path());
                    return failed(feed, index, why);
                }
            };
            let delay = if r.plan.polling && listed.is_some() {
                r.plan.polled(true)
            } else {
                0
            };
            if let Some(listed) = listed {
                took_list(feed, index, listed);
            }
            feed.answered(index);
            schedule(&mut feed.resources[index], delay);
        }
        Parsed::Edge(Ok(bytes)) => {
            feed.edge_doc = Some(bytes);
            feed.resources[index].known = true;
            feed.answered(index);
            let r = &mut feed.resources[index];
            let delay = r.plan.polled(true);
            schedule(r, delay);
        }
        Parsed::Page(Err(e)) | Parsed::Edge(Err(e)) => {
            let path = feed.resources[index].plan.path().to_owned();
            feed.resources[index].plan.polled(false);
            failed(feed, index, format!("{path}: {e}"));
            return;
        }
    }
    flush(feed);
}

/// Writes what changed (the catalog, the status) on a thread, unless one is writing. The
/// catalog is written only once every kind is known (see `Res::known`).
unsafe fn flush(feed: &mut Feed) {
    let catalog = feed.dirty && feed.resources.iter().all(|r| r.known);
    if feed.writer.is_some() || !(catalog || feed.status_dirty || feed.edge_doc.is_some()) {
        return;
    }
    // After a failed write, the next waits for its backoff (the flush timer).
    if feed.write_failures > 0 && feed.flush.timer_set() != 0 {
        return;
    }
    // The events of a burst are written together.
    let now = crate::health::now_ms();
    if catalog && now < feed.next_write_ms {
        if feed.flush.timer_set() == 0 {
            ngx_add_timer(&mut feed.flush, (feed.next_write_ms - now) as ngx_msec_t);
        }
        return;
    }
    let Some(files) = feed.files().cloned() else {
        return;
    };
    let options = feed.slot().options.clone();
    let objects: Option<Vec<Arc<Object>>> =
        catalog.then(|| feed.catalog.objects.values().cloned().collect());
    let edge = feed.edge_doc.take();
    let status = feed.status();
    let last = feed.written_hash;
    let memo = feed.discovery.clone();
    feed.dirty = feed.dirty && !catalog;
    feed.status_dirty = false;
    let job = spawn("edge-feed", move || {
        let mut written = Written {
            result: Ok(None),
            stats: None,
            first_invalid: None,
            first_problem: None,
            default_class: None,
            first_over_limit: None,
            cpu: std::time::Duration::ZERO,
            discovery: None,
        };
        let (bytes, document) = match (&objects, edge) {
            (Some(objects), _) => {
                let mut made = kube::document_of(
                    objects.iter().map(|o| &**o),
                    &options.name,
                    options.upstream.as_deref(),
                    options.ingress_class.as_deref(),
                );
                written.stats = Some(Stats {
                    routes: made.routes,
                    invalid: made.invalid.len(),
                    repeated: made.repeated,
                    unrouted: made.unrouted,
                    problems: made.problems,
                    other_class: made.other_class,
                    unaccepted: made.unaccepted,
                    over_limit: made.over_limit,
                    ambiguous_class: made.ambiguous_class,
                });
                written.first_over_limit = made.first_over_limit.take();
                written.default_class = made.default_class.take();
                written.first_invalid = made.invalid.drain(..).next();
                written.first_problem = made.first_problem.take();
                let discovered = options.discover.any().then(|| {
                    let (discovered, made) = kube::discovered_again(objects, &options.name, memo);
                    written.discovery = made;
                    discovered
                });
                let document = Arc::new(made.with_discovered(discovered));
                (
                    Some(Cache::bytes_of(&options.name, objects)),
                    Some(document),
                )
            }
            (None, Some(doc)) => (Some(doc), None),
            (None, None) => (None, None),
        };
        if let Some(bytes) = bytes {
            let hash = crate::health::fnv1a(&bytes);
            if hash != last {
                written.result = files.write_candidate(&bytes, document).map(|()| Some(hash));
            }
        }
        let mut status = status;
        if let Some(stats) = written.stats {
            status["routes"] = json!(stats.routes);
            status["invalid_hosts"] = json!(stats.invalid);
            status["repeated_hosts"] = json!(stats.repeated);
            status["unrouted_objects"] = json!(stats.unrouted);
            status["invalid_objects"] = json!(stats.problems);
            status["other_class_ingresses"] = json!(stats.other_class);
            status["unaccepted_routes"] = json!(stats.unaccepted);
            status["over_limit_objects"] = json!(stats.over_limit);
            status["default_ingress_class"] = json!(written.default_class.clone());
        }
        let _ = write_atomically(&files.status(), status.to_string().as_bytes());
        written.cpu = thread_cpu();
        written
    });
    match job {
        Ok(job) => {
            feed.writer = Some(job);
            ngx_add_timer(&mut feed.flush, POLL_MS);
        }
        Err(e) => {
            ngx_log_error!(
                NGX_LOG_ERR,
                feed.log,
                "edge_routes_url {}: no thread to write the table ({}); trying again",
                feed.options().name,
                e
            );
            feed.dirty = true;
            ngx_add_timer(&mut feed.flush, 1000);
        }
    }
}

/// The flush timer: the thread reading what the source brought before, then the writer's
/// result (the table that merges the source is told of a new file).
unsafe extern "C" fn on_flush(ev: *mut ngx_event_t) {
    let feed = &mut *(*ev).data.cast::<Feed>();
    if crate::stream::exiting() {
        return;
    }
    if !feed.seeded {
        match feed.seeding.take() {
            Some(job) if !job.is_finished() => {
                feed.seeding = Some(job);
                ngx_add_timer(ev, POLL_MS);
            }
            Some(job) => {
                let catalog = job
                    .join()
                    .unwrap_or_else(|_| Err("the thread reading it failed".into()));
                seeded(feed, catalog);
                flush(feed);
            }
            None => read_before(feed),
        }
        return;
    }
    let Some(job) = feed.writer.take() else {
        return flush(feed);
    };
    if !job.is_finished() {
        feed.writer = Some(job);
        ngx_add_timer(ev, POLL_MS);
        return;
    }
    match job.join() {
        Ok(mut written) => {
            // A write paces the next one; a catalog that had not changed was not written.
            if matches!(written.result, Ok(Some(_))) {
                let spent = written.cpu + (feed.cost)(feed.owner);
                let gap = spent.as_millis() as u64 * u64::from(WRITE_GAP_FACTOR);
                feed.next_write_ms =
                    crate::health::now_ms() + gap.clamp(WRITE_GAP_MIN_MS, WRITE_GAP_MAX_MS);
            }
            if let Some(discovery) = written.discovery.take() {
                // The last owner of the objects it replaces, maybe: freed on a thread.
                if let Some(old) = feed.discovery.replace(discovery) {
                    let _ = spawn("edge-feed", move || {
                        crate::stream::without_fastbins(|| drop(old))
                    });
                }
            }
            if let Some(stats) = written.stats {
                // A count that grew is logged once, with an example.
                let grew = |before: usize, now: usize, what: &str, example: &Option<String>| {
                    if now > before {
                        ngx_log_error!(
                            nginx_sys::NGX_LOG_WARN,
                            feed.log,
                            "edge_routes_url {}: {} {}, e.g. {}",
                            feed.options().name,
                            now,
                            what,
                            example.as_deref().unwrap_or("?")
                        );
                    }
                };
                grew(
                    feed.stats.invalid,
                    stats.invalid,
                    "host(s) are not host names and route nowhere",
                    &written.first_invalid,
                );
                grew(
                    feed.stats.problems,
                    stats.problems,
                    "object(s) route nothing because of a problem of their own",
                    &written.first_problem,
                );
                let over = format!(
                    "object(s), the newest past the source's limit of {} routes or {} upstreams of load-balancer addresses, route nothing",
                    kube::MAX_SOURCE_ROUTES,
                    kube::MAX_SOURCE_UPSTREAMS
                );
                grew(
                    feed.stats.over_limit,
                    stats.over_limit,
                    &over,
                    &written.first_over_limit,
                );
                if stats.ambiguous_class && !feed.stats.ambiguous_class {
                    ngx_log_error!(
                        nginx_sys::NGX_LOG_WARN,
                        feed.log,
                        "edge_routes_url {}: the cluster has several IngressClasses and marks none as its default: every Ingress is read; name the class the edge fronts with ingress_class=",
                        feed.options().name
                    );
                }
                if stats.routes != feed.stats.routes {
                    feed.status_dirty = true;
                }
                feed.stats = stats;
                feed.default_class = written.default_class.take();
            }
            match written.result {
                Ok(Some(hash)) => {
                    feed.written_hash = hash;
                    feed.write_failures = 0;
                    (feed.kick)(feed.owner);
                }
                Ok(None) => {}
                Err(e) => return write_failed(feed, e),
            }
        }
        Err(_) => return write_failed(feed, "the thread writing it failed".into()),
    }
    flush(feed);
}

/// The candidate could not be written (a full disk, say): logged once per reason, tried
/// again after 1 s, doubling up to 30 s.
unsafe fn write_failed(feed: &mut Feed, why: String) {
    let why = format!("cannot keep the table ({why}); trying again");
    if !feed.logged.contains(&why) {
        ngx_log_error!(
            NGX_LOG_ERR,
            feed.log,
            "edge_routes_url {}: {}",
            feed.options().name,
            why
        );
        if feed.logged.len() == MAX_LOGGED {
            feed.logged.remove(0);
        }
        feed.logged.push(why);
    }
    feed.dirty = true;
    feed.write_failures = feed.write_failures.saturating_add(1);
    let ms = (1000u64 << (feed.write_failures - 1).min(5)).min(crate::feed::plan::MAX_BACKOFF_MS);
    ngx_add_timer(&mut feed.flush, ms as ngx_msec_t);
}

/// What `edge_status` shows of a URL source: the fetching worker's last word.
pub fn read_status(url: &UrlSlot) -> Value {
    let status = url.files.as_ref().map(|f| std::fs::read(f.status()));
    match status.unwrap_or_else(|| Err(std::io::ErrorKind::NotFound.into())) {
        Ok(bytes) => {
            let mut status: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            // Written by a worker that is gone (an earlier run, a reload): what it knew, but
            // not what is going on.
            let pid = status["pid"].as_i64().unwrap_or(0) as libc::pid_t;
            // SAFETY: signal 0 only asks whether the process exists.
            if pid <= 0 || unsafe { libc::kill(pid, 0) } != 0 {
                status["state"] = json!("starting");
            }
            status
        }
        Err(_) => json!({
            "name": url.options.name,
            "url": url.options.url.to_string(),
            "state": "starting",
        }),
    }
}
