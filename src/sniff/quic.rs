//! QUIC Initial packets → the TLS ClientHello they carry, without terminating anything.
//!
//! A client's first packets (RFC 9000 §17.2.2) are protected with keys anyone can derive from
//! the Destination Connection ID (RFC 9001 §5.2; QUIC version 2: RFC 9369 §3.3). `Initials`
//! takes the client's datagrams one by one, as they arrive: it removes header protection, opens
//! each Initial packet into its own buffer (the datagrams themselves stay untouched, to be
//! forwarded as they came), and reassembles the CRYPTO stream until the ClientHello is whole,
//! whatever the order of its pieces and however many datagrams it spans. The hello is then
//! read by the same code as on TCP (`tls::read_handshake`).
//!
//! No length field is trusted, and what a client can make it keep is bounded: the CRYPTO bytes
//! before the hello is whole (`MAX_CRYPTO`) and the pieces they come in (`MAX_PIECES`).

use super::crypto;
use super::tls::{self, ClientHello};
use super::Peek;

pub const VERSION_1: u32 = 0x0000_0001;
pub const VERSION_2: u32 = 0x6b33_43cf;

/// CRYPTO stream bytes kept until the ClientHello is whole. Post-quantum hellos are about
/// 2 KiB; nothing a browser sends comes near.
pub const MAX_CRYPTO: usize = 16 * 1024;
/// Disjoint pieces of the CRYPTO stream kept at once.
pub const MAX_PIECES: usize = 64;
/// Long-header packets looked at in one datagram: a client coalesces an Initial packet with
/// a 0-RTT one at most, and every packet costs a key derivation and two cipher runs.
pub const MAX_PACKETS: usize = 4;
/// A client's first datagram is at least this long (RFC 9000 §14.1): a server drops a
/// shorter one.
pub const MIN_FIRST_DATAGRAM: usize = 1200;
/// The longest connection ID in QUIC versions 1 and 2 (RFC 9000 §17.2).
pub const MAX_CID_LEN: usize = 20;
const TAG_LEN: usize = 16;
const SAMPLE_LEN: usize = 16;

/// Why datagrams cannot be a client's first QUIC flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The first byte is not a long header.
    NotQuic,
    /// A long header of a version this module cannot open (the datagram may still be QUIC).
    UnknownVersion(u32),
    /// A long-header packet of a known version, but no Initial.
    NotInitial,
    Malformed(&'static str),
    /// No Initial packet of the datagram opens with the keys of its connection ID.
    Undecryptable,
    /// The CRYPTO stream grows past `MAX_CRYPTO` or into too many pieces.
    TooLarge,
    /// The reassembled hello is not a usable ClientHello.
    Tls(tls::Reject),
}

impl Reject {
    /// Whether the CRYPTO stream of opened packets is at fault (rather than a datagram that
    /// opened nothing).
    pub fn of_the_stream(self) -> bool {
        matches!(self, Reject::TooLarge | Reject::Tls(_))
            || self == Reject::Malformed(CRYPTO_DIFFERS)
            || self == Reject::Malformed(BAD_FRAME)
            || self == Reject::Malformed(FRAME_NOT_ALLOWED)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NotQuic => "not a QUIC long header",
            Reject::UnknownVersion(_) => "QUIC version not supported",
            Reject::NotInitial => "no QUIC Initial packet",
            Reject::Malformed(what) => what,
            Reject::Undecryptable => "QUIC Initial packet that does not open",
            Reject::TooLarge => "QUIC CRYPTO stream too large or too fragmented",
            Reject::Tls(r) => r.as_str(),
        }
    }
}

const CRYPTO_DIFFERS: &str = "QUIC CRYPTO data differs where it overlaps";
const BAD_FRAME: &str = "malformed QUIC frame";
const FRAME_NOT_ALLOWED: &str = "frame not allowed in a QUIC Initial packet";

/// What differs between QUIC versions 1 and 2 for Initial packets.
struct Version {
    salt: [u8; 20],
    key: &'static [u8],
    iv: &'static [u8],
    hp: &'static [u8],
    /// The long-header packet type bits of an Initial packet.
    initial: u8,
    /// And of a 0-RTT packet, which a client may coalesce with its Initial.
    zero_rtt: u8,
}

const V1: Version = Version {
    salt: [
        0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c,
        0xad, 0xcc, 0xbb, 0x7f, 0x0a,
    ],
    key: b"quic key",
    iv: b"quic iv",
    hp: b"quic hp",
    initial: 0,
    zero_rtt: 1,
};

const V2: Version = Version {
    salt: [
        0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d,
        0xcb, 0xf9, 0xbd, 0x2e, 0xd9,
    ],
    key: b"quicv2 key",
    iv: b"quicv2 iv",
    hp: b"quicv2 hp",
    initial: 1,
    zero_rtt: 2,
};

fn version(v: u32) -> Option<&'static Version> {
    match v {
        VERSION_1 => Some(&V1),
        VERSION_2 => Some(&V2),
        _ => None,
    }
}

/// The client's Initial keys (RFC 9001 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub key: [u8; 16],
    pub iv: [u8; 12],
    pub hp: [u8; 16],
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context, for outputs of at most one hash.
fn expand_label(secret: &[u8; 32], label: &[u8], out: &mut [u8]) {
    let mut info = [0u8; 4 + 6 + 16];
    let len = out.len() as u16;
    info[..2].copy_from_slice(&len.to_be_bytes());
    info[2] = (6 + label.len()) as u8;
    info[3..9].copy_from_slice(b"tls13 ");
    info[9..9 + label.len()].copy_from_slice(label);
    let info = &info[..9 + label.len() + 1]; // the context's length byte, zero
    let t1 = crypto::hmac_sha256(secret, &[info, &[1]]);
    out.copy_from_slice(&t1[..out.len()]);
}

/// The client's Initial secret for `dcid` (RFC 9001 §5.2, A.1).
fn client_secret(v: &Version, dcid: &[u8]) -> [u8; 32] {
    let initial = crypto::hmac_sha256(&v.salt, &[dcid]);
    let mut client = [0u8; 32];
    expand_label(&initial, b"client in", &mut client);
    client
}

fn keys_from_secret(v: &Version, secret: &[u8; 32]) -> Keys {
    let mut keys = Keys {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(secret, v.key, &mut keys.key);
    expand_label(secret, v.iv, &mut keys.iv);
    expand_label(secret, v.hp, &mut keys.hp);
    keys
}

/// The client's Initial keys for a connection ID, in QUIC version `v`.
pub fn client_keys(v: u32, dcid: &[u8]) -> Option<Keys> {
    let v = version(v)?;
    Some(keys_from_secret(v, &client_secret(v, dcid)))
}

/// A variable-length integer (RFC 9000 §16) at the start of `b`: its value and length.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for &byte in &bytes[1..] {
        v = v << 8 | u64::from(byte);
    }
    Some((v, len))
}

/// A cursor over bytes that never reads past their end.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(v)
    }
    fn varint(&mut self) -> Option<u64> {
        let (v, n) = varint(&self.b[self.at.min(self.b.len())..])?;
        self.at += n;
        Some(v)
    }
    fn len(&mut self) -> Option<usize> {
        self.varint().and_then(|v| usize::try_from(v).ok())
    }
}

/// A long-header packet's invariant part and, for Initial packets, where its protected part
/// lies.
struct Long<'a> {
    /// Offset of the packet's first byte within the datagram.
    start: usize,
    version: u32,
    packet_type: u8,
    dcid: &'a [u8],
    /// Offset of the packet number (for Initial and 0-RTT packets).
    pn_offset: usize,
    /// Offset just past the packet within the datagram.
    end: usize,
}

/// Reads the long-header packet at `d[at..]`. `Ok(None)`: no long header there (a short-header
/// packet or padding ends what can be read).
fn long_header(d: &[u8], at: usize) -> Result<Option<Long<'_>>, Reject> {
    let malformed = Reject::Malformed("truncated QUIC long header");
    let mut r = Reader { b: d, at };
    let Some(first) = r.u8() else {
        return Ok(None);
    };
    if first & 0x80 == 0 {
        return Ok(None);
    }
    let version = r.take(4).ok_or(malformed)?;
    let version = u32::from_be_bytes(version.try_into().expect("4 bytes"));
    let dcid_len = usize::from(r.u8().ok_or(malformed)?);
    let Some(v) = self::version(version) else {
        return Err(Reject::UnknownVersion(version));
    };
    if dcid_len > MAX_CID_LEN {
        return Err(Reject::Malformed("QUIC connection ID longer than 20 bytes"));
    }
    let dcid = r.take(dcid_len).ok_or(malformed)?;
    let scid_len = usize::from(r.u8().ok_or(malformed)?);
    if scid_len > MAX_CID_LEN {
        return Err(Reject::Malformed("QUIC connection ID longer than 20 bytes"));
    }
    r.take(scid_len).ok_or(malformed)?;
    let packet_type = (first >> 4) & 3;
    if packet_type == v.initial {
        let token = r.len().ok_or(malformed)?;
        r.take(token).ok_or(malformed)?;
    } else if packet_type != v.zero_rtt {
        // Handshake and Retry packets do not come from a client before the server spoke.
        return Err(Reject::NotInitial);
    }
    let length = r.len().ok_or(malformed)?;
    let pn_offset = r.at;
    let end = pn_offset
        .checked_add(length)
        .filter(|&end| end <= d.len())
        .ok_or(Reject::Malformed("QUIC packet longer than its datagram"))?;
    // A packet number of up to 4 bytes, then the sample: RFC 9001 §5.4.2.
    if length < 4 + SAMPLE_LEN {
        return Err(Reject::Malformed("QUIC packet too short to sample"));
    }
    Ok(Some(Long {
        start: at,
        version,
        packet_type,
        dcid,
        pn_offset,
        end,
    }))
}

/// RFC 9000 §A.3: the full packet number from its truncated form.
fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: u32) -> u64 {
    let expected = largest.map_or(0, |l| l + 1);
    let window = 1u64 << bits;
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate + half <= expected && candidate < (1 << 62) - window {
        candidate + window
    } else if candidate > expected + half && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// The CRYPTO stream as far as it arrived: pieces at their offsets in one buffer.
#[derive(Default)]
struct Stream {
    buf: Vec<u8>,
    /// Disjoint, sorted, not touching: [start, end) of the bytes received.
    pieces: Vec<(usize, usize)>,
}

impl Stream {
    fn insert(&mut self, offset: u64, data: &[u8]) -> Result<(), Reject> {
        let start = usize::try_from(offset).map_err(|_| Reject::TooLarge)?;
        let end = start.checked_add(data.len()).ok_or(Reject::TooLarge)?;
        if end > MAX_CRYPTO {
            return Err(Reject::TooLarge);
        }
        if data.is_empty() {
            return Ok(());
        }
        // Merge [start, end) with every piece it touches.
        let first = self.pieces.partition_point(|&(_, e)| e < start);
        let last = self.pieces.partition_point(|&(s, _)| s <= end);
        // Bytes sent again must be the same (RFC 9000 §19.6): a client that says two things
        // at one offset is not routed by either.
        for &(s, e) in &self.pieces[first..last] {
            let (from, to) = (s.max(start), e.min(end));
            if from < to && self.buf[from..to] != data[from - start..to - start] {
                return Err(Reject::Malformed(
                    "QUIC CRYPTO data differs where it overlaps",
                ));
            }
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[start..end].copy_from_slice(data);
        let merged = if first < last {
            (
                start.min(self.pieces[first].0),
                end.max(self.pieces[last - 1].1),
            )
        } else {
            (start, end)
        };
        self.pieces.splice(first..last, [merged]);
        if self.pieces.len() > MAX_PIECES {
            return Err(Reject::TooLarge);
        }
        Ok(())
    }

    /// The bytes received without a gap from offset 0.
    fn contiguous(&self) -> &[u8] {
        match self.pieces.first() {
            Some(&(0, end)) => &self.buf[..end],
            _ => &[],
        }
    }
}

/// Walks the frames of an opened Initial payload, handing CRYPTO data to `crypto`.
/// Allowed in Initial packets (RFC 9000 §12.4): PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE.
pub fn read_frames(
    payload: &[u8],
    mut crypto: impl FnMut(u64, &[u8]) -> Result<(), Reject>,
) -> Result<(), Reject> {
    let malformed = Reject::Malformed(BAD_FRAME);
    let mut r = Reader { b: payload, at: 0 };
    while r.at < payload.len() {
        match r.varint().ok_or(malformed)? {
            0x00 | 0x01 => {}
            kind @ (0x02 | 0x03) => {
                r.varint().ok_or(malformed)?; // largest acknowledged
                r.varint().ok_or(malformed)?; // delay
                let ranges = r.varint().ok_or(malformed)?;
                r.varint().ok_or(malformed)?; // first range
                for _ in 0..ranges {
                    r.varint().ok_or(malformed)?; // gap
                    r.varint().ok_or(malformed)?; // length
                }
                if kind == 0x03 {
                    for _ in 0..3 {
                        r.varint().ok_or(malformed)?; // ECN counts
                    }
                }
            }
            0x06 => {
                let offset = r.varint().ok_or(malformed)?;
                let len = r.len().ok_or(malformed)?;
                let data = r.take(len).ok_or(malformed)?;
                crypto(offset, data)?;
            }
            0x1c => {
                r.varint().ok_or(malformed)?; // error code
                r.varint().ok_or(malformed)?; // frame type
                let len = r.len().ok_or(malformed)?;
                r.take(len).ok_or(malformed)?;
            }
            _ => {
                return Err(Reject::Malformed(
                    "frame not allowed in a QUIC Initial packet",
                ))
            }
        }
    }
    Ok(())
}

/// A client's first flight, datagram by datagram, until its ClientHello is whole.
#[derive(Default)]
pub struct Initials {
    /// The keys of the last connection ID seen, and that ID.
    keys: Option<(u32, [u8; MAX_CID_LEN], usize, Keys)>,
    largest: Option<u64>,
    crypto: Stream,
    /// An opened packet (the datagram is left as it came).
    work: Vec<u8>,
    /// Initial packets opened so far.
    pub opened: u32,
    /// The version of the first Initial packet.
    pub version: u32,
}

impl Initials {
    pub fn new() -> Initials {
        Initials::default()
    }

    /// Takes the next datagram from the client. `Done` once the ClientHello is whole (read it
    /// with `client_hello`); `NeedMore` until then. Once a datagram opened, a later one that
    /// opens nothing (0-RTT only, reordered; or sent by anyone who can spoof the client's
    /// address) adds nothing and ends nothing, as a QUIC server would ignore it.
    pub fn push(&mut self, datagram: &[u8]) -> Peek<(), Reject> {
        match self.read_datagram(datagram) {
            Peek::Invalid(e) if self.opened > 0 && !e.of_the_stream() => Peek::NeedMore,
            other => other,
        }
    }

    fn read_datagram(&mut self, datagram: &[u8]) -> Peek<(), Reject> {
        let mut at = 0;
        let mut opened = 0;
        let mut failed = false;
        for packets in 0.. {
            if packets == MAX_PACKETS {
                break;
            }
            let packet = match long_header(datagram, at) {
                Ok(Some(p)) => p,
                Ok(None) if at == 0 => return Peek::Invalid(Reject::NotQuic),
                Ok(None) => break,
                // Past the first packet, what follows is not ours to judge: the server will.
                Err(e) if at == 0 => return Peek::Invalid(e),
                Err(_) => break,
            };
            if self.opened == 0 && at == 0 && datagram.len() < MIN_FIRST_DATAGRAM {
                return Peek::Invalid(Reject::Malformed(
                    "first QUIC datagram shorter than 1200 bytes",
                ));
            }
            at = packet.end;
            let v = version(packet.version).expect("a known version");
            if packet.packet_type != v.initial {
                continue; // 0-RTT: not for us
            }
            match self.open(datagram, &packet) {
                Ok(()) => opened += 1,
                Err(Reject::Undecryptable) => failed = true,
                Err(e) => return Peek::Invalid(e),
            }
            if self.version == 0 {
                self.version = packet.version;
            }
            if at >= datagram.len() {
                break;
            }
        }
        if opened == 0 {
            return Peek::Invalid(if failed {
                Reject::Undecryptable
            } else {
                Reject::NotInitial
            });
        }
        self.opened += opened;
        match self.hello_state() {
            Ok(true) => Peek::Done(()),
            Ok(false) => Peek::NeedMore,
            Err(e) => Peek::Invalid(e),
        }
    }

    /// Whether the CRYPTO stream holds a whole first handshake message; an error if it
    /// cannot be a ClientHello.
    fn hello_state(&self) -> Result<bool, Reject> {
        let head = self.crypto.contiguous();
        if head.len() < 4 {
            return Ok(false);
        }
        if head[0] != 1 {
            return Err(Reject::Tls(tls::Reject::NotClientHello));
        }
        let len =
            4 + (usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]));
        if len > MAX_CRYPTO {
            return Err(Reject::TooLarge);
        }
        Ok(head.len() >= len)
    }

    /// The ClientHello, once `push` said `Done`.
    pub fn client_hello(&self) -> Peek<ClientHello<'_>, Reject> {
        match self.hello_state() {
            Ok(true) => {}
            Ok(false) => return Peek::NeedMore,
            Err(e) => return Peek::Invalid(e),
        }
        match tls::read_handshake(self.crypto.contiguous()) {
            Peek::Done(hello) => Peek::Done(hello),
            Peek::NeedMore => Peek::NeedMore,
            Peek::Invalid(r) => Peek::Invalid(Reject::Tls(r)),
        }
    }

    /// Opens one Initial packet (a copy of it) and takes its CRYPTO frames.
    fn open(&mut self, datagram: &[u8], p: &Long<'_>) -> Result<(), Reject> {
        let keys = self.keys_for(p.version, p.dcid);
        // Offsets within the packet from here on.
        let packet = &datagram[p.start..p.end];
        let pn_at = p.pn_offset - p.start;
        let sample: &[u8; SAMPLE_LEN] = packet[pn_at + 4..pn_at + 4 + SAMPLE_LEN]
            .try_into()
            .expect("checked by long_header");
        let mask = crypto::aes128_block(&keys.hp, sample).ok_or(Reject::Undecryptable)?;
        let first = packet[0] ^ (mask[0] & 0x0f);
        let pn_len = usize::from(first & 3) + 1;
        // The sample check leaves room for the longest packet number and for the tag.
        let header_len = pn_at + pn_len;
        self.work.clear();
        self.work.extend_from_slice(packet);
        let work = &mut self.work;
        work[0] = first;
        let mut truncated = 0u64;
        for i in 0..pn_len {
            work[pn_at + i] ^= mask[1 + i];
            truncated = truncated << 8 | u64::from(work[pn_at + i]);
        }
        let pn = decode_packet_number(self.largest, truncated, 8 * pn_len as u32);
        let mut nonce = keys.iv;
        for (n, b) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
            *n ^= b;
        }
        let (aad, rest) = work.split_at_mut(header_len);
        let (data, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("16 bytes");
        if !crypto::aes128_gcm_open(&keys.key, &nonce, aad, data, tag) {
            return Err(Reject::Undecryptable);
        }
        self.largest = Some(self.largest.map_or(pn, |l| l.max(pn)));
        let stream = &mut self.crypto;
        read_frames(data, |offset, bytes| stream.insert(offset, bytes))
    }

    fn keys_for(&mut self, version: u32, dcid: &[u8]) -> Keys {
        if let Some((v, id, len, keys)) = &self.keys {
            if *v == version && &id[..*len] == dcid {
                return *keys;
            }
        }
        let keys = client_keys(version, dcid).expect("a known version");
        let mut id = [0u8; MAX_CID_LEN];
        id[..dcid.len()].copy_from_slice(dcid);
        self.keys = Some((version, id, dcid.len(), keys));
        keys
    }
}

/// Builds a client's Initial packet as a client would: `payload` (frames) padded to
/// `padded_to` bytes of packet, with packet number `pn` sent in `pn_len` bytes, sealed with the
/// keys of `dcid` and header-protected. For tests, fuzz targets and benchmarks.
#[cfg(any(test, not(feature = "module")))]
pub fn client_initial(
    v: u32,
    dcid: &[u8],
    scid: &[u8],
    pn: u64,
    pn_len: usize,
    payload: &[u8],
    padded_to: usize,
) -> Vec<u8> {
    let version = version(v).expect("a known version");
    let keys = client_keys(v, dcid).expect("a known version");
    let mut header = vec![0xc0 | version.initial << 4 | (pn_len as u8 - 1)];
    header.extend_from_slice(&v.to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.push(scid.len() as u8);
    header.extend_from_slice(scid);
    header.push(0); // no token
                    // The length as a 2-byte varint, after padding the payload.
    let fixed = header.len() + 2 + pn_len + TAG_LEN;
    let mut body = payload.to_vec();
    if fixed + body.len() < padded_to {
        body.resize(padded_to - fixed, 0);
    }
    // Room for the header-protection sample.
    if pn_len + body.len() < 4 + SAMPLE_LEN - TAG_LEN {
        body.resize(4 + SAMPLE_LEN - TAG_LEN - pn_len, 0);
    }
    let length = (pn_len + body.len() + TAG_LEN) as u16;
    header.extend_from_slice(&(0x4000 | length).to_be_bytes());
    let pn_at = header.len();
    header.extend_from_slice(&pn.to_be_bytes()[8 - pn_len..]);
    let mut nonce = keys.iv;
    for (n, b) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
        *n ^= b;
    }
    let tag = crypto::aes128_gcm_seal(&keys.key, &nonce, &header, &mut body).expect("sealed");
    let mut packet = header;
    packet.extend_from_slice(&body);
    packet.extend_from_slice(&tag);
    let sample: [u8; SAMPLE_LEN] = packet[pn_at + 4..pn_at + 4 + SAMPLE_LEN]
        .try_into()
        .expect("16 bytes");
    let mask = crypto::aes128_block(&keys.hp, &sample).expect("a mask");
    packet[0] ^= mask[0] & 0x0f;
    for i in 0..pn_len {
        packet[pn_at + i] ^= mask[1 + i];
    }
    packet
}

/// A CRYPTO frame carrying `data` at `offset`.
#[cfg(any(test, not(feature = "module")))]
pub fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    f.extend_from_slice(&(0x8000_0000u32 | offset as u32).to_be_bytes());
    f.extend_from_slice(&(0x4000u16 | data.len() as u16).to_be_bytes());
    f.extend_from_slice(data);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::tls::tests::hello_message;

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    #[test]
    fn rfc9001_a1_keys() {
        let v = &V1;
        let secret = client_secret(v, &DCID);
        assert_eq!(
            secret.to_vec(),
            unhex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")
        );
        let keys = client_keys(VERSION_1, &DCID).unwrap();
        assert_eq!(keys.key.to_vec(), unhex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(keys.iv.to_vec(), unhex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(keys.hp.to_vec(), unhex("9f50449e04a0e810283a1e9933adedd2"));
    }

    #[test]
    fn rfc9369_a1_keys() {
        let secret = client_secret(&V2, &DCID);
        assert_eq!(
            secret.to_vec(),
            unhex("14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b")
        );
        let keys = client_keys(VERSION_2, &DCID).unwrap();
        assert_eq!(keys.key.to_vec(), unhex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(keys.iv.to_vec(), unhex("91f73e2351d8fa91660e909f"));
        assert_eq!(keys.hp.to_vec(), unhex("45b95e15235d6f45a6b19cbcb0294ba9"));
    }

    /// The RFC's protected client Initial opens to the RFC's payload, and its hello reads.
    fn rfc_packet(packet: &str, payload: &str, version: u32) {
        let packet = unhex(packet);
        let payload = unhex(payload);
        assert_eq!(packet.len(), 1200);
        let mut initials = Initials::new();
        assert_eq!(initials.push(&packet), Peek::Done(()));
        assert_eq!(initials.version, version);
        assert_eq!(initials.largest, Some(2), "the RFC's packet number");
        // What was opened: the payload, tag left out.
        assert_eq!(&initials.work[22..initials.work.len() - 16], &payload[..]);
        let Peek::Done(hello) = initials.client_hello() else {
            panic!("no hello");
        };
        assert_eq!(hello.server_name.unwrap().to_name().as_str(), "example.com");
        let alpn: Vec<&[u8]> = tls::alpn_protocols(hello.alpn.unwrap()).collect();
        assert_eq!(alpn, [b"alpn".as_slice()]);
    }

    #[test]
    fn rfc9001_a2_client_initial() {
        rfc_packet(
            include_str!("testdata/rfc9001-client-initial.hex"),
            include_str!("testdata/rfc9001-client-initial-payload.hex"),
            VERSION_1,
        );
    }

    #[test]
    fn rfc9369_a2_client_initial() {
        rfc_packet(
            include_str!("testdata/rfc9369-client-initial.hex"),
            include_str!("testdata/rfc9369-client-initial-payload.hex"),
            VERSION_2,
        );
    }

    #[test]
    fn a_packet_changed_anywhere_does_not_open() {
        let packet = unhex(include_str!("testdata/rfc9001-client-initial.hex"));
        for at in [0usize, 5, 30, 600, 1199] {
            let mut bad = packet.clone();
            bad[at] ^= 0x10;
            let got = Initials::new().push(&bad);
            assert!(matches!(got, Peek::Invalid(_)), "byte {at}: {got:?}");
        }
    }

    fn hello(name: &str, pad: usize) -> Vec<u8> {
        hello_message(Some(name), &["h3"], pad)
    }

    /// The hello cut into `n` CRYPTO frames, each in its own Initial packet / datagram.
    fn datagrams(v: u32, hello: &[u8], n: usize) -> Vec<Vec<u8>> {
        let size = hello.len().div_ceil(n);
        hello
            .chunks(size)
            .enumerate()
            .map(|(i, piece)| {
                let frame = crypto_frame((i * size) as u64, piece);
                client_initial(v, &DCID, &[1, 2, 3], i as u64, 2, &frame, 1200)
            })
            .collect()
    }

    fn name_of(initials: &Initials) -> String {
        match initials.client_hello() {
            Peek::Done(h) => h.server_name.unwrap().to_name().as_str().to_owned(),
            other => panic!("no hello: {other:?}"),
        }
    }

    #[test]
    fn a_hello_over_two_datagrams_in_either_order() {
        for v in [VERSION_1, VERSION_2] {
            let hello = hello("two.example", 1800);
            let d = datagrams(v, &hello, 2);
            let mut initials = Initials::new();
            assert_eq!(initials.push(&d[0]), Peek::NeedMore);
            assert_eq!(initials.push(&d[1]), Peek::Done(()));
            assert_eq!(name_of(&initials), "two.example");
            // The second piece (with the name, here) first, as Chromium often sends them.
            let mut initials = Initials::new();
            assert_eq!(initials.push(&d[1]), Peek::NeedMore);
            assert!(matches!(initials.client_hello(), Peek::NeedMore));
            assert_eq!(initials.push(&d[0]), Peek::Done(()));
            assert_eq!(name_of(&initials), "two.example");
        }
    }

    #[test]
    fn frames_shuffled_repeated_overlapping_with_padding_and_ping() {
        let hello = hello("frames.example", 600);
        let mut payload = vec![0x00, 0x01, 0x00];
        // Overlapping pieces, out of order, one repeated.
        payload.extend(crypto_frame(300, &hello[300..]));
        payload.extend(crypto_frame(100, &hello[100..350]));
        payload.extend([0x01]);
        payload.extend(crypto_frame(0, &hello[..150]));
        payload.extend(crypto_frame(100, &hello[100..350]));
        let packet = client_initial(VERSION_1, &DCID, &[], 0, 1, &payload, 1200);
        let mut initials = Initials::new();
        assert_eq!(initials.push(&packet), Peek::Done(()));
        assert_eq!(name_of(&initials), "frames.example");
    }

    #[test]
    fn coalesced_packets_in_one_datagram() {
        let hello = hello("coalesced.example", 0);
        let (a, b) = hello.split_at(40);
        let mut datagram = client_initial(VERSION_1, &DCID, &[], 0, 4, &crypto_frame(0, a), 0);
        datagram.extend(client_initial(
            VERSION_1,
            &DCID,
            &[],
            1,
            4,
            &crypto_frame(40, b),
            0,
        ));
        // Then zeros, as a datagram padded after its packets.
        datagram.resize(1200, 0);
        let mut initials = Initials::new();
        assert_eq!(initials.push(&datagram), Peek::Done(()));
        assert_eq!(initials.opened, 2);
        assert_eq!(name_of(&initials), "coalesced.example");
    }

    #[test]
    fn what_is_not_a_first_flight() {
        let mut i = Initials::new();
        assert_eq!(i.push(b"\x40short header"), Peek::Invalid(Reject::NotQuic));
        assert_eq!(i.push(b""), Peek::Invalid(Reject::NotQuic));
        let mut unknown = unhex(include_str!("testdata/rfc9001-client-initial.hex"));
        unknown[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
        assert_eq!(
            i.push(&unknown),
            Peek::Invalid(Reject::UnknownVersion(0x1a2a_3a4a))
        );
        // A truncated packet: its length says more than the datagram holds.
        let packet = unhex(include_str!("testdata/rfc9001-client-initial.hex"));
        assert!(matches!(
            i.push(&packet[..600]),
            Peek::Invalid(Reject::Malformed(_))
        ));
        // A handshake message that is not a ClientHello.
        let mut not_hello = hello("x.example", 0);
        not_hello[0] = 2;
        let p = client_initial(
            VERSION_1,
            &DCID,
            &[],
            0,
            1,
            &crypto_frame(0, &not_hello),
            1200,
        );
        assert_eq!(
            Initials::new().push(&p),
            Peek::Invalid(Reject::Tls(tls::Reject::NotClientHello))
        );
        // A frame an Initial packet must not carry (STREAM).
        let p = client_initial(VERSION_1, &DCID, &[], 0, 1, &[0x08, 0, 1, 0x61], 1200);
        assert!(matches!(
            Initials::new().push(&p),
            Peek::Invalid(Reject::Malformed(_))
        ));
    }

    #[test]
    fn later_datagrams_that_open_nothing_change_nothing() {
        let hello = hello("later.example", 1800);
        let d = datagrams(VERSION_1, &hello, 2);
        let mut initials = Initials::new();
        assert_eq!(initials.push(&d[0]), Peek::NeedMore);
        // Garbage, a key-less Initial (another connection ID), a 0-RTT packet alone.
        assert_eq!(initials.push(b"\x40 junk"), Peek::NeedMore);
        let other = client_initial(VERSION_1, &[9; 8], &[], 5, 2, &crypto_frame(0, b"x"), 1200);
        let mut keyless = other.clone();
        keyless[30] ^= 1;
        assert_eq!(initials.push(&keyless), Peek::NeedMore);
        let mut zero_rtt = d[1].clone();
        zero_rtt[0] = (zero_rtt[0] & !0x30) | 0x10;
        assert_eq!(initials.push(&zero_rtt), Peek::NeedMore);
        assert_eq!(initials.push(&d[1]), Peek::Done(()));
        assert_eq!(name_of(&initials), "later.example");
        // But a first datagram that is not QUIC is refused at once.
        assert_eq!(
            Initials::new().push(b"\x40 junk"),
            Peek::Invalid(Reject::NotQuic)
        );
    }

    #[test]
    fn a_short_first_datagram_is_refused() {
        let p = client_initial(VERSION_1, &DCID, &[], 0, 1, &crypto_frame(0, b"x"), 0);
        assert!(p.len() < MIN_FIRST_DATAGRAM);
        assert!(matches!(
            Initials::new().push(&p),
            Peek::Invalid(Reject::Malformed(_))
        ));
    }

    #[test]
    fn packets_per_datagram_bounded() {
        // 2,000 tiny Initial packets of two connection IDs in one 60 KB datagram: at most
        // MAX_PACKETS of them are opened.
        let mut datagram = Vec::new();
        for i in 0..2000u64 {
            let dcid = if i % 2 == 0 { [1u8; 8] } else { [2u8; 8] };
            datagram.extend(client_initial(VERSION_1, &dcid, &[], i, 1, &[0x01], 0));
        }
        let mut initials = Initials::new();
        assert_eq!(initials.push(&datagram), Peek::NeedMore);
        assert!(
            initials.opened as usize <= MAX_PACKETS,
            "{}",
            initials.opened
        );
    }

    #[test]
    fn bounded_stream() {
        // Past MAX_CRYPTO.
        let p = client_initial(
            VERSION_1,
            &DCID,
            &[],
            0,
            1,
            &crypto_frame(MAX_CRYPTO as u64, b"x"),
            1200,
        );
        assert_eq!(Initials::new().push(&p), Peek::Invalid(Reject::TooLarge));
        // A hello that says it is larger than MAX_CRYPTO.
        let p = client_initial(
            VERSION_1,
            &DCID,
            &[],
            0,
            1,
            &crypto_frame(0, &[1, 1, 0, 0]),
            1200,
        );
        assert_eq!(Initials::new().push(&p), Peek::Invalid(Reject::TooLarge));
        // Too many disjoint pieces.
        let mut payload = Vec::new();
        for i in 0..=MAX_PIECES as u64 {
            payload.extend(crypto_frame(10 + 2 * i, b"x"));
        }
        let p = client_initial(VERSION_1, &DCID, &[], 0, 1, &payload, 1200);
        assert_eq!(Initials::new().push(&p), Peek::Invalid(Reject::TooLarge));
    }

    #[test]
    fn stream_merges_pieces() {
        let mut s = Stream::default();
        s.insert(10, b"klm").unwrap();
        s.insert(0, b"abc").unwrap();
        assert_eq!(s.contiguous(), b"abc");
        s.insert(3, b"defghij").unwrap();
        assert_eq!(s.contiguous(), b"abcdefghijklm");
        assert_eq!(s.pieces, [(0, 13)]);
        s.insert(20, b"z").unwrap();
        s.insert(13, b"").unwrap();
        assert_eq!(s.pieces, [(0, 13), (20, 21)]);
        assert_eq!(
            s.insert(2, b"cX"),
            Err(Reject::Malformed(
                "QUIC CRYPTO data differs where it overlaps"
            ))
        );
        s.insert(2, b"cdefghijklm").unwrap();
        assert_eq!(s.pieces, [(0, 13), (20, 21)]);
    }

    #[test]
    fn packet_numbers() {
        // RFC 9000 §A.3's example.
        assert_eq!(
            decode_packet_number(Some(0xa82f30ea), 0x9b32, 16),
            0xa82f9b32
        );
        assert_eq!(decode_packet_number(None, 0, 8), 0);
        assert_eq!(decode_packet_number(Some(1), 2, 8), 2);
        assert_eq!(decode_packet_number(Some(300), 0x2d, 8), 301);
    }

    #[test]
    fn varints() {
        // RFC 9000 §A.1's examples.
        assert_eq!(
            varint(&unhex("c2197c5eff14e88c")),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(varint(&unhex("9d7f3e7d")), Some((494_878_333, 4)));
        assert_eq!(varint(&unhex("7bbd")), Some((15_293, 2)));
        assert_eq!(varint(&unhex("25")), Some((37, 1)));
        assert_eq!(varint(&unhex("4025")), Some((37, 2)));
        assert_eq!(varint(&unhex("40")), None);
    }
}
