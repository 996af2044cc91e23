//! Each worker re-checks its route sources on a timer and swaps in new tables.

use core::ptr::addr_of_mut;

use nginx_sys::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_exiting, ngx_int_t, ngx_quit, ngx_terminate,
    NGX_OK,
};

use crate::conf::{log_events, MainConf, SourceSlot};
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
        for slot in &(*mcf_ptr).sources {
            if let Some(source) = slot.source.as_ref() {
                zone.attach(source.table(), (*cycle).log);
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

unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    if ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 {
        return;
    }
    let slot = &mut *(*ev).data.cast::<SourceSlot>();
    let mcf = &*MAIN_CONF;
    if let Some(source) = slot.source.as_mut() {
        let generation = source.generation();
        let events = source.refresh(&|name| mcf.upstream_exists(name));
        log_events((*ev).log, &events);
        if source.generation() != generation {
            if let Some(zone) = zone::zone() {
                zone.attach(source.table(), (*ev).log);
            }
        }
    }
    ngx_add_timer(ev, slot.interval);
}
