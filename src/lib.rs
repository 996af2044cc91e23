//! nginx-edge: a stream module that routes TLS by SNI and HTTP by Host, from a JSON route
//! table reloaded without reloading nginx. This file only wires the module together.

//! The pure parts (`sniff`, `routes`, `health`, `report`) know nothing of nginx; unit tests
//! and fuzz targets build only them, since a test binary cannot link against nginx's symbols.

pub mod arena;
pub mod balance;
pub mod feed;
pub mod health;
pub mod report;
pub mod routes;
pub mod sniff;
pub mod traffic;
pub mod upstream;

#[cfg(all(feature = "module", not(test)))]
mod balancer;
#[cfg(all(feature = "module", not(test)))]
mod caches;
#[cfg(all(feature = "module", not(test)))]
mod check;
#[cfg(all(feature = "module", not(test)))]
mod conf;
#[cfg(all(feature = "module", not(test)))]
mod counters;
#[cfg(all(feature = "module", not(test)))]
mod feeds;
#[cfg(all(feature = "module", not(test)))]
mod fetch;
#[cfg(all(feature = "module", not(test)))]
mod io;
#[cfg(all(feature = "module", not(test)))]
mod preread;
#[cfg(all(feature = "module", not(test)))]
mod quic;
#[cfg(all(feature = "module", not(test)))]
mod session;
#[cfg(all(feature = "module", not(test)))]
mod status;
#[cfg(all(feature = "module", not(test)))]
mod stream;
#[cfg(all(feature = "module", not(test)))]
mod variables;
#[cfg(all(feature = "module", not(test)))]
mod worker;
#[cfg(all(feature = "module", not(test)))]
mod zone;

#[cfg(all(feature = "module", not(test)))]
pub use wiring::ngx_stream_edge_module;

/// The module's allocations: the system's `malloc`, except in `arena::Arena::scoped` (a
/// configuration's route tables are read there). 1 GiB of address space per scope.
#[cfg(all(feature = "module", not(test)))]
#[global_allocator]
pub(crate) static ALLOCATOR: arena::Arena = arena::Arena::new(1 << 30);

#[cfg(all(feature = "module", not(test)))]
mod wiring {
    use core::ptr::{addr_of, addr_of_mut};

    use nginx_sys::{
        ngx_array_push, ngx_command_t, ngx_conf_t, ngx_cycle_t, ngx_int_t, ngx_module_t,
        ngx_stream_core_main_conf_t, ngx_stream_core_module, ngx_stream_handler_pt,
        ngx_stream_module_t, ngx_stream_phases_NGX_STREAM_LOG_PHASE,
        ngx_stream_phases_NGX_STREAM_PREACCESS_PHASE, ngx_stream_phases_NGX_STREAM_PREREAD_PHASE,
        ngx_stream_upstream_add, ngx_uint_t, ngx_url_t, NGX_CONF_1MORE, NGX_CONF_NOARGS,
        NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_CONF_TAKE123, NGX_CONF_TAKE2, NGX_ERROR, NGX_OK,
        NGX_STREAM_MAIN_CONF, NGX_STREAM_MODULE, NGX_STREAM_SRV_CONF, NGX_STREAM_SRV_CONF_OFFSET,
        NGX_STREAM_UPSTREAM_CREATE,
    };
    use ngx::ngx_string;

    use crate::{balancer, check, conf, preread, status, variables, worker};

    static MODULE_CTX: ngx_stream_module_t = ngx_stream_module_t {
        preconfiguration: Some(preconfiguration),
        postconfiguration: Some(postconfiguration),
        create_main_conf: Some(conf::create_main_conf),
        init_main_conf: Some(conf::init_main_conf),
        create_srv_conf: Some(conf::create_srv_conf),
        merge_srv_conf: Some(conf::merge_srv_conf),
    };

    ngx::ngx_modules!(ngx_stream_edge_module);

    #[used]
    #[allow(non_upper_case_globals)]
    pub static mut ngx_stream_edge_module: ngx_module_t = ngx_module_t {
        ctx: addr_of!(MODULE_CTX).cast_mut().cast(),
        commands: unsafe { addr_of_mut!(COMMANDS[0]) },
        type_: NGX_STREAM_MODULE as ngx_uint_t,
        init_module: Some(init_module),
        init_process: Some(init_process),
        exit_process: Some(exit_process),
        ..ngx_module_t::default()
    };

    static mut COMMANDS: [ngx_command_t; 9] = [
        command(
            ngx_string!("edge_routes"),
            NGX_STREAM_MAIN_CONF | NGX_STREAM_SRV_CONF | NGX_CONF_TAKE12,
            conf::set_edge_routes,
            NGX_STREAM_SRV_CONF_OFFSET,
        ),
        command(
            ngx_string!("edge_routes_url"),
            NGX_STREAM_MAIN_CONF | NGX_STREAM_SRV_CONF | NGX_CONF_1MORE,
            conf::set_edge_routes_url,
            NGX_STREAM_SRV_CONF_OFFSET,
        ),
        command(
            ngx_string!("edge_route"),
            NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1,
            conf::set_edge_route,
            NGX_STREAM_SRV_CONF_OFFSET,
        ),
        command(
            ngx_string!("edge_zone"),
            NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE2,
            conf::set_edge_zone,
            0,
        ),
        command(
            ngx_string!("edge_state"),
            NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1,
            conf::set_edge_state,
            0,
        ),
        command(
            ngx_string!("edge_drain_timeout"),
            NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1,
            conf::set_edge_drain_timeout,
            0,
        ),
        command(
            ngx_string!("edge_counters"),
            NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE123,
            conf::set_edge_counters,
            0,
        ),
        command(
            ngx_string!("edge_status"),
            NGX_STREAM_SRV_CONF | NGX_CONF_NOARGS,
            status::set_edge_status,
            NGX_STREAM_SRV_CONF_OFFSET,
        ),
        ngx_command_t::empty(),
    ];

    type Setter = unsafe extern "C" fn(
        *mut ngx_conf_t,
        *mut ngx_command_t,
        *mut core::ffi::c_void,
    ) -> *mut core::ffi::c_char;

    const fn command(
        name: nginx_sys::ngx_str_t,
        type_: u32,
        set: Setter,
        conf: usize,
    ) -> ngx_command_t {
        ngx_command_t {
            name,
            type_: type_ as ngx_uint_t,
            set: Some(set),
            conf: conf as ngx_uint_t,
            offset: 0,
            post: core::ptr::null_mut(),
        }
    }

    /// After the configuration is read, `nginx -t` included: warns of UDP listeners that
    /// `edge_route quic` cannot use well.
    unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
        crate::quic::check_listeners(cycle);
        NGX_OK as ngx_int_t
    }

    unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
        // nginx calls every module's init_process in its cache manager and cache loader too:
        // only a worker (or the single process of `master_process off`) runs the module.
        let process = nginx_sys::ngx_process as u32;
        if process != nginx_sys::NGX_PROCESS_WORKER && process != nginx_sys::NGX_PROCESS_SINGLE {
            return NGX_OK as ngx_int_t;
        }
        if worker::start(cycle) {
            check::start();
        }
        NGX_OK as ngx_int_t
    }

    unsafe extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
        check::stop();
        worker::stop();
    }

    /// Variables, and the upstream group `proxy_pass $edge_upstream` reaches for `servers` routes.
    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        if variables::add_variables(cf) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        let mut url: ngx_url_t = core::mem::zeroed();
        url.host = ngx::ngx_string!("nginx_edge");
        url.url = url.host;
        url.set_no_port(1);
        let uscf = ngx_stream_upstream_add(cf, &mut url, NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t);
        if uscf.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*uscf).peer.init_upstream = Some(balancer::init_upstream);
        NGX_OK as ngx_int_t
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // Every server is merged by now: each table's sources are known.
        if !conf::open_sources(cf) {
            return NGX_ERROR as ngx_int_t;
        }
        let ctx = (*cf).ctx.cast::<nginx_sys::ngx_stream_conf_ctx_t>();
        let cmcf = &mut *(*(*ctx)
            .main_conf
            .add((*addr_of!(ngx_stream_core_module)).ctx_index))
        .cast::<ngx_stream_core_main_conf_t>();
        for (phase, handler) in [
            (
                ngx_stream_phases_NGX_STREAM_PREREAD_PHASE,
                preread::preread_handler as unsafe extern "C" fn(_) -> _,
            ),
            (ngx_stream_phases_NGX_STREAM_LOG_PHASE, preread::log_handler),
        ] {
            let phase = &mut cmcf.phases[phase as usize];
            let h = ngx_array_push(&mut phase.handlers).cast::<ngx_stream_handler_pt>();
            if h.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            *h = Some(handler);
        }
        if crate::stream::cf_main_conf::<crate::conf::MainConf>(cf).quic {
            let phase = &mut cmcf.phases[ngx_stream_phases_NGX_STREAM_PREACCESS_PHASE as usize];
            let h = ngx_array_push(&mut phase.handlers).cast::<ngx_stream_handler_pt>();
            if h.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            *h = Some(crate::quic::handler);
            crate::quic::install_filter();
        }
        NGX_OK as ngx_int_t
    }
}
