//! The route names of a table as one compact, position-independent image: two open-addressing
//! hash tables (exact names, wildcard suffixes) of fixed-size slots that point into one string
//! arena, behind a header with a format version, the image's length and a checksum. A name is
//! looked up in place, without deserializing anything, so the same bytes can be shared by
//! every worker (mapped from a file) and checked before use.
//!
//! It also holds the upstreams (servers, balancing, checks), so that a worker can build
//! everything it serves from an image alone.
//!
//! Layout, little-endian, every section 8-byte aligned: `Header` | exact slots | wildcard
//! slots | upstream records | server records | limit records | client networks | names
//! (`len: u8`, the bytes, then the route's origin: `u32`, a string or `NONE`, and its limits
//! for TLS and for HTTP: `u32` each, a limit record or `NONE`) | strings (`len: u16`, then
//! the bytes).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use std::collections::HashMap;

use super::document::UpstreamKind;
use super::limits::Limits;
use crate::upstream::{
    Balance, CheckDef, CheckKind, Policy, ProxyProtocol, ServerDef, MAX_SERVERS, MAX_WEIGHT,
};

/// No upstream for this protocol.
pub const NONE: u32 = u32::MAX;

const MAGIC: [u8; 8] = *b"EDGEIMG\0";
pub const VERSION: u32 = 4;

/// In a wildcard slot's name offset: the wildcard matches one label only (Kubernetes Ingress
/// `*.foo.com`), not any depth.
const ONE_LABEL: u32 = 1 << 31;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    magic: [u8; 8],
    version: u32,
    /// Upstream ids in slots are below this.
    upstreams: u32,
    len: u64,
    /// Of every byte after the header.
    checksum: u64,
    exact: Section,
    wildcard: Section,
    names_off: u32,
    names_len: u32,
    default_tls: u32,
    default_http: u32,
    upstreams_off: u32,
    servers_off: u32,
    servers_count: u32,
    strings_off: u32,
    strings_len: u32,
    /// Where the default route came from: a string, or `NONE`.
    default_origin: u32,
    limits_off: u32,
    limits_count: u32,
    networks_off: u32,
    networks_count: u32,
    /// The default route's limits per protocol: a limit record, or `NONE`.
    default_limits_tls: u32,
    default_limits_http: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Section {
    off: u32,
    /// A power of two, larger than `count`.
    slots: u32,
    count: u32,
    _pad: u32,
}

/// One entry of a hash table; `hash == 0` is an empty slot.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    hash: u32,
    name: u32,
    tls: u32,
    http: u32,
}

const HEADER: usize = core::mem::size_of::<Header>();
const SLOT: usize = core::mem::size_of::<Slot>();
/// An upstream record; see `UpstreamEntry` for its fields.
const UPSTREAM: usize = 64;
/// A server record: address (16, v4 mapped), port (0: the listener's), weight, backup, v6,
/// draining.
const SERVER: usize = 24;
/// A limit record: max_conns, max_conns_per_client, rate (0: none), flags (1: per minute),
/// burst, then its networks: the first, how many deny, how many allow (0: no allow list).
const LIMIT: usize = 32;
/// A client network: address (16, v4 mapped), prefix length (0 to 128).
const NETWORK: usize = 24;

/// What a route sends each protocol to: upstream ids, or `NONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub tls: u32,
    pub http: u32,
}

/// A 64-bit hash of a name, a word at a time; the same in every process.
pub fn hash(name: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (name.len() as u64).wrapping_mul(K);
    let mut chunks = name.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    crate::health::mix(h)
}

fn slot_hash(h: u64) -> u32 {
    (h >> 32) as u32 | 1
}

/// Builds an image. Names must be unique within each table, at most 255 bytes of ASCII.
#[derive(Default)]
pub struct Builder<'a> {
    exact: Vec<Named>,
    wildcard: Vec<Named>,
    default: Option<(Targets, Origin, LimitIds)>,
    upstreams: Vec<UpstreamSpec<'a>>,
    origins: Vec<&'a str>,
    limits: Vec<Limits>,
    limit_ids: HashMap<Limits, u32>,
    /// Networks in `limits`, all together.
    networks: usize,
}

/// A route's limit records for TLS and for HTTP (`NONE`: none).
pub type LimitIds = [u32; 2];
pub const NO_LIMITS: LimitIds = [NONE, NONE];

/// Where a route came from: an index into the builder's origins, or `NO_ORIGIN`.
pub type Origin = u32;
pub const NO_ORIGIN: Origin = u32::MAX;

/// A name to place: its bytes, targets, one-label flag, origin and limits.
type Named = (Box<[u8]>, Targets, bool, Origin, LimitIds);

/// Bytes a name takes in the names section: its length, itself, its origin, its limits.
fn name_size(name: &[u8]) -> usize {
    1 + name.len() + 12
}

/// An upstream for the image: what the route file says, and the name its check sends.
pub struct UpstreamSpec<'a> {
    pub name: &'a str,
    pub kind: &'a UpstreamKind,
    pub policy: &'a Policy,
    pub check_name: Option<&'a str>,
    /// Its servers are a source's nodes (`"discover"`): it may have none.
    pub discovered: bool,
    /// A Service's node ports: the listener's port to the servers' (`"nodeport"`).
    pub port_map: &'a [(u16, u16)],
}

impl<'a> Builder<'a> {
    /// Upstreams get ids in the order they are added.
    pub fn upstream(&mut self, spec: UpstreamSpec<'a>) {
        self.upstreams.push(spec);
    }

    /// A source routes come from (a file, a URL source), named as `$edge_source` shows it.
    pub fn origin(&mut self, name: &'a str) -> Origin {
        self.origins.push(name);
        self.origins.len() as Origin - 1
    }

    /// The id of a set of limits routes may name (one record per distinct set); `NONE` for
    /// no limit at all.
    pub fn limits(&mut self, limits: Limits) -> u32 {
        if limits.is_empty() {
            return NONE;
        }
        if let Some(&id) = self.limit_ids.get(&limits) {
            return id;
        }
        let id = self.limits.len() as u32;
        self.networks +=
            limits.allow.as_ref().map_or(0, Vec::len) + limits.deny.as_ref().map_or(0, Vec::len);
        self.limits.push(limits.clone());
        self.limit_ids.insert(limits, id);
        id
    }

    /// The client networks of every set of limits added so far.
    pub fn network_count(&self) -> usize {
        self.networks
    }

    pub fn exact(&mut self, name: &str, to: Targets, origin: Origin) {
        self.exact_limited(name, to, origin, NO_LIMITS);
    }

    pub fn exact_limited(&mut self, name: &str, to: Targets, origin: Origin, limits: LimitIds) {
        debug_assert!(name.is_ascii() && name.len() <= 255, "a checked route name");
        self.exact
            .push((name.as_bytes().into(), to, false, origin, limits));
    }

    /// `suffix` is the part after `*.`; `one_label`: the wildcard stands for exactly one label
    /// (Kubernetes Ingress), else for any number of them.
    pub fn wildcard(&mut self, suffix: &str, to: Targets, one_label: bool, origin: Origin) {
        self.wildcard_limited(suffix, to, one_label, origin, NO_LIMITS);
    }

    pub fn wildcard_limited(
        &mut self,
        suffix: &str,
        to: Targets,
        one_label: bool,
        origin: Origin,
        limits: LimitIds,
    ) {
        debug_assert!(
            suffix.is_ascii() && suffix.len() <= 255,
            "a checked route name"
        );
        self.wildcard
            .push((suffix.as_bytes().into(), to, one_label, origin, limits));
    }

    pub fn set_default(&mut self, to: Targets, origin: Origin) {
        self.set_default_limited(to, origin, NO_LIMITS);
    }

    pub fn set_default_limited(&mut self, to: Targets, origin: Origin, limits: LimitIds) {
        self.default = Some((to, origin, limits));
    }

    /// Routes may only use the ids of upstreams added.
    pub fn build(self) -> Image {
        let upstreams = self.upstreams.len() as u32;
        let slots_for = |n: usize| (n + n / 2 + 1).next_power_of_two();
        let (exact_slots, wild_slots) =
            (slots_for(self.exact.len()), slots_for(self.wildcard.len()));
        let names_len: usize = self
            .exact
            .iter()
            .chain(&self.wildcard)
            .map(|(n, ..)| name_size(n))
            .sum();
        let servers_count: usize = self
            .upstreams
            .iter()
            .map(|u| match u.kind {
                UpstreamKind::Servers(list) => list.len(),
                UpstreamKind::Nginx(_) | UpstreamKind::Discover(_) => 0,
            })
            .sum();
        let mut strings = Strings::default();
        let origins: Vec<u32> = self.origins.iter().map(|o| strings.add(o)).collect();
        let origin_at = |o: Origin| origins.get(o as usize).copied().unwrap_or(NONE);
        let exact_off = HEADER;
        let wild_off = exact_off + exact_slots * SLOT;
        let upstreams_off = wild_off + wild_slots * SLOT;
        let servers_off = upstreams_off + self.upstreams.len() * UPSTREAM;
        let limits_off = servers_off + servers_count * SERVER;
        let mut limit_records = Vec::with_capacity(self.limits.len() * LIMIT);
        let mut networks = Vec::new();
        for l in &self.limits {
            limit_records.extend_from_slice(&limit_record(l, &mut networks));
        }
        let networks_off = limits_off + limit_records.len();
        let names_off = networks_off + networks.len();
        let strings_off = names_off + names_len;
        let mut records = Vec::with_capacity(self.upstreams.len() * UPSTREAM);
        let mut servers = Vec::with_capacity(servers_count * SERVER);
        for u in &self.upstreams {
            records.extend_from_slice(&upstream_record(u, servers.len() / SERVER, &mut strings));
            if let UpstreamKind::Servers(list) = u.kind {
                for server in list {
                    servers.extend_from_slice(&server_record(server));
                }
            }
        }
        let len = (strings_off + strings.bytes.len()).next_multiple_of(8);
        let mut bytes = vec![0u8; len];
        bytes[upstreams_off..servers_off].copy_from_slice(&records);
        bytes[servers_off..limits_off].copy_from_slice(&servers);
        bytes[limits_off..networks_off].copy_from_slice(&limit_records);
        bytes[networks_off..names_off].copy_from_slice(&networks);
        bytes[strings_off..strings_off + strings.bytes.len()].copy_from_slice(&strings.bytes);
        let mut names = names_off;
        let mut place = |bytes: &mut [u8], off: usize, slots: usize, list: &[Named]| {
            let mask = slots - 1;
            for (name, to, one_label, origin, limits) in list {
                let h = hash(name);
                let mut i = h as usize & mask;
                while read_slot(bytes, off, i).hash != 0 {
                    i = (i + 1) & mask;
                }
                write_slot(
                    bytes,
                    off,
                    i,
                    Slot {
                        hash: slot_hash(h),
                        name: (names - names_off) as u32 | if *one_label { ONE_LABEL } else { 0 },
                        tls: to.tls,
                        http: to.http,
                    },
                );
                bytes[names] = name.len() as u8;
                bytes[names + 1..names + 1 + name.len()].copy_from_slice(name);
                let at = names + 1 + name.len();
                bytes[at..at + 4].copy_from_slice(&origin_at(*origin).to_le_bytes());
                bytes[at + 4..at + 8].copy_from_slice(&limits[0].to_le_bytes());
                bytes[at + 8..at + 12].copy_from_slice(&limits[1].to_le_bytes());
                names += name_size(name);
            }
        };
        place(&mut bytes, exact_off, exact_slots, &self.exact);
        place(&mut bytes, wild_off, wild_slots, &self.wildcard);
        let (default, default_origin, default_limits) = self.default.unwrap_or((
            Targets {
                tls: NONE,
                http: NONE,
            },
            NO_ORIGIN,
            NO_LIMITS,
        ));
        let mut header = Header {
            magic: MAGIC,
            version: VERSION,
            upstreams,
            len: len as u64,
            checksum: 0,
            exact: Section {
                off: exact_off as u32,
                slots: exact_slots as u32,
                count: self.exact.len() as u32,
                _pad: 0,
            },
            wildcard: Section {
                off: wild_off as u32,
                slots: wild_slots as u32,
                count: self.wildcard.len() as u32,
                _pad: 0,
            },
            names_off: names_off as u32,
            names_len: names_len as u32,
            default_tls: default.tls,
            default_http: default.http,
            upstreams_off: upstreams_off as u32,
            servers_off: servers_off as u32,
            servers_count: servers_count as u32,
            strings_off: strings_off as u32,
            strings_len: strings.bytes.len() as u32,
            default_origin: origin_at(default_origin),
            limits_off: limits_off as u32,
            limits_count: self.limits.len() as u32,
            networks_off: networks_off as u32,
            networks_count: (networks.len() / NETWORK) as u32,
            default_limits_tls: default_limits[0],
            default_limits_http: default_limits[1],
        };
        header.checksum = checksum(&bytes[HEADER..]);
        write_header(&mut bytes, &header);
        Image {
            bytes: Bytes::Heap(bytes),
            header,
        }
    }
}

/// An image, owned, with its header read once: built here, or mapped read-only from a sealed
/// memfd (see `share`) and shared with every other worker that maps it.
pub struct Image {
    bytes: Bytes,
    header: Header,
}

enum Bytes {
    Heap(Vec<u8>),
    /// `len` bytes at `offset` into a read-only mapping of `map_len` bytes at `base`, which
    /// nothing can change any more (a sealed memfd).
    Mapped {
        base: *const u8,
        map_len: usize,
        offset: usize,
        len: usize,
    },
}

// SAFETY: a mapping is read-only, immutable, and owned by the one `Image` that unmaps it.
unsafe impl Send for Bytes {}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Heap(v) => v,
            // SAFETY: `offset + len <= map_len`, mapped until drop.
            Bytes::Mapped {
                base, offset, len, ..
            } => unsafe { core::slice::from_raw_parts(base.add(*offset), *len) },
        }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if let Bytes::Mapped { base, map_len, .. } = *self {
            // SAFETY: the mapping handed to `Image::mapped`, unmapped once.
            unsafe { libc::munmap(base.cast_mut().cast(), map_len) };
        }
    }
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image({} bytes)", self.bytes().len())
    }
}

impl Image {
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Takes bytes from elsewhere, once they are checked: see `check`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Image, ImageError> {
        let header = check(&bytes)?;
        Ok(Image {
            bytes: Bytes::Heap(bytes),
            header,
        })
    }

    /// Takes ownership of a read-only mapping of `map_len` bytes at `base` (unmapped when the
    /// image is dropped, or now if it is refused) whose bytes `offset..offset + len` are an
    /// image, and checks them.
    ///
    /// # Safety
    /// `base` must come from `mmap` for `map_len` bytes, with `offset + len <= map_len`, and
    /// the mapped bytes must never change while it exists (a sealed memfd).
    pub unsafe fn mapped(
        base: *const u8,
        map_len: usize,
        offset: usize,
        len: usize,
    ) -> Result<Image, ImageError> {
        let bytes = Bytes::Mapped {
            base,
            map_len,
            offset,
            len,
        };
        let header = check(bytes.as_slice())?;
        Ok(Image { bytes, header })
    }

    /// The image, to look names up in.
    pub fn view(&self) -> View<'_> {
        View {
            bytes: self.bytes(),
            header: &self.header,
        }
    }
}

impl Default for Image {
    fn default() -> Image {
        Builder::default().build()
    }
}

/// Why bytes are not a usable image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    Truncated { len: usize },
    NotAnImage,
    Version(u32),
    Length { header: u64, actual: usize },
    Checksum,
    Corrupt(&'static str),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Truncated { len } => write!(f, "{len} bytes, shorter than a header"),
            ImageError::NotAnImage => f.write_str("not a route image (bad magic)"),
            ImageError::Version(v) => {
                write!(
                    f,
                    "image format version {v}, this module reads version {VERSION}"
                )
            }
            ImageError::Length { header, actual } => {
                write!(f, "the header says {header} bytes, the image has {actual}")
            }
            ImageError::Checksum => f.write_str("checksum mismatch"),
            ImageError::Corrupt(what) => write!(f, "corrupt: {what}"),
        }
    }
}

/// A checked image, borrowed.
#[derive(Clone, Copy)]
pub struct View<'a> {
    bytes: &'a [u8],
    header: &'a Header,
}

/// Checks `bytes` (format version, length, checksum, every offset and name) before any use: a
/// truncated, corrupt or foreign image is refused, never read out of bounds.
fn check(bytes: &[u8]) -> Result<Header, ImageError> {
    if bytes.len() < HEADER {
        return Err(ImageError::Truncated { len: bytes.len() });
    }
    let header = read_header(bytes);
    if header.magic != MAGIC {
        return Err(ImageError::NotAnImage);
    }
    if header.version != VERSION {
        return Err(ImageError::Version(header.version));
    }
    if header.len != bytes.len() as u64 {
        return Err(ImageError::Length {
            header: header.len,
            actual: bytes.len(),
        });
    }
    if checksum(&bytes[HEADER..]) != header.checksum {
        return Err(ImageError::Checksum);
    }
    View {
        bytes,
        header: &header,
    }
    .check_layout()?;
    Ok(header)
}

impl<'a> View<'a> {
    fn check_layout(&self) -> Result<(), ImageError> {
        let h = &self.header;
        let names_end = h.names_off as u64 + u64::from(h.names_len);
        if names_end > self.bytes.len() as u64 {
            return Err(ImageError::Corrupt("names past the end"));
        }
        let upstreams_end = u64::from(h.upstreams_off) + u64::from(h.upstreams) * UPSTREAM as u64;
        let servers_end = u64::from(h.servers_off) + u64::from(h.servers_count) * SERVER as u64;
        let limits_end = u64::from(h.limits_off) + u64::from(h.limits_count) * LIMIT as u64;
        let networks_end = u64::from(h.networks_off) + u64::from(h.networks_count) * NETWORK as u64;
        let strings_end = u64::from(h.strings_off) + u64::from(h.strings_len);
        // Each section in its place: a route may name any upstream id below `upstreams`, so
        // every one of them must have its record.
        if (h.upstreams_off as usize) < HEADER
            || upstreams_end > u64::from(h.servers_off)
            || servers_end > u64::from(h.limits_off)
            || limits_end > u64::from(h.networks_off)
            || networks_end > u64::from(h.names_off)
            || u64::from(h.strings_off) < names_end
            || strings_end > self.bytes.len() as u64
        {
            return Err(ImageError::Corrupt("upstream sections out of place"));
        }
        for i in 0..h.upstreams as usize {
            self.check_upstream(i)?;
        }
        self.check_limits()?;
        let upstream_ok = |id: u32| id == NONE || id < h.upstreams;
        let limits_ok = |id: u32| id == NONE || id < h.limits_count;
        if !upstream_ok(h.default_tls) || !upstream_ok(h.default_http) {
            return Err(ImageError::Corrupt("default names no upstream"));
        }
        if !limits_ok(h.default_limits_tls) || !limits_ok(h.default_limits_http) {
            return Err(ImageError::Corrupt("the default names no limit record"));
        }
        if h.default_origin != NONE && self.string(h.default_origin).is_none() {
            return Err(ImageError::Corrupt("the default's origin out of bounds"));
        }
        for s in [&h.exact, &h.wildcard] {
            if !s.slots.is_power_of_two() || s.count >= s.slots {
                return Err(ImageError::Corrupt("hash table size"));
            }
            let end = s.off as u64 + u64::from(s.slots) * SLOT as u64;
            if (s.off as usize) < HEADER || end > u64::from(h.upstreams_off) {
                return Err(ImageError::Corrupt("hash table bounds"));
            }
            let mut used = 0;
            for i in 0..s.slots as usize {
                let slot = read_slot(self.bytes, s.off as usize, i);
                if slot.hash == 0 {
                    continue;
                }
                used += 1;
                let name = self
                    .name_at(slot.name)
                    .ok_or(ImageError::Corrupt("a name out of bounds"))?;
                if !name.is_ascii() || slot_hash(hash(name)) != slot.hash {
                    return Err(ImageError::Corrupt("a name that does not match its slot"));
                }
                if !upstream_ok(slot.tls) || !upstream_ok(slot.http) {
                    return Err(ImageError::Corrupt("a route names no upstream"));
                }
                let origin = self
                    .origin_at(slot.name)
                    .ok_or(ImageError::Corrupt("a name's origin out of bounds"))?;
                if origin != NONE && self.string(origin).is_none() {
                    return Err(ImageError::Corrupt("a route's origin out of bounds"));
                }
                let limits = [0, 1].map(|p| self.limits_at(slot.name, p));
                if !limits.iter().all(|l| l.is_some_and(limits_ok)) {
                    return Err(ImageError::Corrupt("a route names no limit record"));
                }
                if core::ptr::eq(s, &h.exact) && slot.name & ONE_LABEL != 0 {
                    return Err(ImageError::Corrupt("an exact name marked as a wildcard"));
                }
            }
            if used != s.count {
                return Err(ImageError::Corrupt("slot count"));
            }
        }
        Ok(())
    }

    /// Each limit record's networks follow the previous record's, so that checking them all
    /// is linear in the image's size.
    fn check_limits(&self) -> Result<(), ImageError> {
        let mut next = 0u64;
        for id in 0..self.header.limits_count {
            let l = self.limit_record(id);
            if u64::from(l.networks_first) != next {
                return Err(ImageError::Corrupt("a limit's networks out of order"));
            }
            next += u64::from(l.deny_count) + u64::from(l.allow_count);
        }
        if next > u64::from(self.header.networks_count) {
            return Err(ImageError::Corrupt("a limit's networks out of bounds"));
        }
        for n in 0..self.header.networks_count as usize {
            if self.network(n).1 > 128 {
                return Err(ImageError::Corrupt("a network prefix out of range"));
            }
        }
        Ok(())
    }

    fn check_upstream(&self, i: usize) -> Result<(), ImageError> {
        let u = self.upstream(i);
        let corrupt = |what| Err(ImageError::Corrupt(what));
        if u.string(u.u32(0)).is_none() {
            return corrupt("an upstream name out of bounds");
        }
        let (first, count) = (u.u32(8) as u64, u64::from(u.u16(12)));
        if first + count > u64::from(self.header.servers_count) || count as usize > MAX_SERVERS {
            return corrupt("an upstream's servers out of bounds");
        }
        match u.byte(14) {
            0 if count > 0 || u.byte(42) == 1 => {}
            1 if u.string(u.u32(4)).is_some() => {}
            _ => return corrupt("an upstream of no known kind"),
        }
        if u.byte(15) > 2 || u.byte(24) > 3 || u.byte(26) > 2 || u.byte(42) > 1 {
            return corrupt("an unknown balance, check or PROXY protocol value");
        }
        for k in [44, 52, 56] {
            let off = u.u32(k);
            if off != NONE && u.string(off).is_none() {
                return corrupt("a check name out of bounds");
            }
        }
        if u.byte(24) != 0 && u.string(u.u32(48)).is_none() {
            return corrupt("a check path out of bounds");
        }
        for j in first..first + count {
            let at = self.header.servers_off as usize + j as usize * SERVER;
            let weight = u16::from_le_bytes([self.bytes[at + 18], self.bytes[at + 19]]);
            if weight == 0 || u32::from(weight) > MAX_WEIGHT {
                return corrupt("a server weight out of range");
            }
            if self.bytes[at + 20] > 1 || self.bytes[at + 22] > 1 {
                return corrupt("a server flag out of range");
            }
        }
        Ok(())
    }

    /// Upstream `i` (below `upstream_count()`).
    pub fn upstream(&self, i: usize) -> UpstreamEntry<'a> {
        UpstreamEntry {
            view: *self,
            at: self.header.upstreams_off as usize + i * UPSTREAM,
        }
    }

    /// The upstream records: every id a route may name is below this.
    pub fn upstream_count(&self) -> usize {
        self.header.upstreams as usize
    }

    /// Limit record `id` (below the header's count: a checked image names no other).
    fn limit_record(&self, id: u32) -> LimitSet {
        let at = self.header.limits_off as usize + id as usize * LIMIT;
        let b = self.bytes;
        LimitSet {
            id,
            max_conns: u32_at(b, at),
            max_conns_per_client: u32_at(b, at + 4),
            rate: u32_at(b, at + 8),
            per_minute: b[at + 12] & 1 != 0,
            burst: u32_at(b, at + 16),
            networks_first: u32_at(b, at + 20),
            deny_count: u32_at(b, at + 24),
            allow_count: u32_at(b, at + 28),
        }
    }

    /// The limits a route or the default set, by id; `None` for `NONE`.
    #[inline]
    pub fn limit_set(&self, id: u32) -> Option<LimitSet> {
        (id != NONE && id < self.header.limits_count).then(|| self.limit_record(id))
    }

    fn network(&self, n: usize) -> (u128, u8) {
        let at = self.header.networks_off as usize + n * NETWORK;
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&self.bytes[at..at + 16]);
        (u128::from_be_bytes(ip), self.bytes[at + 16])
    }

    /// Whether a client at `ip` may use a route with limits `l`: not on its deny list, and
    /// on its allow list if it has one.
    pub fn allows(&self, l: &LimitSet, ip: IpAddr) -> bool {
        if l.deny_count == 0 && l.allow_count == 0 {
            return true;
        }
        let ip = u128::from(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        });
        let contains = |n: usize| {
            let (net, prefix) = self.network(n);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            ip & mask == net
        };
        let first = l.networks_first as usize;
        let deny = first..first + l.deny_count as usize;
        let allow = deny.end..deny.end + l.allow_count as usize;
        if deny.clone().any(contains) {
            return false;
        }
        l.allow_count == 0 || allow.clone().any(contains)
    }

    /// The networks of limits `l`, written as route files do: (deny, allow).
    pub fn networks(&self, l: &LimitSet) -> (Vec<String>, Vec<String>) {
        let show = |n: usize| {
            let (net, prefix) = self.network(n);
            super::limits::Network {
                addr: Ipv6Addr::from(net),
                prefix,
            }
            .to_string()
        };
        let first = l.networks_first as usize;
        let mid = first + l.deny_count as usize;
        (
            (first..mid).map(show).collect(),
            (mid..mid + l.allow_count as usize).map(show).collect(),
        )
    }

    /// The limits of the route whose name is at `off`, for protocol `p` (0: TLS, 1: HTTP).
    #[inline]
    fn limits_at(&self, off: u32, p: usize) -> Option<u32> {
        let name = self.header.names_off as usize + (off & !ONE_LABEL) as usize;
        let len = *self.bytes.get(name)? as usize;
        let at = name + 1 + len + 4 + 4 * p;
        // Within the names section: a checked image's names are (see `check_layout`).
        if at + 4 > self.header.names_off as usize + self.header.names_len as usize {
            return None;
        }
        Some(u32_at(self.bytes.get(at..at + 4)?, 0))
    }

    /// The limits of a route found by `exact_at` or `wildcard_at`, for protocol `p` (0: TLS,
    /// 1: HTTP); `NONE` for none.
    #[inline]
    pub fn route_limits(&self, found: Found, p: usize) -> u32 {
        self.limits_at(found.name, p).unwrap_or(NONE)
    }

    /// The default route's limits for protocol `p`.
    #[inline]
    pub fn default_limits(&self, p: usize) -> u32 {
        if p == 0 {
            self.header.default_limits_tls
        } else {
            self.header.default_limits_http
        }
    }

    fn name_at(&self, off: u32) -> Option<&'a [u8]> {
        let names = self
            .bytes
            .get(self.header.names_off as usize..)?
            .get(..self.header.names_len as usize)?;
        let off = (off & !ONE_LABEL) as usize;
        let len = *names.get(off)? as usize;
        names.get(off + 1..off + 1 + len)
    }

    /// The origin (a strings offset, or `NONE`) of the name at `off`.
    fn origin_at(&self, off: u32) -> Option<u32> {
        let names = self
            .bytes
            .get(self.header.names_off as usize..)?
            .get(..self.header.names_len as usize)?;
        let off = (off & !ONE_LABEL) as usize;
        let at = off + 1 + *names.get(off)? as usize;
        Some(u32_at(names.get(at..at + 4)?, 0))
    }

    /// A string of the strings section; `None` out of bounds (or `NONE`).
    fn string(&self, off: u32) -> Option<&'a str> {
        let h = self.header;
        let strings = self
            .bytes
            .get(h.strings_off as usize..)?
            .get(..h.strings_len as usize)?;
        let off = off as usize;
        let len = u16::from_le_bytes([*strings.get(off)?, *strings.get(off + 1)?]) as usize;
        core::str::from_utf8(strings.get(off + 2..off + 2 + len)?).ok()
    }

    /// Where the exact route for `name` came from (`$edge_source`).
    pub fn exact_origin(&self, name: &[u8]) -> Option<&'a str> {
        self.origin_of(&self.header.exact, name)
    }

    /// Where the wildcard route of `suffix` came from.
    pub fn wildcard_origin(&self, suffix: &[u8]) -> Option<&'a str> {
        self.origin_of(&self.header.wildcard, suffix)
    }

    /// Where the default route came from.
    pub fn default_origin(&self) -> Option<&'a str> {
        self.string(self.header.default_origin)
    }

    fn origin_of(&self, s: &Section, name: &[u8]) -> Option<&'a str> {
        let slot = self.slot_of(s, name)?;
        self.string(self.origin_at(slot.name)?)
    }

    pub fn exact_count(&self) -> usize {
        self.header.exact.count as usize
    }

    pub fn wildcard_count(&self) -> usize {
        self.header.wildcard.count as usize
    }

    pub fn default(&self) -> Option<Targets> {
        let (tls, http) = (self.header.default_tls, self.header.default_http);
        (tls != NONE || http != NONE).then_some(Targets { tls, http })
    }

    /// The exact route for `name`: its key, as stored, and its targets.
    pub fn exact(&self, name: &[u8]) -> Option<(&'a str, Targets)> {
        self.exact_at(name).map(|(k, t, _)| (k, t))
    }

    /// The same, with where it was found (for `route_limits`).
    #[inline]
    pub fn exact_at(&self, name: &[u8]) -> Option<(&'a str, Targets, Found)> {
        self.find(&self.header.exact, name)
    }

    /// The wildcard route whose suffix (after `*.`) is `suffix`, and whether it stands for one
    /// label only.
    pub fn wildcard(&self, suffix: &[u8]) -> Option<(&'a str, Targets, bool)> {
        self.wildcard_at(suffix)
            .map(|(k, t, f)| (k, t, f.one_label))
    }

    /// The same, with where it was found (for `route_limits`).
    #[inline]
    pub fn wildcard_at(&self, suffix: &[u8]) -> Option<(&'a str, Targets, Found)> {
        if self.header.wildcard.count == 0 {
            return None;
        }
        self.find(&self.header.wildcard, suffix)
    }

    fn slot_of(&self, s: &Section, name: &[u8]) -> Option<Slot> {
        if s.count == 0 {
            return None;
        }
        let h = hash(name);
        let want = slot_hash(h);
        let mask = s.slots as usize - 1;
        let mut i = h as usize & mask;
        for _ in 0..s.slots {
            let slot = read_slot(self.bytes, s.off as usize, i);
            if slot.hash == 0 {
                return None;
            }
            if slot.hash == want && self.name_at(slot.name)? == name {
                return Some(slot);
            }
            i = (i + 1) & mask;
        }
        None
    }

    fn find(&self, s: &Section, name: &[u8]) -> Option<(&'a str, Targets, Found)> {
        let h = hash(name);
        let want = slot_hash(h);
        let mask = s.slots as usize - 1;
        let mut i = h as usize & mask;
        // A checked image always has an empty slot; the bound holds even if it had none.
        for _ in 0..s.slots {
            let slot = read_slot(self.bytes, s.off as usize, i);
            if slot.hash == 0 {
                return None;
            }
            if slot.hash == want {
                let stored = self.name_at(slot.name)?;
                if stored == name {
                    // SAFETY: `stored` is equal to `name`, and every name of an image is ASCII:
                    // checked when the image was opened, or a checked route name (a `&str`,
                    // see `Builder::exact_limited`) when this process built it.
                    let key = unsafe { core::str::from_utf8_unchecked(stored) };
                    return Some((
                        key,
                        Targets {
                            tls: slot.tls,
                            http: slot.http,
                        },
                        Found {
                            name: slot.name,
                            one_label: slot.name & ONE_LABEL != 0,
                        },
                    ));
                }
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Every route, exact ones first: (kind, key, targets).
    pub fn routes(&self) -> impl Iterator<Item = (RouteKind, &'a str, Targets)> + '_ {
        [(false, &self.header.exact), (true, &self.header.wildcard)]
            .into_iter()
            .flat_map(move |(wild, s)| {
                (0..s.slots as usize).filter_map(move |i| {
                    let slot = read_slot(self.bytes, s.off as usize, i);
                    if slot.hash == 0 {
                        return None;
                    }
                    let name = core::str::from_utf8(self.name_at(slot.name)?).ok()?;
                    let kind = match (wild, slot.name & ONE_LABEL != 0) {
                        (false, _) => RouteKind::Exact,
                        (true, false) => RouteKind::Wildcard,
                        (true, true) => RouteKind::OneLabel,
                    };
                    Some((
                        kind,
                        name,
                        Targets {
                            tls: slot.tls,
                            http: slot.http,
                        },
                    ))
                })
            })
    }
}

/// Where a route was found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    name: u32,
    /// A wildcard for exactly one label.
    pub one_label: bool,
}

/// A set of limits as an image holds it (0: no such limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSet {
    /// Its record's number: equal sets have one record.
    pub id: u32,
    pub max_conns: u32,
    pub max_conns_per_client: u32,
    /// Connections per second (per minute if `per_minute`); 0: no rate.
    pub rate: u32,
    pub per_minute: bool,
    pub burst: u32,
    networks_first: u32,
    deny_count: u32,
    allow_count: u32,
}

impl LimitSet {
    /// No limit at all.
    pub const NONE: LimitSet = LimitSet {
        id: NONE,
        max_conns: 0,
        max_conns_per_client: 0,
        rate: 0,
        per_minute: false,
        burst: 0,
        networks_first: 0,
        deny_count: 0,
        allow_count: 0,
    };

    /// Microseconds between two connections at its rate (0: no rate).
    #[inline]
    pub fn interval_us(&self) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        super::limits::Rate {
            count: self.rate,
            per_minute: self.per_minute,
        }
        .interval_us()
    }

    /// Whether it has a deny or an allow list.
    #[inline]
    pub fn has_networks(&self) -> bool {
        self.deny_count + self.allow_count > 0
    }

    /// Whether it has a limit kept in the route's counters (all but the networks).
    #[inline]
    pub fn counts(&self) -> bool {
        self.max_conns > 0 || self.max_conns_per_client > 0 || self.rate > 0
    }
}

/// How a route's key matches a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Exact,
    /// `*.suffix`, any number of labels in front.
    Wildcard,
    /// `*.suffix`, exactly one label in front.
    OneLabel,
}

/// One upstream record of an image.
#[derive(Clone, Copy)]
pub struct UpstreamEntry<'a> {
    view: View<'a>,
    at: usize,
}

impl<'a> UpstreamEntry<'a> {
    fn byte(&self, k: usize) -> u8 {
        self.view.bytes[self.at + k]
    }

    fn u16(&self, k: usize) -> u16 {
        u16::from_le_bytes([self.byte(k), self.byte(k + 1)])
    }

    fn u32(&self, k: usize) -> u32 {
        u32_at(self.view.bytes, self.at + k)
    }

    /// A string of the strings section; `None` out of bounds (or `NONE`).
    fn string(&self, off: u32) -> Option<&'a str> {
        self.view.string(off)
    }

    pub fn name(&self) -> &'a str {
        self.string(self.u32(0)).unwrap_or_default()
    }

    /// The `upstream {}` block of nginx.conf this upstream hands connections to, if that is
    /// its kind.
    pub fn nginx(&self) -> Option<&'a str> {
        (self.byte(14) == 1)
            .then(|| self.string(self.u32(4)))
            .flatten()
    }

    /// Whether its servers are a source's nodes (it may have none).
    pub fn discovered(&self) -> bool {
        self.byte(42) == 1
    }

    /// A Service's node ports: the listener's port to the servers' (empty: none).
    pub fn port_map(&self) -> Vec<(u16, u16)> {
        self.string(self.u32(56))
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| {
                let (a, b) = pair.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    }

    pub fn servers(&self) -> Vec<ServerDef> {
        let (first, count) = (self.u32(8) as usize, self.u16(12) as usize);
        let b = self.view.bytes;
        (first..first + count)
            .map(|j| {
                let at = self.view.header.servers_off as usize + j * SERVER;
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[at..at + 16]);
                let ip = Ipv6Addr::from(ip);
                let port = u16::from_le_bytes([b[at + 16], b[at + 17]]);
                ServerDef {
                    ip: match (b[at + 21], ip.to_ipv4_mapped()) {
                        (0, Some(v4)) => IpAddr::V4(v4),
                        _ => IpAddr::V6(ip),
                    },
                    port: (port != 0).then_some(port),
                    weight: u32::from(u16::from_le_bytes([b[at + 18], b[at + 19]])),
                    backup: b[at + 20] != 0,
                    draining: b[at + 22] != 0,
                }
            })
            .collect()
    }

    pub fn policy(&self) -> Policy {
        let check = match self.byte(24) {
            0 => None,
            kind => Some(CheckDef {
                kind: match kind {
                    1 => CheckKind::Tcp,
                    2 => CheckKind::Tls,
                    _ => CheckKind::Http,
                },
                interval_ms: u64::from(self.u32(28)),
                timeout_ms: u64::from(self.u32(32)),
                rise: u32::from(self.u16(36)),
                fall: u32::from(self.u16(38)),
                port: (self.u16(40) != 0).then_some(self.u16(40)),
                name: self.string(self.u32(44)).map(str::to_owned),
                path: self.string(self.u32(48)).unwrap_or("/").to_owned(),
                expect: self.byte(25),
                proxy_protocol: match self.byte(26) {
                    1 => Some(ProxyProtocol::V1),
                    2 => Some(ProxyProtocol::V2),
                    _ => None,
                },
            }),
        };
        Policy {
            balance: match self.byte(15) {
                1 => Balance::LeastConn,
                2 => Balance::Hash,
                _ => Balance::RoundRobin,
            },
            max_fails: self.u32(16),
            fail_timeout_ms: u64::from(self.u32(20)),
            check,
            start_down: self.byte(27) != 0,
        }
    }

    /// The SNI or Host the upstream's check sends.
    pub fn check_name(&self) -> Option<&'a str> {
        self.string(self.u32(52))
    }
}

/// The strings section being built.
#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    fn add(&mut self, s: &str) -> u32 {
        let off = self.bytes.len() as u32;
        self.bytes
            .extend_from_slice(&(s.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(s.as_bytes());
        off
    }

    fn add_opt(&mut self, s: Option<&str>) -> u32 {
        s.map_or(NONE, |s| self.add(s))
    }
}

fn upstream_record(u: &UpstreamSpec, first_server: usize, strings: &mut Strings) -> [u8; UPSTREAM] {
    let mut r = [0u8; UPSTREAM];
    let put32 =
        |r: &mut [u8; UPSTREAM], k: usize, v: u32| r[k..k + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut r, 0, strings.add(u.name));
    let (kind, nginx, count) = match u.kind {
        UpstreamKind::Servers(list) => (0u8, NONE, list.len()),
        UpstreamKind::Nginx(name) => (1u8, strings.add(name), 0),
        // The merge makes its servers; unresolved, it has none.
        UpstreamKind::Discover(_) => (0u8, NONE, 0),
    };
    r[42] = u8::from(u.discovered);
    let map: Vec<String> = u.port_map.iter().map(|(a, b)| format!("{a}:{b}")).collect();
    put32(
        &mut r,
        56,
        if map.is_empty() {
            NONE
        } else {
            strings.add(&map.join(","))
        },
    );
    put32(&mut r, 4, nginx);
    put32(&mut r, 8, first_server as u32);
    r[12..14].copy_from_slice(&(count as u16).to_le_bytes());
    r[14] = kind;
    let p = u.policy;
    r[15] = match p.balance {
        Balance::RoundRobin => 0,
        Balance::LeastConn => 1,
        Balance::Hash => 2,
    };
    put32(&mut r, 16, p.max_fails);
    put32(&mut r, 20, p.fail_timeout_ms as u32);
    r[27] = u8::from(p.start_down);
    put32(&mut r, 44, NONE);
    put32(&mut r, 52, NONE);
    if let Some(c) = &p.check {
        r[24] = match c.kind {
            CheckKind::Tcp => 1,
            CheckKind::Tls => 2,
            CheckKind::Http => 3,
        };
        r[25] = c.expect;
        r[26] = match c.proxy_protocol {
            None => 0,
            Some(ProxyProtocol::V1) => 1,
            Some(ProxyProtocol::V2) => 2,
        };
        put32(&mut r, 28, c.interval_ms as u32);
        put32(&mut r, 32, c.timeout_ms as u32);
        r[36..38].copy_from_slice(&(c.rise as u16).to_le_bytes());
        r[38..40].copy_from_slice(&(c.fall as u16).to_le_bytes());
        r[40..42].copy_from_slice(&c.port.unwrap_or(0).to_le_bytes());
        put32(&mut r, 44, strings.add_opt(c.name.as_deref()));
        put32(&mut r, 48, strings.add(&c.path));
        put32(&mut r, 52, strings.add_opt(u.check_name));
    }
    r
}

fn limit_record(l: &Limits, networks: &mut Vec<u8>) -> [u8; LIMIT] {
    let mut r = [0u8; LIMIT];
    let put32 =
        |r: &mut [u8; LIMIT], k: usize, v: u32| r[k..k + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut r, 0, l.max_conns.unwrap_or(0));
    put32(&mut r, 4, l.max_conns_per_client.unwrap_or(0));
    if let Some(rate) = l.rate {
        put32(&mut r, 8, rate.count);
        r[12] = u8::from(rate.per_minute);
        put32(&mut r, 16, l.burst.unwrap_or(0));
    }
    put32(&mut r, 20, (networks.len() / NETWORK) as u32);
    let deny = l.deny.as_deref().unwrap_or_default();
    let allow = l.allow.as_deref().unwrap_or_default();
    for n in deny.iter().chain(allow) {
        let mut e = [0u8; NETWORK];
        e[..16].copy_from_slice(&n.addr.octets());
        e[16] = n.prefix;
        networks.extend_from_slice(&e);
    }
    put32(&mut r, 24, deny.len() as u32);
    put32(&mut r, 28, allow.len() as u32);
    r
}

fn server_record(s: &ServerDef) -> [u8; SERVER] {
    let mut r = [0u8; SERVER];
    let (ip, v6) = match s.ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 0),
        IpAddr::V6(v6) => (v6, 1),
    };
    r[..16].copy_from_slice(&ip.octets());
    r[16..18].copy_from_slice(&s.port.unwrap_or(0).to_le_bytes());
    r[18..20].copy_from_slice(&(s.weight as u16).to_le_bytes());
    r[20] = u8::from(s.backup);
    r[21] = v6;
    r[22] = u8::from(s.draining);
    r
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_slot(b: &[u8], off: usize, i: usize) -> Slot {
    let at = off + i * SLOT;
    let s = &b[at..at + SLOT];
    Slot {
        hash: u32_at(s, 0),
        name: u32_at(s, 4),
        tls: u32_at(s, 8),
        http: u32_at(s, 12),
    }
}

fn write_slot(b: &mut [u8], off: usize, i: usize, slot: Slot) {
    let at = off + i * SLOT;
    for (k, v) in [slot.hash, slot.name, slot.tls, slot.http]
        .into_iter()
        .enumerate()
    {
        b[at + 4 * k..at + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn read_header(b: &[u8]) -> Header {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    let section = |at: usize| Section {
        off: u32_at(b, at),
        slots: u32_at(b, at + 4),
        count: u32_at(b, at + 8),
        _pad: 0,
    };
    Header {
        magic: b[..8].try_into().unwrap_or([0; 8]),
        version: u32_at(b, 8),
        upstreams: u32_at(b, 12),
        len: u64_at(16),
        checksum: u64_at(24),
        exact: section(32),
        wildcard: section(48),
        names_off: u32_at(b, 64),
        names_len: u32_at(b, 68),
        default_tls: u32_at(b, 72),
        default_http: u32_at(b, 76),
        upstreams_off: u32_at(b, 80),
        servers_off: u32_at(b, 84),
        servers_count: u32_at(b, 88),
        strings_off: u32_at(b, 92),
        strings_len: u32_at(b, 96),
        default_origin: u32_at(b, 100),
        limits_off: u32_at(b, 104),
        limits_count: u32_at(b, 108),
        networks_off: u32_at(b, 112),
        networks_count: u32_at(b, 116),
        default_limits_tls: u32_at(b, 120),
        default_limits_http: u32_at(b, 124),
    }
}

fn write_header(b: &mut [u8], h: &Header) {
    b[..8].copy_from_slice(&h.magic);
    let words: [(usize, u32); 24] = [
        (8, h.version),
        (12, h.upstreams),
        (32, h.exact.off),
        (36, h.exact.slots),
        (40, h.exact.count),
        (48, h.wildcard.off),
        (52, h.wildcard.slots),
        (56, h.wildcard.count),
        (64, h.names_off),
        (68, h.names_len),
        (72, h.default_tls),
        (76, h.default_http),
        (80, h.upstreams_off),
        (84, h.servers_off),
        (88, h.servers_count),
        (92, h.strings_off),
        (96, h.strings_len),
        (100, h.default_origin),
        (104, h.limits_off),
        (108, h.limits_count),
        (112, h.networks_off),
        (116, h.networks_count),
        (120, h.default_limits_tls),
        (124, h.default_limits_http),
    ];
    for (at, v) in words {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[16..24].copy_from_slice(&h.len.to_le_bytes());
    b[24..32].copy_from_slice(&h.checksum.to_le_bytes());
}

/// Rewrites the checksum of `bytes` (an image's, however corrupt) to match its body: lets the
/// fuzz target reach the layout checks behind the checksum.
#[doc(hidden)]
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() >= HEADER {
        let sum = checksum(&bytes[HEADER..]);
        bytes[24..32].copy_from_slice(&sum.to_le_bytes());
    }
}

/// A 64-bit checksum of the body: catches truncation, torn writes and flipped bytes.
fn checksum(body: &[u8]) -> u64 {
    let mut h = body.len() as u64;
    for (i, c) in body.chunks(4096).enumerate() {
        h = crate::health::mix(h ^ hash(c) ^ i as u64);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As a reader of a file would: check, then view.
    fn open(bytes: &[u8]) -> Result<Image, ImageError> {
        Image::from_bytes(bytes.to_vec())
    }

    fn t(tls: u32, http: u32) -> Targets {
        Targets { tls, http }
    }

    /// `n` upstreams (ids 0 to n - 1), of the kind that names an nginx upstream block.
    fn with_upstreams(n: usize) -> Builder<'static> {
        const NAMES: [&str; 8] = ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"];
        static POLICY: std::sync::OnceLock<(UpstreamKind, Policy)> = std::sync::OnceLock::new();
        let (kind, policy) =
            POLICY.get_or_init(|| (UpstreamKind::Nginx("vhosts".into()), Policy::default()));
        let mut b = Builder::default();
        for name in &NAMES[..n] {
            b.upstream(UpstreamSpec {
                name,
                kind,
                policy,
                check_name: None,
                discovered: false,
                port_map: &[],
            });
        }
        b
    }

    fn sample() -> Image {
        let mut b = with_upstreams(3);
        let file = b.origin("/etc/nginx/edge/routes.json");
        let cluster = b.origin("cluster-a");
        b.exact("rancher.example.com", t(0, 0), file);
        b.exact("split.example.com", t(1, NONE), cluster);
        b.wildcard("apps.example.com", t(2, 2), false, cluster);
        b.wildcard("svc.example.com", t(1, 1), true, NO_ORIGIN);
        b.set_default(t(NONE, 1), file);
        b.build()
    }

    #[test]
    fn routes_keep_their_origin() {
        let image = sample();
        let v = open(image.bytes()).unwrap();
        let v = v.view();
        assert_eq!(
            v.exact_origin(b"rancher.example.com"),
            Some("/etc/nginx/edge/routes.json")
        );
        assert_eq!(v.exact_origin(b"split.example.com"), Some("cluster-a"));
        assert_eq!(v.wildcard_origin(b"apps.example.com"), Some("cluster-a"));
        assert_eq!(v.wildcard_origin(b"svc.example.com"), None);
        assert_eq!(v.exact_origin(b"nope.example.com"), None);
        assert_eq!(v.default_origin(), Some("/etc/nginx/edge/routes.json"));
        // A name still reads whole after its origin was added behind it.
        assert_eq!(
            v.exact(b"split.example.com").unwrap().0,
            "split.example.com"
        );
    }

    #[test]
    fn finds_names_and_keys_in_place() {
        let image = sample();
        let v = open(image.bytes()).unwrap();
        let v = v.view();
        assert_eq!(
            v.exact(b"rancher.example.com"),
            Some(("rancher.example.com", t(0, 0)))
        );
        assert_eq!(
            v.exact(b"split.example.com"),
            Some(("split.example.com", t(1, NONE)))
        );
        assert_eq!(v.exact(b"other.example.com"), None);
        assert_eq!(
            v.wildcard(b"apps.example.com"),
            Some(("apps.example.com", t(2, 2), false))
        );
        assert_eq!(
            v.wildcard(b"svc.example.com"),
            Some(("svc.example.com", t(1, 1), true))
        );
        assert_eq!(v.wildcard(b"example.com"), None);
        assert_eq!(v.default(), Some(t(NONE, 1)));
        assert_eq!((v.exact_count(), v.wildcard_count()), (2, 2));
        let kinds: Vec<RouteKind> = v.routes().map(|(k, _, _)| k).collect();
        assert_eq!(
            kinds.iter().filter(|&&k| k == RouteKind::OneLabel).count(),
            1
        );
        assert_eq!(kinds.len(), 4);
        assert_eq!(image.bytes().len() % 8, 0);
    }

    #[test]
    fn an_empty_image_finds_nothing() {
        let image = Image::default();
        let v = open(image.bytes()).unwrap();
        let v = v.view();
        assert_eq!(v.exact(b"a"), None);
        assert_eq!(v.wildcard(b"a"), None);
        assert_eq!(v.default(), None);
    }

    #[test]
    fn many_names_all_found() {
        let mut b = with_upstreams(7);
        for i in 0..50_000u32 {
            b.exact(&format!("n{i}.example.com"), t(i % 7, i % 5), NO_ORIGIN);
        }
        let image = b.build();
        let v = open(image.bytes()).unwrap();
        let v = v.view();
        for i in 0..50_000u32 {
            let (_, to) = v.exact(format!("n{i}.example.com").as_bytes()).unwrap();
            assert_eq!(to, t(i % 7, i % 5));
        }
        assert_eq!(v.exact(b"n50000.example.com"), None);
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let image = sample();
        let good = image.bytes();
        assert!(matches!(
            open(&good[..10]),
            Err(ImageError::Truncated { len: 10 })
        ));
        assert_eq!(open(good).unwrap(), image);
        assert!(matches!(
            open(&good[..good.len() - 8]),
            Err(ImageError::Length { .. })
        ));
        let mut foreign = good.to_vec();
        foreign[8] = 1;
        assert_eq!(open(&foreign).err(), Some(ImageError::Version(1)));
        let mut junk = good.to_vec();
        junk[0] = b'X';
        assert_eq!(open(&junk).err(), Some(ImageError::NotAnImage));
        for at in [HEADER, HEADER + 5, good.len() - 3] {
            let mut flipped = good.to_vec();
            flipped[at] ^= 0x40;
            assert_eq!(
                open(&flipped).err(),
                Some(ImageError::Checksum),
                "byte {at}"
            );
        }
        assert_eq!(
            ImageError::Version(1).to_string(),
            "image format version 1, this module reads version 4"
        );
    }

    /// A header rewritten with a matching checksum but lying offsets is still refused.
    #[test]
    fn lying_headers_are_refused() {
        let image = sample();
        let mut h = read_header(image.bytes());
        for lie in 0..5 {
            let mut bytes = image.bytes().to_vec();
            let mut bad = h;
            match lie {
                0 => bad.exact.slots = 3,
                1 => bad.names_len = u32::MAX,
                2 => bad.default_http = 9,
                // Upstream ids in routes with no upstream records: a lookup would panic.
                3 => bad.upstreams_off = 0,
                _ => bad.wildcard.off = bad.names_off,
            }
            write_header(&mut bytes, &bad);
            assert!(
                matches!(open(&bytes), Err(ImageError::Corrupt(_))),
                "lie {lie}"
            );
        }
        h.exact.count += 1;
        let mut bytes = image.bytes().to_vec();
        write_header(&mut bytes, &h);
        assert!(open(&bytes).is_err());
    }
}
