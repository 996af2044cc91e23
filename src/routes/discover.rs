//! Upstreams whose servers come from a cluster (`"discover"` in a route file): its nodes, or
//! the endpoints of a Service (pods, or the nodes they run on); which of them take new
//! connections as Kubernetes means it, and the servers that makes. Pure: the feed brings the
//! objects, the merge calls `select`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::upstream::{ServerDef, MAX_SERVERS};

/// The label that keeps a node out of external load balancers (Kubernetes' own).
pub const EXCLUDED: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// What a Node says of itself that decides whether it takes connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The `Ready` condition: `Some(true)` for True, `Some(false)` for False, `None` when
    /// Unknown or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// `spec.unschedulable`: cordoned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Tainted `ToBeDeletedByClusterAutoscaler`: about to go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
    /// Its labels, for selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One node of a source, as an upstream may take it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    /// Its first internal address (IPv4 first), if it has one.
    pub address: Option<IpAddr>,
    pub state: NodeState,
    /// Its object could not be read whole (it takes no connection).
    pub problem: bool,
}

/// What a source brought, for the upstreams that discover it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovered {
    /// The source's name (`edge_routes_url ... name=`).
    pub source: String,
    /// In name order.
    pub nodes: Vec<Node>,
    /// EndpointSlices, in (namespace, name) order.
    pub slices: Vec<Slice>,
    /// Services with node ports.
    pub services: Vec<ServiceInfo>,
}

/// Whether a node or an endpoint takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// New connections go to it.
    Eligible,
    /// No new connections; the open ones continue (why).
    Draining(&'static str),
    /// Out because the cluster says it is not ready (why): what fail open may take back when
    /// nothing is eligible (a partition makes every node Unknown).
    Unready(&'static str),
    /// Out (why).
    Out(&'static str),
}

/// Out when excluded from external load balancers, without a usable InternalIP, or
/// unreadable; unready when not Ready (False or Unknown); draining when it is going away (the
/// cluster autoscaler's or Karpenter's taint, or being deleted) or cordoned; eligible
/// otherwise.
pub fn standing(node: &Node) -> Standing {
    let s = &node.state;
    if node.problem {
        Standing::Out("its object cannot be read")
    } else if node.address.is_none() {
        Standing::Out("no usable InternalIP")
    } else if s.labels.contains_key(EXCLUDED) {
        Standing::Out("excluded from external load balancers")
    } else if s.ready != Some(true) && (s.deleting || s.unschedulable) {
        // Taken out by the operator or the autoscaler, and not ready: never taken back.
        Standing::Out("not ready, and cordoned or going away")
    } else if s.ready == Some(false) {
        Standing::Unready("NotReady")
    } else if s.ready.is_none() {
        Standing::Unready("Ready Unknown")
    } else if s.deleting {
        Standing::Draining("going away")
    } else if s.unschedulable {
        Standing::Draining("cordoned")
    } else {
        Standing::Eligible
    }
}

/// A label selector as `kubectl -l` takes it, equality-based: `key`, `!key`, `key=value`,
/// `key==value`, `key!=value`, joined by commas (all must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut all = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                if text.trim().is_empty() {
                    break;
                }
                return Err("an empty requirement".into());
            }
            if part.contains('(') || part.contains(' ') {
                return Err(format!(
                    "\"{part}\": only key, !key, key=value and key!=value are read (not in or notin)"
                ));
            }
            let r = if let Some(key) = part.strip_prefix('!') {
                Requirement::Absent(label_key(key)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(label_key(k)?, label_value(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(label_key(k)?, label_value(v)?)
            } else {
                Requirement::Exists(label_key(part)?)
            };
            all.push(r);
        }
        Ok(Selector(all))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::Absent(k) => write!(f, "!{k}")?,
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
            }
        }
        Ok(())
    }
}

/// A label key: an optional DNS prefix and `/`, then a name of up to 63 characters.
fn label_key(text: &str) -> Result<String, String> {
    let name = text.rsplit_once('/').map_or(text, |(prefix, name)| {
        if prefix.is_empty() || prefix.len() > 253 {
            ""
        } else {
            name
        }
    });
    if name.is_empty() || !label_chars(name) {
        return Err(format!("\"{text}\" is not a label key"));
    }
    Ok(text.to_owned())
}

fn label_value(text: &str) -> Result<String, String> {
    if !text.is_empty() && !label_chars(text) {
        return Err(format!("\"{text}\" is not a label value"));
    }
    Ok(text.to_owned())
}

fn label_chars(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// An upstream's `"discover"`: what of `source` makes its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discover {
    pub source: String,
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// The nodes `selector` takes.
    Nodes(Selector),
    /// The endpoints of a Service: each pod's address, or its node's.
    Service {
        namespace: String,
        name: String,
        address: Address,
        /// A fixed port; `None`: the listener's.
        port: Option<u16>,
    },
    /// A Service's node ports: every node (with `externalTrafficPolicy: Local`, those with
    /// a ready pod of it), on the `nodePort` of the Service port that is the listener's.
    NodePort { namespace: String, name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address {
    Pod,
    /// The InternalIP of the node the pod runs on (a hostPort controller).
    Node,
}

impl Discover {
    /// What the source must read (`discover=` of its `edge_routes_url`).
    pub fn needs(&self) -> Kinds {
        match &self.what {
            What::Nodes(_) => Kinds {
                nodes: true,
                ..Kinds::default()
            },
            What::Service { address, .. } => Kinds {
                nodes: *address == Address::Node,
                endpoints: true,
                services: false,
            },
            What::NodePort { .. } => Kinds {
                nodes: true,
                endpoints: true,
                services: true,
            },
        }
    }
}

/// What a source discovers: `discover=` any of `nodes`, `endpoints`, `services`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Kinds {
    pub nodes: bool,
    pub endpoints: bool,
    pub services: bool,
}

impl Kinds {
    /// Whether `self` reads everything `other` needs.
    pub fn covers(self, other: Kinds) -> bool {
        (self.nodes || !other.nodes)
            && (self.endpoints || !other.endpoints)
            && (self.services || !other.services)
    }

    pub fn any(self) -> bool {
        self.nodes || self.endpoints || self.services
    }

    /// Adds what `other` reads.
    pub fn add(&mut self, other: Kinds) {
        self.nodes |= other.nodes;
        self.endpoints |= other.endpoints;
        self.services |= other.services;
    }
}

impl fmt::Display for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.nodes, "nodes"),
            (self.endpoints, "endpoints"),
            (self.services, "services"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// A Service's node ports (`type: NodePort` or `LoadBalancer`): each TCP port and its
/// `nodePort`; with `externalTrafficPolicy: Local`, only the nodes running one of its ready
/// pods take its traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePorts {
    pub ports: Vec<(u16, u16)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// One Service with node ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub node_ports: NodePorts,
}

/// One endpoint of an EndpointSlice, as Kubernetes' conditions mean it (an absent `ready` or
/// `serving` is read as true, an absent `terminating` as false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its first address.
    pub address: IpAddr,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_ready: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_serving: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The endpoints of one Service, from one EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub service: String,
    pub endpoints: Vec<Endpoint>,
}

/// As Kubernetes means it: eligible when ready and not terminating; draining when
/// terminating and still serving; out otherwise.
pub fn endpoint_standing(e: &Endpoint) -> Standing {
    match (e.terminating, e.not_serving, e.not_ready) {
        (true, false, _) => Standing::Draining("terminating"),
        (true, true, _) => Standing::Out("terminating, not serving"),
        (false, _, true) => Standing::Unready("not ready"),
        (false, _, false) => Standing::Eligible,
    }
}

/// The servers an upstream takes from its source, and how what it took stood.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub servers: Vec<ServerDef>,
    /// Nodes the selector took, or endpoints of the Service.
    pub matched: usize,
    /// Servers that take new connections.
    pub eligible: usize,
    pub draining: usize,
    pub out: usize,
    /// Eligible and draining servers past `MAX_SERVERS`.
    pub over: usize,
    /// A Service's node ports: the listener's port to the node's (`NodePort`).
    pub port_map: Vec<(u16, u16)>,
    /// Nothing was eligible: the servers are unready ones (fail open)...
    pub failed_open: bool,
    /// ...the upstream's previous ones among them, or its previous ones as they were when
    /// the source has not answered.
    pub kept_previous: bool,
    /// Why each address the source gave takes no new connection (draining, out, past the
    /// limit), for `changes`.
    pub why: Vec<((IpAddr, Option<u16>), &'static str)>,
}

/// The servers `spec` takes of what its source `found`: the eligible ones, and the draining
/// ones marked so (they take no new connection; the open ones continue, and show in status);
/// nodes in name order, endpoints in address order; one server per address (the first node
/// claiming an address keeps it).
///
/// Fail open, when none is eligible: the `previous` servers that are only unready now, or
/// else every unready one (a partition that makes every node Unknown must not leave the edge
/// with nowhere to send, also after a restart); the `previous` servers as they were when the
/// source has not answered (`found` is `None`). Nodes deleted, excluded or out of the selector
/// are never taken back.
pub fn select(
    spec: &Discover,
    found: Option<&Discovered>,
    previous: Option<&[ServerDef]>,
) -> Selection {
    let mut s = Selection::default();
    let Some(found) = found else {
        s.servers = previous
            .unwrap_or_default()
            .iter()
            .filter(|p| !p.draining)
            .copied()
            .collect();
        s.eligible = s.servers.len();
        s.kept_previous = !s.servers.is_empty();
        return s;
    };
    // (address, port, standing), in the order servers are made.
    let mut taken: Vec<(IpAddr, Option<u16>, Standing)> = Vec::new();
    match &spec.what {
        What::Nodes(selector) => {
            let mut seen = std::collections::HashSet::new();
            for node in &found.nodes {
                if !selector.matches(&node.state.labels) {
                    continue;
                }
                s.matched += 1;
                let st = match node.address {
                    Some(ip) if !seen.insert(ip) => Standing::Out("an address another node has"),
                    _ => standing(node),
                };
                match node.address {
                    Some(ip) => taken.push((ip, None, st)),
                    None => s.out += 1,
                }
            }
        }
        What::Service {
            namespace,
            name,
            address,
            port,
        } => {
            let all = || {
                found
                    .slices
                    .iter()
                    .filter(|sl| sl.namespace == *namespace && sl.service == *name)
                    .flat_map(|sl| &sl.endpoints)
            };
            // A dual-stack Service has a slice per family for the same pods: its IPv4
            // addresses, when it has any.
            let v4 = all().any(|e| e.address.is_ipv4());
            let endpoints = all().filter(|e| !v4 || e.address.is_ipv4());
            // Several pods on one node, or one pod in two slices: one server, standing as
            // the best of them.
            let mut by_address: BTreeMap<IpAddr, Standing> = BTreeMap::new();
            // Each endpoint's node by name: a cluster of thousands of nodes has as many
            // endpoints of a DaemonSet's Service.
            let nodes: std::collections::HashMap<&str, &Node> = match address {
                Address::Node => found.nodes.iter().map(|n| (n.name.as_str(), n)).collect(),
                Address::Pod => std::collections::HashMap::new(),
            };
            for e in endpoints {
                s.matched += 1;
                let (standing, ip) = match address {
                    Address::Pod => (endpoint_standing(e), Some(e.address)),
                    Address::Node => {
                        let node = e.node.as_deref().and_then(|n| nodes.get(n).copied());
                        match node {
                            Some(node) => {
                                (worse(endpoint_standing(e), standing(node)), node.address)
                            }
                            None => (Standing::Out("on no known node"), None),
                        }
                    }
                };
                match ip {
                    Some(ip) => {
                        let entry = by_address.entry(ip).or_insert(standing);
                        *entry = better(*entry, standing);
                    }
                    None => s.out += 1,
                }
            }
            taken.extend(by_address.into_iter().map(|(ip, st)| (ip, *port, st)));
        }
        What::NodePort { namespace, name } => {
            let service = found
                .services
                .iter()
                .find(|sv| sv.namespace == *namespace && sv.name == *name);
            if let Some(service) = service {
                s.port_map = service.node_ports.ports.clone();
                // With Local, the nodes that run a ready pod of the Service.
                let with_pods: Option<std::collections::HashSet<&str>> =
                    service.node_ports.local.then(|| {
                        found
                            .slices
                            .iter()
                            .filter(|sl| sl.namespace == *namespace && sl.service == *name)
                            .flat_map(|sl| &sl.endpoints)
                            .filter(|e| endpoint_standing(e) == Standing::Eligible)
                            .filter_map(|e| e.node.as_deref())
                            .collect()
                    });
                let mut seen = std::collections::HashSet::new();
                for node in &found.nodes {
                    s.matched += 1;
                    let st = match (node.address, &with_pods) {
                        (Some(ip), _) if !seen.insert(ip) => {
                            Standing::Out("an address another node has")
                        }
                        (_, Some(pods)) if !pods.contains(node.name.as_str()) => {
                            Standing::Out("no ready pod of the Service (Local)")
                        }
                        _ => standing(node),
                    };
                    match node.address {
                        Some(ip) => taken.push((ip, None, st)),
                        None => s.out += 1,
                    }
                }
            }
        }
    }
    let mut unready = Vec::new();
    for &(ip, port, standing) in &taken {
        if let Standing::Draining(why) | Standing::Unready(why) | Standing::Out(why) = standing {
            s.why.push(((ip, port), why));
        }
    }
    for (ip, port, standing) in taken {
        let server = |draining| ServerDef {
            ip,
            port,
            weight: 1,
            backup: false,
            draining,
        };
        let draining = match standing {
            Standing::Eligible => false,
            Standing::Draining(_) => {
                s.draining += 1;
                true
            }
            Standing::Unready(_) => {
                s.out += 1;
                unready.push(server(false));
                continue;
            }
            Standing::Out(_) => {
                s.out += 1;
                continue;
            }
        };
        if s.servers.len() == MAX_SERVERS {
            s.over += 1;
            s.why.push(((ip, port), "past the limit of servers"));
            continue;
        }
        s.eligible += usize::from(!draining);
        s.servers.push(server(draining));
    }
    if s.eligible == 0 && !unready.is_empty() {
        let kept: Vec<ServerDef> = unready
            .iter()
            .filter(|u| {
                previous
                    .unwrap_or_default()
                    .iter()
                    .any(|p| !p.draining && p.ip == u.ip && p.port == u.port)
            })
            .copied()
            .collect();
        let (kept, was) = if kept.is_empty() {
            (unready, false)
        } else {
            (kept, true)
        };
        // Draining servers take no new connection anyway: the unready ones take their room.
        s.servers.retain(|d| !d.draining);
        s.servers.extend(kept.into_iter().take(MAX_SERVERS));
        s.eligible = s.servers.iter().filter(|d| !d.draining).count();
        s.kept_previous = was;
        s.failed_open = true;
    }
    s
}

/// At most this many changes of one upstream are told one by one; the rest are counted.
pub const CHANGES_TOLD: usize = 20;

/// What changed for new connections between an upstream's `previous` servers and `now`'s:
/// one phrase per server, in address order ("server 10.0.0.2 is draining (cordoned): ..."),
/// with the reason `why` gives (see `Selection::why`), at most `CHANGES_TOLD` and then how
/// many more. A server's open connections continue in every case.
pub fn changes(
    previous: &[ServerDef],
    now: &[ServerDef],
    why: &[((IpAddr, Option<u16>), &'static str)],
) -> Vec<String> {
    let key = |s: &ServerDef| (s.ip, s.port);
    let before: BTreeMap<_, &ServerDef> = previous.iter().map(|s| (key(s), s)).collect();
    let after: BTreeMap<_, &ServerDef> = now.iter().map(|s| (key(s), s)).collect();
    let why: BTreeMap<_, &str> = why.iter().copied().collect();
    let mut keys: Vec<_> = before.keys().chain(after.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut told = Vec::new();
    let mut more = 0usize;
    for k in keys {
        let reason = why.get(&k).copied();
        let phrase = match (
            before.get(&k).map(|s| s.draining),
            after.get(&k).map(|s| s.draining),
        ) {
            (Some(false) | None, Some(true)) => format!(
                "is draining ({}): no new connection goes to it, the open ones continue",
                reason.unwrap_or("going away")
            ),
            (Some(_), None) => format!(
                "is out ({}): no new connection goes to it, the open ones continue",
                reason.unwrap_or("gone from the cluster, or no longer selected")
            ),
            (Some(true), Some(false)) => "takes new connections again".into(),
            (None, Some(false)) => "is added: it takes new connections".into(),
            _ => continue,
        };
        if told.len() == CHANGES_TOLD {
            more += 1;
            continue;
        }
        let server = after
            .get(&k)
            .or(before.get(&k))
            .expect("a key of one of them");
        let shown = match server.port {
            Some(port) => format!("{}:{port}", server.host()),
            None => server.host(),
        };
        told.push(format!("server {shown} {phrase}"));
    }
    if more > 0 {
        told.push(format!("and {more} more server(s) changed"));
    }
    told
}

/// The better of two standings: eligible, then draining, then unready, then out.
fn better(a: Standing, b: Standing) -> Standing {
    let rank = |x: Standing| match x {
        Standing::Eligible => 0,
        Standing::Draining(_) => 1,
        Standing::Unready(_) => 2,
        Standing::Out(_) => 3,
    };
    if rank(b) < rank(a) {
        b
    } else {
        a
    }
}

/// The worse of two standings: out, then unready, then draining, then eligible; draining
/// and unready together are out (neither new connections nor fail open).
fn worse(a: Standing, b: Standing) -> Standing {
    match (a, b) {
        (Standing::Draining(_), Standing::Unready(_))
        | (Standing::Unready(_), Standing::Draining(_)) => Standing::Out("draining, and not ready"),
        _ if better(a, b) == a => b,
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, f: impl FnOnce(&mut NodeState)) -> Node {
        let mut state = NodeState {
            ready: Some(true),
            ..NodeState::default()
        };
        f(&mut state);
        Node {
            name: name.into(),
            address: ip.parse().ok(),
            state,
            problem: false,
        }
    }

    fn all() -> Discover {
        Discover {
            source: "a".into(),
            what: What::Nodes(Selector::default()),
        }
    }

    fn found(nodes: &[Node]) -> Discovered {
        Discovered {
            source: "a".into(),
            nodes: nodes.to_vec(),
            slices: Vec::new(),
            services: Vec::new(),
        }
    }

    fn ips(s: &Selection) -> Vec<String> {
        s.servers.iter().map(|s| s.ip.to_string()).collect()
    }

    #[test]
    fn readiness_as_kubernetes_means_it() {
        let cases: [(Node, Standing); 8] = [
            (node("a", "10.0.0.1", |_| {}), Standing::Eligible),
            (
                node("b", "10.0.0.2", |s| s.ready = Some(false)),
                Standing::Unready("NotReady"),
            ),
            (
                node("c", "10.0.0.3", |s| s.ready = None),
                Standing::Unready("Ready Unknown"),
            ),
            (
                node("d", "10.0.0.4", |s| s.unschedulable = true),
                Standing::Draining("cordoned"),
            ),
            (
                node("e", "10.0.0.5", |s| s.deleting = true),
                Standing::Draining("going away"),
            ),
            (
                node("f", "10.0.0.6", |s| {
                    s.labels.insert(EXCLUDED.into(), String::new());
                }),
                Standing::Out("excluded from external load balancers"),
            ),
            (node("g", "", |_| {}), Standing::Out("no usable InternalIP")),
            // Not ready and cordoned: out, neither draining nor taken back by fail open.
            (
                node("h", "10.0.0.8", |s| {
                    s.ready = Some(false);
                    s.unschedulable = true;
                }),
                Standing::Out("not ready, and cordoned or going away"),
            ),
        ];
        for (n, want) in cases {
            assert_eq!(standing(&n), want, "{}", n.name);
        }
        let mut broken = node("i", "10.0.0.9", |_| {});
        broken.problem = true;
        assert_eq!(
            standing(&broken),
            Standing::Out("its object cannot be read")
        );
    }

    #[test]
    fn select_takes_eligible_nodes_and_counts_the_rest() {
        let nodes = [
            node("a1", "10.0.0.1", |_| {}),
            node("a2", "10.0.0.2", |s| s.unschedulable = true),
            node("a3", "10.0.0.3", |s| s.ready = Some(false)),
            node("a4", "10.0.0.4", |_| {}),
        ];
        let s = select(&all(), Some(&found(&nodes)), None);
        assert_eq!(ips(&s), ["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        let draining: Vec<bool> = s.servers.iter().map(|s| s.draining).collect();
        assert_eq!(
            draining,
            [false, true, false],
            "a cordoned node stays, draining"
        );
        assert_eq!(
            (s.matched, s.eligible, s.draining, s.out, s.kept_previous),
            (4, 2, 1, 1, false)
        );
        assert!(s.servers.iter().all(|s| s.port.is_none() && !s.backup));
    }

    #[test]
    fn changes_for_new_connections_are_told_once_each() {
        let server = |ip: &str, draining: bool| ServerDef {
            ip: ip.parse().unwrap(),
            port: None,
            weight: 1,
            backup: false,
            draining,
        };
        let at = |ip: &str| (ip.parse::<IpAddr>().unwrap(), None);
        let before = [
            server("10.0.0.1", false),
            server("10.0.0.2", false),
            server("10.0.0.3", true),
        ];
        let after = [
            server("10.0.0.1", false),
            server("10.0.0.2", true),
            server("10.0.0.3", false),
            server("10.0.0.4", false),
        ];
        assert_eq!(
            changes(&before, &after, &[(at("10.0.0.2"), "cordoned")]),
            [
                "server 10.0.0.2 is draining (cordoned): no new connection goes to it, the open ones continue",
                "server 10.0.0.3 takes new connections again",
                "server 10.0.0.4 is added: it takes new connections",
            ]
        );
        assert_eq!(
            changes(&after, &before[..1], &[(at("10.0.0.2"), "NotReady"), (at("10.0.0.3"), "excluded from external load balancers")]),
            [
                "server 10.0.0.2 is out (NotReady): no new connection goes to it, the open ones continue",
                "server 10.0.0.3 is out (excluded from external load balancers): no new connection goes to it, the open ones continue",
                "server 10.0.0.4 is out (gone from the cluster, or no longer selected): no new connection goes to it, the open ones continue",
            ]
        );
        // The same set again (a relist, a bookmark): nothing to tell.
        assert!(changes(&after, &after, &[]).is_empty());
        // A port tells servers apart (node ports); IPv6 as peers are named; a bulk change is
        // counted past the first ones.
        let mut with_port = server("10.0.0.1", false);
        with_port.port = Some(30443);
        let v6 = server("2001:db8::1", true);
        assert_eq!(
            changes(&[], &[with_port, v6], &[]),
            [
                "server 10.0.0.1:30443 is added: it takes new connections",
                "server [2001:db8::1] is draining (going away): no new connection goes to it, the open ones continue",
            ]
        );
        let many: Vec<ServerDef> = (0..30)
            .map(|i| server(&format!("10.0.1.{i}"), false))
            .collect();
        let told = changes(&many, &[], &[]);
        assert_eq!(told.len(), CHANGES_TOLD + 1);
        assert_eq!(told.last().unwrap(), "and 10 more server(s) changed");
    }

    #[test]
    fn fail_open_keeps_the_previous_servers() {
        let nodes = [
            node("a1", "10.0.0.1", |s| s.ready = Some(false)),
            node("a2", "10.0.0.2", |s| s.ready = None),
        ];
        let previous = select(
            &all(),
            Some(&found(&[node("a1", "10.0.0.1", |_| {})])),
            None,
        )
        .servers;
        let s = select(&all(), Some(&found(&nodes)), Some(&previous));
        assert!(s.kept_previous);
        assert_eq!(ips(&s), ["10.0.0.1"]);
        // Without a previous set (a start), every unready node.
        let s = select(&all(), Some(&found(&nodes)), None);
        assert_eq!(ips(&s), ["10.0.0.1", "10.0.0.2"]);
        assert!(s.failed_open && !s.kept_previous);
        // An empty previous set is no previous set.
        assert!(!select(&all(), Some(&found(&nodes)), Some(&[])).kept_previous);
        // A node deleted, or excluded, is not taken back.
        let excluded = [node("a1", "10.0.0.1", |s| {
            s.ready = None;
            s.labels.insert(EXCLUDED.into(), String::new());
        })];
        let s = select(&all(), Some(&found(&excluded)), Some(&previous));
        assert!(s.servers.is_empty() && !s.failed_open);
        assert!(select(&all(), Some(&found(&[])), Some(&previous))
            .servers
            .is_empty());
        // The source has not answered: the previous servers as they were.
        let s = select(&all(), None, Some(&previous));
        assert_eq!(
            (ips(&s), s.kept_previous),
            (vec!["10.0.0.1".to_owned()], true)
        );
        // Every node cordoned: that is the operator's doing, not a partition; they drain.
        let cordoned = [node("a1", "10.0.0.1", |s| s.unschedulable = true)];
        let s = select(&all(), Some(&found(&cordoned)), Some(&previous));
        assert_eq!(ips(&s), ["10.0.0.1"]);
        assert_eq!(
            (s.failed_open, s.eligible, s.servers[0].draining),
            (false, 0, true)
        );
        // Two nodes claiming one address: the first keeps it.
        let twins = [
            node("a1", "10.0.0.1", |_| {}),
            node("a2", "10.0.0.1", |_| {}),
        ];
        let s = select(&all(), Some(&found(&twins)), None);
        assert_eq!((ips(&s), s.out), (vec!["10.0.0.1".to_owned()], 1));
    }

    #[test]
    fn at_most_max_servers() {
        let nodes: Vec<Node> = (0..MAX_SERVERS + 3)
            .map(|i| {
                node(
                    &format!("n{i:04}"),
                    &format!("10.1.{}.{}", i / 256, i % 256),
                    |_| {},
                )
            })
            .collect();
        let s = select(&all(), Some(&found(&nodes)), None);
        assert_eq!((s.servers.len(), s.over), (MAX_SERVERS, 3));
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> =
            [("node-role.kubernetes.io/ingress", "true"), ("zone", "a")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let yes = [
            "",
            "zone",
            "zone=a",
            "zone==a",
            "zone!=b",
            "!gpu",
            "node-role.kubernetes.io/ingress=true,zone=a",
        ];
        for text in yes {
            let s = Selector::parse(text).unwrap();
            assert!(s.matches(&labels), "{text}");
        }
        for text in ["zone=b", "gpu", "!zone", "zone!=a", "zone=a,gpu"] {
            assert!(!Selector::parse(text).unwrap().matches(&labels), "{text}");
        }
        for bad in [
            "zone in (a,b)",
            "zone,",
            "-zone",
            "zone=a b",
            "/zone",
            "zone=-a",
            &"x".repeat(64),
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Selector::parse("a=1,!b,c!=2,d").unwrap().to_string(),
            "a=1,!b,c!=2,d"
        );
    }

    fn endpoint(ip: &str, node: &str, f: impl FnOnce(&mut Endpoint)) -> Endpoint {
        let mut e = Endpoint {
            address: ip.parse().unwrap(),
            not_ready: false,
            not_serving: false,
            terminating: false,
            node: Some(node.into()),
        };
        f(&mut e);
        e
    }

    #[test]
    fn endpoint_conditions_as_kubernetes_means_them() {
        let cases = [
            (endpoint("10.42.0.1", "a1", |_| {}), Standing::Eligible),
            (
                endpoint("10.42.0.2", "a1", |e| e.not_ready = true),
                Standing::Unready("not ready"),
            ),
            (
                endpoint("10.42.0.3", "a1", |e| {
                    e.not_ready = true;
                    e.terminating = true;
                }),
                Standing::Draining("terminating"),
            ),
            (
                endpoint("10.42.0.4", "a1", |e| {
                    e.terminating = true;
                    e.not_serving = true;
                }),
                Standing::Out("terminating, not serving"),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(endpoint_standing(&e), want, "{e:?}");
        }
    }

    #[test]
    fn a_services_endpoints_by_pod_or_by_node() {
        let mut found = found(&[
            node("a1", "10.0.0.1", |_| {}),
            node("a2", "10.0.0.2", |s| s.unschedulable = true),
            node("a3", "10.0.0.3", |_| {}),
            node("a4", "10.0.0.4", |s| s.ready = Some(false)),
        ]);
        let slice = |name: &str, endpoints: Vec<Endpoint>| Slice {
            namespace: "kube-system".into(),
            service: name.into(),
            endpoints,
        };
        found.slices = vec![
            slice(
                "ingress",
                vec![
                    endpoint("10.42.1.1", "a1", |_| {}),
                    endpoint("10.42.1.2", "a1", |e| e.terminating = true),
                    endpoint("10.42.2.1", "a2", |_| {}),
                    endpoint("10.42.4.1", "a4", |_| {}),
                    endpoint("10.42.9.1", "gone", |_| {}),
                ],
            ),
            slice("other", vec![endpoint("10.42.3.1", "a3", |_| {})]),
        ];
        let service = |address, port| Discover {
            source: "a".into(),
            what: What::Service {
                namespace: "kube-system".into(),
                name: "ingress".into(),
                address,
                port,
            },
        };
        // By node: a1 (one eligible pod of two), a2 draining (cordoned); a3 has no pod of
        // the Service, a4 is NotReady, "gone" is no node.
        let s = select(&service(Address::Node, None), Some(&found), None);
        assert_eq!(ips(&s), ["10.0.0.1", "10.0.0.2"]);
        let draining: Vec<bool> = s.servers.iter().map(|s| s.draining).collect();
        assert_eq!(draining, [false, true]);
        assert_eq!((s.matched, s.eligible, s.out), (5, 1, 2));
        // By pod, on a fixed port: the terminating pod drains, whatever its node.
        let s = select(&service(Address::Pod, Some(8443)), Some(&found), None);
        assert_eq!(
            ips(&s),
            [
                "10.42.1.1",
                "10.42.1.2",
                "10.42.2.1",
                "10.42.4.1",
                "10.42.9.1"
            ]
        );
        assert!(s.servers.iter().all(|s| s.port == Some(8443)));
        assert_eq!(s.servers.iter().filter(|s| s.draining).count(), 1);
        // A Service without endpoints (deleted): nothing, even with previous servers.
        let mut none = service(Address::Pod, None);
        if let What::Service { name, .. } = &mut none.what {
            *name = "missing".into();
        }
        let previous = select(&service(Address::Node, None), Some(&found), None).servers;
        assert!(select(&none, Some(&found), Some(&previous))
            .servers
            .is_empty());
        // What each way needs its source to read.
        assert_eq!(
            service(Address::Node, None).needs(),
            Kinds {
                nodes: true,
                endpoints: true,
                services: false
            }
        );
        assert_eq!(
            service(Address::Pod, None).needs(),
            Kinds {
                nodes: false,
                endpoints: true,
                services: false
            }
        );
        let both = Kinds {
            nodes: true,
            endpoints: true,
            services: false,
        };
        assert!(both.covers(all().needs()));
        assert!(!Kinds {
            nodes: false,
            ..both
        }
        .covers(all().needs()));
        assert_eq!(both.to_string(), "nodes,endpoints");
    }

    #[test]
    fn a_services_node_ports() {
        let mut found = found(&[
            node("a1", "10.0.0.1", |_| {}),
            node("a2", "10.0.0.2", |s| s.unschedulable = true),
            node("a3", "10.0.0.3", |_| {}),
        ]);
        found.services = vec![ServiceInfo {
            namespace: "kube-system".into(),
            name: "ingress".into(),
            node_ports: NodePorts {
                ports: vec![(443, 30443), (80, 30080)],
                local: false,
            },
        }];
        found.slices = vec![Slice {
            namespace: "kube-system".into(),
            service: "ingress".into(),
            endpoints: vec![endpoint("10.42.0.1", "a3", |_| {})],
        }];
        let spec = Discover {
            source: "a".into(),
            what: What::NodePort {
                namespace: "kube-system".into(),
                name: "ingress".into(),
            },
        };
        // Cluster: every node, on the listener's node port.
        let s = select(&spec, Some(&found), None);
        assert_eq!(ips(&s), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(s.port_map, [(443, 30443), (80, 30080)]);
        assert!(s.servers.iter().all(|s| s.port.is_none()));
        assert_eq!((s.eligible, s.draining), (2, 1));
        // Local: only the nodes with a ready pod of the Service.
        found.services[0].node_ports.local = true;
        let s = select(&spec, Some(&found), None);
        assert_eq!((ips(&s), s.out), (vec!["10.0.0.3".to_owned()], 2));
        // No such Service: nothing.
        found.services.clear();
        assert!(select(&spec, Some(&found), None).servers.is_empty());
        assert_eq!(
            spec.needs(),
            Kinds {
                nodes: true,
                endpoints: true,
                services: true
            }
        );
    }

    /// Review: a cordoned node that then goes NotReady is never taken back by fail open, nor
    /// a terminating pod on a NotReady node; a dual-stack Service makes one server per pod.
    #[test]
    fn what_fail_open_never_takes_back() {
        let cordoned = node("a1", "10.0.0.1", |s| {
            s.unschedulable = true;
            s.ready = Some(false);
        });
        let mut previous = select(
            &all(),
            Some(&found(&[node("a1", "10.0.0.1", |s| {
                s.unschedulable = true
            })])),
            None,
        )
        .servers;
        for p in [None, Some(&previous[..])] {
            let s = select(&all(), Some(&found(std::slice::from_ref(&cordoned))), p);
            assert!(s.servers.is_empty() && !s.failed_open, "{p:?}");
        }
        let mut f = found(&[node("a2", "10.0.0.2", |s| s.ready = Some(false))]);
        f.slices = vec![
            Slice {
                namespace: "ns".into(),
                service: "svc".into(),
                endpoints: vec![
                    endpoint("10.42.0.1", "a2", |e| e.terminating = true),
                    endpoint("10.42.0.9", "a2", |_| {}),
                ],
            },
            Slice {
                namespace: "ns".into(),
                service: "svc".into(),
                endpoints: vec![endpoint("fd00::1", "a2", |_| {})],
            },
        ];
        let by = |address| Discover {
            source: "a".into(),
            what: What::Service {
                namespace: "ns".into(),
                name: "svc".into(),
                address,
                port: None,
            },
        };
        previous.clear();
        let s = select(&by(Address::Node), Some(&f), None);
        // The eligible pod on the NotReady node makes it unready (fail open takes it); the
        // terminating one alone would make it out.
        assert_eq!(
            (ips(&s), s.failed_open),
            (vec!["10.0.0.2".to_owned()], true)
        );
        f.slices[0].endpoints.pop();
        let s = select(&by(Address::Node), Some(&f), None);
        assert!(s.servers.is_empty() && !s.failed_open);
        let s = select(&by(Address::Pod), Some(&f), None);
        assert_eq!(
            ips(&s),
            ["10.42.0.1"],
            "IPv4 only, for a dual-stack Service"
        );
    }
}
