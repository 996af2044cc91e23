//! TLS ClientHello → SNI host name and ALPN protocol list, over peeked bytes.
//!
//! The caller hands in everything received so far, every time; the parse is stateless. A hello
//! that spans several records is reassembled into `scratch` (the only copy, and only then).
//! No length field is trusted: every one is checked against what encloses it.

use tls_parser::{TlsExtensionType, TlsRecordType};

use super::{Host, Peek};

/// Largest ClientHello accepted, in bytes of handshake body. Real hellos, post-quantum key
/// shares included, stay under 2 KiB; the preread buffer is the practical bound anyway.
pub const MAX_HELLO_LEN: usize = 64 * 1024;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const SNI_HOST_NAME: u8 = 0;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;

/// What a ClientHello says about where the client wants to go.
#[derive(Debug, Clone, Copy)]
pub struct ClientHello<'a> {
    /// The first `host_name` entry of the server_name extension, if valid.
    pub server_name: Option<Host<'a>>,
    /// The raw ALPN `protocol_name_list` (length-prefixed names), already checked well formed.
    pub alpn: Option<&'a [u8]>,
}

/// Why bytes on a TLS listener carry no usable hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NotTls,
    Sslv2,
    NotClientHello,
    Malformed(&'static str),
    TooLarge,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NotTls => "not a TLS handshake",
            Reject::Sslv2 => "SSLv2-style hello",
            Reject::NotClientHello => "first handshake message is not a ClientHello",
            Reject::Malformed(what) => what,
            Reject::TooLarge => "ClientHello too large",
        }
    }
}

/// Reads the ClientHello at the start of `buf`. `scratch` is cleared and used only when the
/// hello is split over several records.
pub fn read_client_hello<'a>(
    buf: &'a [u8],
    scratch: &'a mut Vec<u8>,
) -> Peek<ClientHello<'a>, Reject> {
    match reassemble(buf, scratch) {
        Peek::Done(body) => parse_client_hello(body).map_or_else(Peek::Invalid, Peek::Done),
        Peek::NeedMore => Peek::NeedMore,
        Peek::Invalid(r) => Peek::Invalid(r),
    }
}

/// Reads a ClientHello handshake message without a record layer (as QUIC's CRYPTO stream
/// carries it): `message` starts with the handshake header.
pub fn read_handshake(message: &[u8]) -> Peek<ClientHello<'_>, Reject> {
    let Some(head) = message.get(..HANDSHAKE_HEADER_LEN) else {
        return Peek::NeedMore;
    };
    if head[0] != HANDSHAKE_CLIENT_HELLO {
        return Peek::Invalid(Reject::NotClientHello);
    }
    let body_len = usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
    if body_len > MAX_HELLO_LEN {
        return Peek::Invalid(Reject::TooLarge);
    }
    match message.get(HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + body_len) {
        Some(body) => parse_client_hello(body).map_or_else(Peek::Invalid, Peek::Done),
        None => Peek::NeedMore,
    }
}

/// Returns the ClientHello body (after the 4-byte handshake header) once all of it arrived.
fn reassemble<'a>(buf: &'a [u8], scratch: &'a mut Vec<u8>) -> Peek<&'a [u8], Reject> {
    match buf.first() {
        None => return Peek::NeedMore,
        Some(&b) if b == u8::from(TlsRecordType::Handshake) => {}
        // SSLv2 compatible hello: 2-byte length with the high bit set, then msg type 1.
        Some(&b) if b & 0x80 != 0 => {
            return match buf.get(2) {
                None => Peek::NeedMore,
                Some(1) => Peek::Invalid(Reject::Sslv2),
                Some(_) => Peek::Invalid(Reject::NotTls),
            }
        }
        Some(_) => return Peek::Invalid(Reject::NotTls),
    }
    if buf.len() >= 2 && buf[1] != 3 {
        return Peek::Invalid(Reject::NotTls);
    }

    let (copied, total) = match collect_first_message(buf, scratch) {
        Ok(found) => found,
        Err(peek) => return peek,
    };
    let message: &'a [u8] = if copied {
        let scratch: &'a Vec<u8> = scratch;
        scratch
    } else {
        first_record_fragment(buf)
    };
    Peek::Done(&message[HANDSHAKE_HEADER_LEN..total])
}

/// The bytes of the first record available so far.
fn first_record_fragment(buf: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let after = &buf[RECORD_HEADER_LEN..];
    &after[..len.min(after.len())]
}

/// Walks the records until the first handshake message is complete. Returns whether it had to
/// be copied into `scratch` (it spans records) and its length, header included.
fn collect_first_message<T>(
    buf: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(bool, usize), Peek<T, Reject>> {
    scratch.clear();
    let mut rest = buf;
    let mut records = 0usize;
    let mut collected = 0usize;
    let mut wanted: Option<usize> = None;
    loop {
        // The record header: type, version (3.x), length; read in place, every time.
        let Some(&[kind, major, _, len_hi, len_lo]) = rest.get(..RECORD_HEADER_LEN) else {
            return Err(Peek::NeedMore);
        };
        let after = &rest[RECORD_HEADER_LEN..];
        if kind != u8::from(TlsRecordType::Handshake) {
            return Err(Peek::Invalid(Reject::Malformed(
                "non-handshake record inside the hello",
            )));
        }
        if major != 3 {
            return Err(Peek::Invalid(Reject::NotTls));
        }
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(Peek::Invalid(Reject::Malformed("bad TLS record length")));
        }
        // A record is usable as it arrives: the handshake header can be checked before the
        // rest of the record is in, which rejects garbage early.
        let fragment = &after[..len.min(after.len())];
        let complete_record = after.len() >= len;
        records += 1;
        if records == 2 {
            scratch.extend_from_slice(first_record_fragment(buf));
        }
        if records >= 2 {
            scratch.extend_from_slice(fragment);
        }
        collected += fragment.len();

        let head = if records == 1 {
            fragment
        } else {
            scratch.as_slice()
        };
        if wanted.is_none() && head.len() >= HANDSHAKE_HEADER_LEN {
            if head[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(Peek::Invalid(Reject::NotClientHello));
            }
            let body_len =
                usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
            if body_len > MAX_HELLO_LEN {
                return Err(Peek::Invalid(Reject::TooLarge));
            }
            wanted = Some(HANDSHAKE_HEADER_LEN + body_len);
        }
        if let Some(total) = wanted {
            if collected >= total {
                return Ok((records >= 2, total));
            }
        }
        if !complete_record {
            return Err(Peek::NeedMore);
        }
        rest = &after[len..];
    }
}

/// A cursor that refuses to read past the end of what encloses it.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_client_hello(body: &[u8]) -> Result<ClientHello<'_>, Reject> {
    let malformed = Reject::Malformed("malformed ClientHello");
    let mut r = Reader(body);
    r.take(2 + 32).ok_or(malformed)?; // legacy_version, random
    let session_id = r.vec8().ok_or(malformed)?;
    if session_id.len() > 32 {
        return Err(malformed);
    }
    let suites = r.vec16().ok_or(malformed)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(malformed);
    }
    if r.vec8().is_none_or(<[u8]>::is_empty) {
        return Err(malformed);
    }
    let mut hello = ClientHello {
        server_name: None,
        alpn: None,
    };
    if r.is_empty() {
        return Ok(hello); // no extensions at all: an old client, still a hello
    }
    let extensions = r.vec16().ok_or(malformed)?;
    if !r.is_empty() {
        return Err(Reject::Malformed("bytes after the ClientHello extensions"));
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    // A hello has a dozen or more extensions and two matter: each is skipped by its 4-byte
    // head (type, length), with one bounds check for the head and one for its data.
    let mut at = 0;
    while at < extensions.len() {
        let Some(&[t_hi, t_lo, len_hi, len_lo]) = extensions.get(at..at + 4) else {
            return Err(malformed);
        };
        let start = at + 4;
        at = start + usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let Some(data) = extensions.get(start..at) else {
            return Err(malformed);
        };
        match TlsExtensionType(u16::from_be_bytes([t_hi, t_lo])) {
            TlsExtensionType::ServerName => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(Reject::Malformed("duplicate server_name extension"));
                }
                hello.server_name = read_sni(data)?;
            }
            TlsExtensionType::ApplicationLayerProtocolNegotiation => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(Reject::Malformed("duplicate ALPN extension"));
                }
                hello.alpn = Some(read_alpn(data)?);
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// The first host_name entry; an entry that is not a valid host name counts as no name.
fn read_sni(data: &[u8]) -> Result<Option<Host<'_>>, Reject> {
    let malformed = Reject::Malformed("malformed server_name extension");
    let mut ext = Reader(data);
    let mut list = Reader(ext.vec16().ok_or(malformed)?);
    if !ext.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    while !list.is_empty() {
        let kind = list.u8().ok_or(malformed)?;
        let name = list.vec16().ok_or(malformed)?;
        if kind == SNI_HOST_NAME {
            return Ok(Host::check(name));
        }
    }
    Ok(None)
}

fn read_alpn(data: &[u8]) -> Result<&[u8], Reject> {
    let malformed = Reject::Malformed("malformed ALPN extension");
    let mut ext = Reader(data);
    let list = ext.vec16().ok_or(malformed)?;
    if !ext.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    let mut names = Reader(list);
    while !names.is_empty() {
        if names.vec8().is_none_or(<[u8]>::is_empty) {
            return Err(malformed);
        }
    }
    Ok(list)
}

/// Turns a `protocol_name_list` checked by [`read_client_hello`] (`\x02h2\x08http/1.1`)
/// into its comma-separated form (`h2,http/1.1`) at the start of `list`; returns its length,
/// one byte less than the list's.
pub fn join_alpn_in_place(list: &mut [u8]) -> usize {
    let (mut read, mut written) = (0, 0);
    while let Some(&n) = list.get(read) {
        let end = (read + 1 + usize::from(n)).min(list.len());
        if written > 0 {
            list[written] = b',';
            written += 1;
        }
        // Each name moves left by one byte (its length byte), or stays after the first.
        list.copy_within(read + 1..end, written);
        written += end - read - 1;
        read = end;
    }
    written
}

/// The protocol names of a `protocol_name_list` checked by [`read_client_hello`].
pub fn alpn_protocols(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut r = Reader(list);
    core::iter::from_fn(move || r.vec8())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a ClientHello handshake message (header included) the way real clients lay it
    /// out; `pad` adds a padding extension to reach post-quantum sizes.
    pub(crate) fn hello_message(sni: Option<&str>, alpn: &[&str], pad: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let n = name.len() as u16;
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        if !alpn.is_empty() {
            let list: Vec<u8> = alpn
                .iter()
                .flat_map(|p| std::iter::once(p.len() as u8).chain(p.bytes()))
                .collect();
            ext.extend_from_slice(&[0, 16]);
            ext.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        if pad > 0 {
            ext.extend_from_slice(&[0, 21]);
            ext.extend_from_slice(&(pad as u16).to_be_bytes());
            ext.extend(std::iter::repeat_n(0, pad));
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// Wraps a handshake message into records of at most `chunk` bytes each.
    pub(crate) fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn sni_of(bytes: &[u8]) -> Peek<Option<String>, Reject> {
        let mut scratch = Vec::new();
        match read_client_hello(bytes, &mut scratch) {
            Peek::Done(h) => Peek::Done(h.server_name.map(|n| n.to_name().as_str().to_owned())),
            Peek::NeedMore => Peek::NeedMore,
            Peek::Invalid(r) => Peek::Invalid(r),
        }
    }

    #[test]
    fn reads_sni_and_alpn_from_one_record() {
        let bytes = records(
            &hello_message(Some("Rancher.Example.com"), &["h2", "acme-tls/1"], 0),
            16384,
        );
        let mut scratch = Vec::new();
        let Peek::Done(hello) = read_client_hello(&bytes, &mut scratch) else {
            panic!("no hello");
        };
        assert_eq!(
            hello.server_name.unwrap().to_name().as_str(),
            "rancher.example.com"
        );
        let alpn: Vec<_> = alpn_protocols(hello.alpn.unwrap()).collect();
        assert_eq!(alpn, [&b"h2"[..], b"acme-tls/1"]);
        assert!(scratch.is_empty(), "one record needs no copy");
    }

    #[test]
    fn every_prefix_needs_more_and_the_whole_succeeds() {
        let msg = hello_message(Some("a.example.com"), &["h2"], 1700);
        for chunk in [16384, 1000, 7, 1] {
            let bytes = records(&msg, chunk);
            for end in 0..bytes.len() {
                assert_eq!(
                    sni_of(&bytes[..end]),
                    Peek::NeedMore,
                    "chunk {chunk} end {end}"
                );
            }
            assert_eq!(
                sni_of(&bytes),
                Peek::Done(Some("a.example.com".into())),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn alpn_lists_join_in_place() {
        for (wire, joined) in [
            (&b"\x02h2"[..], "h2"),
            (b"\x02h2\x08http/1.1", "h2,http/1.1"),
            (b"\x08http/1.1\x02h2\x01x", "http/1.1,h2,x"),
        ] {
            let mut list = wire.to_vec();
            let n = join_alpn_in_place(&mut list);
            assert_eq!(&list[..n], joined.as_bytes());
            assert_eq!(n, wire.len() - 1);
            let names: Vec<&[u8]> = alpn_protocols(wire).collect();
            assert_eq!(names.join(&b","[..]), joined.as_bytes());
        }
        // Bytes that lie about a length stop at the end, whatever they hold.
        let mut lying = b"\x02h2\x09ab".to_vec();
        let n = join_alpn_in_place(&mut lying);
        assert_eq!(&lying[..n], b"h2,ab");
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut bytes = records(&hello_message(Some("x.test"), &[], 0), 16384);
        bytes.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(sni_of(&bytes), Peek::Done(Some("x.test".into())));
    }

    #[test]
    fn no_sni_and_bad_names_are_no_name() {
        let bytes = records(&hello_message(None, &[], 0), 16384);
        assert_eq!(sni_of(&bytes), Peek::Done(None));
        let bytes = records(&hello_message(Some("bad/name"), &[], 0), 16384);
        assert_eq!(sni_of(&bytes), Peek::Done(None));
        let long = "a".repeat(64);
        let bytes = records(&hello_message(Some(&long), &[], 0), 16384);
        assert_eq!(sni_of(&bytes), Peek::Done(None));
    }

    #[test]
    fn rejects_what_is_not_a_tls_hello() {
        assert_eq!(sni_of(b"GET / HTTP/1.1\r\n"), Peek::Invalid(Reject::NotTls));
        assert_eq!(
            sni_of(b"\x80\x2e\x01\x00\x02"),
            Peek::Invalid(Reject::Sslv2)
        );
        assert_eq!(sni_of(b"\x16\x02\x00"), Peek::Invalid(Reject::NotTls));
        assert_eq!(
            sni_of(b"\x16\x03\x01\x00\x00"),
            Peek::Invalid(Reject::Malformed("bad TLS record length"))
        );
        assert_eq!(
            sni_of(b"\x16\x03\x01\x40\x01"),
            Peek::Invalid(Reject::Malformed("bad TLS record length"))
        );
        assert_eq!(
            sni_of(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Peek::Invalid(Reject::NotClientHello)
        );
        assert_eq!(
            sni_of(b"\x16\x03\x01\x00\x04\x01\x01\x00\x01"),
            Peek::Invalid(Reject::TooLarge)
        );
        // A record of another type between the fragments of a hello.
        let msg = hello_message(Some("x.test"), &[], 0);
        let mut bytes = records(&msg[..10], 10);
        bytes.extend_from_slice(b"\x15\x03\x03\x00\x02\x02\x28");
        assert!(matches!(
            sni_of(&bytes),
            Peek::Invalid(Reject::Malformed(_))
        ));
    }

    #[test]
    fn lengths_that_lie_are_rejected() {
        let msg = hello_message(Some("x.test"), &["h2"], 0);
        // Every single-byte corruption either parses or is rejected; none panics, and the
        // ones that break a length field are refused.
        for i in 4..msg.len() {
            for delta in [1u8, 0x80, 0xff] {
                let mut bad = msg.clone();
                bad[i] = bad[i].wrapping_add(delta);
                let _ = sni_of(&records(&bad, 16384));
            }
        }
        let mut bad = msg.clone();
        let ext_len_at = 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2;
        bad[ext_len_at + 1] = bad[ext_len_at + 1].wrapping_add(1);
        assert!(matches!(sni_of(&records(&bad, 16384)), Peek::Invalid(_)));
    }

    #[test]
    fn agrees_with_tls_parser() {
        use tls_parser::{parse_tls_extensions, parse_tls_handshake_client_hello, TlsExtension};
        let msg = hello_message(Some("Agree.Example"), &["http/1.1"], 300);
        let (_, reference) = parse_tls_handshake_client_hello(&msg[4..]).unwrap();
        let (_, exts) = parse_tls_extensions(reference.ext.unwrap()).unwrap();
        let sni = exts.iter().find_map(|e| match e {
            TlsExtension::SNI(names) => Some(names[0].1),
            _ => None,
        });
        assert_eq!(sni, Some(&b"Agree.Example"[..]));
        assert_eq!(
            sni_of(&records(&msg, 100)),
            Peek::Done(Some("agree.example".into()))
        );
    }
}
