//! Each worker re-checks its route sources on a timer and swaps in new tables.

use core::ptr::addr_of_mut;

use nginx_sys::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_exiting, ngx_int_t, ngx_msec_t, ngx_quit,
    ngx_terminate, NGX_LOG_ALERT, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK,
};

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ngx::ngx_log_error;

use crate::conf::{log_events, MainConf, SourceSlot};
use crate::routes::source::{Done, Retired, Step, Work};
use crate::{check, stream, zone};

pub unsafe extern "C" fn init_worker(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    let Some(mcf) = stream::cycle_main_conf(cycle) else {
        return NGX_OK as ngx_int_t;
    };
    let mcf_ptr: *mut MainConf = mcf;
    for slot in &mut (*mcf_ptr).sources {
        let slot: *mut SourceSlot = &mut **slot;
        let ev = &mut *addr_of_mut!((*slot).timer);
        ev.handler = Some(on_timer);
        // Never NULL: debug logging dereferences it.
        ev.data = slot.cast();
        ev.log = (*cycle).log;
        ev.set_cancelable(1);
        ngx_add_timer(ev, (*slot).interval);
    }
    MAIN_CONF = mcf_ptr;

    zone::init_worker((*mcf_ptr).zone, (*cycle).log);
    if let Some(zone) = zone::zone() {
        for slot in &mut (*mcf_ptr).sources {
            if let Some(source) = slot.source.as_ref() {
                zone.attach(source.table(), (*cycle).log);
                slot.attached = source.generation();
            }
        }
        let ev = &mut *addr_of_mut!(TOUCH);
        ev.handler = Some(on_touch);
        ev.data = addr_of_mut!(TOUCH).cast();
        ev.log = (*cycle).log;
        ev.set_cancelable(1);
        ngx_add_timer(ev, zone::TOUCH_MS as _);
    }
    check::init_worker(cycle, mcf_ptr);
    NGX_OK as ngx_int_t
}

/// The worker's configuration, once the worker has started.
pub fn worker_main_conf() -> Option<&'static MainConf> {
    // SAFETY: set once at worker start, before any event runs.
    unsafe { MAIN_CONF.as_ref() }
}

static mut TOUCH: ngx_event_t = unsafe { core::mem::zeroed() };

/// Keeps the zone records of the worker's tables from being reused.
unsafe extern "C" fn on_touch(ev: *mut ngx_event_t) {
    if ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 {
        return;
    }
    if let (Some(zone), Some(mcf)) = (zone::zone(), MAIN_CONF.as_ref()) {
        for slot in &mcf.sources {
            if let Some(source) = slot.source.as_ref() {
                zone.touch(source.table());
            }
        }
    }
    ngx_add_timer(ev, zone::TOUCH_MS as _);
}

/// The worker's configuration, for the upstream check of `nginx_upstream` routes.
static mut MAIN_CONF: *mut MainConf = core::ptr::null_mut();

/// While a refresh's work runs on a thread, the timer polls it this often.
const POLL_MS: ngx_msec_t = 5;

/// Re-checks a source. The slow part of a change (reading, parsing, checking, merging) runs
/// on a thread of its own, so that the worker's event loop only lists the files and, at the
/// end, swaps the new table in.
unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    if ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 {
        return;
    }
    let entered = Instant::now();
    let slot = &mut *(*ev).data.cast::<SourceSlot>();
    let mcf = &*MAIN_CONF;
    let log = (*ev).log;
    let Some(source) = slot.source.as_mut() else {
        ngx_add_timer(ev, slot.interval);
        return;
    };
    let mut step = match slot.job.take() {
        Some(job) if !job.is_finished() => {
            slot.job = Some(job);
            slot.busy += entered.elapsed();
            ngx_add_timer(ev, POLL_MS);
            return;
        }
        Some(job) => match job.join() {
            Ok(done) => source.resume(done),
            Err(_) => {
                ngx_log_error!(
                    NGX_LOG_ALERT,
                    log,
                    "edge_routes: {}: the thread building the table failed; the last good table keeps serving",
                    slot.path.display()
                );
                source.abandon();
                ngx_add_timer(ev, slot.interval);
                return;
            }
        },
        None => {
            slot.busy = Duration::ZERO;
            source.start()
        }
    };
    loop {
        match step {
            Step::Finished(events) => {
                log_events(log, &events);
                if source.generation() != slot.attached {
                    slot.attached = source.generation();
                    if let Some(zone) = zone::zone() {
                        zone.attach(source.table(), log);
                    }
                    retire(source.take_retired());
                    let busy = slot.busy + entered.elapsed();
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        log,
                        "edge_routes: {}: table {} in service; this worker's event loop spent {:.2} ms on it",
                        slot.path.display(),
                        source.generation(),
                        busy.as_secs_f64() * 1000.0
                    );
                } else {
                    retire(source.take_retired());
                }
                ngx_add_timer(ev, slot.interval);
                return;
            }
            Step::NeedWork(work) => {
                let names = Arc::clone(&mcf.nginx_upstreams);
                match spawn(work, names) {
                    Ok(job) => {
                        slot.job = Some(job);
                        slot.busy += entered.elapsed();
                        ngx_add_timer(ev, POLL_MS);
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

/// Runs `work` on a thread of its own.
fn spawn(work: Work, names: Arc<HashSet<String>>) -> std::io::Result<JoinHandle<Done>> {
    spawn_quiet("edge-routes", move || work.run(&|n| names.contains(n)))
}

/// Starts a thread with every signal blocked in it: nginx's signals are for the worker's own
/// thread, which handles them.
fn spawn_quiet<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    // SAFETY: signal-mask calls on this thread only, restored before returning.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        spawned
    }
}

/// Drops what a refresh replaced on a thread when nothing else holds it: freeing a 100,000
/// route table takes tens of milliseconds.
fn retire(retired: Retired) {
    let table = retired.table.and_then(|t| Rc::try_unwrap(t).ok());
    if table.is_none() && retired.documents.is_empty() {
        return;
    }
    let documents = retired.documents;
    let garbage = (table, documents);
    // Without a thread, it is dropped here.
    let _ = spawn_quiet("edge-retire", move || drop(garbage));
}
