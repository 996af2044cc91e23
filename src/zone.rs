//! `edge_zone`: the shared memory holding server health for all workers. Its records outlive
//! route-table reloads (a server still listed keeps its record) and `nginx -s reload` (nginx
//! hands a zone of the same name and size to the new cycle).

use core::ffi::{c_char, c_void};
use core::mem::{align_of, size_of};
use core::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_int_t, ngx_log_t, ngx_pagesize, ngx_parse_size,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_t, ngx_shmtx_unlock,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::{ngx_conf_log_error, ngx_log_error};

use crate::health::{now_ms, Key, Record, Store};
use crate::routes::table::{Backend, RouteTable};
use crate::stream;

pub const DEFAULT_NAME: &str = "nginx_edge";
pub const DEFAULT_SIZE: usize = 1 << 20;

/// A record no table has listed for this long may be reused for another server.
const STALE_MS: u64 = 120_000;

const MAGIC: u64 = u64::from_le_bytes(*b"edgezon1");

/// The start of the zone's one allocation; the records follow it.
#[repr(C)]
struct Header {
    magic: u64,
    record_size: u64,
    capacity: u64,
    live: AtomicU32,
}

fn records_offset() -> usize {
    size_of::<Header>().next_multiple_of(align_of::<Record>())
}

/// `edge_zone NAME SIZE;`
pub unsafe extern "C" fn set_edge_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    let mcf = stream::cf_main_conf(cf);
    if mcf.zone.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let args = stream::conf_args(cf);
    let mut name = args[1];
    let mut size_arg = args[2];
    let size = ngx_parse_size(&mut size_arg);
    let min = 8 * ngx_pagesize;
    if size == NGX_ERROR as isize || (size as usize) < min {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "invalid edge_zone size \"{}\": at least {}k",
            size_arg,
            min / 1024
        );
        return NGX_CONF_ERROR;
    }
    if name.is_empty() {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "edge_zone needs a name");
        return NGX_CONF_ERROR;
    }
    match add(cf, &mut name, size as usize) {
        Some(zone) => {
            mcf.zone = Some(zone);
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
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
    let mut capacity = free.saturating_sub(records_offset()) / size_of::<Record>();
    let mut block = core::ptr::null_mut();
    while capacity > 0 {
        block = ngx_slab_alloc(shpool, records_offset() + capacity * size_of::<Record>());
        if !block.is_null() {
            break;
        }
        capacity -= capacity / 16 + 1;
    }
    if block.is_null() {
        ngx_log_error!(
            NGX_LOG_EMERG,
            zone.shm.log,
            "edge_zone \"{}\" is too small",
            zone.shm.name
        );
        return NGX_ERROR as ngx_int_t;
    }
    core::ptr::write_bytes(
        block.cast::<u8>(),
        0,
        records_offset() + capacity * size_of::<Record>(),
    );
    block.cast::<Header>().write(Header {
        magic: MAGIC,
        record_size: size_of::<Record>() as u64,
        capacity: capacity as u64,
        live: AtomicU32::new(0),
    });
    (*shpool).data = block;
    zone.data = block;
    NGX_OK as ngx_int_t
}

/// The zone as a worker uses it.
pub struct Zone {
    pub name: String,
    header: &'static Header,
    records: &'static [Record],
    mutex: *mut ngx_shmtx_t,
}

static mut ZONE: Option<Zone> = None;

/// Called at worker start, once nginx has mapped the zone.
pub unsafe fn init_worker(zone: Option<NonNull<ngx_shm_zone_t>>, log: *mut ngx_log_t) {
    let Some(zone) = zone else { return };
    let zone = &*zone.as_ptr();
    let header = zone.data.cast::<Header>();
    let name = String::from_utf8_lossy(zone.shm.name.as_bytes()).into_owned();
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
        return;
    }
    let header = &*header;
    let records =
        core::slice::from_raw_parts(header.cast_records().cast_const(), header.capacity as usize);
    let shpool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    *core::ptr::addr_of_mut!(ZONE) = Some(Zone {
        name,
        header,
        records,
        mutex: core::ptr::addr_of_mut!((*shpool).mutex),
    });
}

impl Header {
    fn cast_records(&self) -> *mut Record {
        // SAFETY: the records follow the header in the same allocation.
        unsafe {
            core::ptr::from_ref(self)
                .cast::<u8>()
                .add(records_offset())
                .cast::<Record>()
                .cast_mut()
        }
    }
}

pub fn zone() -> Option<&'static Zone> {
    // SAFETY: written once at worker start, before any event runs.
    unsafe { (*core::ptr::addr_of!(ZONE)).as_ref() }
}

impl Zone {
    pub fn capacity(&self) -> usize {
        self.header.capacity as usize
    }

    pub fn live(&self) -> usize {
        Store::new(self.records, &self.header.live).live()
    }

    /// Points every `servers` upstream of `table` at its shared records, making those that
    /// are new. Servers that do not fit keep per-worker records; that is logged.
    pub fn attach(&self, table: &RouteTable, log: *mut ngx_log_t) {
        let now = now_ms();
        let mut unattached = 0usize;
        // SAFETY: the slab pool's mutex, in shared memory mapped for the process's life.
        unsafe { ngx_shmtx_lock(self.mutex) };
        let store = Store::new(self.records, &self.header.live);
        for upstream in table.upstreams() {
            let Backend::Servers(pool) = &upstream.kind else {
                continue;
            };
            let policy = pool.policy();
            for (i, server) in pool.servers().iter().enumerate() {
                let key = Key::new(&upstream.name, server.ip, server.port);
                let stale_before = now.saturating_sub(STALE_MS);
                match store.find_or_insert(&key, now, stale_before, policy.start_down) {
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
        unsafe { ngx_shmtx_unlock(self.mutex) };
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

/// How often a worker marks the records of its tables as listed.
pub const TOUCH_MS: u64 = STALE_MS / 4;
