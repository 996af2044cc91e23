//! HTTP/1.x request head → the host the client asked for, over peeked bytes.

use super::{Host, Peek};

/// Header lines examined before giving up on a head; browsers send about 20.
pub const MAX_HEADERS: usize = 100;

/// Why a request head carries no usable host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NotHttp,
    TooManyHeaders,
    DuplicateHost,
    BadHost,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NotHttp => "not an HTTP/1.x request head",
            Reject::TooManyHeaders => "too many header lines",
            Reject::DuplicateHost => "more than one Host header",
            Reject::BadHost => "invalid host name",
        }
    }
}

/// Reads the request head at the start of `buf` and returns its host, or `Done(None)` for a
/// well-formed request that names no host (HTTP/1.0 without `Host`). The authority of an
/// absolute-form target wins over `Host` (RFC 9112 §3.2.2).
pub fn read_host(buf: &[u8]) -> Peek<Option<Host<'_>>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) => return Peek::NeedMore,
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Peek::Invalid(Reject::TooManyHeaders),
        Err(_) => return Peek::Invalid(Reject::NotHttp),
    }
    if let Some(authority) = request.path.and_then(absolute_form_authority) {
        return match Host::check_authority(authority.as_bytes()) {
            Some(name) => Peek::Done(Some(name)),
            None => Peek::Invalid(Reject::BadHost),
        };
    }
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => return Peek::Done(None),
        (Some(host), None) => host.value,
        (Some(_), Some(_)) => return Peek::Invalid(Reject::DuplicateHost),
    };
    match Host::check_authority(host.trim_ascii()) {
        Some(name) => Peek::Done(Some(name)),
        None => Peek::Invalid(Reject::BadHost),
    }
}

/// `http://user@host:port/path` → `host:port`.
fn absolute_form_authority(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    Some(
        authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(head: &str) -> Peek<Option<String>, Reject> {
        match read_host(head.as_bytes()) {
            Peek::Done(name) => Peek::Done(name.map(|n| n.to_name().as_str().to_owned())),
            Peek::NeedMore => Peek::NeedMore,
            Peek::Invalid(r) => Peek::Invalid(r),
        }
    }

    fn found(name: &str) -> Peek<Option<String>, Reject> {
        Peek::Done(Some(name.to_owned()))
    }

    #[test]
    fn host_header_lower_cased_without_port_or_dot() {
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: Rancher.Example.COM.:8080\r\n\r\n"),
            found("rancher.example.com")
        );
        assert_eq!(
            host("GET / HTTP/1.1\r\nhOST:  a.test  \r\nAccept: */*\r\n\r\n"),
            found("a.test")
        );
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            found("[::1]")
        );
        // An empty port, as nginx's http module reads it.
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n"),
            found("a.test")
        );
    }

    #[test]
    fn absolute_form_wins_over_host() {
        assert_eq!(
            host("GET http://User@Abs.Test:81/x?y HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            found("abs.test")
        );
        assert_eq!(
            host("GET https://abs.test HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            found("abs.test")
        );
        // Not a URI scheme we know: the Host header speaks.
        assert_eq!(
            host("GET ftp://abs.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            found("other.test")
        );
    }

    #[test]
    fn http10_without_host_has_no_name() {
        assert_eq!(host("GET / HTTP/1.0\r\n\r\n"), Peek::Done(None));
        assert_eq!(
            host("GET / HTTP/1.0\r\nHost: old.test\r\n\r\n"),
            found("old.test")
        );
    }

    #[test]
    fn acme_challenge_request_as_pebble_sends_it() {
        let head = "GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.cluster-a.test:5002\r\nUser-Agent: Go-http-client/1.1\r\nAccept: */*\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n";
        assert_eq!(host(head), found("a.cluster-a.test"));
    }

    #[test]
    fn waits_for_the_whole_head() {
        let head = "GET / HTTP/1.1\r\nHost: split.test\r\nX: y\r\n\r\n";
        for end in 0..head.len() {
            assert_eq!(host(&head[..end]), Peek::NeedMore, "{end}");
        }
        assert_eq!(host(head), found("split.test"));
    }

    #[test]
    fn rejects_bad_heads_and_names() {
        assert_eq!(
            host("\x16\x03\x01\x02\x00\x01"),
            Peek::Invalid(Reject::NotHttp)
        );
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Peek::Invalid(Reject::DuplicateHost)
        );
        for bad in ["a b.test", "a/b", "../etc", "a..b", "x.test:port", ""] {
            let head = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(host(&head), Peek::Invalid(Reject::BadHost), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}Host: a.test\r\n\r\n");
        assert_eq!(host(&head), Peek::Invalid(Reject::TooManyHeaders));
    }
}
