//! Each worker re-checks its route sources on a timer and swaps in new tables.

use core::ptr::addr_of_mut;

use nginx_sys::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_exiting, ngx_int_t, ngx_quit, ngx_terminate,
    NGX_OK,
};

use crate::conf::{log_events, MainConf, SourceSlot};
use crate::stream;

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
    NGX_OK as ngx_int_t
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
        let events = source.refresh(&|name| mcf.upstream_exists(name));
        log_events((*ev).log, &events);
    }
    ngx_add_timer(ev, slot.interval);
}
