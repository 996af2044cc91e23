//! Typed access to the stream module's configuration and session slots: the only place that
//! indexes nginx's `void **` arrays. Generic over what is stored, so that it depends on no
//! module above it.

use core::ptr::addr_of;

use nginx_sys::{
    ngx_conf_t, ngx_cycle_t, ngx_module_t, ngx_stream_conf_ctx_t, ngx_stream_module,
    ngx_stream_session_t, ngx_stream_upstream_main_conf_t, ngx_stream_upstream_module,
    ngx_stream_upstream_srv_conf_t, ngx_uint_t, NGX_STREAM_UPSTREAM_CREATE,
};

fn edge() -> &'static ngx_module_t {
    // SAFETY: the module table is written by nginx only while loading modules.
    unsafe { &*addr_of!(crate::ngx_stream_edge_module) }
}

unsafe fn slot<T>(confs: *mut *mut core::ffi::c_void, module: &ngx_module_t) -> *mut T {
    (*confs.add(module.ctx_index)).cast()
}

/// The module's main configuration while parsing the stream block.
pub unsafe fn cf_main_conf<'a, T>(cf: *mut ngx_conf_t) -> &'a mut T {
    let ctx = (*cf).ctx.cast::<ngx_stream_conf_ctx_t>();
    &mut *slot::<T>((*ctx).main_conf, edge())
}

/// The stream upstream module's main configuration while parsing the stream block.
pub unsafe fn cf_upstream_main_conf<'a>(
    cf: *mut ngx_conf_t,
) -> &'a mut ngx_stream_upstream_main_conf_t {
    let ctx = (*cf).ctx.cast::<ngx_stream_conf_ctx_t>();
    &mut *slot((*ctx).main_conf, &*addr_of!(ngx_stream_upstream_module))
}

/// Another module's server configuration while parsing a server block.
pub unsafe fn cf_srv_conf_of<'a, T>(cf: *mut ngx_conf_t, module: &ngx_module_t) -> &'a mut T {
    let ctx = (*cf).ctx.cast::<ngx_stream_conf_ctx_t>();
    &mut *slot::<T>((*ctx).srv_conf, module)
}

/// The module's main configuration in a running cycle, if the configuration has a stream block.
pub unsafe fn cycle_main_conf<'a, T>(cycle: *mut ngx_cycle_t) -> Option<&'a mut T> {
    let index = (*addr_of!(ngx_stream_module)).index;
    let ctx = (*(*cycle).conf_ctx.add(index)).cast::<ngx_stream_conf_ctx_t>();
    if ctx.is_null() {
        return None;
    }
    slot::<T>((*ctx).main_conf, edge()).as_mut()
}

/// The `upstream NAME {}` block of the session's configuration named `name` (nginx compares
/// upstream names without case, and so does this).
pub unsafe fn upstream_block(
    s: *mut ngx_stream_session_t,
    name: &[u8],
) -> Option<*mut ngx_stream_upstream_srv_conf_t> {
    let umcf = &*slot::<ngx_stream_upstream_main_conf_t>(
        (*s).main_conf,
        &*addr_of!(ngx_stream_upstream_module),
    );
    let blocks = array_items::<*mut ngx_stream_upstream_srv_conf_t>(
        umcf.upstreams.elts,
        umcf.upstreams.nelts,
    );
    blocks.iter().copied().find(|&b| {
        let b = &*b;
        b.flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t != 0
            && b.port == 0
            && b.host.as_bytes().eq_ignore_ascii_case(name)
    })
}

pub unsafe fn srv_conf<'a, T>(s: *mut ngx_stream_session_t) -> &'a T {
    &*slot::<T>((*s).srv_conf, edge())
}

pub unsafe fn session_ctx<'a, T>(s: *mut ngx_stream_session_t) -> Option<&'a mut T> {
    slot::<T>((*s).ctx, edge()).as_mut()
}

/// The session's context slot as a raw pointer (NULL when unset), for reaching past the
/// context without a reference to it.
pub unsafe fn session_ctx_ptr<T>(s: *mut ngx_stream_session_t) -> *mut T {
    slot::<T>((*s).ctx, edge())
}

pub unsafe fn set_session_ctx<T>(s: *mut ngx_stream_session_t, ctx: *mut T) {
    *(*s).ctx.add(edge().ctx_index) = ctx.cast();
}

/// `*mut T` from an nginx array's elements.
pub unsafe fn array_items<'a, T>(elts: *mut core::ffi::c_void, n: usize) -> &'a [T] {
    if n == 0 {
        return &[];
    }
    core::slice::from_raw_parts(elts.cast::<T>().cast_const(), n)
}

/// The current directive's arguments, the name first.
pub unsafe fn conf_args<'a>(cf: *mut ngx_conf_t) -> &'a [nginx_sys::ngx_str_t] {
    let a = &*(*cf).args;
    array_items(a.elts, a.nelts)
}

/// Whether the worker is shutting down: timers then stop re-arming.
pub fn exiting() -> bool {
    // SAFETY: plain reads of nginx's process flags.
    unsafe {
        nginx_sys::ngx_exiting != 0 || nginx_sys::ngx_quit != 0 || nginx_sys::ngx_terminate != 0
    }
}

/// The module's threads still running their work (see `wait_for_threads`).
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The threads this process has started (see `threads_started`).
static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many threads the module has started in this process: once there has been one, glibc
/// takes its multi-threaded paths in every system call and malloc for good.
pub fn threads_started() -> usize {
    STARTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts a thread's work as running until it is dropped (when the work ends, or with a
/// thread that could not start).
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts a thread with every signal blocked in it: nginx's signals are for the worker's own
/// thread, which handles them. Its work is counted until it ends (see `wait_for_threads`).
pub fn spawn_quiet<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    RUNNING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let running = Running;
    let f = move || {
        let _running = running;
        f()
    };
    // SAFETY: signal-mask calls on this thread only, restored before returning.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        if spawned.is_ok() {
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        spawned
    }
}

/// Arms a timer event of the module's own (not a connection's): `data` is never NULL (debug
/// logging reads it), and the event is cancelable, so a worker shutting down does not wait for
/// it.
pub unsafe fn arm(
    ev: &mut nginx_sys::ngx_event_t,
    handler: nginx_sys::ngx_event_handler_pt,
    data: *mut core::ffi::c_void,
    log: *mut nginx_sys::ngx_log_t,
    ms: nginx_sys::ngx_msec_t,
) {
    ev.handler = handler;
    ev.data = data;
    ev.log = log;
    ev.set_cancelable(1);
    nginx_sys::ngx_add_timer(ev, ms);
}

/// Stops a timer, if it is set.
pub unsafe fn cancel_timer(ev: *mut nginx_sys::ngx_event_t) {
    if (*ev).timer_set() != 0 {
        nginx_sys::ngx_del_timer(ev);
    }
}

/// Runs `f` (which frees a table) with glibc's fastbins off. A table read without an arena of
/// the module's (see `arena`: a fallback) was allocated by the master in the main arena: its
/// millions of small chunks, freed on any thread, would wait in the main arena's fastbins
/// until the event loop's next large
/// allocation consolidates them all at once (130 ms at 1,000,000 routes). Without fastbins
/// each chunk is coalesced as it is freed, here.
pub fn without_fastbins(f: impl FnOnce()) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    /// glibc's default `M_MXFAST` on 64-bit targets.
    const DEFAULT_MXFAST: libc::c_int = 128;
    static FREEING: AtomicUsize = AtomicUsize::new(0);
    // SAFETY: mallopt is thread-safe; the last thread out restores the default.
    unsafe {
        if FREEING.fetch_add(1, SeqCst) == 0 {
            libc::mallopt(libc::M_MXFAST, 0);
        }
        f();
        if FREEING.fetch_sub(1, SeqCst) == 1 {
            libc::mallopt(libc::M_MXFAST, DEFAULT_MXFAST);
        }
    }
}

/// The CPU time the calling thread has used.
pub fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the calling thread's clock into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The process's threads when the worker started, before any of the module's (nginx's own
/// thread pools included): see `wait_for_threads`.
static THREADS_AT_START: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The process's threads now (`/proc/self/task`), if it can be read.
fn threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(Iterator::count)
}

/// Notes the worker's threads before the module starts any (see `wait_for_threads`).
pub fn note_threads() {
    if let Some(n) = threads() {
        THREADS_AT_START.store(n, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits, up to `limit`, for the module's threads to end; returns how many have not. A worker ends with `exit()`, whose handlers free what such a thread may be using:
/// OpenSSL's, registered with `atexit`, free the digests a thread hashing a source's file
/// calls (a worker that exited while one did was killed by SIGSEGV). A thread's work done,
/// the thread still runs its thread-local destructors (OpenSSL's among them): the wait lasts
/// until the process has no more threads than when the worker started.
pub fn wait_for_threads(limit: std::time::Duration) -> usize {
    use std::sync::atomic::Ordering::SeqCst;
    let until = std::time::Instant::now() + limit;
    let at_start = THREADS_AT_START.load(SeqCst);
    loop {
        // At work, or done with it and still ending.
        let ending = threads().map_or(0, |n| n.saturating_sub(at_start.max(1)));
        let left = RUNNING
            .load(SeqCst)
            .max(if at_start == 0 { 0 } else { ending });
        if left == 0 || std::time::Instant::now() >= until {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The address of a socket address of the IP families; `None` for the others (unix).
pub unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<std::net::IpAddr> {
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let sin = &*sa.cast::<libc::sockaddr_in>();
            Some(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            let sin6 = &*sa.cast::<libc::sockaddr_in6>();
            Some(std::net::IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// The session's server's `preread_timeout`.
pub unsafe fn preread_timeout(s: *mut ngx_stream_session_t) -> nginx_sys::ngx_msec_t {
    let cscf = &*slot::<nginx_sys::ngx_stream_core_srv_conf_t>(
        (*s).srv_conf,
        &*addr_of!(nginx_sys::ngx_stream_core_module),
    );
    cscf.preread_timeout
}

/// `worker_processes` of `cycle`'s configuration.
pub unsafe fn worker_processes_of(cycle: *const ngx_cycle_t) -> i64 {
    let ccf = (*(*cycle)
        .conf_ctx
        .add((*addr_of!(nginx_sys::ngx_core_module)).index))
    .cast::<nginx_sys::ngx_core_conf_t>();
    if ccf.is_null() {
        return 1;
    }
    (*ccf).worker_processes as i64
}
