//! The route names of a table as one compact, position-independent image: two open-addressing
//! hash tables (exact names, wildcard suffixes) of fixed-size slots that point into one string
//! arena, behind a header with a format version, the image's length and a checksum. A name is
//! looked up in place, without deserializing anything, so the same bytes can be shared by
//! every worker (mapped from a file) and checked before use.
//!
//! Layout, little-endian, every section 8-byte aligned:
//! `Header` | exact slots | wildcard slots | names (`len: u8`, then the bytes).

use std::fmt;

/// No upstream for this protocol.
pub const NONE: u32 = u32::MAX;

const MAGIC: [u8; 8] = *b"EDGEIMG\0";
pub const VERSION: u32 = 1;

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
pub struct Builder {
    exact: Vec<(Box<[u8]>, Targets)>,
    wildcard: Vec<(Box<[u8]>, Targets)>,
    default: Option<Targets>,
}

impl Builder {
    pub fn exact(&mut self, name: &str, to: Targets) {
        self.exact.push((name.as_bytes().into(), to));
    }

    /// `suffix` is the part after `*.`.
    pub fn wildcard(&mut self, suffix: &str, to: Targets) {
        self.wildcard.push((suffix.as_bytes().into(), to));
    }

    pub fn set_default(&mut self, to: Targets) {
        self.default = Some(to);
    }

    pub fn build(self, upstreams: u32) -> Image {
        let slots_for = |n: usize| (n + n / 2 + 1).next_power_of_two();
        let (exact_slots, wild_slots) =
            (slots_for(self.exact.len()), slots_for(self.wildcard.len()));
        let names_len: usize = self
            .exact
            .iter()
            .chain(&self.wildcard)
            .map(|(n, _)| 1 + n.len())
            .sum();
        let exact_off = HEADER;
        let wild_off = exact_off + exact_slots * SLOT;
        let names_off = wild_off + wild_slots * SLOT;
        let len = (names_off + names_len).next_multiple_of(8);
        let mut bytes = vec![0u8; len];
        let mut names = names_off;
        let mut place =
            |bytes: &mut [u8], off: usize, slots: usize, list: &[(Box<[u8]>, Targets)]| {
                let mask = slots - 1;
                for (name, to) in list {
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
                            name: (names - names_off) as u32,
                            tls: to.tls,
                            http: to.http,
                        },
                    );
                    bytes[names] = name.len() as u8;
                    bytes[names + 1..names + 1 + name.len()].copy_from_slice(name);
                    names += 1 + name.len();
                }
            };
        place(&mut bytes, exact_off, exact_slots, &self.exact);
        place(&mut bytes, wild_off, wild_slots, &self.wildcard);
        let default = self.default.unwrap_or(Targets {
            tls: NONE,
            http: NONE,
        });
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
        };
        header.checksum = checksum(&bytes[HEADER..]);
        write_header(&mut bytes, &header);
        Image { bytes, header }
    }
}

/// An image in memory, owned, with its header read once.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    bytes: Vec<u8>,
    header: Header,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Image({} bytes)", self.bytes.len())
    }
}

impl Image {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes bytes from elsewhere (a file), once they are checked: see `check`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Image, ImageError> {
        let header = check(&bytes)?;
        Ok(Image { bytes, header })
    }

    /// The image, to look names up in.
    pub fn view(&self) -> View<'_> {
        View {
            bytes: &self.bytes,
            header: &self.header,
        }
    }
}

impl Default for Image {
    fn default() -> Image {
        Builder::default().build(0)
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
        let upstream_ok = |id: u32| id == NONE || id < h.upstreams;
        if !upstream_ok(h.default_tls) || !upstream_ok(h.default_http) {
            return Err(ImageError::Corrupt("default names no upstream"));
        }
        for s in [&h.exact, &h.wildcard] {
            if !s.slots.is_power_of_two() || s.count >= s.slots {
                return Err(ImageError::Corrupt("hash table size"));
            }
            let end = s.off as u64 + u64::from(s.slots) * SLOT as u64;
            if (s.off as usize) < HEADER || end > u64::from(h.names_off) {
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
            }
            if used != s.count {
                return Err(ImageError::Corrupt("slot count"));
            }
        }
        Ok(())
    }

    fn name_at(&self, off: u32) -> Option<&'a [u8]> {
        let names = self
            .bytes
            .get(self.header.names_off as usize..)?
            .get(..self.header.names_len as usize)?;
        let off = off as usize;
        let len = *names.get(off)? as usize;
        names.get(off + 1..off + 1 + len)
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
        self.find(&self.header.exact, name)
    }

    /// The wildcard route whose suffix (after `*.`) is `suffix`.
    pub fn wildcard(&self, suffix: &[u8]) -> Option<(&'a str, Targets)> {
        if self.header.wildcard.count == 0 {
            return None;
        }
        self.find(&self.header.wildcard, suffix)
    }

    fn find(&self, s: &Section, name: &[u8]) -> Option<(&'a str, Targets)> {
        let h = hash(name);
        let want = slot_hash(h);
        let mask = s.slots as usize - 1;
        let mut i = h as usize & mask;
        loop {
            let slot = read_slot(self.bytes, s.off as usize, i);
            if slot.hash == 0 {
                return None;
            }
            if slot.hash == want {
                let stored = self.name_at(slot.name)?;
                if stored == name {
                    // Checked ASCII when the image was opened.
                    let key = core::str::from_utf8(stored).ok()?;
                    return Some((
                        key,
                        Targets {
                            tls: slot.tls,
                            http: slot.http,
                        },
                    ));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Every route, exact ones first: (is wildcard, key, targets).
    pub fn routes(&self) -> impl Iterator<Item = (bool, &'a str, Targets)> + '_ {
        [(false, &self.header.exact), (true, &self.header.wildcard)]
            .into_iter()
            .flat_map(move |(wild, s)| {
                (0..s.slots as usize).filter_map(move |i| {
                    let slot = read_slot(self.bytes, s.off as usize, i);
                    if slot.hash == 0 {
                        return None;
                    }
                    let name = core::str::from_utf8(self.name_at(slot.name)?).ok()?;
                    Some((
                        wild,
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
    }
}

fn write_header(b: &mut [u8], h: &Header) {
    b[..8].copy_from_slice(&h.magic);
    let words: [(usize, u32); 12] = [
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

    fn sample() -> Image {
        let mut b = Builder::default();
        b.exact("rancher.example.com", t(0, 0));
        b.exact("split.example.com", t(1, NONE));
        b.wildcard("apps.example.com", t(2, 2));
        b.set_default(t(NONE, 1));
        b.build(3)
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
            Some(("apps.example.com", t(2, 2)))
        );
        assert_eq!(v.wildcard(b"example.com"), None);
        assert_eq!(v.default(), Some(t(NONE, 1)));
        assert_eq!((v.exact_count(), v.wildcard_count()), (2, 1));
        assert_eq!(v.routes().count(), 3);
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
        let mut b = Builder::default();
        for i in 0..50_000u32 {
            b.exact(&format!("n{i}.example.com"), t(i % 7, i % 5));
        }
        let image = b.build(7);
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
        foreign[8] = 2;
        assert_eq!(open(&foreign).err(), Some(ImageError::Version(2)));
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
            ImageError::Version(2).to_string(),
            "image format version 2, this module reads version 1"
        );
    }

    /// A header rewritten with a matching checksum but lying offsets is still refused.
    #[test]
    fn lying_headers_are_refused() {
        let image = sample();
        let mut h = read_header(image.bytes());
        for lie in 0..4 {
            let mut bytes = image.bytes().to_vec();
            let mut bad = h;
            match lie {
                0 => bad.exact.slots = 3,
                1 => bad.names_len = u32::MAX,
                2 => bad.default_http = 9,
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
