//! Pure: the Kubernetes objects a source reads (Ingress and IngressClass, and Gateway API
//! HTTPRoute, TLSRoute and Gateway), reduced to what makes routes; list and watch-event
//! parsing; the catalog of a source's objects and the route document it makes, as the APIs
//! mean it; the cache file that keeps it on disk.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::routes::discover::{
    Discovered, Endpoint, Node, NodePorts, NodeState, ServiceInfo, Slice,
};
use crate::routes::document::{
    is_upstream_name, parse_route_key, Document, RouteKey, Targets, UpstreamDef, UpstreamKind,
};
use crate::upstream::{Policy, ServerDef};

/// Objects of one source.
pub const MAX_OBJECTS: usize = 100_000;
/// Hosts of one object.
pub const MAX_HOSTS: usize = 1_000;
/// Addresses of one object's load balancer.
pub const MAX_ADDRESSES: usize = 64;
/// Bytes of one watch event (Kubernetes objects are at most 1.5 MB in etcd).
pub const MAX_EVENT: usize = 4 << 20;
/// Bytes of one list page or polled document.
pub const MAX_BODY: usize = 64 << 20;
/// Routes one source makes, and upstreams it makes of load-balancer addresses: the newest
/// objects past them route nothing (counted), so that no tenant can make the whole table too
/// large to merge.
pub const MAX_SOURCE_ROUTES: usize = 250_000;
pub const MAX_SOURCE_UPSTREAMS: usize = 25_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Ingress,
    HTTPRoute,
    TLSRoute,
    /// Which Ingresses the cluster's default class serves.
    IngressClass,
    /// The listeners Gateway API routes attach to.
    Gateway,
    /// A node, whose address an upstream may take as a server (`discover=nodes`).
    Node,
    /// The endpoints of a Service (`discover=endpoints`).
    EndpointSlice,
    /// A Service's node ports (`discover=services`).
    Service,
}

impl Kind {
    /// Every kind read under an API server's URL, in the order they are asked for.
    pub const ALL: [Kind; 5] = [
        Kind::Ingress,
        Kind::HTTPRoute,
        Kind::TLSRoute,
        Kind::IngressClass,
        Kind::Gateway,
    ];

    /// Every kind a cache or a list may name.
    pub const ANY: [Kind; 8] = [
        Kind::Ingress,
        Kind::HTTPRoute,
        Kind::TLSRoute,
        Kind::IngressClass,
        Kind::Gateway,
        Kind::Node,
        Kind::EndpointSlice,
        Kind::Service,
    ];

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Ingress => "ingresses",
            Kind::HTTPRoute => "httproutes",
            Kind::TLSRoute => "tlsroutes",
            Kind::IngressClass => "ingressclasses",
            Kind::Gateway => "gateways",
            Kind::Node => "nodes",
            Kind::EndpointSlice => "endpointslices",
            Kind::Service => "services",
        }
    }

    /// API group paths to try, in order, under an API server's URL.
    pub fn api_paths(self) -> &'static [&'static str] {
        match self {
            Kind::Ingress | Kind::IngressClass => &["/apis/networking.k8s.io/v1"],
            Kind::HTTPRoute | Kind::Gateway => &["/apis/gateway.networking.k8s.io/v1"],
            Kind::TLSRoute => &[
                "/apis/gateway.networking.k8s.io/v1",
                "/apis/gateway.networking.k8s.io/v1alpha2",
            ],
            Kind::Node => &["/api/v1"],
            Kind::EndpointSlice => &["/apis/discovery.k8s.io/v1"],
            Kind::Service => &["/api/v1"],
        }
    }

    /// Whether a source can do without it: every kind but Ingress (a cluster may not serve
    /// the Gateway API, or the edge's role may not read IngressClasses or Nodes: an
    /// upstream that discovers them keeps what it had, see `routes::discover`).
    pub fn optional(self) -> bool {
        self != Kind::Ingress
    }

    /// Whether its objects live in namespaces.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::IngressClass | Kind::Node)
    }

    /// A wildcard host in this kind: Ingress `*.foo.com` is one label, Gateway API any depth.
    fn wildcard(self, suffix: String) -> RouteKey {
        match self {
            Kind::Ingress => RouteKey::OneLabel(suffix),
            _ => RouteKey::Wildcard(suffix),
        }
    }

    fn of_list(kind: &str) -> Option<Kind> {
        let kind = kind.strip_suffix("List").unwrap_or(kind);
        Kind::ANY.into_iter().find(|k| format!("{k:?}") == kind)
    }

    /// The kinds a list path of this kind brings along, at their paths: an Ingress list the
    /// IngressClasses (cluster-wide), a route list the Gateways (at the same level).
    pub fn companions(self, path: &str) -> Vec<(Kind, String)> {
        let Some(base) = path.strip_suffix(self.plural()) else {
            return Vec::new();
        };
        match self {
            Kind::Ingress => {
                // `…/v1/namespaces/NS/` or `…/v1/`: IngressClasses are not namespaced.
                let base = match base.find("/namespaces/") {
                    Some(at) => &base[..=at],
                    None => base,
                };
                vec![(Kind::IngressClass, format!("{base}ingressclasses"))]
            }
            Kind::HTTPRoute | Kind::TLSRoute => {
                // Gateways at `…/gateway.networking.k8s.io/v1/…`, whatever the route's version.
                let base = base.replacen("/v1alpha2/", "/v1/", 1);
                vec![(Kind::Gateway, format!("{base}gateways"))]
            }
            Kind::IngressClass
            | Kind::Gateway
            | Kind::Node
            | Kind::EndpointSlice
            | Kind::Service => Vec::new(),
        }
    }
}

/// What a URL path names for `format=k8s`.
pub struct Target;

impl Target {
    /// The kind a list path reads (`…/ingresses`, `…/namespaces/web/httproutes`), or `None`
    /// for an API server's URL (with any prefix, as Rancher's `/k8s/clusters/<id>`).
    pub fn of(path: &str) -> Option<Kind> {
        let last = path.rsplit('/').next()?;
        [Kind::Ingress, Kind::HTTPRoute, Kind::TLSRoute]
            .into_iter()
            .find(|k| k.plural() == last)
    }
}

/// An object, reduced to what makes routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// As the object writes them; checked when the document is made.
    pub hosts: Vec<String>,
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Why the object routes nothing although it is there (it is kept, so that its earlier
    /// version's routes go): more hosts than the limit, a spec that cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// `metadata.creationTimestamp` in Unix seconds: the oldest object keeps a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// An IngressClass: the cluster's default (`ingressclass.kubernetes.io/is-default-class`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_class: bool,
    /// A Gateway's listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    /// A Gateway API route: the parents (Gateways) that accepted it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<Parent>,
    /// A Node: what says whether it takes connections (its address is in `addresses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Box<NodeState>>,
    /// An EndpointSlice: its Service (`kubernetes.io/service-name`) and endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// A Service of type NodePort or LoadBalancer: its node ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ports: Option<Box<NodePorts>>,
    /// Its JSON in a cache file, once written (see `Cache::bytes_of`).
    #[serde(skip)]
    pub json: Json,
}

/// An object's JSON, made the first time a cache file holds it: an object stays in the
/// catalog, shared, until an event replaces it, and each write of the catalog copies the
/// JSON of the objects that did not change. Not part of what the object is: a clone has none,
/// and two objects compare equal whatever their JSON.
#[derive(Default)]
pub struct Json(std::sync::OnceLock<Box<[u8]>>);

impl Clone for Json {
    fn clone(&self) -> Json {
        Json::default()
    }
}

impl PartialEq for Json {
    fn eq(&self, _: &Json) -> bool {
        true
    }
}

impl Eq for Json {}

impl std::fmt::Debug for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Json(made)"
        } else {
            "Json"
        })
    }
}

/// A Gateway's listener: its name, and the hostname it takes (any when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// A Gateway that accepted a route, and the listener the route names, if it names one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
}

pub type Key = (Kind, String, String);

impl Object {
    pub fn new(kind: Kind, namespace: String, name: String) -> Object {
        Object {
            kind,
            namespace,
            name,
            hosts: Vec::new(),
            addresses: Vec::new(),
            class: None,
            problem: None,
            created: None,
            default_class: false,
            listeners: Vec::new(),
            parents: Vec::new(),
            node: None,
            service: None,
            endpoints: Vec::new(),
            node_ports: None,
            json: Json::default(),
        }
    }

    pub fn key(&self) -> Key {
        (self.kind, self.namespace.clone(), self.name.clone())
    }
}

// The wire shapes: only the fields read; serde skips the rest (managedFields and all) without
// building them.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawObject {
    kind: Option<String>,
    metadata: RawMeta,
    spec: RawSpec,
    status: StatusField,
    // An `ERROR` event's object is a Status.
    code: Option<u16>,
    reason: Option<String>,
    message: Option<String>,
    /// An EndpointSlice's (beside its metadata, not under a spec).
    endpoints: Option<Vec<RawEndpoint>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEndpoint {
    addresses: Vec<String>,
    conditions: RawEndpointConditions,
    #[serde(rename = "nodeName")]
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEndpointConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawMeta {
    name: String,
    namespace: String,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    annotations: Option<RawAnnotations>,
    #[serde(rename = "creationTimestamp")]
    created: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "deletionTimestamp")]
    deleted: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAnnotations {
    #[serde(rename = "kubernetes.io/ingress.class")]
    class: Option<String>,
    #[serde(rename = "ingressclass.kubernetes.io/is-default-class")]
    default_class: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSpec {
    #[serde(rename = "ingressClassName")]
    ingress_class_name: Option<String>,
    rules: Option<Vec<RawRule>>,
    hostnames: Option<Vec<String>>,
    listeners: Option<Vec<RawListener>>,
    /// A Node's.
    unschedulable: Option<bool>,
    taints: Option<Vec<RawTaint>>,
    /// A Service's.
    #[serde(rename = "type")]
    service_type: Option<String>,
    ports: Option<Vec<RawServicePort>>,
    #[serde(rename = "externalTrafficPolicy")]
    external_traffic_policy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawServicePort {
    port: u16,
    #[serde(rename = "nodePort")]
    node_port: Option<u16>,
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawTaint {
    key: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRule {
    host: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawListener {
    name: String,
    hostname: Option<String>,
}

/// An object's `status`; a Status object's is a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum StatusField {
    Object(RawStatus),
    Other(serde::de::IgnoredAny),
}

impl Default for StatusField {
    fn default() -> StatusField {
        StatusField::Other(serde::de::IgnoredAny)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawStatus {
    #[serde(rename = "loadBalancer")]
    load_balancer: Option<RawLoadBalancer>,
    /// A Gateway API route's: what each parent made of it.
    parents: Option<Vec<RawParentStatus>>,
    /// A Node's.
    addresses: Option<Vec<RawNodeAddress>>,
    conditions: Option<Vec<RawCondition>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawParentStatus {
    #[serde(rename = "parentRef")]
    parent_ref: RawParentRef,
    conditions: Option<Vec<RawCondition>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawParentRef {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    #[serde(rename = "sectionName")]
    section_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawLoadBalancer {
    ingress: Option<Vec<RawLbIngress>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawLbIngress {
    ip: Option<String>,
}

/// A list, its items left as they are: each is read on its own, so that one that cannot be
/// read is skipped, not the page.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawList<'a> {
    kind: Option<String>,
    metadata: RawMeta,
    #[serde(borrow)]
    items: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow)]
    object: &'a RawValue,
}

/// What is read of an object that cannot be read whole: which object it is.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawName {
    kind: Option<String>,
    metadata: RawMeta,
}

/// One object of a list or an event, read leniently.
enum Read {
    /// Read; perhaps with a problem that makes it route nothing.
    Object(Box<Object>),
    /// Not even its name could be read.
    Unreadable(String),
}

/// Reads one object of `kind`, and its resourceVersion: an object whose spec cannot be read,
/// or that has more hosts than the limit, is kept with its problem (it routes nothing); one
/// whose name cannot be read is unreadable.
fn read_object(raw: &RawValue, kind: Option<Kind>) -> (Read, Option<String>) {
    let kind_of = |k: Option<&str>| {
        kind.or_else(|| k.and_then(Kind::of_list))
            .unwrap_or(Kind::Ingress)
    };
    match serde_json::from_str::<RawObject>(raw.get()) {
        Ok(mut o) => {
            let k = kind_of(o.kind.as_deref());
            let rv = o.metadata.resource_version.take();
            (Read::Object(Box::new(o.reduce(k))), rv)
        }
        Err(e) => match serde_json::from_str::<RawName>(raw.get()) {
            Ok(n) if !n.metadata.name.is_empty() => {
                let k = kind_of(n.kind.as_deref());
                let mut object = Object::new(k, n.metadata.namespace, n.metadata.name);
                object.problem = Some(format!("cannot be read ({e})"));
                (Read::Object(Box::new(object)), n.metadata.resource_version)
            }
            _ => (Read::Unreadable(e.to_string()), None),
        },
    }
}

impl RawObject {
    fn reduce(self, kind: Kind) -> Object {
        let mut object = Object::new(kind, self.metadata.namespace, self.metadata.name);
        object.created = self.metadata.created.as_deref().and_then(unix_seconds);
        let annotations = self.metadata.annotations.unwrap_or_default();
        let labels = self.metadata.labels.unwrap_or_default();
        let deleting = self.metadata.deleted.is_some();
        let status = match self.status {
            StatusField::Object(s) => s,
            StatusField::Other(_) => RawStatus::default(),
        };
        let mut hosts = match kind {
            // Rules' hosts only: a host named only in `spec.tls` is on a certificate, which
            // may be shared with other clusters; a rule without a host is the cluster's
            // default backend, and adds nothing.
            Kind::Ingress => self
                .spec
                .rules
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.host)
                .collect(),
            Kind::HTTPRoute | Kind::TLSRoute => self.spec.hostnames.unwrap_or_default(),
            Kind::IngressClass
            | Kind::Gateway
            | Kind::Node
            | Kind::EndpointSlice
            | Kind::Service => Vec::new(),
        };
        hosts.sort_unstable();
        hosts.dedup();
        if hosts.len() > MAX_HOSTS {
            object.problem = Some(format!(
                "{} hosts, more than the limit of {MAX_HOSTS}",
                hosts.len()
            ));
            hosts.clear();
        }
        object.hosts = hosts;
        match kind {
            Kind::Ingress => {
                object.addresses = status
                    .load_balancer
                    .and_then(|lb| lb.ingress)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| i.ip?.parse().ok())
                    .take(MAX_ADDRESSES)
                    .collect();
                object.class = self.spec.ingress_class_name.or(annotations.class);
            }
            Kind::IngressClass => {
                object.default_class = annotations.default_class.as_deref() == Some("true");
            }
            Kind::Gateway => {
                object.listeners = self
                    .spec
                    .listeners
                    .unwrap_or_default()
                    .into_iter()
                    .take(MAX_LISTENERS)
                    .map(|l| Listener {
                        name: l.name,
                        hostname: l.hostname.filter(|h| !h.is_empty()),
                    })
                    .collect();
            }
            Kind::Service => {
                let with_node_ports = matches!(
                    self.spec.service_type.as_deref(),
                    Some("NodePort" | "LoadBalancer")
                );
                if with_node_ports {
                    let ports = self
                        .spec
                        .ports
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                        .filter_map(|p| Some((p.port, p.node_port.filter(|&n| n > 0)?)))
                        .filter(|&(port, _)| port > 0)
                        .take(MAX_LISTENERS)
                        .collect();
                    object.node_ports = Some(Box::new(NodePorts {
                        ports,
                        local: self.spec.external_traffic_policy.as_deref() == Some("Local"),
                    }));
                }
            }
            Kind::EndpointSlice => {
                object.service = labels.get(SERVICE_NAME).cloned();
                let endpoints = self.endpoints.unwrap_or_default();
                if endpoints.len() > MAX_ENDPOINTS {
                    object.problem = Some(format!(
                        "{} endpoints, more than the limit of {MAX_ENDPOINTS}",
                        endpoints.len()
                    ));
                } else {
                    // Kubernetes' meaning of absent conditions: ready and serving unless
                    // said otherwise, terminating only when said.
                    object.endpoints = endpoints
                        .into_iter()
                        .filter_map(|e| {
                            Some(Endpoint {
                                address: e
                                    .addresses
                                    .iter()
                                    .filter_map(|a| a.parse().ok())
                                    .find(usable)?,
                                not_ready: e.conditions.ready == Some(false),
                                not_serving: e.conditions.serving == Some(false),
                                terminating: e.conditions.terminating == Some(true),
                                node: e.node_name,
                            })
                        })
                        .collect();
                }
            }
            Kind::Node => {
                // Its internal addresses, the first of each family: what an ingress
                // controller on hostPort listens on.
                let mut addresses: Vec<IpAddr> = status
                    .addresses
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|a| a.kind == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .filter(usable)
                    .collect();
                let first_v4 = addresses.iter().position(IpAddr::is_ipv4);
                let first_v6 = addresses.iter().position(IpAddr::is_ipv6);
                addresses = [first_v4, first_v6]
                    .into_iter()
                    .flatten()
                    .map(|i| addresses[i])
                    .collect();
                addresses.sort_by_key(|a| a.is_ipv6());
                object.addresses = addresses;
                let ready = status
                    .conditions
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.kind == "Ready")
                    .and_then(|c| match c.status.as_str() {
                        "True" => Some(true),
                        "False" => Some(false),
                        _ => None,
                    });
                let label_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
                let too_many = labels.len() > MAX_LABELS || label_bytes > MAX_LABEL_BYTES;
                if too_many {
                    object.problem = Some(format!(
                        "{} labels of {label_bytes} bytes, more than the limits of {MAX_LABELS} and {MAX_LABEL_BYTES}",
                        labels.len()
                    ));
                }
                object.node = Some(Box::new(NodeState {
                    ready,
                    unschedulable: self.spec.unschedulable.unwrap_or(false),
                    deleting: deleting
                        || self
                            .spec
                            .taints
                            .unwrap_or_default()
                            .iter()
                            .any(|t| GOING_AWAY.contains(&t.key.as_str())),
                    labels: if too_many { BTreeMap::new() } else { labels },
                }));
            }
            Kind::HTTPRoute | Kind::TLSRoute => {
                // The Gateways that accepted the route, as their controllers wrote it.
                let namespace = object.namespace.clone();
                object.parents = status
                    .parents
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| {
                        let r = &p.parent_ref;
                        r.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
                            && r.kind.as_deref().unwrap_or("Gateway") == "Gateway"
                            && p.conditions
                                .iter()
                                .flatten()
                                .any(|c| c.kind == "Accepted" && c.status == "True")
                    })
                    .take(MAX_PARENTS)
                    .map(|p| Parent {
                        namespace: p.parent_ref.namespace.unwrap_or_else(|| namespace.clone()),
                        name: p.parent_ref.name,
                        section: p.parent_ref.section_name,
                    })
                    .collect();
            }
        }
        object
    }
}

/// Whether a node's or an endpoint's address can be a server: not unspecified, multicast,
/// broadcast or link-local (a kubelet writes its own Node's addresses: 169.254.169.254 would
/// send clients to the edge host's cloud metadata service).
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_unspecified() || v6.is_multicast() || link_local)
                && v6.to_ipv4_mapped().is_none_or(|v4| usable(&IpAddr::V4(v4)))
        }
    }
}

/// The label that names an EndpointSlice's Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Endpoints of one EndpointSlice (Kubernetes puts at most 1,000 in one).
const MAX_ENDPOINTS: usize = 1000;
/// The taints the cluster autoscaler and Karpenter put on a node they are about to remove.
const GOING_AWAY: [&str; 3] = [
    "ToBeDeletedByClusterAutoscaler",
    "karpenter.sh/disrupted",
    "karpenter.sh/disruption",
];
/// Labels of one Node that are read, in number and in bytes: a node with more takes no
/// connection (node-feature-discovery adds a few hundred short ones).
const MAX_LABELS: usize = 1024;
const MAX_LABEL_BYTES: usize = 64 << 10;

/// The Gateway API's group, the default of a parentRef's.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Listeners of one Gateway, and parents of one route, that are read.
const MAX_LISTENERS: usize = 64;
const MAX_PARENTS: usize = 32;

/// `2026-11-29T10:00:00Z` (RFC 3339, as Kubernetes writes its timestamps) in Unix seconds.
fn unix_seconds(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// One list page (or a whole list from a server that does not page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The kind the list says it holds, when it says so.
    pub kind: Option<Kind>,
    pub objects: Vec<Arc<Object>>,
    pub resource_version: Option<String>,
    pub continue_token: Option<String>,
    /// Items skipped because not even their name could be read, and the first reason.
    pub unreadable: usize,
    pub first_unreadable: Option<String>,
}

/// Whether a JSON document looks like a Kubernetes list rather than a route file.
pub fn looks_like_list(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        items: Option<serde::de::IgnoredAny>,
        kind: Option<String>,
    }
    serde_json::from_slice::<Probe>(body)
        .is_ok_and(|p| p.items.is_some() || p.kind.is_some_and(|k| k.ends_with("List")))
}

/// Parses a list page. `kind` is the kind requested; a list that names another is refused.
/// An item that cannot be read is skipped and counted; one that cannot be used is kept with
/// its problem. Items past `MAX_OBJECTS` are not read (the catalog could not take them).
pub fn parse_list(body: &[u8], kind: Option<Kind>) -> Result<Page, String> {
    let raw: RawList = serde_json::from_slice(body).map_err(|e| format!("not a list: {e}"))?;
    let listed = raw.kind.as_deref().and_then(Kind::of_list);
    if let (Some(want), Some(got)) = (kind, listed) {
        if want != got {
            return Err(format!("asked for {want:?} objects, got a {got:?} list"));
        }
    }
    let items = raw.items.ok_or("not a list: no \"items\"")?;
    let of = kind.or(listed);
    let mut page = Page {
        kind: listed,
        objects: Vec::with_capacity(items.len().min(MAX_OBJECTS)),
        resource_version: raw.metadata.resource_version.filter(|v| !v.is_empty()),
        continue_token: raw.metadata.continue_token.filter(|c| !c.is_empty()),
        unreadable: 0,
        first_unreadable: None,
    };
    for item in items.into_iter().take(MAX_OBJECTS) {
        match read_object(item, of).0 {
            // Shared here, on the thread that parses the list, not in the event loop.
            Read::Object(o) => page.objects.push(Arc::from(o)),
            Read::Unreadable(why) => {
                page.unreadable += 1;
                page.first_unreadable.get_or_insert(why);
            }
        }
    }
    Ok(page)
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Object, Option<String>),
    Delete(Object, Option<String>),
    /// Only a resourceVersion to resume from.
    Bookmark(String),
    /// `410 Gone`: the resourceVersion is too old; list again.
    Expired,
    /// Another `ERROR` event.
    Error(String),
    /// An event whose object cannot even be named: it cannot be applied, so the kind is
    /// listed again (a list skips such an item and goes on).
    Unreadable(String),
}

/// Parses one line of a watch stream.
pub fn parse_event(line: &[u8], kind: Kind) -> Result<Event, String> {
    let raw: RawEvent =
        serde_json::from_slice(line).map_err(|e| format!("a broken watch event: {e}"))?;
    match raw.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let (o, rv) = match read_object(raw.object, Some(kind)) {
                (Read::Object(o), rv) => (*o, rv),
                (Read::Unreadable(why), _) => return Ok(Event::Unreadable(why)),
            };
            if raw.kind == "DELETED" {
                Ok(Event::Delete(o, rv))
            } else {
                Ok(Event::Put(o, rv))
            }
        }
        "BOOKMARK" => serde_json::from_str::<RawName>(raw.object.get())
            .ok()
            .and_then(|n| n.metadata.resource_version)
            .map(Event::Bookmark)
            .ok_or_else(|| "a bookmark without a resourceVersion".into()),
        "ERROR" => {
            let o: RawObject = serde_json::from_str(raw.object.get())
                .map_err(|e| format!("a broken ERROR event: {e}"))?;
            if o.code == Some(410) || o.reason.as_deref() == Some("Expired") {
                return Ok(Event::Expired);
            }
            Ok(Event::Error(format!(
                "{} {}: {}",
                o.code.unwrap_or(0),
                o.reason.unwrap_or_default(),
                o.message.unwrap_or_default()
            )))
        }
        other => Err(format!("a watch event of unknown type \"{other}\"")),
    }
}

/// The objects of one source, by kind, namespace and name: at most `MAX_OBJECTS`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub objects: BTreeMap<Key, Arc<Object>>,
    /// Objects of each kind refused because the catalog was full (by its last list and the
    /// events since): once one goes, the kind is listed again to take them.
    pub refused: BTreeMap<Kind, usize>,
}

/// What a catalog made: the document, and what it left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Made {
    pub document: Document,
    /// Distinct route names.
    pub routes: usize,
    /// Hosts that are not host names.
    pub invalid: Vec<String>,
    /// Hosts already routed by an earlier object of the source (cert-manager's solver
    /// Ingresses repeat their host, for one).
    pub repeated: usize,
    /// Objects that route nowhere: no `upstream=` and no load-balancer address.
    pub unrouted: usize,
    /// Objects that route nothing because of a problem (too many hosts, a spec that cannot be
    /// read), and the first of them.
    pub problems: usize,
    pub first_problem: Option<String>,
    /// Ingresses of a class the edge does not serve.
    pub other_class: usize,
    /// Gateway API routes no Gateway accepted (yet).
    pub unaccepted: usize,
    /// The cluster's default IngressClass, when it marks one.
    pub default_class: Option<String>,
    /// Several IngressClasses, none the default, and no `ingress_class=`: every Ingress is
    /// read, which is likely not what the edge's operator wants.
    pub ambiguous_class: bool,
    /// Objects past `MAX_SOURCE_ROUTES` or `MAX_SOURCE_UPSTREAMS`, and the first of them.
    pub over_limit: usize,
    pub first_over_limit: Option<String>,
}

impl Made {
    /// The document, with what the source discovers for the table's upstreams, if anything.
    pub fn with_discovered(self, discovered: Option<Arc<Discovered>>) -> Document {
        let mut document = self.document;
        document.discovered = discovered;
        document
    }
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Replaces the objects of `kind` with a full list of them, as many as the catalog has
    /// room for (in the list's order); returns how many it refused.
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Arc<Object>>) -> usize {
        self.swap_kind(kind, objects).0
    }

    /// `replace_kind`, which also returns the objects replaced, for the caller to drop where
    /// it costs nothing (a large kind's objects take milliseconds to free). The kind's range
    /// is cut out of the map and the list, sorted, bulk-built and appended: no insertion one
    /// by one.
    pub fn swap_kind(
        &mut self,
        kind: Kind,
        objects: Vec<Arc<Object>>,
    ) -> (usize, BTreeMap<Key, Arc<Object>>) {
        let mut old = self
            .objects
            .split_off(&(kind, String::new(), String::new()));
        let next = old.keys().find(|k| k.0 != kind).cloned();
        if let Some(next) = next {
            let mut after = old.split_off(&next);
            self.objects.append(&mut after);
        }
        let room = MAX_OBJECTS.saturating_sub(self.objects.len());
        // A key listed twice takes room once, its last version kept (as inserting each would).
        let mut new: BTreeMap<Key, Arc<Object>> = BTreeMap::new();
        let mut refused = 0;
        let listed = objects.len();
        if listed <= room {
            new = objects.into_iter().map(|o| (o.key(), o)).collect();
        } else {
            for o in objects {
                let key = o.key();
                if new.len() < room || new.contains_key(&key) {
                    new.insert(key, o);
                } else {
                    refused += 1;
                }
            }
        }
        // `append` rebuilds the whole map: a few objects are inserted one by one.
        if new.len() * 16 < self.objects.len() {
            self.objects.extend(new);
        } else {
            self.objects.append(&mut new);
        }
        self.refused.insert(kind, refused);
        (refused, old)
    }

    /// Adds or replaces an object; `false` when it is new and the catalog is full (it is
    /// counted as refused).
    pub fn put(&mut self, object: Object) -> bool {
        let key = object.key();
        if !self.objects.contains_key(&key) && self.objects.len() >= MAX_OBJECTS {
            *self.refused.entry(object.kind).or_default() += 1;
            return false;
        }
        self.objects.insert(key, Arc::new(object));
        true
    }

    /// Removes an object. `true` when objects of its kind were refused for want of room:
    /// the kind should be listed again now that there is some.
    pub fn delete(&mut self, object: &Object) -> bool {
        let removed = self.objects.remove(&object.key()).is_some();
        removed && self.refused.get(&object.kind).is_some_and(|&n| n > 0)
    }

    /// The objects of `kind`, in (namespace, name) order.
    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(move |(k, _)| k.0 == kind)
            .map(|(_, o)| &**o)
    }

    /// The source's Nodes, EndpointSlices and Services, for the upstreams that discover them.
    pub fn discovered(&self, source: &str) -> Discovered {
        let kinds = [Kind::Node, Kind::EndpointSlice, Kind::Service];
        discovered_of(kinds.into_iter().flat_map(|k| self.of_kind(k)), source)
    }

    /// Objects refused for want of room, of every kind.
    pub fn refused(&self) -> usize {
        self.refused.values().sum()
    }

    /// The route document of the source: each host to `upstream`, or to an upstream made of
    /// the object's load-balancer addresses (on the port the client connected to). Objects
    /// are taken in (kind, namespace, name) order; a host already routed keeps its first.
    pub fn document(
        &self,
        source: &str,
        upstream: Option<&str>,
        ingress_class: Option<&str>,
    ) -> Made {
        document_of(
            self.objects.values().map(|o| &**o),
            source,
            upstream,
            ingress_class,
        )
    }
}

/// `Catalog::discovered`, of objects in key order.
pub fn discovered_of<'o>(objects: impl Iterator<Item = &'o Object>, source: &str) -> Discovered {
    let mut found = Discovered {
        source: source.into(),
        ..Discovered::default()
    };
    for o in objects {
        match o.kind {
            Kind::Node => found.nodes.push(Node {
                name: o.name.clone(),
                address: o.addresses.first().copied(),
                state: o.node.as_deref().cloned().unwrap_or_default(),
                problem: o.problem.is_some(),
            }),
            Kind::EndpointSlice => {
                if let Some(service) = &o.service {
                    found.slices.push(Slice {
                        namespace: o.namespace.clone(),
                        service: service.clone(),
                        endpoints: o.endpoints.clone(),
                    });
                }
            }
            Kind::Service => {
                if let Some(ports) = &o.node_ports {
                    found.services.push(ServiceInfo {
                        namespace: o.namespace.clone(),
                        name: o.name.clone(),
                        node_ports: (**ports).clone(),
                    });
                }
            }
            _ => {}
        }
    }
    found
}

/// What a source's Nodes, EndpointSlices and Services made for the upstreams that discover
/// them, with those objects: while they are the same (a batch of Ingress events), the next
/// write takes it as it is rather than copying thousands of nodes again.
pub type Discovery = Arc<(Vec<Arc<Object>>, Arc<Discovered>)>;

/// The source's discovered objects, made again unless they are those of `memo`; the new memo
/// when made.
pub fn discovered_again(
    objects: &[Arc<Object>],
    source: &str,
    memo: Option<Discovery>,
) -> (Arc<Discovered>, Option<Discovery>) {
    let now: Vec<&Arc<Object>> = objects
        .iter()
        .filter(|o| matches!(o.kind, Kind::Node | Kind::EndpointSlice | Kind::Service))
        .collect();
    if let Some(memo) = memo {
        let (before, discovered) = &*memo;
        if before.len() == now.len() && before.iter().zip(&now).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return (Arc::clone(discovered), None);
        }
    }
    let discovered = Arc::new(discovered_of(now.iter().map(|o| &***o), source));
    let memo = Arc::new((now.into_iter().cloned().collect(), Arc::clone(&discovered)));
    (discovered, Some(memo))
}

/// `Catalog::document`: the route document of a source's objects, as the APIs mean them:
/// - Ingresses of the class the edge serves: `ingress_class=`, or else the cluster's default
///   IngressClass; an Ingress without a class belongs to the default class. When the cluster
///   marks no class as its default (or its IngressClasses cannot be read), without
///   `ingress_class=` every Ingress is read;
/// - Gateway API routes that a Gateway accepted, their hostnames intersected with the
///   listeners' (a route without hostnames takes its listener's); when a Gateway cannot be
///   read, the route's own hostnames;
/// - a host claimed by two objects stays with the oldest (`creationTimestamp`, then namespace
///   and name), as ingress controllers do: a newer object cannot take a live host.
pub fn document_of<'o>(
    objects: impl Iterator<Item = &'o Object>,
    source: &str,
    upstream: Option<&str>,
    ingress_class: Option<&str>,
) -> Made {
    let objects: Vec<&Object> = objects.collect();
    let mut made = Made::default();
    let classes: Vec<&Object> = objects
        .iter()
        .copied()
        .filter(|o| o.kind == Kind::IngressClass)
        .collect();
    let defaults: Vec<&str> = classes
        .iter()
        .filter(|o| o.default_class)
        .map(|o| o.name.as_str())
        .collect();
    made.default_class = defaults.first().map(|d| d.to_string());
    // Without ingress_class= and without a default class: a cluster's only class is the one
    // the edge fronts; with several, which one is not known (every Ingress is read, warned).
    let only = (defaults.is_empty() && classes.len() == 1).then(|| classes[0].name.as_str());
    made.ambiguous_class = ingress_class.is_none() && defaults.is_empty() && classes.len() > 1;
    let serves = |class: Option<&str>| match (ingress_class, class) {
        (Some(want), Some(class)) => class == want,
        (Some(want), None) => defaults.contains(&want),
        (None, class) if !defaults.is_empty() => class.is_none_or(|c| defaults.contains(&c)),
        (None, class) => match only {
            Some(only) => class == Some(only),
            None => true,
        },
    };
    let gateways: std::collections::HashMap<(&str, &str), &Object> = objects
        .iter()
        .filter(|o| o.kind == Kind::Gateway)
        .map(|o| ((o.namespace.as_str(), o.name.as_str()), *o))
        .collect();
    let mut routing: Vec<(&Object, Vec<String>)> = Vec::new();
    for object in objects {
        if let Some(problem) = &object.problem {
            made.problems += 1;
            made.first_problem.get_or_insert_with(|| {
                format!(
                    "{:?} {}/{}: {problem}",
                    object.kind, object.namespace, object.name
                )
            });
            continue;
        }
        match object.kind {
            Kind::IngressClass
            | Kind::Gateway
            | Kind::Node
            | Kind::EndpointSlice
            | Kind::Service => {}
            Kind::Ingress if !serves(object.class.as_deref()) => made.other_class += 1,
            Kind::Ingress => routing.push((object, object.hosts.clone())),
            _ if object.parents.is_empty() => made.unaccepted += 1,
            _ => routing.push((object, route_hosts(object, &gateways))),
        }
    }
    routing.sort_by(|(a, _), (b, _)| {
        let age = |o: &Object| o.created.unwrap_or(i64::MAX);
        (age(a), &a.namespace, &a.name, a.kind).cmp(&(age(b), &b.namespace, &b.name, b.kind))
    });
    let mut seen = std::collections::HashSet::new();
    for (object, hosts) in routing {
        let over = made.document.routes.len() + hosts.len() > MAX_SOURCE_ROUTES
            || (upstream.is_none() && made.document.upstreams.len() >= MAX_SOURCE_UPSTREAMS);
        if over {
            made.over_limit += 1;
            made.first_over_limit.get_or_insert_with(|| {
                format!("{:?} {}/{}", object.kind, object.namespace, object.name)
            });
            continue;
        }
        let target = match upstream {
            Some(up) => up.to_owned(),
            None if object.addresses.is_empty() => {
                if !hosts.is_empty() {
                    made.unrouted += 1;
                }
                continue;
            }
            None => {
                let name = made_up_name(source, object);
                made.document.upstreams.push(UpstreamDef {
                    name: name.clone(),
                    kind: UpstreamKind::Servers(
                        object
                            .addresses
                            .iter()
                            .map(|&ip| ServerDef {
                                ip,
                                port: None,
                                weight: 1,
                                backup: false,
                                draining: false,
                            })
                            .collect(),
                    ),
                    policy: Policy::default(),
                    limits: None,
                });
                name
            }
        };
        for host in &hosts {
            let key = match parse_route_key(host) {
                Some(RouteKey::Wildcard(suffix)) => object.kind.wildcard(suffix),
                Some(key) => key,
                None => {
                    made.invalid.push(format!(
                        "{:?} {}/{}: \"{host}\"",
                        object.kind, object.namespace, object.name
                    ));
                    continue;
                }
            };
            let name = match &key {
                RouteKey::Exact(n) => (false, n.clone()),
                RouteKey::Wildcard(n) | RouteKey::OneLabel(n) => (true, n.clone()),
            };
            if !seen.insert(name) {
                made.repeated += 1;
                continue;
            }
            made.document.routes.push((
                key,
                Targets {
                    tls: Some(target.clone()),
                    http: Some(target.clone()),
                    limits: None,
                },
            ));
        }
    }
    made.routes = made.document.routes.len();
    made
}

/// The hostnames a Gateway API route serves: its own, intersected with those of the
/// listeners of the Gateways that accepted it.
fn route_hosts(
    route: &Object,
    gateways: &std::collections::HashMap<(&str, &str), &Object>,
) -> Vec<String> {
    let mut hosts = Vec::new();
    for parent in &route.parents {
        let Some(gateway) = gateways.get(&(parent.namespace.as_str(), parent.name.as_str())) else {
            // The Gateway cannot be read: its listeners are not known.
            hosts.extend(route.hosts.iter().cloned());
            continue;
        };
        let listeners = gateway
            .listeners
            .iter()
            .filter(|l| parent.section.as_deref().is_none_or(|s| s == l.name));
        for listener in listeners {
            match &listener.hostname {
                None => hosts.extend(route.hosts.iter().cloned()),
                Some(l) if route.hosts.is_empty() => hosts.push(l.clone()),
                Some(l) => hosts.extend(route.hosts.iter().filter_map(|h| intersect(h, l))),
            }
        }
    }
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// The hostnames a route's `route` and a listener's `listener` both take (the Gateway API's
/// intersection): the more specific of the two when one contains the other.
fn intersect(route: &str, listener: &str) -> Option<String> {
    let (route, listener) = (route.to_ascii_lowercase(), listener.to_ascii_lowercase());
    let below = |name: &str, suffix: &str| {
        name.len() > suffix.len() + 1
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
    };
    match (route.strip_prefix("*."), listener.strip_prefix("*.")) {
        (None, None) => (route == listener).then_some(route),
        (None, Some(l)) => below(&route, l).then_some(route),
        (Some(r), None) => below(&listener, r).then_some(listener),
        (Some(r), Some(l)) if r == l || below(r, l) => Some(route),
        (Some(r), Some(l)) => below(l, r).then_some(listener),
    }
}

/// The upstream name made for an object's addresses: `k8s.SOURCE.NAMESPACE.NAME`, or a hash
/// of it when that is too long.
fn made_up_name(source: &str, o: &Object) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = format!(
        "k8s.{}.{}.{}",
        clean(source),
        clean(&o.namespace),
        clean(&o.name)
    );
    if is_upstream_name(&name) {
        return name;
    }
    let h = crate::health::fnv1a(format!("{source}\n{}\n{}", o.namespace, o.name).as_bytes());
    format!("k8s.{:016x}", h)
}

/// The last good state of a `format=k8s` source, kept on disk.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cache {
    /// Its format version (3; 2 before Nodes were kept, 1 before Gateway API routes
    /// recorded the Gateways that accepted them): tells a cache from a route file.
    pub edge_url_cache: u32,
    pub source: String,
    pub objects: Vec<Object>,
}

/// The start of every cache file: a route file never starts so.
pub const CACHE_MAGIC: &[u8] = b"{\"edge_url_cache\":";
/// The newest cache format (3 since Nodes and EndpointSlices are kept).
const CACHE_VERSION: u32 = 3;

/// The format a cache of `objects` is written in: 2 unless it holds Nodes or EndpointSlices,
/// so that an edge rolled back to a version without them still starts from its copy.
fn version_for<'o>(mut objects: impl Iterator<Item = &'o Object>) -> u32 {
    if objects.any(|o| matches!(o.kind, Kind::Node | Kind::EndpointSlice | Kind::Service)) {
        CACHE_VERSION
    } else {
        2
    }
}

impl Cache {
    pub fn of(source: &str, catalog: &Catalog) -> Cache {
        Cache {
            edge_url_cache: version_for(catalog.objects.values().map(|o| &**o)),
            source: source.into(),
            objects: catalog.objects.values().map(|o| (**o).clone()).collect(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The bytes of a cache of `objects`, as `to_bytes` writes them: each object's JSON is
    /// made once (see `Json`).
    pub fn bytes_of(source: &str, objects: &[Arc<Object>]) -> Vec<u8> {
        let jsons: Vec<&[u8]> = objects
            .iter()
            .map(|o| {
                &**o.json
                    .0
                    .get_or_init(|| serde_json::to_vec(&**o).unwrap_or_default().into())
            })
            .collect();
        let mut bytes = Vec::with_capacity(jsons.iter().map(|j| j.len() + 1).sum::<usize>() + 64);
        bytes.extend_from_slice(CACHE_MAGIC);
        bytes.extend_from_slice(
            version_for(objects.iter().map(|o| &**o))
                .to_string()
                .as_bytes(),
        );
        bytes.extend_from_slice(b",\"source\":");
        // A string's JSON cannot fail.
        let _ = serde_json::to_writer(&mut bytes, source);
        bytes.extend_from_slice(b",\"objects\":[");
        for (i, json) in jsons.iter().enumerate() {
            if i > 0 {
                bytes.push(b',');
            }
            bytes.extend_from_slice(json);
        }
        bytes.extend_from_slice(b"]}");
        bytes
    }

    /// A cache read back; one holding more than `MAX_OBJECTS` objects is refused (this
    /// module never writes one).
    pub fn parse(bytes: &[u8]) -> Result<Catalog, String> {
        let cache: Cache = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if cache.objects.len() > MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects"));
        }
        if !(1..=CACHE_VERSION).contains(&cache.edge_url_cache) {
            return Err(format!("cache format {}", cache.edge_url_cache));
        }
        let mut catalog = Catalog::default();
        for mut o in cache.objects {
            // A cache of version 1 did not record who accepted a route: it was routed, and is
            // again, by its own hostnames (a Gateway not known).
            let route = matches!(o.kind, Kind::HTTPRoute | Kind::TLSRoute);
            if cache.edge_url_cache == 1 && route && o.parents.is_empty() {
                o.parents.push(Parent {
                    namespace: String::new(),
                    name: String::new(),
                    section: None,
                });
            }
            catalog.objects.insert(o.key(), Arc::new(o));
        }
        Ok(catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ingress as the API server sends it, fields we ignore included.
    fn ingress(ns: &str, name: &str, rules: &[&str], tls: &[&str], ip: Option<&str>) -> String {
        let rules: Vec<String> = rules
            .iter()
            .map(|h| {
                if h.is_empty() {
                    r#"{"http":{"paths":[{"path":"/","pathType":"Prefix","backend":{"service":{"name":"d","port":{"number":80}}}}]}}"#.to_owned()
                } else {
                    format!(r#"{{"host":"{h}","http":{{"paths":[{{"path":"/","pathType":"Prefix","backend":{{"service":{{"name":"web","port":{{"number":80}}}}}}}}]}}}}"#)
                }
            })
            .collect();
        let tls: Vec<String> = tls.iter().map(|h| format!("\"{h}\"")).collect();
        let status = match ip {
            Some(ip) => format!(
                r#"{{"loadBalancer":{{"ingress":[{{"ip":"{ip}"}},{{"hostname":"lb.example"}}]}}}}"#
            ),
            None => "{}".into(),
        };
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}","uid":"u","resourceVersion":"7",
            "annotations":{{"kubectl.kubernetes.io/last-applied-configuration":"{{}}"}},
            "managedFields":[{{"manager":"kubectl","operation":"Update","fieldsType":"FieldsV1","fieldsV1":{{"f:spec":{{}}}}}}]}},
            "spec":{{"ingressClassName":"nginx","rules":[{}],"tls":[{{"hosts":[{}],"secretName":"s"}}]}},
            "status":{status}}}"#,
            rules.join(","),
            tls.join(",")
        )
    }

    #[test]
    fn lists_reduce_to_hosts_and_addresses() {
        let body = format!(
            r#"{{"kind":"IngressList","apiVersion":"networking.k8s.io/v1","metadata":{{"resourceVersion":"42","continue":"abc"}},
            "items":[{},{}]}}"#,
            ingress(
                "web",
                "shop",
                &["shop.example.com", ""],
                &["shop.example.com", "*.shop.example.com"],
                Some("10.0.0.5")
            ),
            ingress(
                "web",
                "cm-acme-http-solver-x",
                &["shop.example.com"],
                &[],
                Some("10.0.0.5")
            ),
        );
        let page = parse_list(body.as_bytes(), Some(Kind::Ingress)).unwrap();
        assert_eq!(page.resource_version.as_deref(), Some("42"));
        assert_eq!(page.continue_token.as_deref(), Some("abc"));
        let shop = &page.objects[0];
        // Rules' hosts only: `*.shop.example.com` is only on the certificate (`spec.tls`), which
        // may be shared with another cluster (it was routed).
        assert_eq!(shop.hosts, ["shop.example.com"]);
        assert_eq!(shop.addresses, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(shop.class.as_deref(), Some("nginx"));
        assert!(looks_like_list(body.as_bytes()));
        assert!(!looks_like_list(br#"{"version":1,"routes":{}}"#));
        assert!(parse_list(body.as_bytes(), Some(Kind::TLSRoute)).is_err());
        assert!(parse_list(b"{\"kind\":\"IngressList\"}", None).is_err());
        assert!(parse_list(b"[1,2]", None).is_err());
    }

    /// It was: one Ingress with more than MAX_HOSTS hosts, or one that could not be read,
    /// failed its whole list page and its watch event, and every relist failed the same way.
    #[test]
    fn one_bad_object_is_skipped_not_its_page() {
        let many: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("h{i}.test")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let body = format!(
            r#"{{"kind":"IngressList","metadata":{{"resourceVersion":"5"}},"items":[{},{},
            {{"metadata":{{"name":"odd","namespace":"t2"}},"spec":{{"rules":"not a list"}}}},
            42, {{"metadata":"not an object"}}]}}"#,
            ingress("web", "shop", &["shop.example.com"], &[], None),
            ingress("t1", "huge", &many, &[], None),
        );
        let page = parse_list(body.as_bytes(), Some(Kind::Ingress)).unwrap();
        assert_eq!(page.objects.len(), 3);
        assert_eq!(page.objects[0].hosts, ["shop.example.com"]);
        let huge = &page.objects[1];
        assert!(huge.hosts.is_empty());
        assert_eq!(
            huge.problem.as_deref(),
            Some("1001 hosts, more than the limit of 1000")
        );
        assert!(page.objects[2]
            .problem
            .as_deref()
            .unwrap()
            .starts_with("cannot be read"));
        assert_eq!(page.unreadable, 2);
        let mut c = Catalog::default();
        assert_eq!(c.replace_kind(Kind::Ingress, page.objects), 0);
        let made = c.document("s", Some("u"), None);
        assert_eq!((made.routes, made.problems), (1, 2));
        assert!(made.first_problem.unwrap().contains("t1/huge: 1001 hosts"));

        let event = format!(
            r#"{{"type":"MODIFIED","object":{}}}"#,
            ingress("t1", "huge", &many, &[], None)
        );
        match parse_event(event.as_bytes(), Kind::Ingress).unwrap() {
            Event::Put(o, rv) => assert!(o.problem.is_some() && rv.as_deref() == Some("7")),
            other => panic!("{other:?}"),
        }
        let unnamed = br#"{"type":"ADDED","object":{"metadata":7}}"#;
        assert!(matches!(
            parse_event(unnamed, Kind::Ingress),
            Ok(Event::Unreadable(_))
        ));
    }

    /// It was: an object past MAX_OBJECTS failed the watch after its resourceVersion was
    /// taken, and was never seen again.
    #[test]
    fn a_full_catalog_counts_what_it_refuses_and_asks_for_it_again() {
        let mut c = Catalog::default();
        let objects = (0..MAX_OBJECTS + 2)
            .map(|i| Arc::new(object(Kind::Ingress, &format!("o{i}"), &[], None)))
            .collect();
        assert_eq!(c.replace_kind(Kind::Ingress, objects), 2);
        assert_eq!(c.len(), MAX_OBJECTS);
        assert!(!c.put(object(Kind::HTTPRoute, "late", &[], None)));
        assert!(
            c.put(object(Kind::Ingress, "o1", &["x.test"], None)),
            "a change fits"
        );
        assert_eq!(c.refused(), 3);
        assert!(
            c.delete(&object(Kind::Ingress, "o2", &[], None)),
            "list again"
        );
        assert!(!c.delete(&object(Kind::Ingress, "gone", &[], None)));
    }

    #[test]
    fn events_put_delete_bookmark_and_expire() {
        let added = format!(
            r#"{{"type":"ADDED","object":{}}}"#,
            ingress("a", "b", &["x.test"], &[], None)
        );
        match parse_event(added.as_bytes(), Kind::Ingress).unwrap() {
            Event::Put(o, rv) => {
                assert_eq!((o.hosts.len(), rv.as_deref()), (1, Some("7")));
            }
            other => panic!("{other:?}"),
        }
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"Ingress","apiVersion":"networking.k8s.io/v1","metadata":{"resourceVersion":"99"}}}"#;
        assert_eq!(
            parse_event(bookmark, Kind::Ingress),
            Ok(Event::Bookmark("99".into()))
        );
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}}"#;
        assert_eq!(parse_event(gone, Kind::Ingress), Ok(Event::Expired));
        let other = br#"{"type":"ERROR","object":{"kind":"Status","code":500,"reason":"InternalError","message":"etcd"}}"#;
        assert!(
            matches!(parse_event(other, Kind::Ingress), Ok(Event::Error(m)) if m.contains("500"))
        );
        assert!(parse_event(b"{\"type\":\"NOPE\",\"object\":{}}", Kind::Ingress).is_err());
        assert!(parse_event(b"garbage", Kind::Ingress).is_err());
    }

    /// An object of namespace "web"; an Ingress of class "nginx"; a route accepted by the
    /// Gateway "web/gw" (not in the catalog unless a test adds it).
    fn object(kind: Kind, name: &str, hosts: &[&str], ip: Option<&str>) -> Object {
        let mut o = Object::new(kind, "web".into(), name.into());
        o.hosts = hosts.iter().map(|h| h.to_string()).collect();
        o.addresses = ip.iter().map(|ip| ip.parse().unwrap()).collect();
        if kind == Kind::Ingress {
            o.class = Some("nginx".into());
        }
        if matches!(kind, Kind::HTTPRoute | Kind::TLSRoute) {
            o.parents = vec![Parent {
                namespace: "web".into(),
                name: "gw".into(),
                section: None,
            }];
        }
        o
    }

    #[test]
    fn the_document_keeps_each_apis_wildcard_meaning() {
        let mut c = Catalog::default();
        assert!(c.put(object(
            Kind::Ingress,
            "a",
            &["*.apps.test", "A.test", "bad host"],
            None,
        )));
        assert!(c.put(object(Kind::HTTPRoute, "b", &["*.gw.test", "a.test"], None)));
        let made = c.document("cluster-a", Some("cluster-a"), None);
        assert_eq!(made.routes, 3);
        assert_eq!(made.repeated, 1, "a.test is the Ingress's");
        assert_eq!(made.invalid.len(), 1);
        let keys: Vec<&RouteKey> = made.document.routes.iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&&RouteKey::OneLabel("apps.test".into())));
        assert!(keys.contains(&&RouteKey::Wildcard("gw.test".into())));
        assert!(keys.contains(&&RouteKey::Exact("a.test".into())));
        assert_eq!(c.document("x", None, None).unrouted, 2);
        assert_eq!(
            c.document("x", Some("u"), Some("traefik")).routes,
            2,
            "only the HTTPRoute"
        );
    }

    fn class(name: &str, default: bool) -> Object {
        let mut o = Object::new(Kind::IngressClass, String::new(), name.into());
        o.default_class = default;
        o
    }

    fn hosts_of(made: &Made) -> Vec<String> {
        let mut hosts: Vec<String> = made
            .document
            .routes
            .iter()
            .map(|(k, _)| k.to_string())
            .collect();
        hosts.sort();
        hosts
    }

    /// It was: without `ingress_class=`, Ingresses of every class were published (internal
    /// ones too); with it, those without a class (which the default class serves) were not.
    #[test]
    fn ingresses_follow_the_default_class() {
        let mut c = Catalog::default();
        for (name, class) in [
            ("pub", Some("nginx")),
            ("int", Some("internal")),
            ("none", None),
        ] {
            let mut o = object(Kind::Ingress, name, &[&format!("{name}.test")], None);
            o.class = class.map(Into::into);
            assert!(c.put(o));
        }
        let hosts = |c: &Catalog, class| hosts_of(&c.document("s", Some("u"), class));
        assert_eq!(
            hosts(&c, None),
            ["int.test", "none.test", "pub.test"],
            "no default class"
        );
        assert!(c.put(class("nginx", true)));
        assert!(c.put(class("internal", false)));
        assert_eq!(hosts(&c, None), ["none.test", "pub.test"]);
        assert_eq!(hosts(&c, Some("nginx")), ["none.test", "pub.test"]);
        assert_eq!(hosts(&c, Some("internal")), ["int.test"]);
        let made = c.document("s", Some("u"), None);
        assert_eq!(
            (made.other_class, made.default_class.as_deref()),
            (1, Some("nginx"))
        );
        // No default: the only class is the one the edge fronts; several are not known apart.
        assert!(c.put(class("nginx", false)));
        let made = c.document("s", Some("u"), None);
        assert!(made.ambiguous_class);
        assert_eq!(hosts_of(&made), ["int.test", "none.test", "pub.test"]);
        c.delete(&class("internal", false));
        assert_eq!(hosts(&c, None), ["pub.test"], "the only class, nginx");
    }

    /// A tenant cannot make a source's table too large to merge: the newest objects past
    /// the limit route nothing.
    #[test]
    fn a_source_is_bounded_in_routes() {
        let mut c = Catalog::default();
        for i in 0..MAX_SOURCE_ROUTES / MAX_HOSTS + 2 {
            let mut o = object(Kind::Ingress, &format!("o{i:04}"), &[], None);
            o.hosts = (0..MAX_HOSTS).map(|h| format!("h{h}.{i}.test")).collect();
            o.created = Some(i as i64);
            assert!(c.put(o));
        }
        let made = c.document("s", Some("u"), None);
        assert_eq!(made.routes, MAX_SOURCE_ROUTES);
        assert_eq!(made.over_limit, 2);
        assert_eq!(made.first_over_limit.as_deref(), Some("Ingress web/o0250"));
    }

    /// It was: caches written before routes recorded their Gateways lost every route at start.
    #[test]
    fn a_cache_of_version_1_keeps_its_routes() {
        let v1 = br#"{"edge_url_cache":1,"source":"s","objects":[{"kind":"HTTPRoute","namespace":"web","name":"r","hosts":["r.test"],"addresses":[]}]}"#;
        let c = Cache::parse(v1).unwrap();
        assert_eq!(c.document("s", Some("u"), None).routes, 1);
        assert!(Cache::parse(br#"{"edge_url_cache":9,"source":"s","objects":[]}"#).is_err());
    }

    /// It was: routes were taken whether or not a Gateway accepted them, and whatever the
    /// listeners' hostnames.
    #[test]
    fn gateway_routes_need_a_parent_that_accepted_them_and_its_listeners() {
        let mut c = Catalog::default();
        let mut gw = Object::new(Kind::Gateway, "web".into(), "gw".into());
        gw.listeners = vec![
            Listener {
                name: "apps".into(),
                hostname: Some("*.apps.test".into()),
            },
            Listener {
                name: "admin".into(),
                hostname: Some("admin.test".into()),
            },
        ];
        assert!(c.put(gw));
        assert!(c.put(object(
            Kind::HTTPRoute,
            "r1",
            &["a.apps.test", "other.test"],
            None
        )));
        assert!(c.put(object(Kind::TLSRoute, "r2", &[], None)));
        let mut r3 = object(Kind::HTTPRoute, "r3", &["*.x.apps.test"], None);
        r3.parents[0].section = Some("apps".into());
        assert!(c.put(r3));
        let mut waiting = object(Kind::HTTPRoute, "waiting", &["w.apps.test"], None);
        waiting.parents.clear();
        assert!(c.put(waiting));
        let made = c.document("s", Some("u"), None);
        assert_eq!(
            hosts_of(&made),
            ["*.apps.test", "*.x.apps.test", "a.apps.test", "admin.test"],
            "r2 takes the listeners' own hostnames"
        );
        assert_eq!(made.unaccepted, 1);
        // A Gateway that cannot be read: the route's own hostnames.
        let mut elsewhere = object(Kind::HTTPRoute, "r4", &["e.test"], None);
        elsewhere.parents[0].name = "unknown".into();
        assert!(c.put(elsewhere));
        assert!(hosts_of(&c.document("s", Some("u"), None)).contains(&"e.test".to_owned()));
    }

    #[test]
    fn hostnames_intersect_as_the_gateway_api_says() {
        for (route, listener, both) in [
            ("a.test", "a.test", Some("a.test")),
            ("a.test", "b.test", None),
            ("a.b.test", "*.test", Some("a.b.test")),
            ("test", "*.test", None),
            ("*.test", "a.test", Some("a.test")),
            ("*.a.test", "*.test", Some("*.a.test")),
            ("*.test", "*.a.test", Some("*.a.test")),
            ("*.test", "*.test", Some("*.test")),
            ("*.a.test", "*.b.test", None),
            ("xa.test", "*.a.test", None),
            ("A.Test", "a.test", Some("a.test")),
        ] {
            assert_eq!(
                intersect(route, listener).as_deref(),
                both,
                "{route} {listener}"
            );
        }
    }

    /// It was: a host claimed by two objects went to the first in (kind, namespace, name)
    /// order, so a newer object in an earlier-sorting namespace took a live host.
    #[test]
    fn the_oldest_object_keeps_a_host() {
        let mut c = Catalog::default();
        let mut old = object(Kind::Ingress, "old", &["shop.test"], None);
        old.namespace = "zz".into();
        old.created = unix_seconds("2025-01-01T00:00:00Z");
        let mut new = object(Kind::Ingress, "new", &["shop.test"], None);
        new.namespace = "aa".into();
        new.created = unix_seconds("2026-11-29T10:00:00Z");
        let mut route = object(Kind::HTTPRoute, "route", &["shop.test"], None);
        route.created = unix_seconds("2024-06-01T00:00:00Z");
        assert!(c.put(old) && c.put(new));
        let upstream_of = |c: &Catalog| {
            let made = c.document("s", None, None);
            made.document.routes.len()
        };
        assert_eq!(upstream_of(&c), 0, "no addresses: routed nowhere");
        let made = c.document("s", Some("u"), None);
        assert_eq!((made.routes, made.repeated), (1, 1));
        // Which one kept it shows without upstream=: each has its own load balancer.
        for (name, ip) in [("old", "10.0.0.1"), ("new", "10.0.0.2")] {
            let key = (
                Kind::Ingress,
                if name == "old" { "zz" } else { "aa" }.to_owned(),
                name.to_owned(),
            );
            let mut o = (*c.objects[&key]).clone();
            o.addresses = vec![ip.parse().unwrap()];
            assert!(c.put(o));
        }
        let made = c.document("s", None, None);
        assert_eq!(
            made.document.routes[0].1.tls.as_deref(),
            Some("k8s.s.zz.old")
        );
        // An older object of another kind, that routes nowhere, takes nothing from it.
        assert!(c.put(route));
        let made = c.document("s", None, None);
        assert_eq!((made.unrouted, made.routes), (1, 1));
        assert_eq!(
            made.document.routes[0].1.tls.as_deref(),
            Some("k8s.s.zz.old")
        );
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            unix_seconds("2026-11-29T10:00:00.123456Z"),
            Some(1_795_946_400)
        );
        assert_eq!(unix_seconds("not a date"), None);
    }

    #[test]
    fn route_status_and_classes_are_read() {
        let route = br#"{"type":"MODIFIED","object":{"kind":"HTTPRoute","metadata":{"name":"r","namespace":"web","resourceVersion":"9","creationTimestamp":"2026-11-29T10:00:00Z"},
            "spec":{"hostnames":["r.test"],"parentRefs":[{"name":"gw"},{"name":"other","namespace":"infra"}]},
            "status":{"parents":[
              {"parentRef":{"name":"gw"},"controllerName":"c","conditions":[{"type":"Accepted","status":"True"}]},
              {"parentRef":{"name":"other","namespace":"infra","sectionName":"https"},"conditions":[{"type":"Accepted","status":"False"}]},
              {"parentRef":{"group":"","kind":"Service","name":"mesh"},"conditions":[{"type":"Accepted","status":"True"}]}]}}}"#;
        match parse_event(route, Kind::HTTPRoute).unwrap() {
            Event::Put(o, _) => {
                assert_eq!(
                    o.parents,
                    [Parent {
                        namespace: "web".into(),
                        name: "gw".into(),
                        section: None
                    }]
                );
                assert_eq!(o.created, Some(1_795_946_400));
            }
            other => panic!("{other:?}"),
        }
        let list = br#"{"kind":"IngressClassList","metadata":{"resourceVersion":"3"},"items":[
            {"metadata":{"name":"nginx","annotations":{"ingressclass.kubernetes.io/is-default-class":"true"}},"spec":{"controller":"k8s.io/ingress-nginx"}},
            {"metadata":{"name":"internal"},"spec":{"controller":"k8s.io/ingress-nginx"}}]}"#;
        let page = parse_list(list, Some(Kind::IngressClass)).unwrap();
        let defaults: Vec<bool> = page.objects.iter().map(|o| o.default_class).collect();
        assert_eq!(defaults, [true, false]);
    }

    #[test]
    fn without_an_upstream_hosts_route_to_the_load_balancer() {
        let mut c = Catalog::default();
        assert!(c.put(object(
            Kind::Ingress,
            "shop",
            &["shop.test"],
            Some("10.1.0.7"),
        )));
        let made = c.document("b", None, None);
        let up = &made.document.upstreams[0];
        assert_eq!(up.name, "k8s.b.web.shop");
        assert_eq!(
            up.kind,
            UpstreamKind::Servers(vec![ServerDef {
                ip: "10.1.0.7".parse().unwrap(),
                port: None,
                weight: 1,
                backup: false,
                draining: false,
            }])
        );
        assert_eq!(
            made.document.routes[0].1.tls.as_deref(),
            Some("k8s.b.web.shop")
        );
        let table = crate::routes::table::RouteTable::merge(&[&made.document], &|_| false);
        assert!(table.is_ok());
        let long = object(
            Kind::Ingress,
            &"n".repeat(200),
            &["l.test"],
            Some("10.1.0.8"),
        );
        assert!(is_upstream_name(&made_up_name("b", &long)));
    }

    #[test]
    fn a_cache_reads_back_as_the_catalog_it_was() {
        let mut c = Catalog::default();
        assert!(c.put(object(Kind::TLSRoute, "t", &["t.test"], Some("::1"))));
        assert!(c.put(object(Kind::Ingress, "i", &["i.test"], None)));
        let bytes = Cache::of("s", &c).to_bytes();
        assert!(bytes.starts_with(CACHE_MAGIC));
        let shared: Vec<Arc<Object>> = c.objects.values().cloned().collect();
        assert_eq!(Cache::bytes_of("s", &shared), bytes);
        // Again, from each object's JSON made the first time; and a name JSON must escape.
        assert_eq!(Cache::bytes_of("s", &shared), bytes);
        assert_eq!(
            Cache::bytes_of("s\"é\\", &shared),
            Cache::of("s\"é\\", &c).to_bytes()
        );
        assert_eq!(Cache::parse(&bytes).unwrap(), c);
        assert!(Cache::parse(b"{\"edge_url_cache\":1}").is_err());
        c.replace_kind(Kind::Ingress, vec![]);
        assert_eq!(c.len(), 1);
        c.delete(&object(Kind::TLSRoute, "t", &[], None));
        assert!(c.is_empty());
    }

    /// A kind's list replaces that kind only, whatever sorts before and after it, and gives
    /// back what it replaced.
    #[test]
    fn a_list_replaces_its_kind_only() {
        let mut c = Catalog::default();
        for kind in Kind::ANY {
            c.put(object(kind, "a", &["a.test"], None));
            c.put(object(kind, "b", &["b.test"], None));
        }
        let before = c.len();
        for kind in Kind::ANY {
            let (refused, old) = c.swap_kind(
                kind,
                vec![
                    Arc::new(object(kind, "c", &[], None)),
                    Arc::new(object(kind, "b", &["new.test"], None)),
                ],
            );
            assert_eq!((refused, old.len()), (0, 2), "{kind:?}");
            assert!(old.values().all(|o| o.kind == kind && o.name != "c"));
            assert_eq!(c.len(), before, "{kind:?}");
            let names: Vec<(&str, &[String])> = c
                .of_kind(kind)
                .map(|o| (o.name.as_str(), &o.hosts[..]))
                .collect();
            assert_eq!(names, [("b", &["new.test".to_owned()][..]), ("c", &[][..])]);
        }
        for kind in Kind::ANY {
            assert_eq!(c.of_kind(kind).count(), 2, "{kind:?}");
        }
        assert_eq!(c.swap_kind(Kind::Ingress, vec![]).1.len(), 2);
        assert_eq!(c.len(), before - 2);
    }

    fn arc_node(name: &str, ip: &str) -> Arc<Object> {
        let mut o = Object::new(Kind::Node, String::new(), name.into());
        o.addresses = vec![ip.parse().unwrap()];
        Arc::new(o)
    }

    /// A batch that changed no Node, EndpointSlice or Service takes what they made last time;
    /// one that changed any makes it again.
    #[test]
    fn the_discovered_objects_are_made_again_only_when_they_change() {
        let ingress = Arc::new(Object::new(Kind::Ingress, "web".into(), "shop".into()));
        let mut objects = vec![Arc::clone(&ingress), arc_node("a1", "10.0.0.1")];
        let (first, memo) = discovered_again(&objects, "s", None);
        assert_eq!(first.nodes.len(), 1);
        let memo = memo.expect("made");
        // Another Ingress: the same nodes.
        objects.push(Arc::new(Object::new(
            Kind::Ingress,
            "web".into(),
            "blog".into(),
        )));
        let (again, none) = discovered_again(&objects, "s", Some(Arc::clone(&memo)));
        assert!(none.is_none());
        assert!(Arc::ptr_eq(&first, &again));
        // A node replaced by an event, even an equal one: made again.
        objects[1] = arc_node("a1", "10.0.0.2");
        let (changed, made) = discovered_again(&objects, "s", Some(Arc::clone(&memo)));
        assert!(made.is_some());
        assert_eq!(changed.nodes[0].address, Some("10.0.0.2".parse().unwrap()));
        // A node added.
        objects.push(arc_node("a2", "10.0.0.3"));
        let (more, _) = discovered_again(&objects, "s", made);
        assert_eq!(more.nodes.len(), 2);
    }

    /// Near the limit, a key listed twice takes room once (its last version kept), as
    /// inserting each object would.
    #[test]
    fn a_key_listed_twice_takes_room_once() {
        let mut c = Catalog::default();
        let others: Vec<Arc<Object>> = (0..MAX_OBJECTS - 2)
            .map(|i| Arc::new(object(Kind::HTTPRoute, &format!("r{i}"), &[], None)))
            .collect();
        assert_eq!(c.replace_kind(Kind::HTTPRoute, others), 0);
        let list = vec![
            Arc::new(object(Kind::Ingress, "a", &["old.test"], None)),
            Arc::new(object(Kind::Ingress, "a", &["new.test"], None)),
            Arc::new(object(Kind::Ingress, "b", &[], None)),
            Arc::new(object(Kind::Ingress, "c", &[], None)),
        ];
        assert_eq!(c.replace_kind(Kind::Ingress, list), 1, "c has no room");
        let kept: Vec<(&str, &[String])> = c
            .of_kind(Kind::Ingress)
            .map(|o| (o.name.as_str(), &o.hosts[..]))
            .collect();
        assert_eq!(kept, [("a", &["new.test".to_owned()][..]), ("b", &[][..])]);
    }

    /// The table takes the document the feed made when it wrote a candidate rather than
    /// parsing the bytes again: both must be the same document.
    #[test]
    fn the_document_made_is_the_one_read_back() {
        let mut c = Catalog::default();
        c.put(object(
            Kind::Ingress,
            "i",
            &["i.test", "*.w.test", "bad host"],
            None,
        ));
        c.put(object(
            Kind::Ingress,
            "j",
            &["i.test", "j.test"],
            Some("10.0.0.9"),
        ));
        c.put(object(Kind::TLSRoute, "t", &["t.test"], Some("::1")));
        let mut class = Object::new(Kind::IngressClass, String::new(), "nginx".into());
        class.default_class = true;
        c.put(class);
        let mut node = Object::new(Kind::Node, String::new(), "n1".into());
        node.addresses = vec!["10.1.0.1".parse().unwrap()];
        c.put(node);
        let mut slice = Object::new(Kind::EndpointSlice, "ingress".into(), "s1".into());
        slice.service = Some("ingress".into());
        c.put(slice);
        let objects: Vec<Arc<Object>> = c.objects.values().cloned().collect();
        for upstream in [Some("up"), None] {
            let made =
                document_of(objects.iter().map(|o| &**o), "s", upstream, None).with_discovered(
                    Some(Arc::new(discovered_of(objects.iter().map(|o| &**o), "s"))),
                );
            let back = Cache::parse(&Cache::bytes_of("s", &objects)).unwrap();
            let read = back
                .document("s", upstream, None)
                .with_discovered(Some(Arc::new(back.discovered("s"))));
            assert_eq!(made, read);
            assert_eq!(read.discovered.as_ref().unwrap().nodes.len(), 1);
            assert_eq!(read.discovered.as_ref().unwrap().slices.len(), 1);
        }
    }

    /// A Node as the API server sends it: its InternalIP (IPv4 first), Ready, cordon, the
    /// autoscaler's taint and its labels; the rest ignored. Read back from a cache.
    #[test]
    fn nodes_are_read_as_kubernetes_writes_them() {
        let list = br#"{"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": [
          {"metadata": {"name": "a1", "labels": {"role": "ingress"}, "managedFields": [{"x": 1}]},
           "spec": {"podCIDR": "10.42.0.0/24"},
           "status": {"addresses": [{"type": "Hostname", "address": "a1"}, {"type": "InternalIP", "address": "fd00::1"},
                                    {"type": "ExternalIP", "address": "203.0.113.1"}, {"type": "InternalIP", "address": "10.0.0.1"}],
                      "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}]}},
          {"metadata": {"name": "a2"},
           "spec": {"unschedulable": true, "taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
           "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}], "conditions": [{"type": "Ready", "status": "Unknown"}]}},
          {"metadata": {"name": "a3"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        ]}"#;
        let page = parse_list(list, Some(Kind::Node)).unwrap();
        assert_eq!(page.kind, Some(Kind::Node));
        let mut catalog = Catalog::default();
        catalog.replace_kind(Kind::Node, page.objects);
        let found = catalog.discovered("a");
        let got: Vec<_> = found
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.address.map(|a| a.to_string()),
                    n.state.ready,
                    n.state.unschedulable,
                    n.state.deleting,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a1", Some("10.0.0.1".into()), Some(true), false, false),
                ("a2", Some("10.0.0.2".into()), None, true, true),
                ("a3", None, Some(false), false, false),
            ]
        );
        assert_eq!(found.nodes[0].state.labels["role"], "ingress");
        // Nodes route nothing, and count as nothing unrouted.
        let made = catalog.document("a", Some("u"), None);
        assert_eq!((made.routes, made.unrouted, made.unaccepted), (0, 0, 0));
        let back = Cache::parse(&Cache::of("a", &catalog).to_bytes()).unwrap();
        assert_eq!(back.objects, catalog.objects);
        // A watch event of a Node.
        let event = br#"{"type": "MODIFIED", "object": {"kind": "Node", "metadata": {"name": "a1", "resourceVersion": "8"},
            "spec": {"unschedulable": true}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}]}}}"#;
        match parse_event(event, Kind::Node).unwrap() {
            Event::Put(o, rv) => {
                assert_eq!(rv.as_deref(), Some("8"));
                assert!(o.node.unwrap().unschedulable);
            }
            other => panic!("{other:?}"),
        }
    }

    /// Addresses a kubelet could write to turn the edge against its own host: never servers.
    #[test]
    fn unusable_node_addresses_are_refused() {
        for bad in [
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!usable(&bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "10.0.0.1",
            "127.0.0.2",
            "192.168.0.1",
            "2001:db8::1",
            "fd00::1",
        ] {
            assert!(usable(&good.parse().unwrap()), "{good}");
        }
        let node = br#"{"kind": "Node", "metadata": {"name": "evil", "deletionTimestamp": "2026-11-29T10:00:00Z"},
            "spec": {"taints": [{"key": "karpenter.sh/disrupted"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "169.254.169.254"}], "conditions": [{"type": "Ready", "status": "True"}]}}"#;
        let raw: &RawValue = serde_json::from_slice(node).unwrap();
        let (Read::Object(o), _) = read_object(raw, Some(Kind::Node)) else {
            panic!()
        };
        assert!(o.addresses.is_empty());
        assert!(o.node.unwrap().deleting);
    }

    /// A Service of type NodePort or LoadBalancer: its TCP node ports and traffic policy; a
    /// ClusterIP Service has none.
    #[test]
    fn services_node_ports() {
        let list = br#"{"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "3"}, "items": [
          {"metadata": {"name": "ingress", "namespace": "kube-system"},
           "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "clusterIP": "10.43.0.10",
                    "ports": [{"name": "https", "port": 443, "targetPort": 443, "nodePort": 30443, "protocol": "TCP"},
                              {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"},
                              {"name": "http", "port": 80, "nodePort": 30080}]}},
          {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"type": "ClusterIP", "ports": [{"port": 80}]}}
        ]}"#;
        let page = parse_list(list, Some(Kind::Service)).unwrap();
        let mut catalog = Catalog::default();
        catalog.replace_kind(Kind::Service, page.objects);
        let found = catalog.discovered("a");
        assert_eq!(found.services.len(), 1);
        let ingress = &found.services[0];
        assert_eq!(
            (ingress.namespace.as_str(), ingress.name.as_str()),
            ("kube-system", "ingress")
        );
        assert_eq!(ingress.node_ports.ports, [(443, 30443), (80, 30080)]);
        assert!(ingress.node_ports.local);
        let back = Cache::parse(&Cache::of("a", &catalog).to_bytes()).unwrap();
        assert_eq!(back.objects, catalog.objects);
    }
}
