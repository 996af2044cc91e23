//! One route file, checked against the schema (version 1) on its own. References between
//! upstreams and routes are resolved later, when files are merged into a table.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::discover::{Address, Discover, Discovered, Selector, What};
use super::json::Json;
pub use super::limits::Limits;
use super::limits::{Network, Rate, MAX_CONNS, MAX_CONNS_PER_CLIENT, MAX_NETWORKS};
use crate::sniff::{ServerName, MAX_LABEL_LEN};
pub use crate::upstream::{Balance, CheckDef, CheckKind, Policy, ProxyProtocol, ServerDef};

/// Bounds of one table; each is documented in docs/configuration.md (Limits).
pub mod limits {
    /// Bytes of one route file. 100,000 routes take about 6 MB.
    pub const MAX_FILE_BYTES: u64 = 64 << 20;
    /// Routes in a table, all files of a folder together.
    pub const MAX_ROUTES: usize = 1_000_000;
    /// Upstreams in a table.
    pub const MAX_UPSTREAMS: usize = 100_000;
    pub use crate::upstream::{MAX_SERVERS, MAX_WEIGHT};
    /// Length of an upstream name.
    pub const MAX_UPSTREAM_NAME: usize = 128;
    /// Length of a route name (a DNS name: 253).
    pub const MAX_ROUTE_NAME: usize = 253;
    /// `*.json` files in a folder source.
    pub const MAX_FILES: usize = 10_000;
    /// Largest `max_fails`.
    pub const MAX_FAILS: u32 = 1000;
    /// Largest `rise` and `fall`.
    pub const MAX_RISE_FALL: u32 = 100;
    /// Longest `fail_timeout`, check `interval` and `timeout`: one hour.
    pub const MAX_DURATION_MS: u64 = 3_600_000;
}
use limits::*;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Document {
    pub upstreams: Vec<UpstreamDef>,
    pub routes: Vec<(RouteKey, Targets)>,
    pub default: Option<Targets>,
    /// A URL source's nodes (`discover=nodes`), for the upstreams that discover them: only
    /// a Kubernetes source's document has them.
    pub discovered: Option<std::sync::Arc<Discovered>>,
}

impl Document {
    /// What reading, merging or freeing it costs, in items: routes, upstreams and servers; a
    /// Kubernetes source's nodes count as a great many (`usize::MAX`).
    pub fn weight(&self) -> usize {
        if self.discovered.is_some() {
            return usize::MAX;
        }
        let servers: usize = self
            .upstreams
            .iter()
            .map(|u| match &u.kind {
                UpstreamKind::Servers(servers) => servers.len(),
                _ => 0,
            })
            .sum();
        self.routes.len() + self.upstreams.len() + servers + 1
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamDef {
    pub name: String,
    pub kind: UpstreamKind,
    /// Balancing and health; only `servers` upstreams may set it.
    pub policy: Policy,
    /// The limits of the routes that send to it, unless a route sets its own.
    pub limits: Option<Box<Limits>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamKind {
    Servers(Vec<ServerDef>),
    /// The name of an `upstream {}` block of nginx.conf.
    Nginx(String),
    /// A source's nodes: the merge makes them `Servers`.
    Discover(Discover),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKey {
    Exact(String),
    /// `*.example.com`, stored as `example.com`: any number of labels in front.
    Wildcard(String),
    /// The same, for exactly one label in front (the Kubernetes Ingress meaning); made by the
    /// Kubernetes reader, not written in route files.
    OneLabel(String),
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteKey::Exact(name) => f.write_str(name),
            RouteKey::Wildcard(suffix) | RouteKey::OneLabel(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Upstream names per protocol; a plain string in the file sets both. With the route's own
/// limits, if it has any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub tls: Option<String>,
    pub http: Option<String>,
    pub limits: Option<Box<Limits>>,
}

/// Where in a document a value sits, e.g. `upstreams.rancher.servers[2]`.
#[derive(Clone, Copy)]
pub enum JsonPath<'a> {
    Root,
    Key(&'a JsonPath<'a>, &'a str),
    Index(&'a JsonPath<'a>, usize),
}

impl fmt::Display for JsonPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            JsonPath::Root => f.write_str("(top level)"),
            JsonPath::Key(JsonPath::Root, key) if is_plain_key(key) => f.write_str(key),
            JsonPath::Key(parent, key) if is_plain_key(key) => write!(f, "{parent}.{key}"),
            JsonPath::Key(JsonPath::Root, key) => write!(f, "[{key:?}]"),
            JsonPath::Key(parent, key) => write!(f, "{parent}[{key:?}]"),
            JsonPath::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A value that breaks the schema: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

pub(super) fn fail<T>(path: &JsonPath, message: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError {
        path: path.to_string(),
        message: message.into(),
    })
}

pub(super) fn object<'j>(
    value: &'j Json,
    path: &JsonPath,
) -> Result<&'j [(String, Json)], SchemaError> {
    match value {
        Json::Object(entries) => Ok(entries),
        other => fail(path, format!("expected an object, found {}", other.kind())),
    }
}

pub(super) fn string<'j>(value: &'j Json, path: &JsonPath) -> Result<&'j str, SchemaError> {
    match value {
        Json::String(s) => Ok(s),
        other => fail(path, format!("expected a string, found {}", other.kind())),
    }
}

pub(super) fn integer(
    value: &Json,
    path: &JsonPath,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, SchemaError> {
    match value {
        Json::Number(n)
            if n.fract() == 0.0
                && *n >= f64::from(*range.start())
                && *n <= f64::from(*range.end()) =>
        {
            Ok(*n as u32)
        }
        _ => fail(
            path,
            format!(
                "expected an integer from {} to {}",
                range.start(),
                range.end()
            ),
        ),
    }
}

impl Document {
    pub fn from_json(root: &Json) -> Result<Document, SchemaError> {
        let top = JsonPath::Root;
        let mut doc = Document {
            upstreams: Vec::new(),
            routes: Vec::new(),
            default: None,
            discovered: None,
        };
        for (key, value) in object(root, &top)? {
            let path = JsonPath::Key(&top, key);
            match key.as_str() {
                "version" => {
                    if *value != Json::Number(1.0) {
                        return fail(&path, "only version 1 is known");
                    }
                }
                "upstreams" => doc.upstreams = upstreams(value, &path)?,
                "routes" => doc.routes = routes(value, &path)?,
                "default" => doc.default = Some(targets(value, &path)?),
                _ => {
                    return fail(
                        &path,
                        "unknown field (expected version, upstreams, routes or default)",
                    )
                }
            }
        }
        Ok(doc)
    }
}

fn upstreams(value: &Json, path: &JsonPath) -> Result<Vec<UpstreamDef>, SchemaError> {
    let entries = object(value, path)?;
    if entries.len() > MAX_UPSTREAMS {
        return fail(path, format!("more than {MAX_UPSTREAMS} upstreams"));
    }
    entries
        .iter()
        .map(|(name, def)| {
            let path = JsonPath::Key(path, name);
            check_upstream_name(name, &path)?;
            let (kind, policy, limits) = upstream(def, &path)?;
            Ok(UpstreamDef {
                name: name.clone(),
                kind,
                policy,
                limits,
            })
        })
        .collect()
}

fn check_upstream_name(name: &str, path: &JsonPath) -> Result<(), SchemaError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_UPSTREAM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        fail(
            path,
            format!("an upstream name is 1 to {MAX_UPSTREAM_NAME} of [A-Za-z0-9_.-]"),
        )
    }
}

type UpstreamParts = (UpstreamKind, Policy, Option<Box<Limits>>);

fn upstream(value: &Json, path: &JsonPath) -> Result<UpstreamParts, SchemaError> {
    let mut servers = None;
    let mut limits = None;
    let mut nginx = None;
    let mut discover = None;
    let mut policy = Policy::default();
    // The first field that only a `servers` upstream may have.
    let mut health_field = None;
    for (key, value) in object(value, path)? {
        let path = JsonPath::Key(path, key);
        match key.as_str() {
            "servers" => servers = Some(server_list(value, &path)?),
            "nginx_upstream" => nginx = Some(string(value, &path)?.to_owned()),
            "discover" => discover = Some(discover_of(value, &path)?),
            "limits" => limits = Some(Box::new(limits_of(value, &path)?)),
            "balance" => {
                policy.balance = match string(value, &path)? {
                    "round_robin" => Balance::RoundRobin,
                    "least_conn" => Balance::LeastConn,
                    "hash" => Balance::Hash,
                    _ => return fail(&path, "expected \"round_robin\", \"least_conn\" or \"hash\""),
                }
            }
            "max_fails" => policy.max_fails = integer(value, &path, 0..=MAX_FAILS)?,
            "fail_timeout" => policy.fail_timeout_ms = duration(value, &path, 1..=MAX_DURATION_MS)?,
            "check" => policy.check = Some(check(value, &path)?),
            "start" => {
                policy.start_down = match string(value, &path)? {
                    "up" => false,
                    "down" => true,
                    _ => return fail(&path, "expected \"up\" or \"down\""),
                }
            }
            _ => {
                return fail(
                    &path,
                    "unknown field (expected servers, nginx_upstream, discover, balance, max_fails, fail_timeout, check, start or limits)",
                )
            }
        }
        if !["servers", "nginx_upstream", "discover", "limits"].contains(&key.as_str())
            && health_field.is_none()
        {
            health_field = Some(key.as_str());
        }
    }
    if policy.start_down && policy.check.is_none() {
        return fail(
            &JsonPath::Key(path, "start"),
            "\"down\" needs a check to bring the servers up",
        );
    }
    match (servers, nginx, discover) {
        (Some(servers), None, None) => Ok((UpstreamKind::Servers(servers), policy, limits)),
        (None, None, Some(discover)) => Ok((UpstreamKind::Discover(discover), policy, limits)),
        (None, Some(name), None) => {
            if let Some(field) = health_field {
                return fail(
                    &JsonPath::Key(path, field),
                    "applies to servers only: an nginx_upstream is balanced by its upstream{} block",
                );
            }
            check_upstream_name(&name, &JsonPath::Key(path, "nginx_upstream"))?;
            Ok((UpstreamKind::Nginx(name), Policy::default(), limits))
        }
        (None, None, None) => fail(path, "needs servers, nginx_upstream or discover"),
        _ => fail(
            path,
            "servers, nginx_upstream and discover exclude each other: one of them",
        ),
    }
}

/// `{"source": "cluster-a", "nodes": {"selector": "node-role.kubernetes.io/ingress=true"}}`:
/// the nodes of a URL source read with `discover=nodes` (all of them without a selector); or
/// `{"source": "cluster-a", "service": "kube-system/ingress", "address": "node", "port": 443}`:
/// the endpoints of a Service (`discover=endpoints`), by pod address (the default) or by the
/// address of the node each pod runs on, on `port` or the listener's.
fn discover_of(value: &Json, path: &JsonPath) -> Result<Discover, SchemaError> {
    let mut source = None;
    let mut selector = None;
    let mut service = None;
    let mut nodeport = None;
    let mut address = None;
    let mut port = None;
    for (key, value) in object(value, path)? {
        let path = JsonPath::Key(path, key);
        match key.as_str() {
            "source" => {
                let name = string(value, &path)?;
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return fail(
                        &path,
                        "the name= of an edge_routes_url: 1 to 64 of [A-Za-z0-9._-]",
                    );
                }
                source = Some(name.to_owned());
            }
            "nodes" => {
                let mut text = "";
                for (key, value) in object(value, &path)? {
                    let path = JsonPath::Key(&path, key);
                    match key.as_str() {
                        "selector" => text = string(value, &path)?,
                        _ => return fail(&path, "unknown field (expected selector)"),
                    }
                }
                let parsed = Selector::parse(text).or_else(|e| {
                    fail(
                        &JsonPath::Key(&path, "selector"),
                        format!("a label selector: {e}"),
                    )
                })?;
                selector = Some(parsed);
            }
            "service" | "nodeport" => {
                let text = string(value, &path)?;
                let dns = |s: &str| {
                    !s.is_empty()
                        && s.len() <= 63
                        && s.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !s.starts_with('-')
                        && !s.ends_with('-')
                };
                let named = match text.split_once('/') {
                    Some((ns, name)) if dns(ns) && dns(name) => (ns.to_owned(), name.to_owned()),
                    _ => return fail(&path, "expected \"namespace/name\" of a Service"),
                };
                if key == "service" {
                    service = Some(named);
                } else {
                    nodeport = Some(named);
                }
            }
            "address" => {
                address = Some(match string(value, &path)? {
                    "pod" => Address::Pod,
                    "node" => Address::Node,
                    _ => return fail(&path, "expected \"pod\" or \"node\""),
                })
            }
            "port" => port = Some(integer(value, &path, 1..=65535)? as u16),
            _ => {
                return fail(
                    &path,
                    "unknown field (expected source, nodes, service, nodeport, address or port)",
                )
            }
        }
    }
    let Some(source) = source else {
        return fail(path, "needs source (the name= of an edge_routes_url)");
    };
    let what = match (selector, service, nodeport) {
        (Some(selector), None, None) => {
            if address.is_some() || port.is_some() {
                return fail(path, "address and port go with service, not nodes");
            }
            What::Nodes(selector)
        }
        (None, Some((namespace, name)), None) => What::Service {
            namespace,
            name,
            address: address.unwrap_or(Address::Pod),
            port,
        },
        (None, None, Some((namespace, name))) => {
            if address.is_some() || port.is_some() {
                return fail(
                    path,
                    "address and port go with service: a nodeport's are the nodes' and the Service's",
                );
            }
            What::NodePort { namespace, name }
        }
        (None, None, None) => {
            return fail(path, "needs nodes, service or nodeport (what to discover)")
        }
        _ => return fail(path, "nodes, service and nodeport exclude each other"),
    };
    Ok(Discover { source, what })
}

/// `"limits": {"max_conns": 100, "max_conns_per_client": 10, "rate": "50r/s", "burst": 20,
/// "allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}`.
pub(crate) fn limits_of(value: &Json, path: &JsonPath) -> Result<Limits, SchemaError> {
    let mut l = Limits::default();
    for (key, value) in object(value, path)? {
        let path = JsonPath::Key(path, key);
        match key.as_str() {
            "max_conns" => l.max_conns = Some(integer(value, &path, 1..=MAX_CONNS)?),
            "max_conns_per_client" => {
                l.max_conns_per_client = Some(integer(value, &path, 1..=MAX_CONNS_PER_CLIENT)?)
            }
            "rate" => {
                let text = string(value, &path)?;
                l.rate = Some(Rate::parse(text).ok_or_else(|| SchemaError {
                    path: path.to_string(),
                    message: format!(
                        "\"{text}\" is not a rate: 1 to {MAX_CONNS} connections per second or minute, such as \"50r/s\" or \"600r/m\""
                    ),
                })?);
            }
            "burst" => l.burst = Some(integer(value, &path, 0..=MAX_CONNS)?),
            "allow" => l.allow = Some(networks(value, &path)?),
            "deny" => l.deny = Some(networks(value, &path)?),
            _ => {
                return fail(
                    &path,
                    "unknown field (expected max_conns, max_conns_per_client, rate, burst, allow or deny)",
                )
            }
        }
    }
    if l.burst.is_some() && l.rate.is_none() {
        return fail(&JsonPath::Key(path, "burst"), "goes with a rate");
    }
    Ok(l)
}

fn networks(value: &Json, path: &JsonPath) -> Result<Vec<Network>, SchemaError> {
    let Json::Array(items) = value else {
        return fail(path, format!("expected an array, found {}", value.kind()));
    };
    if items.is_empty() || items.len() > MAX_NETWORKS {
        return fail(
            path,
            format!("expected 1 to {MAX_NETWORKS} networks (\"10.0.0.0/8\", \"2001:db8::/32\", \"all\")"),
        );
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = JsonPath::Index(path, i);
            Network::parse(string(item, &path)?).or_else(|e| fail(&path, e))
        })
        .collect()
}

/// `"2s"`, `"500ms"`, `"1m"`, `"1h"`, or a number of seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 9 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(n * scale)
}

fn duration(
    value: &Json,
    path: &JsonPath,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, SchemaError> {
    let ms = match value {
        Json::String(s) => parse_duration(s),
        Json::Number(n) if n.fract() == 0.0 && *n >= 0.0 && *n < 1e9 => Some(*n as u64 * 1000),
        _ => None,
    };
    match ms {
        Some(ms) if range.contains(&ms) => Ok(ms),
        _ => fail(
            path,
            format!(
                "expected a duration from {}ms to {}s, such as \"2s\" or \"500ms\"",
                range.start(),
                range.end() / 1000
            ),
        ),
    }
}

fn check(value: &Json, path: &JsonPath) -> Result<CheckDef, SchemaError> {
    let mut def = CheckDef {
        kind: CheckKind::Tcp,
        interval_ms: 2000,
        timeout_ms: 1000,
        rise: 2,
        fall: 3,
        port: None,
        name: None,
        path: "/".into(),
        expect: 0b1100, // 2xx and 3xx, as HAProxy
        proxy_protocol: None,
    };
    let mut kind = None;
    let mut timeout = None;
    for (key, value) in object(value, path)? {
        let path = JsonPath::Key(path, key);
        match key.as_str() {
            "type" => {
                kind = Some(match string(value, &path)? {
                    "tcp" => CheckKind::Tcp,
                    "tls" => CheckKind::Tls,
                    "http" => CheckKind::Http,
                    _ => return fail(&path, "expected \"tcp\", \"tls\" or \"http\""),
                })
            }
            "interval" => def.interval_ms = duration(value, &path, 100..=MAX_DURATION_MS)?,
            "timeout" => timeout = Some(duration(value, &path, 1..=MAX_DURATION_MS)?),
            "rise" => def.rise = integer(value, &path, 1..=MAX_RISE_FALL)?,
            "fall" => def.fall = integer(value, &path, 1..=MAX_RISE_FALL)?,
            "port" => def.port = Some(integer(value, &path, 1..=65535)? as u16),
            "sni" | "host" => {
                let name = string(value, &path)?;
                let ok = ServerName::parse(name.as_bytes())
                    .is_some_and(|n| n.as_str() == name.to_ascii_lowercase());
                if !ok {
                    return fail(&path, format!("\"{name}\" is not a host name"));
                }
                def.name = Some(name.to_ascii_lowercase());
            }
            "path" => {
                let p = string(value, &path)?;
                if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return fail(&path, "expected an absolute path without spaces, up to 1024 bytes");
                }
                def.path = p.into();
            }
            "expect" => {
                let items: Vec<&Json> = match value {
                    Json::Array(items) if !items.is_empty() => items.iter().collect(),
                    Json::Array(_) => return fail(&path, "expected at least one status class"),
                    other => vec![other],
                };
                def.expect = 0;
                for item in items {
                    match string(item, &path)?.as_bytes() {
                        [c @ b'1'..=b'5', b'x', b'x'] => def.expect |= 1 << (c - b'0'),
                        _ => return fail(&path, "expected status classes such as \"2xx\" or [\"2xx\", \"3xx\"]"),
                    }
                }
            }
            "proxy_protocol" => {
                def.proxy_protocol = match value {
                    Json::Bool(false) => None,
                    Json::String(v) if v == "v1" => Some(ProxyProtocol::V1),
                    Json::String(v) if v == "v2" => Some(ProxyProtocol::V2),
                    _ => return fail(&path, "expected \"v1\", \"v2\" or false"),
                }
            }
            _ => {
                return fail(
                    &path,
                    "unknown field (expected type, interval, timeout, rise, fall, port, sni, host, path, expect or proxy_protocol)",
                )
            }
        }
    }
    def.kind = kind.ok_or_else(|| SchemaError {
        path: path.to_string(),
        message: "a check needs a type (tcp, tls or http)".into(),
    })?;
    // Unset, the timeout is 1s, or the interval if that is shorter.
    def.timeout_ms = timeout.unwrap_or(def.timeout_ms.min(def.interval_ms));
    if def.timeout_ms > def.interval_ms {
        return fail(
            &JsonPath::Key(path, "timeout"),
            "must not be longer than the interval",
        );
    }
    Ok(def)
}

fn server_list(value: &Json, path: &JsonPath) -> Result<Vec<ServerDef>, SchemaError> {
    let Json::Array(items) = value else {
        return fail(path, format!("expected an array, found {}", value.kind()));
    };
    if items.is_empty() || items.len() > MAX_SERVERS {
        return fail(path, format!("expected 1 to {MAX_SERVERS} servers"));
    }
    let mut servers: Vec<ServerDef> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = JsonPath::Index(path, i);
        let server = server(item, &path)?;
        if servers
            .iter()
            .any(|s| s.ip == server.ip && s.port == server.port)
        {
            return fail(&path, "duplicate server address");
        }
        servers.push(server);
    }
    if servers.iter().all(|s| s.backup) {
        return fail(path, "every server is a backup");
    }
    Ok(servers)
}

fn server(value: &Json, path: &JsonPath) -> Result<ServerDef, SchemaError> {
    let mut server = ServerDef {
        ip: IpAddr::from([0, 0, 0, 0]),
        port: None,
        weight: 1,
        backup: false,
        draining: false,
    };
    let address = match value {
        Json::String(address) => address,
        Json::Object(entries) => {
            let mut address = None;
            for (key, value) in entries {
                let path = JsonPath::Key(path, key);
                match key.as_str() {
                    "address" => address = Some(string(value, &path)?),
                    "weight" => server.weight = integer(value, &path, 1..=MAX_WEIGHT)?,
                    "backup" => match value {
                        Json::Bool(b) => server.backup = *b,
                        _ => return fail(&path, "expected true or false"),
                    },
                    _ => return fail(&path, "unknown field (expected address, weight or backup)"),
                }
            }
            address.ok_or_else(|| SchemaError {
                path: path.to_string(),
                message: "a server needs an address".into(),
            })?
        }
        other => {
            return fail(
                path,
                format!(
                    "expected an address string or an object, found {}",
                    other.kind()
                ),
            )
        }
    };
    (server.ip, server.port) = parse_address(address).ok_or_else(|| SchemaError {
        path: path.to_string(),
        message: format!(
            "\"{address}\" is not an IP address with an optional port (IPv6 as [addr]:port)"
        ),
    })?;
    Ok(server)
}

/// `10.0.0.1`, `10.0.0.1:8443`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:8443`.
/// Host names are refused: resolving them would block the event loop (use `nginx_upstream`).
pub fn parse_address(text: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some((ip, None));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| (IpAddr::V6(ip), None));
    }
    let addr: SocketAddr = text.parse().ok()?;
    (addr.port() != 0).then_some((addr.ip(), Some(addr.port())))
}

fn routes(value: &Json, path: &JsonPath) -> Result<Vec<(RouteKey, Targets)>, SchemaError> {
    let entries = object(value, path)?;
    if entries.len() > MAX_ROUTES {
        return fail(path, format!("more than {MAX_ROUTES} routes"));
    }
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    entries
        .iter()
        .map(|(key, value)| {
            let path = JsonPath::Key(path, key);
            let key = route_key(key, &path)?;
            if !seen.insert(key.clone()) {
                return fail(
                    &path,
                    format!("duplicate route (\"{key}\" once lower-cased)"),
                );
            }
            Ok((key, targets(value, &path)?))
        })
        .collect()
}

/// A route key as route files write it (`name` or `*.suffix`), checked and lower-cased.
pub fn parse_route_key(key: &str) -> Option<RouteKey> {
    route_key(key, &JsonPath::Root).ok()
}

/// Whether `name` may name an upstream in a route file.
pub fn is_upstream_name(name: &str) -> bool {
    check_upstream_name(name, &JsonPath::Root).is_ok()
}

fn route_key(key: &str, path: &JsonPath) -> Result<RouteKey, SchemaError> {
    let (wildcard, name) = match key.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, key),
    };
    let valid = name.len() <= MAX_ROUTE_NAME
        && !name.ends_with('.')
        && !name.starts_with('[')
        && ServerName::parse(name.as_bytes()).is_some();
    if !valid {
        return fail(
            path,
            format!(
                "a route is a host name (labels of [A-Za-z0-9_-], at most {MAX_LABEL_LEN} bytes each, \
                 {MAX_ROUTE_NAME} in all) or *. followed by one"
            ),
        );
    }
    let name = name.to_ascii_lowercase();
    Ok(if wildcard {
        RouteKey::Wildcard(name)
    } else {
        RouteKey::Exact(name)
    })
}

fn targets(value: &Json, path: &JsonPath) -> Result<Targets, SchemaError> {
    match value {
        Json::String(name) => {
            check_upstream_name(name, path)?;
            Ok(Targets {
                tls: Some(name.clone()),
                http: Some(name.clone()),
                limits: None,
            })
        }
        Json::Object(entries) => {
            let mut t = Targets::default();
            let mut both = None;
            for (key, value) in entries {
                let path = JsonPath::Key(path, key);
                let slot = match key.as_str() {
                    "tls" => &mut t.tls,
                    "http" => &mut t.http,
                    "upstream" => &mut both,
                    "limits" => {
                        t.limits = Some(Box::new(limits_of(value, &path)?));
                        continue;
                    }
                    _ => {
                        return fail(
                            &path,
                            "unknown field (expected upstream, tls, http or limits)",
                        )
                    }
                };
                let name = string(value, &path)?;
                check_upstream_name(name, &path)?;
                *slot = Some(name.to_owned());
            }
            if let Some(name) = both {
                if t.tls.is_some() || t.http.is_some() {
                    return fail(
                        &JsonPath::Key(path, "upstream"),
                        "names the upstream of both protocols: not with tls or http",
                    );
                }
                t.tls = Some(name.clone());
                t.http = Some(name);
            }
            if t.tls.is_none() && t.http.is_none() {
                return fail(path, "names no upstream (expected upstream, tls, http or both)");
            }
            Ok(t)
        }
        other => fail(
            path,
            format!(
                "expected an upstream name or {{\"upstream\": .., \"limits\": ..}} or {{\"tls\": .., \"http\": ..}}, found {}",
                other.kind()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Result<Document, String> {
        let json: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Document::from_json(&json).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_the_design_example() {
        let d = doc(r#"{
          "version": 1,
          "upstreams": {
            "rancher": { "servers": ["192.168.0.1", "192.168.0.2:8443", "[2001:db8::1]:443", "2001:db8::2"] },
            "hetzner": { "servers": [ { "address": "203.0.113.7", "weight": 2 },
                                      { "address": "203.0.113.8:8443", "backup": true } ] },
            "local":   { "nginx_upstream": "local_vhosts" }
          },
          "routes": {
            "Rancher.Example.com": "rancher",
            "*.apps.example.com":  "hetzner",
            "argocd.example.com":  { "tls": "hetzner" }
          },
          "default": "local"
        }"#)
        .unwrap();
        assert_eq!(d.upstreams.len(), 3);
        let UpstreamKind::Servers(ref servers) = d.upstreams[0].kind else {
            panic!()
        };
        assert_eq!(servers[0].port, None);
        assert_eq!(servers[1].port, Some(8443));
        assert_eq!(servers[2].ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(servers[3].port, None);
        let UpstreamKind::Servers(ref servers) = d.upstreams[1].kind else {
            panic!()
        };
        assert_eq!((servers[0].weight, servers[1].backup), (2, true));
        assert_eq!(
            d.upstreams[2].kind,
            UpstreamKind::Nginx("local_vhosts".into())
        );
        assert_eq!(d.routes[0].0, RouteKey::Exact("rancher.example.com".into()));
        assert_eq!(d.routes[1].0, RouteKey::Wildcard("apps.example.com".into()));
        assert_eq!(
            d.routes[2].1,
            Targets {
                tls: Some("hetzner".into()),
                http: None,
                limits: None,
            }
        );
        assert_eq!(d.default.unwrap().http.as_deref(), Some("local"));
    }

    #[test]
    fn errors_give_the_json_path() {
        let cases = [
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1", "10.0.0.2", "nope"]}}}"#,
                "upstreams.u.servers[2]: \"nope\" is not an IP address",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1", "10.0.0.1"]}}}"#,
                "upstreams.u.servers[1]: duplicate server address",
            ),
            (
                r#"{"upstreams": {"u": {"servers": [{"address": "10.0.0.1", "weight": 0}]}}}"#,
                "upstreams.u.servers[0].weight: expected an integer from 1 to 1000",
            ),
            (
                r#"{"upstreams": {"u": {"servers": [{"adress": "10.0.0.1"}]}}}"#,
                "upstreams.u.servers[0].adress: unknown field",
            ),
            (
                r#"{"upstreams": {"u": {"servers": []}}}"#,
                "upstreams.u.servers: expected 1 to 256 servers",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1:0"]}}}"#,
                "upstreams.u.servers[0]:",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["example.com:80"]}}}"#,
                "upstreams.u.servers[0]:",
            ),
            (
                r#"{"upstreams": {"u": {"servers": [{"address": "10.0.0.1", "backup": true}]}}}"#,
                "upstreams.u.servers: every server is a backup",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "nginx_upstream": "x"}}}"#,
                "upstreams.u: servers, nginx_upstream and discover exclude each other",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "discover": {"source": "a", "nodes": {}}}}}"#,
                "upstreams.u: servers, nginx_upstream and discover exclude each other",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"nodes": {}}}}}"#,
                "upstreams.u.discover: needs source",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a"}}}}"#,
                "upstreams.u.discover: needs nodes, service or nodeport",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a b", "nodes": {}}}}}"#,
                "upstreams.u.discover.source: the name= of an edge_routes_url",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "nodes": {"selector": "zone in (a)"}}}}}"#,
                "upstreams.u.discover.nodes.selector: a label selector: \"zone in (a)\": only key",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "nodes": {"label": "x"}}}}}"#,
                "upstreams.u.discover.nodes.label: unknown field (expected selector)",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "service": "xy"}}}}"#,
                "upstreams.u.discover.service: expected \"namespace/name\" of a Service",
            ),
            (
                r#"{"upstreams": {"u": {}}}"#,
                "upstreams.u: needs servers, nginx_upstream or discover",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "nodes": {}, "service": "x/y"}}}}"#,
                "upstreams.u.discover: nodes, service and nodeport exclude each other",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "nodes": {}, "port": 443}}}}"#,
                "upstreams.u.discover: address and port go with service",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "service": "x/y", "address": "host"}}}}"#,
                "upstreams.u.discover.address: expected \"pod\" or \"node\"",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "service": "x/y", "port": 0}}}}"#,
                "upstreams.u.discover.port: expected an integer from 1 to 65535",
            ),
            (
                r#"{"upstreams": {"u": {"discover": {"source": "a", "service": "Kube/y"}}}}"#,
                "upstreams.u.discover.service: expected \"namespace/name\"",
            ),
            (
                r#"{"upstreams": {"u w": {"nginx_upstream": "x"}}}"#,
                "upstreams[\"u w\"]: an upstream name",
            ),
            (
                r#"{"routes": {"a.example.com": 3}}"#,
                "routes[\"a.example.com\"]: expected an upstream name",
            ),
            (
                r#"{"routes": {"a.example.com": {"tls": "u", "ftp": "u"}}}"#,
                "routes[\"a.example.com\"].ftp: unknown field",
            ),
            (
                r#"{"routes": {"a.example.com": {}}}"#,
                "routes[\"a.example.com\"]: names no upstream",
            ),
            (
                r#"{"routes": {"A.example.com": "u", "a.example.com": "u"}}"#,
                "routes[\"a.example.com\"]: duplicate route",
            ),
            (
                r#"{"routes": {"a/b": "u"}}"#,
                "routes[\"a/b\"]: a route is a host name",
            ),
            (
                r#"{"routes": {"*": "u"}}"#,
                "routes[\"*\"]: a route is a host name",
            ),
            (
                r#"{"routes": {"a.*.com": "u"}}"#,
                "routes[\"a.*.com\"]: a route is a host name",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "balance": "random"}}}"#,
                "upstreams.u.balance: expected \"round_robin\"",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "fail_timeout": "5 s"}}}"#,
                "upstreams.u.fail_timeout: expected a duration",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "max_fails": -1}}}"#,
                "upstreams.u.max_fails: expected an integer from 0 to 1000",
            ),
            (
                r#"{"upstreams": {"u": {"nginx_upstream": "x", "max_fails": 2}}}"#,
                "upstreams.u.max_fails: applies to servers only",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"interval": "1s"}}}}"#,
                "upstreams.u.check: a check needs a type",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "udp"}}}}"#,
                "upstreams.u.check.type: expected \"tcp\"",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "tcp", "interval": "50ms"}}}}"#,
                "upstreams.u.check.interval: expected a duration from 100ms",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "tcp", "interval": "1s", "timeout": "2s"}}}}"#,
                "upstreams.u.check.timeout: must not be longer than the interval",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "http", "expect": ["2xx", "600"]}}}}"#,
                "upstreams.u.check.expect: expected status classes",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "http", "path": "no-slash"}}}}"#,
                "upstreams.u.check.path: expected an absolute path",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "tls", "sni": "a b"}}}}"#,
                "upstreams.u.check.sni: \"a b\" is not a host name",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "check": {"type": "tls", "proxy_protocol": "v3"}}}}"#,
                "upstreams.u.check.proxy_protocol: expected \"v1\", \"v2\" or false",
            ),
            (
                r#"{"upstreams": {"u": {"servers": ["10.0.0.1"], "start": "down"}}}"#,
                "upstreams.u.start: \"down\" needs a check",
            ),
            (r#"{"version": 2}"#, "version: only version 1 is known"),
            (r#"{"upstream": {}}"#, "upstream: unknown field"),
            (r#"[]"#, "(top level): expected an object, found an array"),
        ];
        for (text, want) in cases {
            let err = doc(text).unwrap_err();
            assert!(
                err.starts_with(want),
                "{text}\n  got:  {err}\n  want: {want}"
            );
        }
    }

    #[test]
    fn reads_balancing_and_checks() {
        let d = doc(r#"{"upstreams": {
            "rancher": {
              "servers": ["192.168.0.1", "192.168.0.2", "192.168.0.3"],
              "balance": "least_conn",
              "max_fails": 3, "fail_timeout": "5s",
              "check": { "type": "tcp", "interval": "2s", "timeout": "1s", "rise": 2, "fall": 3,
                         "proxy_protocol": "v2" }
            },
            "web": {
              "servers": ["10.0.0.1:8080"], "balance": "hash", "start": "down",
              "check": { "type": "http", "path": "/healthz", "host": "Web.Example.com",
                         "expect": ["2xx"], "interval": 1, "port": 8081 }
            },
            "plain": { "servers": ["10.0.0.2"] }
        }}"#)
        .unwrap();
        let p = &d.upstreams[0].policy;
        assert_eq!(
            (p.balance, p.max_fails, p.fail_timeout_ms),
            (Balance::LeastConn, 3, 5000)
        );
        let c = p.check.as_ref().unwrap();
        assert_eq!(
            (c.kind, c.interval_ms, c.timeout_ms, c.rise, c.fall),
            (CheckKind::Tcp, 2000, 1000, 2, 3)
        );
        assert_eq!(c.default_port(), 443);
        assert_eq!(c.proxy_protocol, Some(ProxyProtocol::V2));
        let p = &d.upstreams[1].policy;
        assert!(p.start_down);
        let c = p.check.as_ref().unwrap();
        assert_eq!(c.path, "/healthz");
        assert_eq!(c.proxy_protocol, None);
        assert_eq!(c.name.as_deref(), Some("web.example.com"));
        assert_eq!(
            (c.expect, c.interval_ms, c.default_port()),
            (0b100, 1000, 8081)
        );
        assert_eq!(d.upstreams[2].policy, Policy::default());
        assert_eq!(Policy::default().max_fails, 1);
        assert_eq!(Policy::default().fail_timeout_ms, 10_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Some(2000));
        assert_eq!(parse_duration("250ms"), Some(250));
        assert_eq!(parse_duration("3"), Some(3000));
        assert_eq!(parse_duration("1m"), Some(60_000));
        assert_eq!(parse_duration("1h"), Some(3_600_000));
        for bad in ["", "s", "1.5s", "-1s", "1d", "1 s", "9999999999s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("10.1.2.3"),
            Some(("10.1.2.3".parse().unwrap(), None))
        );
        assert_eq!(
            parse_address("10.1.2.3:443"),
            Some(("10.1.2.3".parse().unwrap(), Some(443)))
        );
        assert_eq!(parse_address("[::1]"), Some(("::1".parse().unwrap(), None)));
        assert_eq!(
            parse_address("[::1]:80"),
            Some(("::1".parse().unwrap(), Some(80)))
        );
        for bad in [
            "",
            "10.1.2",
            "10.1.2.3:",
            "10.1.2.3:65536",
            "localhost:80",
            "::1:80:x",
            "[::1",
        ] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }
}
