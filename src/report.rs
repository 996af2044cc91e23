//! What `edge_status` answers: the route sources and every server's health, as JSON or as
//! Prometheus text. Pure: the caller gathers the sources, the zone figures and the clocks.

use std::collections::HashSet;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

pub mod page;

use crate::balance::Pool;
use crate::health::{Outcome, View};
use crate::routes::table::{Backend, RouteTable};
use crate::traffic::limits::{Refusal, REASONS};
use crate::traffic::{CountersView, RouteView, Snapshot, DECISION_BUCKETS_MS, PROTOCOLS};
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
    traffic: Option<&Snapshot>,
    clock: Clock,
) -> String {
    pretty(&status(sources, urls, zone, traffic, clock))
}

/// What `/status` answers, as a value (the HTML page is made from it too).
pub fn status(
    sources: &[SourceInfo],
    urls: &[Value],
    zone: Option<ZoneInfo>,
    traffic: Option<&Snapshot>,
    clock: Clock,
) -> Value {
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
    json!({
        "module": "nginx-edge",
        "version": env!("CARGO_PKG_VERSION"),
        "zone": zone,
        "sources": sources_json,
        "urls": urls,
        "upstreams": upstreams,
        "routes": traffic.map(|t| routes_json(t, STATUS_ROUTES, clock)),
        "unrouted": traffic.map(|t| unrouted_json(t, clock)),
    })
}

fn pretty(v: &Value) -> String {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    text
}

/// Routes `/status` lists, busiest first; `/routes` lists `ROUTES_DEFAULT` unless asked
/// `?top=N`.
pub const STATUS_ROUTES: usize = 100;
pub const ROUTES_DEFAULT: usize = 1000;
/// The most `/routes?top=N` lists: an answer of about 5 MB.
pub const ROUTES_MAX: usize = 10_000;
/// An unrouted name gets a series of its own once it surely had this many connections
/// (its count less its error): a scanner's random names never do.
pub const METRICS_UNROUTED_MIN: u64 = 5;
/// Routes with series of their own in `/metrics`, busiest first.
pub const METRICS_ROUTES: usize = 100;
/// Unrouted names per protocol with a series of their own in `/metrics`.
pub const METRICS_UNROUTED: usize = 20;

const PROTOCOL_NAMES: [&str; PROTOCOLS] = ["tls", "http"];

/// The per-route counters: the `top` busiest routes.
pub fn routes_json(t: &Snapshot, top: usize, clock: Clock) -> Value {
    let routes: Vec<Value> = t
        .routes
        .iter()
        .take(top)
        .map(|r| {
            let mut v = json!({
                "route": r.route,
                "match": r.kind.as_str(),
                "first_seen": clock.unix(r.first_ms),
                "last_seen": clock.unix(r.last_ms),
            });
            for (p, name) in PROTOCOL_NAMES.iter().enumerate() {
                let c = &r.by_protocol[p];
                if c.connections == 0 && c.refused.iter().all(|&n| n == 0) {
                    continue;
                }
                v[*name] = json!({
                    "connections": c.connections,
                    "active": c.active,
                    "bytes_received": c.received,
                    "bytes_sent": c.sent,
                    "no_server": c.no_server,
                    "failed": c.failed,
                    "decision_ms_avg": c.decision_ms as f64 / c.connections.max(1) as f64,
                    "refused": refusals(&c.refused),
                });
            }
            v
        })
        .collect();
    json!({
        "capacity": t.capacity,
        "tracked": t.tracked,
        "evicted": t.evicted,
        "untracked_connections": t.untracked,
        "refused": {
            "tls": refusals(&t.refused[0]),
            "http": refusals(&t.refused[1]),
        },
        "limits_not_applied": t.unlimited,
        "clients": {
            "capacity": t.clients_capacity,
            "in_use": t.clients_used,
            "refused_full": t.clients_full,
        },
        "routes": routes,
    })
}

/// Refusals by reason: `{"denied": 0, "max_conns": 3, ...}`.
fn refusals(counts: &[u64; REASONS]) -> Value {
    Value::Object(
        Refusal::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), json!(counts[*r as usize])))
            .collect(),
    )
}

/// The names nobody routes, per protocol, and the connections without a name.
pub fn unrouted_json(t: &Snapshot, clock: Clock) -> Value {
    let mut out = Map::new();
    for (p, name) in PROTOCOL_NAMES.iter().enumerate() {
        let names: Vec<Value> = t.unrouted[p]
            .iter()
            .map(|h| {
                json!({
                    "name": h.name,
                    "connections": h.count,
                    "error": h.error,
                    "closed": h.closed,
                    "first_seen": h.first_s,
                    "last_seen": h.last_s,
                    "client": h.client.to_string(),
                })
            })
            .collect();
        out.insert(
            (*name).into(),
            json!({
                "defaulted": t.defaulted[p],
                "closed": t.closed[p],
                "names": names,
            }),
        );
    }
    let nameless: Map<String, Value> = t
        .nameless
        .iter()
        .map(|(k, n)| (k.as_str().to_owned(), json!(n)))
        .collect();
    out.insert("without_name".into(), Value::Object(nameless));
    out.insert("names_not_counted".into(), json!(t.sampled_out));
    let _ = clock;
    Value::Object(out)
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
    traffic: Option<&Snapshot>,
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

    if let Some(t) = traffic {
        // The busiest routes, and those whose connections fail (a small route that fails must
        // still reach an alert).
        let mut top: Vec<&RouteView> = t.routes.iter().take(METRICS_ROUTES).collect();
        for r in &t.failing {
            if !top.iter().any(|s| s.kind == r.kind && s.route == r.route) {
                top.push(r);
            }
        }
        let per_route = |f: &dyn Fn(&CountersView) -> u64| {
            let mut out = Vec::new();
            for r in &top {
                for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
                    let c = &r.by_protocol[p];
                    if c.connections > 0 || c.refused.iter().any(|&n| n > 0) {
                        let labels = format!(
                            "route=\"{}\",match=\"{}\",protocol=\"{proto}\"",
                            label(&r.route),
                            r.kind.as_str()
                        );
                        out.push((labels, f(c).to_string()));
                    }
                }
            }
            out
        };
        family(
            "nginx_edge_route_connections_total",
            "counter",
            "Connections the route took, for the busiest routes only (see nginx_edge_routes_tracked).",
            per_route(&|c| c.connections),
        );
        family(
            "nginx_edge_route_active_connections",
            "gauge",
            "Connections of the route open now, all workers together.",
            per_route(&|c| c.active),
        );
        family(
            "nginx_edge_route_received_bytes_total",
            "counter",
            "Bytes received from the clients of the route's closed connections.",
            per_route(&|c| c.received),
        );
        family(
            "nginx_edge_route_sent_bytes_total",
            "counter",
            "Bytes sent to the clients of the route's closed connections.",
            per_route(&|c| c.sent),
        );
        family(
            "nginx_edge_route_no_server_total",
            "counter",
            "Connections of the route whose upstream had no server to give.",
            per_route(&|c| c.no_server),
        );
        family(
            "nginx_edge_route_connect_failed_total",
            "counter",
            "Connections of the route that no server of its upstream accepted.",
            per_route(&|c| c.failed),
        );
        let mut refused = Vec::new();
        for r in &top {
            for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
                for why in Refusal::ALL {
                    let n = r.by_protocol[p].refused[why as usize];
                    if n > 0 {
                        refused.push((
                            format!(
                                "route=\"{}\",match=\"{}\",protocol=\"{proto}\",reason=\"{}\"",
                                label(&r.route),
                                r.kind.as_str(),
                                why.as_str()
                            ),
                            n.to_string(),
                        ));
                    }
                }
            }
        }
        family(
            "nginx_edge_route_refused_total",
            "counter",
            "Connections a limit of the route refused, by reason (busiest routes only).",
            refused,
        );
        let mut all_refused = Vec::new();
        for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
            for why in Refusal::ALL {
                all_refused.push((
                    format!("protocol=\"{proto}\",reason=\"{}\"", why.as_str()),
                    t.refused[p][why as usize].to_string(),
                ));
            }
        }
        family(
            "nginx_edge_refused_connections_total",
            "counter",
            "Connections refused by the limits of their route, all routes together, by reason.",
            all_refused,
        );
        family(
            "nginx_edge_limit_clients",
            "gauge",
            "(route, client) pairs with connections open that max_conns_per_client keeps.",
            vec![(String::new(), t.clients_used.to_string())],
        );
        family(
            "nginx_edge_limit_clients_capacity",
            "gauge",
            "(route, client) pairs edge_counters clients= can keep.",
            vec![(String::new(), t.clients_capacity.to_string())],
        );
        family(
            "nginx_edge_limit_clients_full_total",
            "counter",
            "Connections refused because every (route, client) pair edge_counters keeps was taken.",
            vec![(String::new(), t.clients_full.to_string())],
        );
        family(
            "nginx_edge_limits_not_applied_total",
            "counter",
            "Connections of a limited route refused because no route counter was free for it.",
            vec![(String::new(), t.unlimited.to_string())],
        );
        family(
            "nginx_edge_routes_tracked",
            "gauge",
            "Routes with counters of their own (the busiest of them have series above).",
            vec![(String::new(), t.tracked.to_string())],
        );
        family(
            "nginx_edge_routes_tracked_capacity",
            "gauge",
            "Routes edge_counters can track at once.",
            vec![(String::new(), t.capacity.to_string())],
        );
        family(
            "nginx_edge_route_evictions_total",
            "counter",
            "Route counters dropped to make room for another route (least recently used first).",
            vec![(String::new(), t.evicted.to_string())],
        );
        let mut unrouted = Vec::new();
        for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
            for (outcome, n) in [("default", t.defaulted[p]), ("closed", t.closed[p])] {
                unrouted.push((
                    format!("protocol=\"{proto}\",outcome=\"{outcome}\""),
                    n.to_string(),
                ));
            }
        }
        family(
            "nginx_edge_unrouted_connections_total",
            "counter",
            "Connections whose name no route matched: sent to the default route, or closed.",
            unrouted,
        );
        family(
            "nginx_edge_nameless_connections_total",
            "counter",
            "Connections without a name, by why.",
            t.nameless
                .iter()
                .map(|(k, n)| (format!("kind=\"{}\"", k.as_str()), n.to_string()))
                .collect(),
        );
        let mut names = Vec::new();
        for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
            let sure = t.unrouted[p]
                .iter()
                .filter(|h| h.count - h.error >= METRICS_UNROUTED_MIN);
            for h in sure.take(METRICS_UNROUTED) {
                names.push((
                    format!("protocol=\"{proto}\",name=\"{}\"", label(&h.name)),
                    h.count.to_string(),
                ));
            }
        }
        family(
            "nginx_edge_unrouted_name_connections",
            "gauge",
            "Connections for the most frequent names no route matched, those surely seen 5 times or more (an estimate: over by at most the error in /unrouted).",
            names,
        );
        family(
            "nginx_edge_unrouted_names_not_counted_total",
            "counter",
            "Unrouted connections counted in the totals only: another worker was updating the names.",
            vec![(String::new(), t.sampled_out.to_string())],
        );
    }

    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {}", f.name, value);
            } else {
                let _ = writeln!(out, "{}{{{}}} {}", f.name, labels, value);
            }
        }
    }
    if let Some(t) = traffic {
        histogram(&mut out, t);
    }
    out
}

/// `nginx_edge_routing_decision_seconds`: from accept to the routing decision, per protocol.
fn histogram(out: &mut String, t: &Snapshot) {
    let name = "nginx_edge_routing_decision_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a connection's accept to its routing decision (nginx's cached clock: millisecond steps)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (p, proto) in PROTOCOL_NAMES.iter().enumerate() {
        let mut cumulative = 0;
        for (b, n) in t.decisions[p].iter().enumerate() {
            cumulative += n;
            let le = DECISION_BUCKETS_MS
                .get(b)
                .map_or("+Inf".to_owned(), |ms| format!("{}", *ms as f64 / 1000.0));
            let _ = writeln!(
                out,
                "{name}_bucket{{protocol=\"{proto}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{protocol=\"{proto}\"}} {}",
            t.decision_ms[p] as f64 / 1000.0
        );
        let _ = writeln!(out, "{name}_count{{protocol=\"{proto}\"}} {cumulative}");
    }
}

/// The request line of a status request: `Some(path)` once the head is complete.
pub enum Request<'a> {
    Incomplete,
    /// The path, and whether the client prefers HTML (a browser) to JSON.
    Get(&'a str, bool),
    /// Not a GET, or not HTTP: answered 400 or 405.
    Bad(u16),
}

pub fn parse_request(buf: &[u8]) -> Request<'_> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Request::Incomplete,
        Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
            (Some("GET"), Some(path)) => {
                let accept = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("accept"))
                    .map_or(&b""[..], |h| h.value);
                Request::Get(path, prefers_html(accept))
            }
            _ => Request::Bad(405),
        },
        Err(_) => Request::Bad(400),
    }
}

/// Whether an `Accept` header prefers `text/html` to `application/json`: a browser's does
/// (`text/html,...,*/*;q=0.8`); curl's `*/*` and a script's `application/json` do not.
pub fn prefers_html(accept: &[u8]) -> bool {
    let accept = String::from_utf8_lossy(accept);
    let mut html: Option<f32> = None;
    let mut json: Option<f32> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let kind = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match kind.as_str() {
            "text/html" | "application/xhtml+xml" => html = Some(html.map_or(q, |h| h.max(q))),
            "application/json" => json = Some(json.map_or(q, |j| j.max(q))),
            _ => {}
        }
    }
    match (html, json) {
        (Some(h), Some(j)) => h > 0.0 && h > j,
        (Some(h), None) => h > 0.0,
        _ => false,
    }
}

/// The full response to a status request.
#[allow(clippy::too_many_arguments)]
pub fn respond(
    path: &str,
    html: bool,
    sources: &[SourceInfo],
    urls: &[Value],
    zone: Option<ZoneInfo>,
    traffic: Option<&Snapshot>,
    clock: Clock,
) -> Vec<u8> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    const JSON: &str = "application/json";
    let off = || pretty(&json!({"error": "edge_counters is off"}));
    let (status, kind, body) = match path {
        "/" if html => {
            let v = status(sources, urls, zone, traffic, clock);
            let now = clock.unix(clock.monotonic_ms);
            ("200 OK", "text/html; charset=utf-8", page::render(&v, now))
        }
        "/" | "/status" => ("200 OK", JSON, json(sources, urls, zone, traffic, clock)),
        "/routes" => match (traffic, top(query)) {
            (_, None) => (
                "400 Bad Request",
                "text/plain",
                "top must be a number: /routes?top=N\n".into(),
            ),
            (Some(t), Some(n)) => ("200 OK", JSON, pretty(&routes_json(t, n, clock))),
            (None, Some(_)) => ("404 Not Found", JSON, off()),
        },
        "/unrouted" => match traffic {
            Some(t) => ("200 OK", JSON, pretty(&unrouted_json(t, clock))),
            None => ("404 Not Found", JSON, off()),
        },
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus(sources, urls, zone, traffic, clock),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /status, /routes, /unrouted or /metrics\n".into(),
        ),
    };
    http_response(status, kind, &body)
}

/// `top=N` of a query string (at most `ROUTES_MAX`); `ROUTES_DEFAULT` without it.
fn top(query: &str) -> Option<usize> {
    match query.split('&').find_map(|kv| kv.strip_prefix("top=")) {
        None => Some(ROUTES_DEFAULT),
        Some(n) => n.parse::<usize>().ok().map(|n| n.min(ROUTES_MAX)),
    }
}

/// How many of the busiest routes a request's answer shows.
pub fn routes_wanted(path: &str) -> usize {
    match path.split_once('?') {
        Some(("/routes", query)) => top(query).unwrap_or(0),
        None if path == "/routes" => ROUTES_DEFAULT,
        _ => STATUS_ROUTES.max(METRICS_ROUTES),
    }
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
        let v: Value = serde_json::from_str(&json(&[], &urls, None, None, clock())).unwrap();
        assert_eq!(v["urls"][0]["objects"], 12);
        let text = prometheus(&[], &urls, None, None, clock());
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
        let v: Value =
            serde_json::from_str(&json(&sources, &[], Some(zone), None, clock())).unwrap();
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
        let text = prometheus(&sources, &[], None, None, clock());
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
            Request::Get("/metrics", false)
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
        let r = respond_json("/nope", &sources, &[], None, None, clock());
        assert!(r.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let r = respond_json("/status?pretty", &sources, &[], None, None, clock());
        let text = String::from_utf8(r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("application/json"));
    }

    fn respond_json(
        path: &str,
        sources: &[SourceInfo],
        urls: &[Value],
        zone: Option<ZoneInfo>,
        traffic: Option<&Snapshot>,
        clock: Clock,
    ) -> Vec<u8> {
        respond(path, false, sources, urls, zone, traffic, clock)
    }

    #[test]
    fn browsers_get_html_and_scripts_json() {
        let chromium = b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
        let firefox = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(prefers_html(chromium));
        assert!(prefers_html(firefox));
        assert!(!prefers_html(b"*/*"));
        assert!(!prefers_html(b""));
        assert!(!prefers_html(b"application/json"));
        assert!(!prefers_html(b"application/json, text/html;q=0.5"));
        assert!(!prefers_html(b"text/html;q=0"));
        assert!(prefers_html(b"application/json;q=0.5, text/html"));
        assert!(matches!(
            parse_request(
                format!(
                    "GET / HTTP/1.1\r\nAccept: {}\r\n\r\n",
                    String::from_utf8_lossy(firefox)
                )
                .as_bytes()
            ),
            Request::Get("/", true)
        ));
        let t = table(TABLE);
        let sources = [SourceInfo {
            path: "p",
            generation: 1,
            loaded_at: None,
            last_error: None,
            table: &t,
        }];
        let page =
            String::from_utf8(respond("/", true, &sources, &[], None, None, clock())).unwrap();
        assert!(page.contains("Content-Type: text/html") && page.contains("<!DOCTYPE html>"));
        let status =
            String::from_utf8(respond("/status", true, &sources, &[], None, None, clock()))
                .unwrap();
        assert!(
            status.contains("Content-Type: application/json"),
            "/status stays JSON"
        );
    }

    fn snapshot() -> Snapshot {
        use crate::traffic::{HeavyView, Nameless, RouteKind, RouteView};
        let route = |kind, name: &str, tls: u64, http: u64| RouteView {
            kind,
            route: name.into(),
            first_ms: 1_000,
            last_ms: 2_000,
            by_protocol: [
                CountersView {
                    connections: tls,
                    active: 1,
                    received: 10 * tls,
                    sent: 100 * tls,
                    decision_ms: 3 * tls,
                    ..CountersView::default()
                },
                CountersView {
                    connections: http,
                    failed: http,
                    ..CountersView::default()
                },
            ],
        };
        let mut t = Snapshot {
            capacity: 10,
            tracked: 2,
            evicted: 4,
            routes: vec![
                route(RouteKind::Exact, "shop.test", 5, 0),
                route(RouteKind::Wildcard, "*.apps.test", 2, 1),
            ],
            nameless: vec![(Nameless::NoSni, 3), (Nameless::TimedOut, 1)],
            ..Snapshot::default()
        };
        t.unrouted[0].push(HeavyView {
            name: "typo\"test".into(),
            count: 7,
            error: 1,
            closed: 7,
            first_s: 100,
            last_s: 200,
            client: "192.0.2.1".parse().unwrap(),
        });
        t.closed[0] = 7;
        t.decisions[0][0] = 6;
        t.decisions[0][2] = 1;
        t.decision_ms[0] = 9;
        t
    }

    #[test]
    fn route_counters_in_json_and_metrics() {
        let t = snapshot();
        let v = routes_json(&t, 1, clock());
        assert_eq!(v["tracked"], 2);
        assert_eq!(v["evicted"], 4);
        assert_eq!(v["routes"].as_array().unwrap().len(), 1);
        let shop = &v["routes"][0];
        assert_eq!(shop["route"], "shop.test");
        assert_eq!(shop["match"], "exact");
        assert_eq!(shop["tls"]["bytes_sent"], 500);
        assert_eq!(shop["tls"]["decision_ms_avg"], 3.0);
        assert!(
            shop["http"].is_null(),
            "a protocol without traffic is left out"
        );
        let u = unrouted_json(&t, clock());
        assert_eq!(u["tls"]["closed"], 7);
        assert_eq!(u["tls"]["names"][0]["name"], "typo\"test");
        assert_eq!(u["tls"]["names"][0]["client"], "192.0.2.1");
        assert_eq!(u["without_name"]["no_sni"], 3);

        let text = prometheus(&[], &[], None, Some(&t), clock());
        for line in [
            "nginx_edge_route_connections_total{route=\"shop.test\",match=\"exact\",protocol=\"tls\"} 5",
            "nginx_edge_route_connect_failed_total{route=\"*.apps.test\",match=\"wildcard\",protocol=\"http\"} 1",
            "nginx_edge_routes_tracked 2",
            "nginx_edge_route_evictions_total 4",
            "nginx_edge_unrouted_connections_total{protocol=\"tls\",outcome=\"closed\"} 7",
            "nginx_edge_nameless_connections_total{kind=\"no_sni\"} 3",
            "nginx_edge_unrouted_name_connections{protocol=\"tls\",name=\"typo\\\"test\"} 7",
            "nginx_edge_routing_decision_seconds_bucket{protocol=\"tls\",le=\"0.001\"} 6",
            "nginx_edge_routing_decision_seconds_bucket{protocol=\"tls\",le=\"0.005\"} 6",
            "nginx_edge_routing_decision_seconds_bucket{protocol=\"tls\",le=\"0.01\"} 7",
            "nginx_edge_routing_decision_seconds_bucket{protocol=\"tls\",le=\"+Inf\"} 7",
            "nginx_edge_routing_decision_seconds_sum{protocol=\"tls\"} 0.009",
            "nginx_edge_routing_decision_seconds_count{protocol=\"http\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn how_many_routes_an_answer_shows() {
        assert_eq!(routes_wanted("/routes"), ROUTES_DEFAULT);
        assert_eq!(routes_wanted("/routes?top=5"), 5);
        assert_eq!(routes_wanted("/routes?top=100000000"), ROUTES_MAX);
        assert_eq!(routes_wanted("/routes?top=x"), 0);
        assert_eq!(routes_wanted("/metrics"), METRICS_ROUTES.max(STATUS_ROUTES));
    }

    #[test]
    fn routes_and_unrouted_paths() {
        let t = snapshot();
        let body = |r: Vec<u8>| String::from_utf8(r).unwrap();
        let r = body(respond_json(
            "/routes?top=1",
            &[],
            &[],
            None,
            Some(&t),
            clock(),
        ));
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.contains("shop.test") && !r.contains("apps"));
        let r = body(respond_json(
            "/routes?top=x",
            &[],
            &[],
            None,
            Some(&t),
            clock(),
        ));
        assert!(r.starts_with("HTTP/1.1 400"));
        let r = body(respond_json("/unrouted", &[], &[], None, Some(&t), clock()));
        assert!(r.contains("typo"));
        let r = body(respond_json("/unrouted", &[], &[], None, None, clock()));
        assert!(r.starts_with("HTTP/1.1 404") && r.contains("edge_counters is off"));
        let r = body(respond_json("/status", &[], &[], None, Some(&t), clock()));
        assert!(r.contains("\"unrouted\"") && r.contains("shop.test"));
    }
}
