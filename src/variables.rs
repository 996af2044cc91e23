//! `$edge_upstream`, `$edge_server_name`, `$edge_route`, `$edge_protocol`, `$edge_alpn`,
//! `$edge_match`, `$edge_source`.

use nginx_sys::{
    ngx_conf_t, ngx_int_t, ngx_pnalloc, ngx_str_t, ngx_stream_add_variable, ngx_stream_session_t,
    ngx_stream_variable_value_t, NGX_ERROR, NGX_OK, NGX_STREAM_VAR_NOCACHEABLE,
};
use ngx::ngx_string;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::conf::GROUP_NAME;
use crate::routes::table::{Backend, MatchedBy};
use crate::session::{self, RouteKind, SessionCtx};
use crate::sniff::tls;

type Getter = unsafe extern "C" fn(
    *mut ngx_stream_session_t,
    *mut ngx_stream_variable_value_t,
    usize,
) -> ngx_int_t;

const VARIABLES: [(ngx_str_t, Getter); 7] = [
    (ngx_string!("edge_upstream"), edge_upstream),
    (ngx_string!("edge_server_name"), edge_server_name),
    (ngx_string!("edge_route"), edge_route),
    (ngx_string!("edge_protocol"), edge_protocol),
    (ngx_string!("edge_alpn"), edge_alpn),
    (ngx_string!("edge_match"), edge_match),
    (ngx_string!("edge_source"), edge_source),
];

/// Whether the flags word of a variable value is laid out as `packed_flags` assumes, checked
/// once: bindgen's bit-by-bit setters cost a few hundred instructions per value.
static PACKED_FLAGS: AtomicBool = AtomicBool::new(false);

/// `len:28, valid:1, no_cacheable:1, not_found:1, escape:1`, from the lowest bit, as GCC lays
/// out the bitfield on the targets nginx runs on; checked against bindgen's setters.
fn packed_flags(len: u32) -> u32 {
    len | 1 << 28 | 1 << 29
}

fn check_packed_flags() -> bool {
    // SAFETY: a zeroed value is valid; the flags word is its first field (repr(C)).
    unsafe {
        let mut v: ngx_stream_variable_value_t = core::mem::zeroed();
        let len = 0x0abc_def1;
        v.set_len(len);
        v.set_valid(1);
        v.set_no_cacheable(1);
        v.set_not_found(0);
        core::ptr::from_ref(&v).cast::<u32>().read() == packed_flags(len)
    }
}

pub unsafe fn add_variables(cf: *mut ngx_conf_t) -> ngx_int_t {
    PACKED_FLAGS.store(check_packed_flags(), Ordering::Relaxed);
    for (name, get) in VARIABLES {
        let mut name = name;
        // Not cacheable: a value read before the preread phase ends must not stick.
        let var = ngx_stream_add_variable(cf, &mut name, NGX_STREAM_VAR_NOCACHEABLE as _);
        if var.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*var).get_handler = Some(get);
        (*var).data = 0;
    }
    NGX_OK as ngx_int_t
}

unsafe fn set(v: *mut ngx_stream_variable_value_t, data: *const u8, len: usize) -> ngx_int_t {
    if PACKED_FLAGS.load(Ordering::Relaxed) {
        v.cast::<u32>().write(packed_flags(len as u32));
    } else {
        let v = &mut *v;
        v.set_len(len as u32);
        v.set_valid(1);
        v.set_no_cacheable(1);
        v.set_not_found(0);
    }
    (*v).data = data.cast_mut();
    NGX_OK as ngx_int_t
}

unsafe fn set_bytes(v: *mut ngx_stream_variable_value_t, bytes: &[u8]) -> ngx_int_t {
    set(v, bytes.as_ptr(), bytes.len())
}

unsafe fn not_found(v: *mut ngx_stream_variable_value_t) -> ngx_int_t {
    (*v).set_not_found(1);
    NGX_OK as ngx_int_t
}

unsafe fn with_ctx(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    f: impl FnOnce(&SessionCtx) -> Option<ngx_int_t>,
) -> ngx_int_t {
    match session::get(s) {
        Some(ctx) => f(ctx).unwrap_or_else(|| not_found(v)),
        None => not_found(v),
    }
}

unsafe extern "C" fn edge_upstream(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| {
        Some(match &ctx.upstream()?.kind {
            Backend::Servers(_) => set_bytes(v, GROUP_NAME.as_bytes()),
            Backend::Nginx(name) => set_bytes(v, name.as_bytes()),
        })
    })
}

unsafe extern "C" fn edge_server_name(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| Some(set_bytes(v, ctx.name()?.as_bytes())))
}

unsafe extern "C" fn edge_route(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| {
        Some(match ctx.route? {
            // SAFETY: route keys point into the table the context holds.
            RouteKind::Exact(key) => set_bytes(v, (*key).as_bytes()),
            RouteKind::Wildcard(suffix) => {
                let suffix = (*suffix).as_bytes();
                let len = suffix.len() + 2;
                let p = ngx_pnalloc((*(*s).connection).pool, len).cast::<u8>();
                if p.is_null() {
                    return Some(NGX_ERROR as ngx_int_t);
                }
                let out = core::slice::from_raw_parts_mut(p, len);
                out[..2].copy_from_slice(b"*.");
                out[2..].copy_from_slice(suffix);
                set(v, p, len)
            }
            RouteKind::Default => set_bytes(v, b"default"),
        })
    })
}

unsafe extern "C" fn edge_protocol(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| {
        let protocol = if ctx.quic_flight {
            "quic"
        } else {
            ctx.protocol?.as_str()
        };
        Some(set_bytes(v, protocol.as_bytes()))
    })
}

unsafe extern "C" fn edge_alpn(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    let Some(ctx) = session::get(s) else {
        return not_found(v);
    };
    // Kept as the wire lists them: joined once, in place, when (and if) it is read.
    if core::mem::take(&mut ctx.alpn_wire) && !ctx.alpn.data.is_null() {
        let list = core::slice::from_raw_parts_mut(ctx.alpn.data, ctx.alpn.len);
        ctx.alpn.len = tls::join_alpn_in_place(list);
    }
    set(v, ctx.alpn.data, ctx.alpn.len)
}

/// How the route was found: `exact`, `wildcard`, `default`, or `none` once the name was read
/// and nothing matched.
unsafe extern "C" fn edge_match(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| {
        let how: &'static [u8] = match ctx.route {
            Some(RouteKind::Exact(_)) => b"exact",
            Some(RouteKind::Wildcard(_)) => b"wildcard",
            Some(RouteKind::Default) => b"default",
            None if ctx.done => b"none",
            None => return None,
        };
        Some(set_bytes(v, how))
    })
}

/// The file or URL source that gave the route (`$edge_source`): a file's path, or the name of
/// an `edge_routes_url`.
unsafe extern "C" fn edge_source(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    _: usize,
) -> ngx_int_t {
    with_ctx(s, v, |ctx| {
        let by = match ctx.route? {
            // SAFETY: route keys point into the table the context holds.
            RouteKind::Exact(key) => MatchedBy::Exact(&*key),
            RouteKind::Wildcard(suffix) => MatchedBy::Wildcard(&*suffix),
            RouteKind::Default => MatchedBy::Default,
        };
        // The text lives in the table's image, which the context holds.
        let source = ctx.table.as_ref()?.source_of(&by)?;
        Some(set_bytes(v, source.as_bytes()))
    })
}
