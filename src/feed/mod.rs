//! Pure: route sources read over HTTP (`edge_routes_url`): the URL and options, HTTP/1.1
//! response decoding, the Kubernetes objects and the list-and-watch protocol. The worker
//! layer (`feeds`) drives them on nginx's connections.

pub mod http;
pub mod kube;
pub mod plan;
pub mod state;

use std::fmt;
use std::net::IpAddr;

use crate::routes::discover::Kinds;

/// What the URL serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Decided by the URL (an API server or a Kubernetes list path) or the first answer.
    Auto,
    /// The native route JSON.
    Edge,
    /// Kubernetes objects: Ingresses, HTTPRoutes, TLSRoutes.
    K8s,
}

/// An `http://` or `https://` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// As written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// The path, without a trailing `/` (`""` for the root), and no query.
    pub path: String,
    /// The query, without `?`, if any.
    pub query: Option<String>,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err("the URL must start with http:// or https://".into());
        };
        let (authority, path_query) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("user:password@ in the URL is not supported; use token_file=".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or("an IPv6 address in the URL needs its closing ]")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("\"{host}\" is not an IPv6 address"));
            }
            (host, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("invalid port \"{p}\" in the URL"))?,
            None if tls => 443,
            None => 80,
        };
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !valid_host {
            return Err(format!("invalid host \"{host}\" in the URL"));
        }
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (path_query, None),
        };
        if path.contains('#') || query.as_deref().is_some_and(|q| q.contains('#')) {
            return Err("a #fragment has no meaning in the URL".into());
        }
        if path
            .bytes()
            .chain(query.as_deref().unwrap_or("").bytes())
            .any(|b| b <= b' ' || b >= 0x7f)
        {
            return Err("the URL has a space or a control character".into());
        }
        Ok(Url {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            path: path.trim_end_matches('/').to_owned(),
            query,
        })
    }

    /// The address, when the host is one; a name needs the resolver.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The `Host` header's value.
    pub fn authority(&self) -> String {
        let host = match self.ip() {
            Some(IpAddr::V6(_)) => format!("[{}]", self.host),
            _ => self.host.clone(),
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The path and query to request for the URL itself.
    pub fn target(&self) -> String {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        match &self.query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.target())
    }
}

/// One `edge_routes_url` directive's arguments, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub url: Url,
    /// `name=`, or the URL: in logs and status, and in the names of made-up upstreams.
    pub name: String,
    pub format: Format,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// `upstream=`: every host of this source routes there.
    pub upstream: Option<String>,
    pub token_file: Option<String>,
    pub ca: Option<String>,
    pub certificate: Option<String>,
    pub certificate_key: Option<String>,
    pub ingress_class: Option<String>,
    /// `discover=nodes`, `endpoints` or `nodes,endpoints`: the source reads the cluster's
    /// Nodes or EndpointSlices too, for upstreams whose servers come from them (`"discover"`
    /// in a route file).
    pub discover: Kinds,
}

impl Options {
    /// Parses the directive's arguments after the URL. `duration` parses `10s`-style times.
    pub fn parse(
        url: &str,
        args: &[&str],
        duration: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<Options, String> {
        let url = Url::parse(url)?;
        let mut o = Options {
            name: url.to_string(),
            url,
            format: Format::Auto,
            interval_ms: 10_000,
            timeout_ms: 5_000,
            upstream: None,
            token_file: None,
            ca: None,
            certificate: None,
            certificate_key: None,
            ingress_class: None,
            discover: Kinds::default(),
        };
        let mut named = false;
        for arg in args {
            let Some((key, value)) = arg.split_once('=') else {
                return Err(format!("invalid parameter \"{arg}\""));
            };
            if value.is_empty() {
                return Err(format!("\"{key}=\" needs a value"));
            }
            let text = || Some(value.to_owned());
            match key {
                "name" => {
                    if value.len() > 64
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    {
                        return Err(format!(
                            "invalid name \"{value}\": at most 64 of [A-Za-z0-9._-]"
                        ));
                    }
                    o.name = value.to_owned();
                    named = true;
                }
                "format" => {
                    o.format = match value {
                        "auto" => Format::Auto,
                        "edge" => Format::Edge,
                        "k8s" => Format::K8s,
                        _ => {
                            return Err(format!(
                            "invalid format \"{value}\", it must be \"auto\", \"edge\" or \"k8s\""
                        ))
                        }
                    }
                }
                "interval" | "timeout" => {
                    let ms = duration(value)
                        .filter(|&ms| ms > 0 && ms <= 3_600_000)
                        .ok_or_else(|| format!("invalid {key} \"{value}\""))?;
                    if key == "interval" {
                        o.interval_ms = ms;
                    } else {
                        o.timeout_ms = ms;
                    }
                }
                "upstream" => o.upstream = text(),
                "token_file" => o.token_file = text(),
                "ca" => o.ca = text(),
                "certificate" => o.certificate = text(),
                "certificate_key" => o.certificate_key = text(),
                "ingress_class" => o.ingress_class = text(),
                "discover" => {
                    for what in value.split(',') {
                        match what {
                            "nodes" => o.discover.nodes = true,
                            "endpoints" => o.discover.endpoints = true,
                            "services" => o.discover.services = true,
                            _ => {
                                return Err(format!(
                                    "invalid discover \"{value}\": nodes, endpoints, services, or several of them (nodes,endpoints)"
                                ))
                            }
                        }
                    }
                }
                _ => return Err(format!("invalid parameter \"{arg}\"")),
            }
        }
        if o.certificate.is_some() != o.certificate_key.is_some() {
            return Err("certificate= and certificate_key= go together".into());
        }
        if !o.url.tls {
            for (given, what) in [
                (o.ca.is_some(), "ca="),
                (o.certificate.is_some(), "certificate="),
            ] {
                if given {
                    return Err(format!("{what} needs an https:// URL"));
                }
            }
        }
        if !o.url.tls && o.token_file.is_some() {
            return Err(
                "token_file= needs an https:// URL: a token is only sent to a verified server"
                    .into(),
            );
        }
        if o.url.tls && o.ca.is_none() {
            return Err("an https:// URL needs ca= (the certificate authority to verify the server against)".into());
        }
        if o.format == Format::Edge && (o.ingress_class.is_some() || o.upstream.is_some()) {
            return Err("upstream= and ingress_class= are for format=k8s".into());
        }
        // An API server's URL, or a Kubernetes list path.
        if o.format == Format::Auto
            && (o.url.path.is_empty() || kube::Target::of(&o.url.path).is_some())
        {
            o.format = Format::K8s;
        }
        if o.discover.any() && !named {
            return Err(
                "discover= needs name=: a route file's \"discover\" names the source by it".into(),
            );
        }
        if o.discover.any() && (o.format != Format::K8s || kube::Target::of(&o.url.path).is_some())
        {
            return Err(
                "discover= needs the API server's URL (format=k8s, not a list path)".into(),
            );
        }
        Ok(o)
    }

    /// Whether `other` connects as this does: the same credentials, CA and timeout. Two
    /// directives for one source must agree on these, or one of them would be silently unused.
    pub fn connects_as(&self, other: &Options) -> bool {
        (
            &self.token_file,
            &self.ca,
            &self.certificate,
            &self.certificate_key,
            self.timeout_ms,
        ) == (
            &other.token_file,
            &other.ca,
            &other.certificate,
            &other.certificate_key,
            other.timeout_ms,
        )
    }

    /// Tells this source's cache file from another's: everything that shapes its routes.
    /// Not `discover=`: a source that starts discovering keeps its last good copy (its
    /// routes at the next start), and two directives for one source read what either asks.
    pub fn cache_key(&self) -> u64 {
        let text = format!(
            "{}\n{}\n{:?}\n{:?}\n{:?}",
            self.url, self.name, self.format, self.upstream, self.ingress_class
        );
        crate::health::fnv1a(text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> Option<u64> {
        text.strip_suffix('s')?
            .parse::<u64>()
            .ok()
            .map(|s| s * 1000)
    }

    #[test]
    fn urls_split_into_what_a_request_needs() {
        let u = Url::parse("https://10.0.0.1:6443").unwrap();
        assert_eq!((u.tls, u.port, u.target()), (true, 6443, "/".into()));
        assert_eq!(u.authority(), "10.0.0.1:6443");
        let u =
            Url::parse("http://127.0.0.1:8001/apis/networking.k8s.io/v1/namespaces/web/ingresses/")
                .unwrap();
        assert_eq!(
            u.path,
            "/apis/networking.k8s.io/v1/namespaces/web/ingresses"
        );
        let u = Url::parse("https://Routes.Example.com/edge.json?x=1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("routes.example.com", 443));
        assert_eq!(u.target(), "/edge.json?x=1");
        assert_eq!(u.ip(), None);
        let u = Url::parse("http://[::1]:8080/k8s/clusters/c-xxxxx").unwrap();
        assert_eq!(u.authority(), "[::1]:8080");
        assert_eq!(u.to_string(), "http://[::1]:8080/k8s/clusters/c-xxxxx");
        for bad in [
            "ftp://x",
            "http://",
            "http://a:0",
            "http://a:99999",
            "http://[::1",
            "http://u:p@host/",
            "http://host/a b",
            "http://ho st/",
            "http://host/#x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_are_checked_together() {
        let o = Options::parse(
            "https://10.0.0.1:6443",
            &["name=cluster-a", "upstream=a", "ca=/x", "interval=3s"],
            &secs,
        )
        .unwrap();
        assert_eq!(
            (o.name.as_str(), o.interval_ms, o.format),
            ("cluster-a", 3000, Format::K8s)
        );
        let o = Options::parse("http://127.0.0.1/edge.json", &[], &secs).unwrap();
        assert_eq!(o.format, Format::Auto);
        assert_eq!(o.name, "http://127.0.0.1/edge.json");
        for (url, args, why) in [
            ("https://h/", &[][..], "needs ca="),
            ("http://h/", &["ca=/x"][..], "needs an https://"),
            ("http://h/", &["certificate=/c"][..], "go together"),
            ("http://h/", &["interval=0s"][..], "invalid interval"),
            ("http://h/", &["format=yaml"][..], "invalid format"),
            ("http://h/", &["bogus"][..], "invalid parameter"),
            ("http://h/", &["name=a b"][..], "invalid name"),
            (
                "http://h/",
                &["format=edge", "upstream=a"][..],
                "format=k8s",
            ),
            ("http://h/", &["discover=pods"][..], "invalid discover"),
            ("http://h/", &["discover=nodes,"][..], "invalid discover"),
            (
                "http://h/",
                &["discover=nodes"][..],
                "discover= needs name=",
            ),
            (
                "http://h/apis/networking.k8s.io/v1/ingresses",
                &["name=a", "discover=nodes"][..],
                "needs the API server's URL",
            ),
            (
                "http://h/edge.json",
                &["name=a", "discover=nodes"][..],
                "needs the API server's URL",
            ),
        ] {
            let e = Options::parse(url, args, &secs).unwrap_err();
            assert!(e.contains(why), "{args:?}: {e}");
        }
        let n = Options::parse("http://h/", &["name=h", "discover=nodes"], &secs).unwrap();
        assert!(n.discover.nodes && !n.discover.endpoints);
        let both =
            Options::parse("http://h/", &["name=h", "discover=nodes,endpoints"], &secs).unwrap();
        assert!(both.discover.nodes && both.discover.endpoints);
        assert_eq!(both.cache_key(), n.cache_key());
        assert_eq!(
            n.cache_key(),
            Options::parse("http://h/", &["name=h"], &secs)
                .unwrap()
                .cache_key(),
            "a source that starts reading nodes keeps its last good copy"
        );
        let a = Options::parse("http://h/", &["upstream=a"], &secs).unwrap();
        let b = Options::parse("http://h/", &["upstream=b"], &secs).unwrap();
        let c = Options::parse("http://h/", &["upstream=a", "interval=1s"], &secs).unwrap();
        assert_ne!(a.cache_key(), b.cache_key());
        assert_eq!(a.cache_key(), c.cache_key());
        assert!(a.connects_as(&c));
        let d = Options::parse("http://h/", &["upstream=a", "timeout=9s"], &secs).unwrap();
        assert_eq!(a.cache_key(), d.cache_key());
        assert!(!a.connects_as(&d), "another timeout");
        let e = Options::parse("https://h/", &["ca=/a", "token_file=/t1"], &secs).unwrap();
        let f = Options::parse("https://h/", &["ca=/a", "token_file=/t2"], &secs).unwrap();
        assert!(!e.connects_as(&f), "another token");
    }
}
