//! Upstreams whose servers are a cluster's nodes (`"discover"` in a route file): which nodes
//! a selector takes, which of them take new connections as Kubernetes means it, and the
//! servers that makes. Pure: the feed brings the nodes, the merge calls `select`.

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

/// The nodes a source brought, for the upstreams that discover them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovered {
    /// The source's name (`edge_routes_url ... name=`).
    pub source: String,
    /// In name order.
    pub nodes: Vec<Node>,
}

/// Whether a node takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// New connections go to it.
    Eligible,
    /// No new connections; the open ones continue (why).
    Draining(&'static str),
    /// Out (why).
    Out(&'static str),
}

/// As Kubernetes means it: out when excluded from external load balancers, not Ready (False
/// or Unknown), or unreadable; draining when the cluster autoscaler is about to delete it or
/// it is cordoned; eligible otherwise.
pub fn standing(node: &Node) -> Standing {
    let s = &node.state;
    if node.problem {
        Standing::Out("its object cannot be read")
    } else if node.address.is_none() {
        Standing::Out("no InternalIP")
    } else if s.labels.contains_key(EXCLUDED) {
        Standing::Out("excluded from external load balancers")
    } else if s.ready == Some(false) {
        Standing::Out("NotReady")
    } else if s.ready.is_none() {
        Standing::Out("Ready Unknown")
    } else if s.deleting {
        Standing::Draining("to be deleted by the cluster autoscaler")
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

/// An upstream's `"discover"`: the nodes of `source` that `selector` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discover {
    pub source: String,
    pub selector: Selector,
}

/// The servers an upstream takes from its source's nodes, and how the nodes stood.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    pub servers: Vec<ServerDef>,
    /// Nodes the selector took.
    pub matched: usize,
    /// Servers that take new connections.
    pub eligible: usize,
    pub draining: usize,
    pub out: usize,
    /// Eligible and draining nodes past `MAX_SERVERS`.
    pub over: usize,
    /// No node was eligible: the servers are the upstream's previous ones (fail open).
    pub kept_previous: bool,
}

/// The servers `spec` takes of `nodes`, in name order, on the listener's port: the eligible
/// ones, and the draining ones marked so (they take no new connection; the open ones
/// continue, and show in status). When none is eligible, the `previous` servers that took
/// new connections (a partition that marks every node NotReady must not leave the edge with
/// nowhere to send).
pub fn select(spec: &Discover, nodes: &[Node], previous: Option<&[ServerDef]>) -> Selection {
    let mut s = Selection::default();
    for node in nodes {
        if !spec.selector.matches(&node.state.labels) {
            continue;
        }
        s.matched += 1;
        let draining = match standing(node) {
            Standing::Eligible => false,
            Standing::Draining(_) => {
                s.draining += 1;
                true
            }
            Standing::Out(_) => {
                s.out += 1;
                continue;
            }
        };
        let Some(ip) = node.address else { continue };
        if s.servers.len() == MAX_SERVERS {
            s.over += 1;
            continue;
        }
        s.eligible += usize::from(!draining);
        s.servers.push(ServerDef {
            ip,
            port: None,
            weight: 1,
            backup: false,
            draining,
        });
    }
    if s.eligible == 0 {
        let previous: Vec<ServerDef> = previous
            .unwrap_or_default()
            .iter()
            .filter(|p| !p.draining)
            .copied()
            .collect();
        if !previous.is_empty() {
            s.eligible = previous.len();
            s.servers = previous;
            s.kept_previous = true;
        }
    }
    s
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
            selector: Selector::default(),
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
                Standing::Out("NotReady"),
            ),
            (
                node("c", "10.0.0.3", |s| s.ready = None),
                Standing::Out("Ready Unknown"),
            ),
            (
                node("d", "10.0.0.4", |s| s.unschedulable = true),
                Standing::Draining("cordoned"),
            ),
            (
                node("e", "10.0.0.5", |s| s.deleting = true),
                Standing::Draining("to be deleted by the cluster autoscaler"),
            ),
            (
                node("f", "10.0.0.6", |s| {
                    s.labels.insert(EXCLUDED.into(), String::new());
                }),
                Standing::Out("excluded from external load balancers"),
            ),
            (node("g", "", |_| {}), Standing::Out("no InternalIP")),
            // Not ready and cordoned: out, not draining.
            (
                node("h", "10.0.0.8", |s| {
                    s.ready = Some(false);
                    s.unschedulable = true;
                }),
                Standing::Out("NotReady"),
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
        let s = select(&all(), &nodes, None);
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
    fn fail_open_keeps_the_previous_servers() {
        let nodes = [
            node("a1", "10.0.0.1", |s| s.ready = Some(false)),
            node("a2", "10.0.0.2", |s| s.ready = None),
        ];
        let previous = select(&all(), &[node("a1", "10.0.0.1", |_| {})], None).servers;
        let s = select(&all(), &nodes, Some(&previous));
        assert!(s.kept_previous);
        assert_eq!(ips(&s), ["10.0.0.1"]);
        // Without a previous set (a start), nothing: the upstream has no server.
        let s = select(&all(), &nodes, None);
        assert!(s.servers.is_empty() && !s.kept_previous);
        // An empty previous set is no previous set.
        assert!(!select(&all(), &nodes, Some(&[])).kept_previous);
        // Every node cordoned: the previous servers that took connections are kept, not
        // the draining ones.
        let cordoned = [node("a1", "10.0.0.1", |s| s.unschedulable = true)];
        let mut previous = previous.clone();
        previous.push(select(&all(), &cordoned, None).servers[0]);
        previous[1].ip = "10.0.0.9".parse().unwrap();
        let s = select(&all(), &cordoned, Some(&previous));
        assert_eq!(ips(&s), ["10.0.0.1"]);
        assert_eq!((s.kept_previous, s.eligible), (true, 1));
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
        let s = select(&all(), &nodes, None);
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
}
