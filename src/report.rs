//! What `edge_status` answers: the route sources and every server's health, as JSON or as
//! Prometheus text. Pure: the caller gathers the sources, the zone figures and the clocks.

use std::collections::HashSet;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::balance::Pool;
use crate::health::{Outcome, View};
use crate::routes::table::{Backend, RouteTable};
pub use crate::upstream::peer_name;
use crate::upstream::{Balance, CheckKind, ServerDef};

pub struct SourceInfo<'a> {
    pub path: &'a str,
    pub generation: u64,
    pub loaded_at: Option<SystemTime>,
    pub last_error: Option<&'a str>,
    pub table: &'a RouteTable,
}

pub struct ZoneInfo<'a> {
    pub name: &'a str,
    pub capacity: usize,
    pub used: usize,
}

/// Both clocks read at the same moment: records keep monotonic times, reports give Unix ones.
#[derive(Clone, Copy)]
pub struct Clock {
    pub monotonic_ms: u64,
    pub wall: SystemTime,
}

impl Clock {
    fn unix(&self, monotonic_ms: u64) -> f64 {
        let wall = self.wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ago = self.monotonic_ms.saturating_sub(monotonic_ms);
        (wall.as_millis() as f64 - ago as f64) / 1000.0
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as f64 / 1000.0
}

/// A server as the route file lists it: `10.0.0.1`, `10.0.0.1:443`, `[2001:db8::1]:443`.
pub fn address(s: &ServerDef) -> String {
    match s.port {
        None => s.host(),
        Some(port) => format!("{}:{port}", s.host()),
    }
}

fn balance(b: Balance) -> &'static str {
    match b {
        Balance::RoundRobin => "round_robin",
        Balance::LeastConn => "least_conn",
        Balance::Hash => "hash",
    }
}

pub fn check_kind(k: CheckKind) -> &'static str {
    match k {
        CheckKind::Tcp => "tcp",
        CheckKind::Tls => "tls",
        CheckKind::Http => "http",
    }
}

fn state(v: &View, s: &ServerDef) -> &'static str {
    match (s.draining, v.down, v.checking) {
        (true, _, _) => "draining",
        (false, _, true) => "checking",
        (false, true, false) => "down",
        (false, false, false) => "up",
    }
}

/// Every `servers` upstream once, the first source defining a name winning.
fn pools<'a>(sources: &'a [SourceInfo<'a>]) -> Vec<(&'a str, &'a str, &'a Pool)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for source in sources {
        for upstream in source.table.upstreams() {
            if let Backend::Servers(pool) = &upstream.kind {
                if seen.insert(&*upstream.name) {
                    out.push((source.path, &*upstream.name, &**pool));
                }
            }
        }
    }
    out
}

/// `urls`: the state of each URL source, as the worker that fetches it last wrote it.
pub fn json(
    sources: &[SourceInfo],
    urls: &[Value],
    zone: Option<ZoneInfo>,
    clock: Clock,
) -> String {
    let sources_json: Vec<Value> = sources
        .iter()
        .map(|s| {
            json!({
                "path": s.path,
                "generation": s.generation,
                "loaded_at": s.loaded_at.map(unix),
                "routes": s.table.route_count(),
                "upstreams": s.table.upstreams().len(),
                "image_bytes": s.table.image().bytes().len(),
                "last_error": s.last_error,
            })
        })
        .collect();
    let mut upstreams = Map::new();
    for (source, name, pool) in pools(sources) {
        let servers: Vec<Value> = pool
            .servers()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = pool.health(i).view(clock.monotonic_ms);
                let last_check = (v.last_outcome != Outcome::None).then(|| {
                    json!({"result": v.last_outcome.as_str(), "at": clock.unix(v.last_check_ms)})
                });
                json!({
                    "address": address(s),
                    "weight": s.weight,
                    "backup": s.backup,
                    "state": state(&v, s),
                    "draining": s.draining,
                    "down": v.down,
                    "why": v.why.as_str(),
                    "fails": v.fails,
                    "active": v.conns,
                    "total": v.total,
                    "last_check": last_check,
                    "shared": pool.is_shared(i),
                })
            })
            .collect();
        let policy = pool.policy();
        upstreams.insert(
            name.to_owned(),
            json!({
                "source": source,
                "balance": balance(policy.balance),
                "max_fails": policy.max_fails,
                "fail_timeout_ms": policy.fail_timeout_ms,
                "check": policy.check.as_ref().map(|c| json!({
                    "type": check_kind(c.kind),
                    "interval_ms": c.interval_ms,
                    "timeout_ms": c.timeout_ms,
                    "rise": c.rise,
                    "fall": c.fall,
                    "name": pool.check_name(),
                })),
                "servers": servers,
            }),
        );
    }
    let zone = zone.map(|z| json!({"name": z.name, "capacity": z.capacity, "used": z.used}));
    let mut text = serde_json::to_string_pretty(&json!({
        "module": "nginx-edge",
        "version": env!("CARGO_PKG_VERSION"),
        "zone": zone,
        "sources": sources_json,
        "urls": urls,
        "upstreams": upstreams,
    }))
    .unwrap_or_default();
    text.push('\n');
    text
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    samples: Vec<(String, String)>,
}

pub fn prometheus(
    sources: &[SourceInfo],
    urls: &[Value],
    zone: Option<ZoneInfo>,
    clock: Clock,
) -> String {
    let mut families: Vec<Family> = Vec::new();
    let mut family = |name, kind, help, samples| {
        families.push(Family {
            name,
            kind,
            help,
            samples,
        })
    };
    let per_source = |f: &dyn Fn(&SourceInfo) -> Option<String>| {
        sources
            .iter()
            .filter_map(|s| Some((format!("source=\"{}\"", label(s.path)), f(s)?)))
            .collect::<Vec<_>>()
    };
    family(
        "nginx_edge_routes_generation",
        "gauge",
        "Route tables this worker has loaded from the source, the first included.",
        per_source(&|s| Some(s.generation.to_string())),
    );
    family(
        "nginx_edge_routes_loaded_timestamp_seconds",
        "gauge",
        "When the serving route table was loaded.",
        per_source(&|s| s.loaded_at.map(|t| format!("{:.3}", unix(t)))),
    );
    family(
        "nginx_edge_routes",
        "gauge",
        "Routes in the serving table.",
        per_source(&|s| Some(s.table.route_count().to_string())),
    );
    family(
        "nginx_edge_routes_last_load_failed",
        "gauge",
        "1 if a change to the source was rejected since nginx started (see last_error in the JSON).",
        per_source(&|s| Some(u8::from(s.last_error.is_some()).to_string())),
    );

    let per_url = |f: &dyn Fn(&Value) -> Option<String>| {
        urls.iter()
            .filter_map(|u| {
                let name = u["name"].as_str()?;
                Some((format!("source=\"{}\"", label(name)), f(u)?))
            })
            .collect::<Vec<_>>()
    };
    family(
        "nginx_edge_url_up",
        "gauge",
        "1 if the URL source is watched or polled without error, 0 while it fails (the last good table serves).",
        per_url(&|u| {
            let ok = matches!(u["state"].as_str(), Some("watching" | "polling"))
                && u["resources"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|r| r["error"].is_null()));
            Some(u8::from(ok).to_string())
        }),
    );
    family(
        "nginx_edge_url_objects",
        "gauge",
        "Kubernetes objects read from the URL source.",
        per_url(&|u| u["objects"].as_u64().map(|n| n.to_string())),
    );
    family(
        "nginx_edge_url_routes",
        "gauge",
        "Routes the URL source gives.",
        per_url(&|u| u["routes"].as_u64().map(|n| n.to_string())),
    );
    family(
        "nginx_edge_url_last_success_timestamp_seconds",
        "gauge",
        "When the URL source last answered well.",
        per_url(&|u| u["last_success"].as_f64().map(|t| format!("{t:.3}"))),
    );

    let pools = pools(sources);
    let per_server = |f: &dyn Fn(&View, &ServerDef) -> Option<String>| {
        let mut out = Vec::new();
        for (_, name, pool) in &pools {
            for (i, s) in pool.servers().iter().enumerate() {
                let v = pool.health(i).view(clock.monotonic_ms);
                if let Some(value) = f(&v, s) {
                    let labels = format!(
                        "upstream=\"{}\",server=\"{}\"",
                        label(name),
                        label(&address(s))
                    );
                    out.push((labels, value));
                }
            }
        }
        out
    };
    family(
        "nginx_edge_server_up",
        "gauge",
        "1 if the server takes new connections, 0 if it is down (passive or active check).",
        per_server(&|v, _| Some(u8::from(!v.down).to_string())),
    );
    family(
        "nginx_edge_server_draining",
        "gauge",
        "1 while the server takes no new connection and its open ones continue (a cluster's node cordoned or about to be deleted).",
        per_server(&|_, s| Some(u8::from(s.draining).to_string())),
    );
    family(
        "nginx_edge_server_checking",
        "gauge",
        "1 while an active check is between states (rising or falling).",
        per_server(&|v, _| Some(u8::from(v.checking).to_string())),
    );
    family(
        "nginx_edge_server_fails",
        "gauge",
        "Connect failures in the current fail_timeout window.",
        per_server(&|v, _| Some(v.fails.to_string())),
    );
    family(
        "nginx_edge_server_active_connections",
        "gauge",
        "Connections open to the server, all workers together.",
        per_server(&|v, _| Some(v.conns.to_string())),
    );
    family(
        "nginx_edge_server_connections_total",
        "counter",
        "Connections sent to the server since its record was made.",
        per_server(&|v, _| Some(v.total.to_string())),
    );
    family(
        "nginx_edge_server_last_check_ok",
        "gauge",
        "1 if the last active check passed.",
        per_server(&|v, _| {
            (v.last_outcome != Outcome::None)
                .then(|| u8::from(v.last_outcome == Outcome::Ok).to_string())
        }),
    );
    family(
        "nginx_edge_server_last_check_timestamp_seconds",
        "gauge",
        "When the last active check ended.",
        per_server(&|v, _| {
            (v.last_outcome != Outcome::None).then(|| format!("{:.3}", clock.unix(v.last_check_ms)))
        }),
    );
    if let Some(z) = zone {
        let l = format!("zone=\"{}\"", label(z.name));
        family(
            "nginx_edge_zone_records",
            "gauge",
            "Health records in use in the edge_zone.",
            vec![(l.clone(), z.used.to_string())],
        );
        family(
            "nginx_edge_zone_capacity_records",
            "gauge",
            "Health records the edge_zone can hold.",
            vec![(l, z.capacity.to_string())],
        );
    }

    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in f.samples {
            let _ = writeln!(out, "{}{{{}}} {}", f.name, labels, value);
        }
    }
    out
}

/// The request line of a status request: `Some(path)` once the head is complete.
pub enum Request<'a> {
    Incomplete,
    Get(&'a str),
    /// Not a GET, or not HTTP: answered 400 or 405.
    Bad(u16),
}

pub fn parse_request(buf: &[u8]) -> Request<'_> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Request::Incomplete,
        Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
            (Some("GET"), Some(path)) => Request::Get(path),
            _ => Request::Bad(405),
        },
        Err(_) => Request::Bad(400),
    }
}

/// The full response to a status request.
pub fn respond(
    path: &str,
    sources: &[SourceInfo],
    urls: &[Value],
    zone: Option<ZoneInfo>,
    clock: Clock,
) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or(path);
    let (status, kind, body) = match path {
        "/" | "/status" => (
            "200 OK",
            "application/json",
            json(sources, urls, zone, clock),
        ),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(sources, urls, zone, clock),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /status or /metrics\n".into(),
        ),
    };
    http_response(status, kind, &body)
}

pub fn http_response(status: &str, kind: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::document::Document;
    use crate::routes::json::Json;

    fn table(text: &str) -> RouteTable {
        let json: Json = serde_json::from_str(text).unwrap();
        let doc = Document::from_json(&json).unwrap();
        RouteTable::merge(&[&doc], &|_| true).unwrap().0
    }

    const TABLE: &str = r#"{
        "upstreams": {
          "a": {"servers": ["10.0.0.1:443", {"address": "[2001:db8::1]", "backup": true}],
                "check": {"type": "tcp"}},
          "b": {"servers": ["10.0.0.2"], "balance": "hash"},
          "n": {"nginx_upstream": "x"}
        },
        "routes": {"a.example.com": "a", "b.example.com": "b", "n.example.com": "n"}
    }"#;

    fn clock() -> Clock {
        Clock {
            monotonic_ms: 10_000,
            wall: UNIX_EPOCH + std::time::Duration::from_secs(1_000_000),
        }
    }

    #[test]
    fn url_sources_show_in_json_and_metrics() {
        let urls = [
            json!({"name": "cluster-a", "state": "watching", "objects": 12, "routes": 30,
                   "last_success": 999_999.5, "resources": [{"error": null}]}),
            json!({"name": "b\"x", "state": "backoff", "objects": 1, "routes": 2,
                   "last_success": null, "resources": [{"error": "HTTP status 500"}]}),
        ];
        let v: Value = serde_json::from_str(&json(&[], &urls, None, clock())).unwrap();
        assert_eq!(v["urls"][0]["objects"], 12);
        let text = prometheus(&[], &urls, None, clock());
        assert!(
            text.contains("nginx_edge_url_up{source=\"cluster-a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("nginx_edge_url_up{source=\"b\\\"x\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("nginx_edge_url_routes{source=\"cluster-a\"} 30\n"));
        assert!(text.contains(
            "nginx_edge_url_last_success_timestamp_seconds{source=\"cluster-a\"} 999999.500\n"
        ));
        assert!(!text.contains("nginx_edge_url_last_success_timestamp_seconds{source=\"b"));
    }

    #[test]
    fn json_gives_sources_upstreams_and_server_state() {
        let t = table(TABLE);
        let pool = t.upstreams()[0].servers().unwrap();
        pool.health(0).connected(None);
        pool.health(0).checked(9_000, Outcome::Refused, 2, 1);
        let sources = [SourceInfo {
            path: "/etc/edge/routes.json",
            generation: 3,
            loaded_at: Some(UNIX_EPOCH + std::time::Duration::from_secs(999_990)),
            last_error: Some("bad \"thing\""),
            table: &t,
        }];
        let zone = ZoneInfo {
            name: "z",
            capacity: 100,
            used: 3,
        };
        let v: Value = serde_json::from_str(&json(&sources, &[], Some(zone), clock())).unwrap();
        assert_eq!(v["sources"][0]["generation"], 3);
        assert_eq!(v["sources"][0]["loaded_at"], 999_990.0);
        assert_eq!(v["sources"][0]["routes"], 3);
        assert_eq!(v["sources"][0]["last_error"], "bad \"thing\"");
        assert_eq!(v["zone"]["used"], 3);
        let a = &v["upstreams"]["a"];
        assert_eq!(a["check"]["type"], "tcp");
        assert_eq!(a["check"]["name"], Value::Null);
        let s0 = &a["servers"][0];
        assert_eq!(s0["address"], "10.0.0.1:443");
        assert_eq!(s0["state"], "down");
        assert_eq!(s0["why"], "check");
        assert_eq!(s0["active"], 1);
        assert_eq!(s0["total"], 1);
        assert_eq!(s0["last_check"]["result"], "connection refused");
        assert_eq!(s0["last_check"]["at"], 999_999.0);
        assert_eq!(a["servers"][1]["address"], "[2001:db8::1]");
        assert_eq!(a["servers"][1]["state"], "up");
        assert_eq!(a["servers"][1]["last_check"], Value::Null);
        assert_eq!(v["upstreams"]["b"]["balance"], "hash");
        assert!(
            v["upstreams"].get("n").is_none(),
            "nginx upstreams have no servers here"
        );
    }

    #[test]
    fn prometheus_text_is_well_formed() {
        let t = table(TABLE);
        t.upstreams()[1]
            .servers()
            .unwrap()
            .health(0)
            .connected(None);
        let sources = [SourceInfo {
            path: "/a\"b\\c",
            generation: 1,
            loaded_at: None,
            last_error: None,
            table: &t,
        }];
        let text = prometheus(&sources, &[], None, clock());
        let mut typed = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_owned()), "one TYPE per family: {name}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap();
            assert!(name.starts_with("nginx_edge_"), "{line}");
            assert!(typed.contains(name), "TYPE before samples: {line}");
        }
        assert!(text.contains("nginx_edge_routes_generation{source=\"/a\\\"b\\\\c\"} 1\n"));
        assert!(text.contains(
            "nginx_edge_server_connections_total{upstream=\"b\",server=\"10.0.0.2\"} 1\n"
        ));
        assert!(text.contains("nginx_edge_server_up{upstream=\"a\",server=\"10.0.0.1:443\"} 1\n"));
        assert!(
            !text.contains("loaded_timestamp_seconds{"),
            "no sample without a load time"
        );
    }

    #[test]
    fn peer_names_as_core_fmt_writes_them() {
        let mut buf = [0u8; 48];
        let mut x = 0x1234_5678u64;
        for i in 0..20_000u64 {
            x = crate::health::mix(x + i);
            let port = if i < 3 {
                [0, 9, 65535][i as usize]
            } else {
                (x >> 32) as u16
            };
            let addr: std::net::SocketAddr = if i % 2 == 0 {
                ((x as u32).to_be_bytes(), port).into()
            } else {
                (
                    std::net::Ipv6Addr::from(u128::from(x) << 64 | u128::from(i)),
                    port,
                )
                    .into()
            };
            let server = ServerDef {
                ip: addr.ip(),
                port: None,
                weight: 1,
                backup: false,
                draining: false,
            };
            let n = peer_name(&address(&server), port, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn requests_and_paths() {
        assert!(matches!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Request::Incomplete
        ));
        assert!(matches!(
            parse_request(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Request::Get("/metrics")
        ));
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\n\r\n"),
            Request::Bad(405)
        ));
        assert!(matches!(
            parse_request(b"\x16\x03\x01\x00"),
            Request::Bad(400)
        ));
        let t = table(TABLE);
        let sources = [SourceInfo {
            path: "p",
            generation: 1,
            loaded_at: None,
            last_error: None,
            table: &t,
        }];
        let r = respond("/nope", &sources, &[], None, clock());
        assert!(r.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let r = respond("/status?pretty", &sources, &[], None, clock());
        let text = String::from_utf8(r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("application/json"));
    }
}
