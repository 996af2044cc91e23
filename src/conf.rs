//! Directives, configuration structures and their merge.

use core::ffi::{c_char, c_void};
use core::ptr::{self, NonNull};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use nginx_sys::{
    ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_msec_t, ngx_pagesize, ngx_parse_size,
    ngx_parse_time, ngx_shm_zone_t, ngx_str_t, ngx_stream_core_module, ngx_stream_core_srv_conf_t,
    ngx_stream_session_t, ngx_stream_upstream_srv_conf_t, ngx_uint_t, NGX_ERROR, NGX_LOG_EMERG,
    NGX_LOG_WARN, NGX_STREAM_UPSTREAM_CREATE,
};
use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::{ngx_conf_log_error, ngx_log_error};

use crate::caches::{Contents, Files};
use crate::feed::kube::{Cache, CACHE_MAGIC};
use crate::feed::Options;
use crate::routes::source::{self, Cached, Event, Inputs, Level, Reader, Source};
use crate::{fetch, stream, zone};

/// The module-owned upstream group that `$edge_upstream` names for `servers` routes.
pub const GROUP_NAME: &str = "nginx_edge";

const DEFAULT_INTERVAL_MS: ngx_msec_t = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unset,
    Off,
    Tls,
    Http,
    Auto,
    /// QUIC on a UDP listener, routed by the SNI of its Initial packets (see `quic`).
    Quic,
}

/// One route table: an `edge_routes` file or folder and the URL sources merged with it,
/// shared by every server with the same ones. Read at configuration time; a worker then
/// refreshes `source` (see `worker`).
pub struct SourceSlot {
    /// The file source's path, or the first URL source's name: in messages.
    pub path: PathBuf,
    pub file: Option<FileSource>,
    /// Indexes into `MainConf::urls`, in configuration order.
    pub urls: Vec<usize>,
    pub interval: ngx_msec_t,
    /// `file:line` of the directive, for configuration errors.
    pub declared_at: String,
    pub source: Option<Source>,
}

/// An `edge_routes` directive.
#[derive(Clone, PartialEq)]
pub struct FileSource {
    pub path: PathBuf,
    pub interval: ngx_msec_t,
    pub declared_at: String,
    /// Where it stands among the directives, for the merge order.
    pub position: usize,
}

/// An `edge_routes_url` directive: one source, fetched by one worker for the whole edge.
pub struct UrlSlot {
    pub options: Options,
    pub declared_at: String,
    pub position: usize,
    /// Its files in the state folder (set once the folder is known).
    pub files: Option<Arc<Files>>,
    /// For `https://`: nginx's TLS context, verifying against `ca=`.
    pub ssl: Option<fetch::Tls>,
    /// The table whose leading worker fetches this source (the first that merges it).
    pub owner: usize,
    /// The stream core configuration where the directive is: its `resolver` resolves a host
    /// name in the URL.
    pub core: *mut ngx_stream_core_srv_conf_t,
}

impl UrlSlot {
    /// nginx's resolver for a URL with a host name, when `resolver` names servers.
    pub fn resolver(&self) -> Option<*mut nginx_sys::ngx_resolver_t> {
        // SAFETY: the core configuration lives as long as the cycle's.
        let r = unsafe { self.core.as_ref()?.resolver };
        // Unset (stream level), or nginx's dummy resolver without servers.
        if r.is_null() || r as usize == usize::MAX || unsafe { (*r).connections.nelts } == 0 {
            return None;
        }
        Some(r)
    }
}

#[derive(Default)]
pub struct MainConf {
    // Boxed: server configurations and timers point at a slot while the list grows.
    #[allow(clippy::vec_box)]
    pub sources: Vec<Box<SourceSlot>>,
    /// Names of the `upstream {}` blocks a route's `nginx_upstream` may name.
    /// Shared with the threads that merge tables.
    pub nginx_upstreams: Arc<HashSet<String>>,
    /// The health zone: `edge_zone`'s, or a default one once a source is declared.
    pub zone: Option<NonNull<ngx_shm_zone_t>>,
    /// `edge_state`: where a changed table is published for every worker.
    pub state: Option<PathBuf>,
    /// Tells this configuration's publications from those of another (a reload's).
    pub config_id: u64,
    // Boxed: fetches point at a slot while the list grows.
    #[allow(clippy::vec_box)]
    pub urls: Vec<Box<UrlSlot>>,
    /// Counts `edge_routes` and `edge_routes_url` directives: their order is the merge order.
    pub directives: usize,
    /// `edge_drain_timeout`: how long a connection may stay open once its server or route
    /// went away (never, without it).
    pub drain_timeout_ms: Option<u64>,
    /// `edge_counters`: `Some(None)` for `off`; unset, the defaults.
    pub counters_sizes: Option<Option<crate::counters::Sizes>>,
    /// The counters' zone, once a source is declared and counters are not off.
    pub counters: Option<NonNull<ngx_shm_zone_t>>,
    /// Some server says `edge_route quic`: the QUIC handler and filter are installed.
    pub quic: bool,
}

pub struct SrvConf {
    pub mode: Mode,
    /// This level's `edge_routes`; a server without one takes stream's.
    pub file: Option<FileSource>,
    /// This level's `edge_routes_url`s (indexes into `MainConf::urls`); a server without any
    /// takes stream's.
    pub urls: Vec<usize>,
    pub source: *mut SourceSlot,
    /// `edge_status`: this server answers with the live state instead of proxying, through
    /// this content handler.
    pub status: Option<StatusHandler>,
}

pub type StatusHandler = unsafe extern "C" fn(*mut ngx_stream_session_t);

impl MainConf {
    pub fn upstream_exists(&self, name: &str) -> bool {
        self.nginx_upstreams.contains(name)
    }
}

unsafe fn directive_position(cf: *mut ngx_conf_t) -> String {
    let file = &(*(*cf).conf_file).file;
    format!(
        "{}:{}",
        String::from_utf8_lossy(file.name.as_bytes()),
        (*(*cf).conf_file).line
    )
}

/// `edge_routes PATH [interval=TIME];`
pub unsafe extern "C" fn set_edge_routes(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let scf = &mut *conf.cast::<SrvConf>();
    if scf.file.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let args = stream::conf_args(cf);
    let mut interval = DEFAULT_INTERVAL_MS;
    for arg in &args[2..] {
        let Some(value) = arg.strip_prefix("interval=") else {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid parameter \"{}\"", arg);
            return NGX_CONF_ERROR;
        };
        let mut value = value;
        let ms = ngx_parse_time(&mut value, 0);
        if ms == NGX_ERROR as isize || ms <= 0 {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid interval \"{}\"", value);
            return NGX_CONF_ERROR;
        }
        interval = ms as ngx_msec_t;
    }
    // Relative paths are relative to the configuration prefix, like include.
    let mut name = args[1];
    if ngx_conf_full_name((*cf).cycle, &mut name, 1) != 0 {
        return NGX_CONF_ERROR;
    }
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    mcf.directives += 1;
    scf.file = Some(FileSource {
        path: PathBuf::from(String::from_utf8_lossy(name.as_bytes()).into_owned()),
        interval,
        declared_at: directive_position(cf),
        position: mcf.directives,
    });
    NGX_CONF_OK
}

/// `edge_routes_url URL [name=] [format=] [interval=] [timeout=] [upstream=] [token_file=]
/// [ca=] [certificate= certificate_key=] [ingress_class=];`
pub unsafe extern "C" fn set_edge_routes_url(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let scf = &mut *conf.cast::<SrvConf>();
    let args = stream::conf_args(cf);
    let text: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
        .collect();
    let rest: Vec<&str> = text[1..].iter().map(String::as_str).collect();
    let duration = |v: &str| {
        let mut s = ngx_str_t {
            len: v.len(),
            data: v.as_ptr().cast_mut(),
        };
        let ms = ngx_parse_time(&mut s, 0);
        (ms != NGX_ERROR as isize && ms > 0).then_some(ms as u64)
    };
    let mut options = match Options::parse(&text[0], &rest, &duration) {
        Ok(o) => o,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "edge_routes_url: {}", e);
            return NGX_CONF_ERROR;
        }
    };
    // Files are relative to the configuration prefix, like include; each must be readable now.
    for file in [
        &mut options.token_file,
        &mut options.ca,
        &mut options.certificate,
        &mut options.certificate_key,
    ]
    .into_iter()
    .flatten()
    {
        let mut bytes = file.clone().into_bytes();
        let mut name = ngx_str_t {
            len: bytes.len(),
            data: bytes.as_mut_ptr(),
        };
        if ngx_conf_full_name((*cf).cycle, &mut name, 1) != 0 {
            return NGX_CONF_ERROR;
        }
        *file = String::from_utf8_lossy(name.as_bytes()).into_owned();
        if let Err(e) = std::fs::File::open(&*file) {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "edge_routes_url: {}: {}", file, e);
            return NGX_CONF_ERROR;
        }
    }
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    let key = options.cache_key();
    if let Some(i) = mcf.urls.iter().position(|u| u.options.cache_key() == key) {
        let slot = &mut mcf.urls[i];
        if !slot.options.connects_as(&options) {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "edge_routes_url: {} is already declared in {} with other connection settings (token_file=, ca=, certificate=, certificate_key=, timeout=): declare it once, or give each its own name=",
                options.name,
                slot.declared_at
            );
            return NGX_CONF_ERROR;
        }
        slot.options.interval_ms = slot.options.interval_ms.min(options.interval_ms);
        // One source, read with what either directive asks.
        slot.options.discover.add(options.discover);
        if !scf.urls.contains(&i) {
            scf.urls.push(i);
        }
        return NGX_CONF_OK;
    }
    let ssl = if options.url.tls {
        match fetch::Tls::new(cf, &options) {
            Some(tls) => Some(tls),
            None => return NGX_CONF_ERROR,
        }
    } else {
        None
    };
    mcf.directives += 1;
    scf.urls.push(mcf.urls.len());
    mcf.urls.push(Box::new(UrlSlot {
        options,
        declared_at: directive_position(cf),
        position: mcf.directives,
        files: None,
        ssl,
        owner: usize::MAX,
        core: stream::cf_srv_conf_of::<ngx_stream_core_srv_conf_t>(
            cf,
            &*core::ptr::addr_of!(ngx_stream_core_module),
        ),
    }));
    NGX_CONF_OK
}

/// `edge_zone NAME SIZE;`
pub unsafe extern "C" fn set_edge_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    let mcf = stream::cf_main_conf::<MainConf>(cf);
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
    match zone::add(cf, &mut name, size as usize) {
        Some(zone) => {
            mcf.zone = Some(zone);
            NGX_CONF_OK
        }
        None => NGX_CONF_ERROR,
    }
}

/// `edge_counters [routes=N] [unrouted=K] [clients=C];` or `edge_counters off;`
pub unsafe extern "C" fn set_edge_counters(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    use crate::counters::{Sizes, MAX_CLIENTS, MAX_ROUTES, MAX_UNROUTED};
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    if mcf.counters_sizes.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let args: Vec<String> = stream::conf_args(cf)[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned())
        .collect();
    if args.len() == 1 && args[0] == "off" {
        mcf.counters_sizes = Some(None);
        return NGX_CONF_OK;
    }
    let mut sizes = Sizes::default();
    for arg in &args {
        let (key, value) = arg.split_once('=').unwrap_or((arg, ""));
        let (field, min, max) = match key {
            "routes" => (&mut sizes.routes, 1, MAX_ROUTES),
            "unrouted" => (&mut sizes.unrouted, 0, MAX_UNROUTED),
            "clients" => (&mut sizes.clients, 0, MAX_CLIENTS),
            _ => {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "edge_counters: unknown parameter \"{}\" (routes=N, unrouted=K, clients=C, or off alone)",
                    arg
                );
                return NGX_CONF_ERROR;
            }
        };
        match value.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => *field = n,
            _ => {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "edge_counters: invalid {} \"{}\": a number from {} to {}",
                    key,
                    value,
                    min,
                    max
                );
                return NGX_CONF_ERROR;
            }
        }
    }
    mcf.counters_sizes = Some(Some(sizes));
    NGX_CONF_OK
}

/// `edge_drain_timeout TIME;`
pub unsafe extern "C" fn set_edge_drain_timeout(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    if mcf.drain_timeout_ms.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let text = String::from_utf8_lossy(stream::conf_args(cf)[1].as_bytes()).into_owned();
    match crate::routes::document::parse_duration(&text).filter(|&ms| ms > 0 && ms <= 86_400_000) {
        Some(ms) => {
            mcf.drain_timeout_ms = Some(ms);
            NGX_CONF_OK
        }
        None => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "edge_drain_timeout: invalid time \"{}\" (1ms to 24h, as \"30s\", \"10m\")",
                text
            );
            NGX_CONF_ERROR
        }
    }
}

/// `edge_state PATH;`
pub unsafe extern "C" fn set_edge_state(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    if mcf.state.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    let mut name = stream::conf_args(cf)[1];
    if ngx_conf_full_name((*cf).cycle, &mut name, 0) != 0 {
        return NGX_CONF_ERROR;
    }
    mcf.state = Some(PathBuf::from(
        String::from_utf8_lossy(name.as_bytes()).into_owned(),
    ));
    NGX_CONF_OK
}

/// The state folder when `edge_state` is not given: `edge_state` beside nginx's temporary
/// folders (`/var/lib/nginx/edge_state` for Debian's nginx), under the prefix if they are.
unsafe fn default_state(cf: *mut ngx_conf_t) -> Option<PathBuf> {
    let temp = nginx_sys::NGX_HTTP_CLIENT_TEMP_PATH.to_bytes();
    let parent = match temp.iter().rposition(|&b| b == b'/') {
        Some(at) => &temp[..=at],
        None => b"",
    };
    let mut path = parent.to_vec();
    path.extend_from_slice(b"edge_state");
    let mut name = ngx_str_t {
        len: path.len(),
        data: path.as_mut_ptr(),
    };
    if ngx_conf_full_name((*cf).cycle, &mut name, 0) != 0 {
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8_lossy(name.as_bytes()).into_owned(),
    ))
}

/// Has nginx make the state folder at start, owned by the workers' user, as it does its
/// temporary folders; `nginx -t` fails if it cannot.
unsafe fn add_state_path(cf: *mut ngx_conf_t, state: &std::path::Path) -> bool {
    let path = nginx_sys::ngx_pcalloc((*cf).pool, core::mem::size_of::<nginx_sys::ngx_path_t>())
        .cast::<nginx_sys::ngx_path_t>();
    let Some(p) = path.as_mut() else {
        return false;
    };
    // nginx hands the name to mkdir(): NUL-terminated.
    let text = state.as_os_str().as_encoded_bytes();
    let data = nginx_sys::ngx_pnalloc((*cf).pool, text.len() + 1).cast::<u8>();
    if data.is_null() {
        return false;
    }
    core::ptr::copy_nonoverlapping(text.as_ptr(), data, text.len());
    *data.add(text.len()) = 0;
    p.name = ngx_str_t {
        len: text.len(),
        data,
    };
    p.conf_file = (*(*cf).conf_file).file.name.data;
    p.line = (*(*cf).conf_file).line;
    let mut slot = path;
    nginx_sys::ngx_add_path(cf, &mut slot) == 0
}

/// `edge_route tls | http | auto | quic | off;`
pub unsafe extern "C" fn set_edge_route(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let scf = &mut *conf.cast::<SrvConf>();
    if scf.mode != Mode::Unset {
        return c"is duplicate".as_ptr().cast_mut();
    }
    scf.mode = match stream::conf_args(cf)[1].as_bytes() {
        b"tls" => Mode::Tls,
        b"http" => Mode::Http,
        b"auto" => Mode::Auto,
        b"quic" => {
            stream::cf_main_conf::<MainConf>(cf).quic = true;
            Mode::Quic
        }
        b"off" => Mode::Off,
        other => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{}\", it must be \"tls\", \"http\", \"auto\", \"quic\" or \"off\"",
                String::from_utf8_lossy(other)
            );
            return NGX_CONF_ERROR;
        }
    };
    NGX_CONF_OK
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    let pool = Pool::from_ngx_pool((*cf).pool);
    pool.allocate(MainConf::default()).cast()
}

pub unsafe extern "C" fn init_main_conf(_cf: *mut ngx_conf_t, _conf: *mut c_void) -> *mut c_char {
    NGX_CONF_OK
}

/// Runs once the whole stream block is parsed and every server merged, so every
/// `upstream {}` block and every table is known: reads every route source now, so that
/// `nginx -t` rejects a bad table.
pub unsafe fn open_sources(cf: *mut ngx_conf_t) -> bool {
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    let umcf = stream::cf_upstream_main_conf(cf);
    let upstreams = stream::array_items::<*mut ngx_stream_upstream_srv_conf_t>(
        umcf.upstreams.elts,
        umcf.upstreams.nelts,
    );
    let mut names = HashSet::new();
    for &uscf in upstreams {
        let uscf = &*uscf;
        // Only `upstream NAME {}` blocks: proxy_pass host:port makes implicit ones.
        if uscf.flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t != 0 && uscf.port == 0 {
            let name = String::from_utf8_lossy(uscf.host.as_bytes()).into_owned();
            if name != GROUP_NAME {
                names.insert(name);
            }
        }
    }
    let log = (*cf).log;
    mcf.nginx_upstreams = Arc::new(names);
    if !mcf.sources.is_empty() {
        // The folder is where URL sources keep their last good documents; nginx makes it
        // (owned by the workers' user) when one needs it, or when it is named.
        let named = mcf.state.is_some();
        if !named {
            mcf.state = default_state(cf);
        }
        let Some(state) = mcf.state.clone() else {
            return false;
        };
        if (named || !mcf.urls.is_empty()) && !add_state_path(cf, &state) {
            return false;
        }
        for url in &mut mcf.urls {
            url.files = Some(Arc::new(Files::new(&state, url.options.cache_key())));
        }
    }
    let exists = |name: &str| mcf.nginx_upstreams.contains(name);
    // Read in an arena of the module's: what the read frees would otherwise leave holes in
    // the heap every worker inherits, and nginx's buffers per connection would be cut from
    // them (see `arena`).
    let (opened, in_arena) = crate::ALLOCATOR.scoped(|| {
        for slot in &mut mcf.sources {
            let cached = |i: &usize| {
                let url = &mcf.urls[*i];
                // Set above for every URL source of a table.
                let files = url.files.as_ref()?;
                Some(Cached {
                    file: files.accepted.clone(),
                    candidate: None,
                    read: url_reader(&url.options, Arc::clone(files)),
                    label: format!("edge_routes_url {}", url.options.name),
                    discovers: (url.options.discover.any())
                        .then(|| (url.options.name.clone(), url.options.discover)),
                })
            };
            let at = slot.file.as_ref().map_or(usize::MAX, |f| f.position);
            let inputs = Inputs {
                path: slot.file.as_ref().map(|f| f.path.clone()),
                before: slot
                    .urls
                    .iter()
                    .filter(|&&i| mcf.urls[i].position < at)
                    .filter_map(cached)
                    .collect(),
                after: slot
                    .urls
                    .iter()
                    .filter(|&&i| mcf.urls[i].position > at)
                    .filter_map(cached)
                    .collect(),
            };
            match Source::open(inputs, &exists) {
                Ok((source, warnings)) => {
                    for event in warnings {
                        ngx_log_error!(NGX_LOG_WARN, log, "edge_routes: {}", event.message);
                    }
                    slot.source = Some(source);
                }
                Err(message) => {
                    ngx_log_error!(
                        NGX_LOG_EMERG,
                        log,
                        "edge_routes: {} ({} in {})",
                        message,
                        if slot.file.is_some() {
                            "edge_routes"
                        } else {
                            "edge_routes_url"
                        },
                        slot.declared_at
                    );
                    return false;
                }
            }
            // A host name needs the resolver (`resolver` in stream, or in the server).
            for &i in &slot.urls {
                let url = &mcf.urls[i];
                if url.options.url.ip().is_none() && url.resolver().is_none() {
                    ngx_log_error!(
                        NGX_LOG_EMERG,
                        log,
                        "edge_routes_url: \"{}\" is a host name: it needs \"resolver\" in stream or in the server (in {})",
                        url.options.url.host,
                        url.declared_at
                    );
                    return false;
                }
            }
            // upstream= must name an upstream of the table the source is merged into.
            let table = slot.source.as_ref().map(|s| s.table());
            for &i in &slot.urls {
                let url = &mcf.urls[i];
                let Some(up) = url.options.upstream.as_deref() else {
                    continue;
                };
                if !table.is_some_and(|t| t.upstreams().iter().any(|u| &*u.name == up)) {
                    ngx_log_error!(
                        NGX_LOG_EMERG,
                        log,
                        "edge_routes_url: upstream={} is not defined by the route files merged with {} (in {})",
                        up,
                        url.options.name,
                        url.declared_at
                    );
                    return false;
                }
            }
        }
        true
    });
    if !opened {
        return false;
    }
    if !in_arena {
        ngx_log_error!(
            nginx_sys::NGX_LOG_INFO,
            log,
            "edge_routes: the route tables were read on the system allocator (no arena mapping); connections may cost a little more with large tables"
        );
    }
    // Reading the tables freed more than they kept (documents, merge maps): give those pages
    // back before the workers are forked, or each worker inherits them and dirties them.
    // SAFETY: malloc_trim is always safe to call.
    unsafe { libc::malloc_trim(0) };
    if !mcf.sources.is_empty() {
        mcf.config_id = crate::health::fnv1a(
            &[
                (libc::getpid() as u64).to_le_bytes(),
                crate::health::now_ms().to_le_bytes(),
                (mcf as *const MainConf as u64).to_le_bytes(),
            ]
            .concat(),
        )
        .max(1);
    }
    if !mcf.sources.is_empty() {
        let sizes = mcf
            .counters_sizes
            .unwrap_or(Some(crate::counters::Sizes::default()));
        if let Some(sizes) = sizes {
            mcf.counters = crate::counters::add(cf, sizes);
            if mcf.counters.is_none() {
                return false;
            }
        }
    }
    if mcf.zone.is_none() && !mcf.sources.is_empty() {
        let mut name = ngx_str_t {
            len: zone::DEFAULT_NAME.len(),
            data: zone::DEFAULT_NAME.as_ptr().cast_mut(),
        };
        mcf.zone = zone::add(cf, &mut name, zone::DEFAULT_SIZE);
        if mcf.zone.is_none() {
            return false;
        }
    }
    true
}

/// Reads a URL source's document (see `caches`): a Kubernetes source's objects, made into
/// routes as the source's options say, or a native route document.
fn url_reader(options: &Options, files: Arc<Files>) -> Reader {
    let name = options.name.clone();
    let upstream = options.upstream.clone();
    let class = options.ingress_class.clone();
    let discovers = options.discover.any();
    Reader::new(move |path| {
        let shown =
            |e: &dyn std::fmt::Display| format!("edge_routes_url {name}: {}: {e}", path.display());
        let bytes = match files.read_or_recall(path).map_err(|e| shown(&e))? {
            Contents::Made(document) => return Ok(document),
            Contents::Bytes(bytes) => bytes,
        };
        if bytes.starts_with(CACHE_MAGIC) {
            let catalog = Cache::parse(&bytes).map_err(|e| shown(&e))?;
            let made = catalog.document(&name, upstream.as_deref(), class.as_deref());
            Ok(Arc::new(made.with_discovered(
                discovers.then(|| Arc::new(catalog.discovered(&name))),
            )))
        } else {
            source::parse_document(&bytes)
                .map(Arc::new)
                .map_err(|e| shown(&e))
        }
    })
}

pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    let pool = Pool::from_ngx_pool((*cf).pool);
    pool.allocate(SrvConf {
        mode: Mode::Unset,
        file: None,
        urls: Vec::new(),
        source: ptr::null_mut(),
        status: None,
    })
    .cast()
}

pub unsafe extern "C" fn merge_srv_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    let prev = &*prev.cast::<SrvConf>();
    let conf = &mut *conf.cast::<SrvConf>();
    if conf.file.is_none() {
        conf.file = prev.file.clone();
    }
    if conf.urls.is_empty() {
        conf.urls = prev.urls.clone();
    }
    if conf.file.is_some() || !conf.urls.is_empty() {
        conf.source = table_for(cf, conf.file.as_ref(), &conf.urls);
    }
    if conf.mode == Mode::Unset {
        conf.mode = Mode::Off;
    }
    let handler = stream::cf_srv_conf_of::<ngx_stream_core_srv_conf_t>(
        cf,
        &*core::ptr::addr_of!(ngx_stream_core_module),
    )
    .handler;
    // A later `proxy_pass` or `return` in the server replaced the status handler.
    if conf
        .status
        .is_some_and(|ours| !handler.is_some_and(|h| core::ptr::fn_addr_eq(h, ours)))
    {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"edge_status\" cannot be used with \"proxy_pass\" or \"return\" in the same server"
        );
        return NGX_CONF_ERROR;
    }
    if conf.mode != Mode::Off && conf.source.is_null() {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"edge_route\" needs \"edge_routes\" or \"edge_routes_url\" in this server or in stream"
        );
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

/// The table of a server's sources: the one another server with the same sources has, or a
/// new one.
unsafe fn table_for(
    cf: *mut ngx_conf_t,
    file: Option<&FileSource>,
    urls: &[usize],
) -> *mut SourceSlot {
    let mcf = stream::cf_main_conf::<MainConf>(cf);
    let path = file.map(|f| &f.path);
    if let Some(slot) = mcf
        .sources
        .iter_mut()
        .find(|s| s.file.as_ref().map(|f| &f.path) == path && s.urls == urls)
    {
        return &mut **slot;
    }
    let index = mcf.sources.len();
    for &i in urls {
        let url = &mut mcf.urls[i];
        if url.owner == usize::MAX {
            url.owner = index;
        }
    }
    let first_url = urls.first().map(|&i| &mcf.urls[i]);
    let mut slot = Box::new(SourceSlot {
        path: match (file, first_url) {
            (Some(f), _) => f.path.clone(),
            (None, Some(u)) => PathBuf::from(&u.options.name),
            (None, None) => PathBuf::new(),
        },
        file: file.cloned(),
        urls: urls.to_vec(),
        interval: file.map_or(DEFAULT_INTERVAL_MS, |f| f.interval),
        declared_at: match (file, first_url) {
            (Some(f), _) => f.declared_at.clone(),
            (None, Some(u)) => u.declared_at.clone(),
            (None, None) => String::new(),
        },
        source: None,
    });
    let at: *mut SourceSlot = &mut *slot;
    mcf.sources.push(slot);
    at
}

pub fn log_level(level: Level) -> ngx_uint_t {
    (match level {
        Level::Error => nginx_sys::NGX_LOG_ERR,
        Level::Warn => nginx_sys::NGX_LOG_WARN,
        Level::Notice => nginx_sys::NGX_LOG_NOTICE,
    }) as ngx_uint_t
}

pub fn log_events(log: *mut nginx_sys::ngx_log_t, events: &[Event]) {
    for event in events {
        ngx_log_error!(
            log_level(event.level),
            log,
            "edge_routes: {}",
            event.message
        );
    }
}
