//! What an active check sends and how it judges the answer. The nginx side (connect, timers,
//! reads) is in `check.rs`.

use super::{mix, Outcome};
use crate::upstream::{CheckKind, ProxyProtocol};

/// The PROXY protocol header a check sends first. A check is the edge's own connection, not a
/// relayed one, which the protocol says so: `UNKNOWN` in v1, the `LOCAL` command in v2. The
/// server then takes the connection's own addresses.
pub fn proxy_header(version: ProxyProtocol) -> &'static [u8] {
    match version {
        ProxyProtocol::V1 => b"PROXY UNKNOWN\r\n",
        // Signature, version 2 + LOCAL, family UNSPEC, no address block.
        ProxyProtocol::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

/// A ClientHello a TLS 1.2 or 1.3 server answers with a ServerHello (or a HelloRetryRequest,
/// which has the same form). The handshake is never finished, so `seed` need not be secret.
pub fn client_hello(sni: Option<&str>, seed: u64) -> Vec<u8> {
    let mut random = [0u8; 96];
    let mut x = seed;
    for chunk in random.chunks_mut(8) {
        x = mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let (client_random, rest) = random.split_at(32);
    let (session_id, key) = rest.split_at(32);

    let mut ext = Vec::with_capacity(160);
    if let Some(name) = sni {
        let n = name.len() as u16;
        extension(&mut ext, 0x0000, |b| {
            b.extend_from_slice(&(n + 3).to_be_bytes());
            b.push(0);
            b.extend_from_slice(&n.to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        });
    }
    // supported_groups: x25519, secp256r1, secp384r1.
    extension(&mut ext, 0x000a, |b| {
        b.extend_from_slice(&[0, 6, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18])
    });
    // ec_point_formats: uncompressed.
    extension(&mut ext, 0x000b, |b| b.extend_from_slice(&[1, 0]));
    // signature_algorithms: ECDSA, RSA-PSS and RSA PKCS#1 with SHA-256/384/512.
    extension(&mut ext, 0x000d, |b| {
        let algs: [u16; 9] = [
            0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601,
        ];
        b.extend_from_slice(&(algs.len() as u16 * 2).to_be_bytes());
        for a in algs {
            b.extend_from_slice(&a.to_be_bytes());
        }
    });
    // supported_versions: TLS 1.3, 1.2.
    extension(&mut ext, 0x002b, |b| {
        b.extend_from_slice(&[4, 0x03, 0x04, 0x03, 0x03])
    });
    // key_share: one x25519 share (any 32 bytes will do for a ServerHello).
    extension(&mut ext, 0x0033, |b| {
        b.extend_from_slice(&[0, 36, 0x00, 0x1d, 0, 32]);
        b.extend_from_slice(key);
    });

    let suites: [u16; 12] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0x009c, 0x009d,
        0x002f,
    ];
    let mut body = Vec::with_capacity(96 + suites.len() * 2 + ext.len());
    body.extend_from_slice(&[0x03, 0x03]);
    body.extend_from_slice(client_random);
    body.push(32);
    body.extend_from_slice(session_id);
    body.extend_from_slice(&(suites.len() as u16 * 2).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);

    let mut out = Vec::with_capacity(9 + body.len());
    out.extend_from_slice(&[0x16, 0x03, 0x01]);
    out.extend_from_slice(&(body.len() as u16 + 4).to_be_bytes());
    out.push(0x01);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&body);
    out
}

fn extension(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(&kind.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    body(out);
    let len = (out.len() - at - 2) as u16;
    out[at..at + 2].copy_from_slice(&len.to_be_bytes());
}

pub fn http_request(path: &str, host: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: nginx-edge-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Judges the bytes received so far; `None` while more are needed. `expect` has bit N set for
/// each accepted status class Nxx.
pub fn judge(kind: CheckKind, expect: u8, got: &[u8]) -> Option<Outcome> {
    match kind {
        CheckKind::Tcp => Some(Outcome::Ok),
        CheckKind::Tls => {
            // A handshake record whose first message is a ServerHello (type 2).
            match got {
                [0x16, 0x03, _, _, _, 0x02, ..] => Some(Outcome::Ok),
                [] | [0x16] | [0x16, 0x03] | [0x16, 0x03, _] | [0x16, 0x03, _, _] => None,
                [0x16, 0x03, _, _, _] => None,
                _ => Some(Outcome::BadAnswer),
            }
        }
        CheckKind::Http => {
            // "HTTP/1.1 200": the status class is the tenth byte.
            const PREFIX: &[u8] = b"HTTP/1.";
            let n = got.len().min(PREFIX.len());
            if got[..n] != PREFIX[..n] {
                return Some(Outcome::BadAnswer);
            }
            if got.len() < 10 {
                return None;
            }
            match (got[7], got[8], got[9]) {
                (b'0' | b'1', b' ', c @ b'1'..=b'5') if expect & (1 << (c - b'0')) != 0 => {
                    Some(Outcome::Ok)
                }
                _ => Some(Outcome::BadAnswer),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::{tls::read_client_hello, Peek};

    #[test]
    fn client_hello_carries_the_sni_and_parses() {
        let hello = client_hello(Some("rancher.example.com"), 7);
        let mut scratch = Vec::new();
        match read_client_hello(&hello, &mut scratch) {
            Peek::Done(h) => {
                assert_eq!(
                    h.server_name.unwrap().to_name().as_str(),
                    "rancher.example.com"
                )
            }
            other => panic!("{other:?}"),
        }
        let (_, record) = tls_parser::parse_tls_plaintext(&hello).unwrap();
        assert_eq!(record.msg.len(), 1);
        let without = client_hello(None, 7);
        match read_client_hello(&without, &mut scratch) {
            Peek::Done(h) => assert!(h.server_name.is_none()),
            other => panic!("{other:?}"),
        }
        assert_ne!(client_hello(None, 1), client_hello(None, 2));
    }

    #[test]
    fn proxy_headers() {
        assert_eq!(proxy_header(ProxyProtocol::V1), b"PROXY UNKNOWN\r\n");
        let v2 = proxy_header(ProxyProtocol::V2);
        assert_eq!(v2.len(), 16);
        assert_eq!(
            &v2[..12],
            b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
        );
        assert_eq!(v2[12], 0x20, "version 2, LOCAL");
        assert_eq!(
            u16::from_be_bytes([v2[14], v2[15]]),
            0,
            "no addresses follow"
        );
    }

    #[test]
    fn tls_answers() {
        let j = |b: &[u8]| judge(CheckKind::Tls, 0, b);
        assert_eq!(j(&[]), None);
        assert_eq!(j(&[0x16, 0x03, 0x03, 0x00]), None);
        assert_eq!(j(&[0x16, 0x03, 0x03, 0x00, 0x7a]), None);
        assert_eq!(j(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02]), Some(Outcome::Ok));
        // An alert (handshake_failure), or plain HTTP.
        assert_eq!(
            j(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
            Some(Outcome::BadAnswer)
        );
        assert_eq!(j(b"HTTP/1.1 400"), Some(Outcome::BadAnswer));
        assert_eq!(
            j(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x0b]),
            Some(Outcome::BadAnswer)
        );
    }

    #[test]
    fn http_answers() {
        let two_three = 0b1100;
        let j = |b: &[u8]| judge(CheckKind::Http, two_three, b);
        assert_eq!(j(b"HTTP/1."), None);
        assert_eq!(j(b"HTTP/1.1 "), None);
        assert_eq!(j(b"HTTP/1.1 2"), Some(Outcome::Ok), "the class is known");
        assert_eq!(j(b"HTTP/1.1 204 No Content\r\n"), Some(Outcome::Ok));
        assert_eq!(j(b"HTTP/1.0 302 Found\r\n"), Some(Outcome::Ok));
        assert_eq!(j(b"HTTP/1.1 503 Busy\r\n"), Some(Outcome::BadAnswer));
        assert_eq!(j(b"SSH-2.0-OpenSSH"), Some(Outcome::BadAnswer));
        assert_eq!(j(b"HTTP/2.0 200"), Some(Outcome::BadAnswer));
        assert_eq!(
            judge(CheckKind::Http, 1 << 5, b"HTTP/1.1 503 x"),
            Some(Outcome::Ok)
        );
        let req = String::from_utf8(http_request("/healthz", "web.example.com")).unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.0\r\nHost: web.example.com\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
