//! Host names as read from clients: checked where they lie (`Host`), lower-cased where they
//! are kept (`Host::lower_into`, or a `ServerName`'s fixed buffer).

use core::fmt;

/// Longest name accepted from a client, in bytes; longer ones count as no name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest DNS label accepted from a client.
pub const MAX_LABEL_LEN: usize = 63;

/// A lower-cased host name without port or trailing dot: a DNS name, an IPv4 literal, or an
/// IPv6 literal kept in brackets. Lives on the stack; reading one never allocates.
#[derive(Clone, Copy)]
pub struct ServerName {
    len: u8,
    buf: [u8; MAX_NAME_LEN],
}

impl ServerName {
    /// Validates and lower-cases `raw`, which has no port (see `Host::check`).
    pub fn parse(raw: &[u8]) -> Option<ServerName> {
        Host::check(raw).map(|host| host.to_name())
    }

    /// Splits `host[:port]` (or `[v6]:port`) and parses the host part (see
    /// `Host::check_authority`).
    pub fn parse_authority(authority: &[u8]) -> Option<ServerName> {
        Host::check_authority(authority).map(|host| host.to_name())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: `Host::check` accepts ASCII bytes only, lower-cased on the way in (the tests check
        // every byte value).
        unsafe { core::str::from_utf8_unchecked(self.as_bytes()) }
    }
}

/// A host name as a client sent it, checked but not yet lower-cased: whoever keeps it writes
/// its lower-case form once, where it keeps it (`lower_into`), rather than through a
/// fixed-size `ServerName` copied on the way.
#[derive(Clone, Copy, Debug)]
pub struct Host<'a> {
    raw: &'a [u8],
}

impl<'a> Host<'a> {
    /// Checks `raw`, which has no port. One trailing dot is dropped. Returns `None` for
    /// anything that is not a plausible host name: empty or too long, a label over 63 bytes,
    /// empty labels (`a..b`), or bytes outside `[A-Za-z0-9._-]` (control characters, spaces,
    /// `/`, `@`, `%`, ...); an IPv6 literal in brackets is checked as an address.
    pub fn check(raw: &'a [u8]) -> Option<Host<'a>> {
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.first() == Some(&b'[') {
            let inner = raw.strip_prefix(b"[")?.strip_suffix(b"]")?;
            let text = core::str::from_utf8(inner).ok()?;
            text.parse::<core::net::Ipv6Addr>().ok()?;
            return (raw.len() <= MAX_NAME_LEN).then_some(Host { raw });
        }
        if raw.is_empty() || raw.len() > MAX_NAME_LEN {
            return None;
        }
        // One table lookup per byte: its lower-case form, `.`, or 0 for a byte no host name
        // has; a label's length is checked at its end.
        let label_ok = |len: usize| (1..=MAX_LABEL_LEN).contains(&len);
        let mut label_start = 0;
        for (i, &b) in raw.iter().enumerate() {
            match LOWER[b as usize] {
                0 => return None,
                b'.' => {
                    if !label_ok(i - label_start) {
                        return None;
                    }
                    label_start = i + 1;
                }
                _ => {}
            }
        }
        label_ok(raw.len() - label_start).then_some(Host { raw })
    }

    /// Splits `host[:port]` (or `[v6]:port`) and checks the host part. The port, if any,
    /// must be decimal digits; it is dropped.
    pub fn check_authority(authority: &'a [u8]) -> Option<Host<'a>> {
        let host = if authority.first() == Some(&b'[') {
            let end = authority.iter().position(|&b| b == b']')? + 1;
            let (host, rest) = authority.split_at(end);
            if !rest.is_empty() && !is_port(rest.strip_prefix(b":")?) {
                return None;
            }
            host
        } else {
            match authority.iter().rposition(|&b| b == b':') {
                Some(colon) if is_port(&authority[colon + 1..]) => &authority[..colon],
                Some(_) => return None,
                None => authority,
            }
        };
        Self::check(host)
    }

    /// Its length in bytes (at most `MAX_NAME_LEN`, never 0).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Never: a checked host has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Writes its lower-case form, ASCII only, into `out`, which is `len()` bytes long (and
    /// may be uninitialised, as fresh pool memory is).
    pub fn lower_into(&self, out: &mut [core::mem::MaybeUninit<u8>]) {
        debug_assert_eq!(out.len(), self.raw.len());
        for (dst, &b) in out.iter_mut().zip(self.raw) {
            // Checked: every byte is one LOWER maps to itself or its lower case, or an IPv6
            // literal's (hex digits, `:`, `.`, brackets), which ASCII lower-casing keeps.
            dst.write(b.to_ascii_lowercase());
        }
    }

    /// As a `ServerName`.
    pub fn to_name(&self) -> ServerName {
        let mut name = ServerName {
            len: self.raw.len() as u8,
            buf: [0; MAX_NAME_LEN],
        };
        for (dst, &b) in name.buf.iter_mut().zip(self.raw) {
            *dst = b.to_ascii_lowercase();
        }
        name
    }
}

/// Each byte's lower-case form in a host name: `[a-z0-9._-]` for themselves, `[A-Z]` for their
/// lower-case letter, 0 for every other byte.
static LOWER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => c,
            b'A'..=b'Z' => c + 32,
            _ => 0,
        };
        b += 1;
    }
    t
};

/// A port after the host's colon. Empty counts, as in nginx's own Host check: `name:` is `name`.
fn is_port(digits: &[u8]) -> bool {
    digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit)
}

impl PartialEq for ServerName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerName({:?})", self.as_str())
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> Option<String> {
        ServerName::parse(raw.as_bytes()).map(|n| n.as_str().to_owned())
    }

    fn authority(raw: &str) -> Option<String> {
        ServerName::parse_authority(raw.as_bytes()).map(|n| n.as_str().to_owned())
    }

    /// Every byte value, alone and inside a name: accepted exactly when a host name may have
    /// it, and stored as ASCII (what `as_str` relies on).
    #[test]
    fn every_byte_is_judged_and_only_ascii_is_stored() {
        for b in 0..=255u8 {
            let ok = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            let raw = [b'a', b, b'b'];
            let parsed = ServerName::parse(&raw);
            assert_eq!(parsed.is_some(), ok || b == b'.', "byte {b:#04x}");
            if let Some(n) = parsed {
                assert!(n.as_bytes().is_ascii());
                assert_eq!(n.as_bytes()[1], b.to_ascii_lowercase());
            }
        }
    }

    /// What the preread handler keeps: a checked host lower-cased where it is kept, the same
    /// bytes as its `ServerName`.
    #[test]
    fn a_host_is_lower_cased_where_it_is_kept() {
        for raw in ["Rancher.Example.COM.", "a", "[::FFFF:1]", "x_Y-9.test"] {
            let host = Host::check(raw.as_bytes()).unwrap();
            let mut kept = vec![core::mem::MaybeUninit::uninit(); host.len()];
            host.lower_into(&mut kept);
            // SAFETY: `lower_into` wrote every byte.
            let kept: Vec<u8> = kept.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(kept, ServerName::parse(raw.as_bytes()).unwrap().as_bytes());
            assert!(!host.is_empty());
        }
        assert!(Host::check(b"a..b").is_none());
        assert_eq!(
            Host::check_authority(b"Shop.Test:8443").map(|h| h.len()),
            Some(9)
        );
    }

    #[test]
    fn lower_cases_and_drops_one_trailing_dot() {
        assert_eq!(
            name("Rancher.Example.COM.").as_deref(),
            Some("rancher.example.com")
        );
        assert_eq!(name("a.b..").as_deref(), None);
        assert_eq!(
            name("under_score-1.test").as_deref(),
            Some("under_score-1.test")
        );
    }

    #[test]
    fn rejects_what_is_not_a_host_name() {
        for bad in [
            "",
            ".",
            ".a",
            "a..b",
            "a b",
            "a/b",
            "a\0b",
            "a\r\nb",
            "..",
            "a@b",
            "a%2eb",
            "é.test",
            "[::1",
            "[not-v6]",
            "*.example.com",
        ] {
            assert_eq!(name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn enforces_name_and_label_lengths() {
        let label63 = "a".repeat(63);
        assert!(name(&format!("{label63}.test")).is_some());
        assert!(name(&format!("{label63}a.test")).is_none());
        let long = ["abcdefg"; 32].join(".");
        assert_eq!(long.len(), 255);
        assert!(name(&long).is_some());
        assert!(name(&format!("{long}x")).is_none());
        // The trailing dot does not count toward the limit.
        assert!(name(&format!("{long}.")).is_some());
    }

    #[test]
    fn keeps_ipv6_literals_in_brackets() {
        assert_eq!(name("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(
            authority("[2001:DB8::1]:8080").as_deref(),
            Some("[2001:db8::1]")
        );
        assert_eq!(authority("[::1]x"), None);
        assert_eq!(name("127.0.0.1").as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn authority_drops_a_numeric_port() {
        assert_eq!(authority("Example.com:80").as_deref(), Some("example.com"));
        assert_eq!(
            authority("example.com.:5002").as_deref(),
            Some("example.com")
        );
        assert_eq!(authority("example.com:").as_deref(), Some("example.com"));
        assert_eq!(authority("[::1]:").as_deref(), Some("[::1]"));
        assert_eq!(authority("example.com:http"), None);
        assert_eq!(authority("example.com:123456"), None);
        assert_eq!(authority("a:1:2"), None);
    }
}
