//! The route table a worker serves from: documents merged, references resolved, and the
//! name lookup (exact, then longest wildcard suffix, then default).

use std::collections::HashMap;
use std::fmt;

use super::discover::{self, Discovered, Kinds, What};
use super::document::limits::{MAX_ROUTES, MAX_UPSTREAMS};
use super::document::{Document, RouteKey, ServerDef, Targets, UpstreamDef, UpstreamKind};
use super::image::{self, Image, LimitSet};
use super::limits::{Limits, MAX_TABLE_NETWORKS};
use crate::balance::Pool;
use crate::sniff::Protocol;
use crate::upstream::CheckKind;

pub type UpstreamId = u32;

#[derive(Debug)]
pub struct Upstream {
    pub name: Box<str>,
    pub kind: Backend,
}

#[derive(Debug)]
pub enum Backend {
    /// Balanced by the module.
    Servers(Box<Pool>),
    /// Handed to nginx by name.
    Nginx(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route<'d> {
    tls: Option<UpstreamId>,
    http: Option<UpstreamId>,
    /// The document that gave it.
    file: usize,
    /// Its own limits, over its upstreams'.
    limits: Option<&'d Limits>,
}

impl Route<'_> {
    fn targets(self) -> image::Targets {
        image::Targets {
            tls: self.tls.unwrap_or(image::NONE),
            http: self.http.unwrap_or(image::NONE),
        }
    }
}

fn upstream(targets: image::Targets, protocol: Protocol) -> Option<UpstreamId> {
    let id = match protocol {
        Protocol::Tls => targets.tls,
        Protocol::Http => targets.http,
    };
    (id != image::NONE).then_some(id)
}

/// Which rule matched a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy<'t> {
    Exact(&'t str),
    /// The suffix after `*.`.
    Wildcard(&'t str),
    Default,
}

impl fmt::Display for MatchedBy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatchedBy::Exact(name) => f.write_str(name),
            MatchedBy::Wildcard(suffix) => write!(f, "*.{suffix}"),
            MatchedBy::Default => f.write_str("default"),
        }
    }
}

#[derive(Debug)]
pub struct Match<'t> {
    pub by: MatchedBy<'t>,
    pub upstream: &'t Upstream,
    /// The route's limits for the connection's protocol: a limit record of the image, or
    /// `image::NONE` (see `RouteTable::limits`).
    pub limits: u32,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    upstreams: Vec<Upstream>,
    /// The route names, compiled: see `image`.
    image: Image,
    /// Indices of the upstreams with an active check, for the check timer.
    checked: Vec<UpstreamId>,
}

/// Why a connection's server no longer takes connections like it (see `still_serves`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gone {
    /// Its route now names another upstream, or none.
    RouteMoved,
    /// Its server is no longer in its upstream.
    Removed,
    /// Its server is draining (a cluster's node cordoned or going away).
    Draining,
}

impl Gone {
    pub fn as_str(self) -> &'static str {
        match self {
            Gone::RouteMoved => "its route moved",
            Gone::Removed => "the server was removed",
            Gone::Draining => "the server is draining",
        }
    }
}

/// Something worth a warning that does not reject the table, or (`notice`) a change worth
/// telling: a discovered server that starts or stops taking new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeWarning {
    pub file: usize,
    pub message: String,
    pub notice: bool,
}

/// A reference to an upstream that no file defines, found in file `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeError {
    pub file: usize,
    pub message: String,
}

/// Inserts unless the key is there already; `true` if it was.
trait InsertNew<'a, V> {
    fn try_insert_new(&mut self, key: &'a str, value: V) -> bool;
}

impl<'a, V> InsertNew<'a, V> for HashMap<&'a str, V> {
    fn try_insert_new(&mut self, key: &'a str, value: V) -> bool {
        match self.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => true,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(value);
                false
            }
        }
    }
}

/// What a merge knows besides its documents: the URL sources of the table that discover
/// nodes, and the servers each discovering upstream had in the table it replaces (kept when
/// none is eligible now).
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub sources: Vec<(String, Kinds)>,
    pub previous: HashMap<String, Vec<ServerDef>>,
    /// What `$edge_source` calls each document: a file's path, a URL source's name.
    pub origins: Vec<String>,
}

impl RouteTable {
    /// Merges documents in order, without sources that discover nodes: see `merge_with`.
    pub fn merge(
        documents: &[&Document],
        nginx_upstream_exists: &dyn Fn(&str) -> bool,
    ) -> Result<(RouteTable, Vec<MergeWarning>), MergeError> {
        RouteTable::merge_with(documents, nginx_upstream_exists, &Discovery::default())
    }

    /// The servers of each upstream that discovers nodes, by name: what the next merge keeps
    /// if none is eligible then.
    pub fn discovered_servers(&self) -> HashMap<String, Vec<ServerDef>> {
        let view = self.image.view();
        (0..view.upstream_count())
            .map(|i| view.upstream(i))
            .filter(|u| u.discovered())
            .map(|u| (u.name().to_owned(), u.servers()))
            .collect()
    }

    /// Merges documents in order. A name defined twice (upstream, route or default) keeps its
    /// first definition and yields a warning. `nginx_upstream_exists` tells which nginx.conf
    /// upstream blocks exist.
    pub fn merge_with<'d>(
        documents: &[&'d Document],
        nginx_upstream_exists: &dyn Fn(&str) -> bool,
        discovery: &Discovery,
    ) -> Result<(RouteTable, Vec<MergeWarning>), MergeError> {
        let mut exact: HashMap<&str, Route> = HashMap::new();
        let mut wildcard: HashMap<&str, (Route, bool)> = HashMap::new();
        let mut default: Option<Route> = None;
        let mut warnings = Vec::new();
        let mut ids: HashMap<&str, (UpstreamId, usize)> = HashMap::new();
        let mut defs: Vec<&UpstreamDef> = Vec::new();

        // Each file is checked against the limit on its own; the table as a whole too.
        let mut defined = 0;
        for (file, doc) in documents.iter().enumerate() {
            defined += doc.upstreams.len();
            if defined > MAX_UPSTREAMS {
                return Err(MergeError {
                    file,
                    message: format!(
                        "{defined} upstreams in this and the earlier files, more than the limit of {MAX_UPSTREAMS}"
                    ),
                });
            }
        }
        for (file, doc) in documents.iter().enumerate() {
            for def in &doc.upstreams {
                if let Some(&(_, first)) = ids.get(def.name.as_str()) {
                    warnings.push(MergeWarning {
                        file,
                        notice: false,
                        message: format!(
                            "upstreams.{}: already defined in an earlier file (#{first}), ignored",
                            def.name
                        ),
                    });
                    continue;
                }
                if let UpstreamKind::Nginx(name) = &def.kind {
                    if !nginx_upstream_exists(name) {
                        return Err(MergeError {
                            file,
                            message: format!(
                                "upstreams.{}.nginx_upstream: no \"upstream {name} {{}}\" block in the stream section of nginx.conf",
                                def.name
                            ),
                        });
                    }
                }
                if let UpstreamKind::Discover(d) = &def.kind {
                    let reads = discovery
                        .sources
                        .iter()
                        .find(|(name, _)| *name == d.source)
                        .map(|&(_, kinds)| kinds);
                    if !reads.is_some_and(|k| k.covers(d.needs())) {
                        return Err(MergeError {
                            file,
                            message: format!(
                                "upstreams.{}.discover.source: no edge_routes_url name={} with discover={} among the sources of this table",
                                def.name,
                                d.source,
                                d.needs()
                            ),
                        });
                    }
                }
                ids.insert(&def.name, (defs.len() as UpstreamId, file));
                defs.push(def);
            }
        }

        let resolve = |file: usize,
                       path: &dyn fmt::Display,
                       t: &'d Targets|
         -> Result<Route<'d>, MergeError> {
            let id = |name: &Option<String>, proto: &str| match name {
                None => Ok(None),
                Some(name) => ids
                    .get(name.as_str())
                    .map(|&(id, _)| Some(id))
                    .ok_or_else(|| MergeError {
                        file,
                        message: format!("{path}{proto}: unknown upstream \"{name}\""),
                    }),
            };
            let proto_suffix = |p: &'static str| if t.tls == t.http { "" } else { p };
            Ok(Route {
                tls: id(&t.tls, proto_suffix(".tls"))?,
                http: id(&t.http, proto_suffix(".http"))?,
                file,
                limits: t.limits.as_deref(),
            })
        };

        let total: usize = documents.iter().map(|d| d.routes.len()).sum();
        if total > MAX_ROUTES {
            return Err(MergeError {
                file: documents.len().saturating_sub(1),
                message: format!("{total} routes in all, more than the limit of {MAX_ROUTES}"),
            });
        }
        for (file, doc) in documents.iter().enumerate() {
            for (key, targets) in &doc.routes {
                let route = resolve(file, &format_args!("routes[\"{key}\"]"), targets)?;
                let taken = match key {
                    RouteKey::Exact(name) => exact.try_insert_new(name, route),
                    RouteKey::Wildcard(suffix) => wildcard.try_insert_new(suffix, (route, false)),
                    RouteKey::OneLabel(suffix) => wildcard.try_insert_new(suffix, (route, true)),
                };
                if taken {
                    warnings.push(MergeWarning {
                        file,
                        notice: false,
                        message: format!(
                            "routes[\"{key}\"]: already routed by an earlier file, ignored"
                        ),
                    });
                }
            }
            if let Some(targets) = &doc.default {
                let route = resolve(file, &"default", targets)?;
                if default.is_some() {
                    warnings.push(MergeWarning {
                        file,
                        notice: false,
                        message: "default: already set by an earlier file, ignored".into(),
                    });
                } else {
                    default = Some(route);
                }
            }
        }
        let found: HashMap<&str, &Discovered> = documents
            .iter()
            .filter_map(|d| d.discovered.as_deref())
            .map(|d| (d.source.as_str(), d))
            .collect();
        // A discovering upstream's servers, and its node ports.
        type Resolved = Option<(UpstreamKind, Vec<(u16, u16)>)>;
        let resolved: Vec<Resolved> = defs
            .iter()
            .map(|def| {
                let UpstreamKind::Discover(d) = &def.kind else {
                    return None;
                };
                let previous = discovery.previous.get(&def.name).map(Vec::as_slice);
                let answered = found.get(d.source.as_str()).copied();
                let s = discover::select(d, answered, previous);
                let file = ids[def.name.as_str()].1;
                let (one, counts) = match &d.what {
                    What::Nodes(_) => (
                        "node",
                        format!(
                            "{} node(s) of {} selected: {} draining, {} out",
                            s.matched, d.source, s.draining, s.out
                        ),
                    ),
                    What::NodePort { namespace, name } => (
                        "node",
                        format!(
                            "{} node(s) of {} for the node ports of Service {namespace}/{name}: {} draining, {} out",
                            s.matched, d.source, s.draining, s.out
                        ),
                    ),
                    What::Service {
                        namespace, name, ..
                    } => (
                        "endpoint",
                        format!(
                            "{} endpoint(s) of Service {namespace}/{name} in {}: {} draining, {} out",
                            s.matched, d.source, s.draining, s.out
                        ),
                    ),
                };
                let message = if answered.is_none() {
                    Some(format!(
                        "upstreams.{}: {} has not answered yet; its {} previous server(s) are kept",
                        def.name,
                        d.source,
                        s.servers.len()
                    ))
                } else if s.kept_previous {
                    Some(format!(
                        "upstreams.{}: no {one} is eligible ({counts}); its {} previous server(s), unready, are kept (fail open)",
                        def.name,
                        s.eligible
                    ))
                } else if s.failed_open {
                    Some(format!(
                        "upstreams.{}: no {one} is eligible ({counts}); its {} unready server(s) are taken (fail open)",
                        def.name,
                        s.eligible
                    ))
                } else if s.eligible == 0 {
                    Some(format!(
                        "upstreams.{}: no {one} is eligible ({counts}); it has no server to send to",
                        def.name
                    ))
                } else if s.over > 0 {
                    Some(format!(
                        "upstreams.{}: {} {one}(s) past the limit of {} servers are left out",
                        def.name,
                        s.over,
                        s.servers.len()
                    ))
                } else {
                    None
                };
                if let Some(message) = message {
                    warnings.push(MergeWarning {
                        file,
                        message,
                        notice: false,
                    });
                }
                // What changed for new connections, once (the next table compares with this
                // one). Not at a start, nor before the source's first answer (no previous
                // servers: every one would be "added").
                if let (Some(previous), Some(_)) = (previous, answered) {
                    let told = if previous.is_empty() {
                        Vec::new()
                    } else {
                        discover::changes(previous, &s.servers, &s.why)
                    };
                    for change in told {
                        warnings.push(MergeWarning {
                            file,
                            message: format!("upstreams.{}: {change}", def.name),
                            notice: true,
                        });
                    }
                }
                Some((UpstreamKind::Servers(s.servers), s.port_map))
            })
            .collect();
        let mut image = image::Builder::default();
        let check_names = check_names(&defs, documents);
        for ((def, check_name), resolved) in defs.iter().zip(&check_names).zip(&resolved) {
            image.upstream(image::UpstreamSpec {
                name: &def.name,
                kind: resolved.as_ref().map_or(&def.kind, |(kind, _)| kind),
                policy: &def.policy,
                check_name: *check_name,
                discovered: resolved.is_some(),
                port_map: resolved.as_ref().map_or(&[][..], |(_, map)| map),
            });
        }
        let origins: Vec<image::Origin> = (0..documents.len())
            .map(|f| match discovery.origins.get(f) {
                Some(name) => image.origin(name),
                None => image::NO_ORIGIN,
            })
            .collect();
        // Per protocol: the route's limits over those of the upstream it sends to, made once
        // per (route limits, upstream): a million routes that share them cost a lookup each.
        let any_upstream_limits = defs.iter().any(|d| d.limits.is_some());
        let mut made: HashMap<(*const Limits, UpstreamId), u32> = HashMap::new();
        let mut limit_ids = |image: &mut image::Builder, route: &Route| -> image::LimitIds {
            if route.limits.is_none() && !any_upstream_limits {
                return image::NO_LIMITS;
            }
            let own = route
                .limits
                .map_or(core::ptr::null(), |l| l as *const Limits);
            [route.tls, route.http].map(|id| match id {
                None => image::NONE,
                Some(id) => *made.entry((own, id)).or_insert_with(|| {
                    image.limits(Limits::over(
                        route.limits,
                        defs[id as usize].limits.as_deref(),
                    ))
                }),
            })
        };
        for (name, route) in exact {
            let limits = limit_ids(&mut image, &route);
            image.exact_limited(name, route.targets(), origins[route.file], limits);
        }
        for (suffix, (route, one_label)) in wildcard {
            let limits = limit_ids(&mut image, &route);
            image.wildcard_limited(
                suffix,
                route.targets(),
                one_label,
                origins[route.file],
                limits,
            );
        }
        if let Some(route) = default {
            let limits = limit_ids(&mut image, &route);
            image.set_default_limited(route.targets(), origins[route.file], limits);
        }
        if image.network_count() > MAX_TABLE_NETWORKS {
            return Err(MergeError {
                file: documents.len().saturating_sub(1),
                message: format!(
                    "{} client networks in the routes' limits, more than the limit of {MAX_TABLE_NETWORKS} (routes with the same limits share theirs)",
                    image.network_count()
                ),
            });
        }
        Ok((RouteTable::from_image(image.build()), warnings))
    }

    /// The table an image describes: its names, and this worker's state for each upstream.
    pub fn from_image(image: Image) -> RouteTable {
        let view = image.view();
        let mut upstreams = Vec::with_capacity(view.upstream_count());
        let mut checked = Vec::new();
        for i in 0..view.upstream_count() {
            let entry = view.upstream(i);
            let kind = match entry.nginx() {
                Some(name) => Backend::Nginx(name.into()),
                None => {
                    let mut pool = Pool::new(entry.servers(), entry.policy());
                    pool.set_port_map(entry.port_map());
                    if pool.policy().check.is_some() {
                        pool.set_check_name(entry.check_name().map(Into::into));
                        checked.push(i as UpstreamId);
                    }
                    Backend::Servers(Box::new(pool))
                }
            };
            upstreams.push(Upstream {
                name: entry.name().into(),
                kind,
            });
        }
        RouteTable {
            upstreams,
            image,
            checked,
        }
    }

    /// Serves this table from another copy of its image (the file it was written to, mapped):
    /// the upstreams built from the first copy stay. `false`, and no change, if the bytes
    /// differ.
    pub fn use_image(&mut self, image: Image) -> bool {
        if image.bytes() != self.image.bytes() {
            return false;
        }
        self.image = image;
        true
    }

    /// The compiled image this table was made from.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Finds the upstream for a name read from a client (already lower-cased), or for a
    /// connection without a name. Costs one hash lookup, plus one per label for wildcards.
    pub fn lookup(&self, name: Option<&str>, protocol: Protocol) -> Option<Match<'_>> {
        let found = name.and_then(|name| self.lookup_name(name, protocol));
        let view = self.image.view();
        let p = protocol as usize;
        let (by, id, limits) = match found {
            Some(found) => found,
            None => (
                MatchedBy::Default,
                upstream(view.default()?, protocol)?,
                view.default_limits(p),
            ),
        };
        Some(Match {
            by,
            // A checked image names no id without its upstream; `get` costs nothing more.
            upstream: self.upstreams.get(id as usize)?,
            limits,
        })
    }

    /// The limits `Match::limits` names; `None` for none.
    #[inline]
    pub fn limits(&self, id: u32) -> Option<LimitSet> {
        self.image.view().limit_set(id)
    }

    fn lookup_name<'t>(
        &'t self,
        name: &str,
        protocol: Protocol,
    ) -> Option<(MatchedBy<'t>, UpstreamId, u32)> {
        let image = self.image.view();
        let p = protocol as usize;
        if let Some((key, targets, at)) = image.exact_at(name.as_bytes()) {
            if let Some(id) = upstream(targets, protocol) {
                return Some((MatchedBy::Exact(key), id, image.route_limits(at, p)));
            }
        }
        if image.wildcard_count() == 0 {
            return None;
        }
        // Longest suffix first: for a.b.example.com try b.example.com, example.com, com. A
        // one-label wildcard only matches the first of them.
        let mut rest = name;
        let mut first = true;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some((key, targets, at)) = image.wildcard_at(rest.as_bytes()) {
                if first || !at.one_label {
                    if let Some(id) = upstream(targets, protocol) {
                        return Some((MatchedBy::Wildcard(key), id, image.route_limits(at, p)));
                    }
                }
            }
            first = false;
        }
        None
    }

    /// The file or URL source that gave the route `by` (`$edge_source`).
    pub fn source_of(&self, by: &MatchedBy) -> Option<&str> {
        let view = self.image.view();
        match by {
            MatchedBy::Exact(key) => view.exact_origin(key.as_bytes()),
            MatchedBy::Wildcard(suffix) => view.wildcard_origin(suffix.as_bytes()),
            MatchedBy::Default => view.default_origin(),
        }
    }

    /// Whether a connection that went to `server` of upstream `upstream` for `name` would
    /// still go there with this table: `Err(why)` when its route now names another upstream
    /// (or none), or its server was removed or is draining.
    pub fn still_serves(
        &self,
        name: Option<&str>,
        protocol: Protocol,
        upstream: &str,
        server: &ServerDef,
    ) -> Result<(), Gone> {
        let Some(found) = self.lookup(name, protocol) else {
            return Err(Gone::RouteMoved);
        };
        if &*found.upstream.name != upstream {
            return Err(Gone::RouteMoved);
        }
        let Some(pool) = found.upstream.servers() else {
            return Err(Gone::RouteMoved);
        };
        match pool
            .servers()
            .iter()
            .find(|s| s.ip == server.ip && s.port == server.port)
        {
            None => Err(Gone::Removed),
            Some(s) if s.draining => Err(Gone::Draining),
            Some(_) => Ok(()),
        }
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The upstreams with an active check, by index into `upstreams()`.
    pub fn checked(&self) -> impl Iterator<Item = usize> + '_ {
        self.checked.iter().map(|&i| i as usize)
    }

    /// What freeing it costs, in items: its routes, its upstreams and their servers. Routes
    /// count although the image is one buffer or one mapping: freeing the table the master
    /// read touches pages the workers share with it (measured at 100,000 routes: 1.7 MB more
    /// per worker when freed in the event loop rather than on the thread that gives pages
    /// back).
    pub fn free_weight(&self) -> usize {
        let servers: usize = self
            .upstreams
            .iter()
            .map(|u| match &u.kind {
                Backend::Servers(pool) => pool.servers().len(),
                Backend::Nginx(_) => 0,
            })
            .sum();
        self.route_count() + self.upstreams.len() + servers
    }

    pub fn route_count(&self) -> usize {
        let image = self.image.view();
        image.exact_count() + image.wildcard_count()
    }
}

impl Upstream {
    pub fn servers(&self) -> Option<&Pool> {
        match &self.kind {
            Backend::Servers(rr) => Some(rr),
            Backend::Nginx(_) => None,
        }
    }
}

/// Each active check's SNI or Host, by upstream: the check's own `sni`/`host`, else the first
/// exact route (in file order) that sends the check's protocol to the upstream.
fn check_names<'d>(defs: &[&'d UpstreamDef], documents: &[&'d Document]) -> Vec<Option<&'d str>> {
    let by_name: HashMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let mut names: Vec<Option<&str>> = defs
        .iter()
        .map(|d| d.policy.check.as_ref().and_then(|c| c.name.as_deref()))
        .collect();
    for doc in documents {
        for (key, targets) in &doc.routes {
            let RouteKey::Exact(name) = key else { continue };
            for target in [&targets.tls, &targets.http].into_iter().flatten() {
                let Some(&i) = by_name.get(target.as_str()) else {
                    continue;
                };
                let def = defs[i];
                if matches!(def.kind, UpstreamKind::Nginx(_)) {
                    continue;
                }
                let Some(check) = &def.policy.check else {
                    continue;
                };
                let wanted = match check.kind {
                    CheckKind::Tls => &targets.tls,
                    CheckKind::Http => &targets.http,
                    CheckKind::Tcp => continue,
                };
                if names[i].is_none() && wanted.as_deref() == Some(def.name.as_str()) {
                    names[i] = Some(name.as_str());
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::json::Json;

    fn document(text: &str) -> Document {
        let json: Json = serde_json::from_str(text).unwrap();
        Document::from_json(&json).unwrap()
    }

    fn table(texts: &[&str]) -> (RouteTable, Vec<MergeWarning>) {
        let docs: Vec<Document> = texts.iter().map(|t| document(t)).collect();
        let refs: Vec<&Document> = docs.iter().collect();
        RouteTable::merge(&refs, &|name| name == "vhosts").unwrap()
    }

    fn find(t: &RouteTable, name: Option<&str>, p: Protocol) -> Option<(String, String)> {
        t.lookup(name, p)
            .map(|m| (m.by.to_string(), m.upstream.name.to_string()))
    }

    fn pair(by: &str, up: &str) -> Option<(String, String)> {
        Some((by.to_owned(), up.to_owned()))
    }

    const BASE: &str = r#"{
        "upstreams": {
            "a": {"servers": ["127.0.0.1"]}, "b": {"servers": ["127.0.0.2"]},
            "c": {"servers": ["127.0.0.3"]}, "local": {"nginx_upstream": "vhosts"}
        },
        "routes": {
            "exact.example.com": "a",
            "*.example.com": "b",
            "*.deep.example.com": "c",
            "deep.example.com": "a",
            "split.example.com": {"tls": "a"}
        }
    }"#;

    /// What a worker builds from an image read back from its bytes is what the files say.
    #[test]
    fn upstreams_come_back_from_the_image_as_the_files_define_them() {
        let doc = document(
            r#"{
            "upstreams": {
              "web": {"servers": ["10.0.0.1", {"address": "[2001:db8::7]:8443", "weight": 7},
                                  {"address": "10.0.0.2:80", "backup": true}],
                      "balance": "hash", "max_fails": 3, "fail_timeout": "5s", "start": "down",
                      "check": {"type": "http", "path": "/healthz", "expect": ["2xx"],
                                "interval": "1500ms", "timeout": "700ms", "rise": 4,
                                "fall": 5, "port": 8080, "proxy_protocol": "v2"}},
              "tls": {"servers": ["10.1.0.1"], "balance": "least_conn",
                      "check": {"type": "tls", "sni": "own.example.com"}},
              "plain": {"servers": ["10.2.0.1:443"]},
              "local": {"nginx_upstream": "vhosts"}
            },
            "routes": {"web.example.com": "web", "t.example.com": "tls", "p.example.com": "plain",
                       "*.local.example.com": "local"},
            "default": "plain"
        }"#,
        );
        let (t, _) = RouteTable::merge(&[&doc], &|n| n == "vhosts").unwrap();
        let again = RouteTable::from_image(Image::from_bytes(t.image().bytes().to_vec()).unwrap());
        // Served from another copy of the same image, the table keeps its upstreams; a
        // different image is refused.
        let (mut same, _) = RouteTable::merge(&[&doc], &|n| n == "vhosts").unwrap();
        let first: *const Upstream = &same.upstreams()[0];
        let copy = same.image().bytes().to_vec();
        assert!(same.use_image(Image::from_bytes(copy.clone()).unwrap()));
        assert!(std::ptr::eq(first, &same.upstreams()[0]));
        assert!(!same.use_image(Image::default()));
        assert_eq!(same.image().bytes(), &copy[..]);
        for table in [&t, &again] {
            assert_eq!(table.upstreams().len(), doc.upstreams.len());
            for (def, up) in doc.upstreams.iter().zip(table.upstreams()) {
                assert_eq!(&*up.name, def.name.as_str());
                match (&def.kind, &up.kind) {
                    (UpstreamKind::Servers(list), Backend::Servers(pool)) => {
                        assert_eq!(pool.servers(), &list[..], "{}", def.name);
                        assert_eq!(pool.policy(), &def.policy, "{}", def.name);
                    }
                    (UpstreamKind::Nginx(a), Backend::Nginx(b)) => assert_eq!(a.as_str(), &**b),
                    _ => panic!("{}: another kind", def.name),
                }
            }
            let name = |u: usize| match &table.upstreams()[u].kind {
                Backend::Servers(pool) => pool.check_name().map(str::to_owned),
                Backend::Nginx(_) => None,
            };
            assert_eq!(name(0).as_deref(), Some("web.example.com"));
            assert_eq!(name(1).as_deref(), Some("own.example.com"));
            assert_eq!(table.checked().collect::<Vec<_>>(), [0, 1]);
            assert_eq!(
                find(table, Some("x.local.example.com"), Protocol::Tls),
                pair("*.local.example.com", "local")
            );
            assert_eq!(find(table, None, Protocol::Http), pair("default", "plain"));
        }
    }

    /// A route's limits over its upstream's, per protocol, for exact, wildcard and default
    /// routes; equal sets share one record, and the image survives a round trip.
    #[test]
    fn limits_are_per_route_and_protocol() {
        let (t, _) = table(&[r#"{
            "upstreams": {
                "a": {"servers": ["127.0.0.1"], "limits": {"max_conns": 100, "deny": ["10.0.0.0/8"]}},
                "b": {"servers": ["127.0.0.2"]}
            },
            "routes": {
                "plain.test": "b",
                "up.test": "a",
                "own.test": {"upstream": "a", "limits": {"max_conns": 10, "rate": "50r/s", "burst": 10}},
                "split.test": {"tls": "a", "http": "b"},
                "*.wild.test": {"upstream": "b", "limits": {"max_conns_per_client": 2, "allow": ["192.0.2.0/24"]}}
            },
            "default": {"upstream": "b", "limits": {"rate": "600r/m"}}
        }"#]);
        let limits = |name: Option<&str>, p| t.limits(t.lookup(name, p).unwrap().limits);
        assert_eq!(limits(Some("plain.test"), Protocol::Tls), None);
        let up = limits(Some("up.test"), Protocol::Tls).unwrap();
        assert_eq!((up.max_conns, up.rate), (100, 0));
        let own = limits(Some("own.test"), Protocol::Http).unwrap();
        assert_eq!((own.max_conns, own.rate, own.burst), (10, 50, 10));
        assert_eq!(own.interval_us(), 20_000);
        let view = t.image().view();
        // The upstream's deny list stays under the route's own limits.
        assert!(!view.allows(&own, "10.1.1.1".parse().unwrap()));
        assert!(view.allows(&own, "192.0.2.1".parse().unwrap()));
        assert_eq!(limits(Some("split.test"), Protocol::Tls), Some(up));
        assert_eq!(limits(Some("split.test"), Protocol::Http), None);
        let wild = limits(Some("x.wild.test"), Protocol::Tls).unwrap();
        assert_eq!(wild.max_conns_per_client, 2);
        assert!(view.allows(&wild, "192.0.2.9".parse().unwrap()));
        assert!(!view.allows(&wild, "198.51.100.1".parse().unwrap()));
        assert_eq!(
            view.networks(&wild),
            (Vec::new(), vec!["192.0.2.0/24".to_string()])
        );
        let default = limits(Some("nowhere.test"), Protocol::Http).unwrap();
        assert_eq!((default.rate, default.per_minute), (600, true));
        let copy = RouteTable::from_image(Image::from_bytes(t.image().bytes().to_vec()).unwrap());
        let id = copy.lookup(Some("own.test"), Protocol::Tls).unwrap().limits;
        assert_eq!(copy.limits(id), Some(own));
    }

    /// Files under the limit each, over it together: the merged table is refused.
    #[test]
    fn the_upstream_limit_holds_for_the_merged_table() {
        let file = |from: usize, n: usize| Document {
            upstreams: (from..from + n)
                .map(|i| crate::routes::document::UpstreamDef {
                    name: format!("u{i}"),
                    kind: UpstreamKind::Nginx("vhosts".into()),
                    policy: Default::default(),
                    limits: None,
                })
                .collect(),
            routes: Vec::new(),
            default: None,
            discovered: None,
        };
        let half = MAX_UPSTREAMS / 2 + 1;
        let (a, b) = (file(0, half), file(half, half));
        let err = RouteTable::merge(&[&a, &b], &|_| true).unwrap_err();
        assert_eq!(err.file, 1);
        assert!(
            err.message.contains("more than the limit of 100000"),
            "{}",
            err.message
        );
        let c = file(half, half - 2);
        assert!(RouteTable::merge(&[&a, &c], &|_| true).is_ok());
    }

    #[test]
    fn checks_take_their_name_from_the_first_route_of_their_protocol() {
        let (t, _) = table(&[r#"{
            "upstreams": {
              "t": {"servers": ["10.0.0.1"], "check": {"type": "tls"}},
              "h": {"servers": ["10.0.0.2"], "check": {"type": "http"}},
              "own": {"servers": ["10.0.0.3"], "check": {"type": "tls", "sni": "own.example.com"}},
              "none": {"servers": ["10.0.0.4"], "check": {"type": "tls"}}
            },
            "routes": {
              "*.wild.example.com": "t",
              "http-only.example.com": {"http": "t"},
              "first.example.com": "t",
              "second.example.com": "t",
              "web.example.com": {"tls": "t", "http": "h"},
              "x.example.com": "own",
              "y.example.com": {"http": "none"}
            }
        }"#]);
        let name = |u: &str| {
            let up = t.upstreams().iter().find(|x| &*x.name == u).unwrap();
            up.servers().unwrap().check_name().map(str::to_owned)
        };
        assert_eq!(name("t").as_deref(), Some("first.example.com"));
        assert_eq!(name("h").as_deref(), Some("web.example.com"));
        assert_eq!(name("own").as_deref(), Some("own.example.com"));
        assert_eq!(name("none"), None);
        let checked: Vec<&str> = t.checked().map(|i| &*t.upstreams()[i].name).collect();
        assert_eq!(checked, ["t", "h", "own", "none"]);
    }

    #[test]
    fn exact_beats_wildcard_and_longest_suffix_wins() {
        let (t, warnings) = table(&[BASE]);
        assert!(warnings.is_empty());
        assert_eq!(
            find(&t, Some("exact.example.com"), Protocol::Tls),
            pair("exact.example.com", "a")
        );
        assert_eq!(
            find(&t, Some("x.example.com"), Protocol::Tls),
            pair("*.example.com", "b")
        );
        assert_eq!(
            find(&t, Some("x.y.example.com"), Protocol::Tls),
            pair("*.example.com", "b")
        );
        assert_eq!(
            find(&t, Some("x.deep.example.com"), Protocol::Http),
            pair("*.deep.example.com", "c")
        );
        assert_eq!(
            find(&t, Some("deep.example.com"), Protocol::Http),
            pair("deep.example.com", "a")
        );
        // The wildcard covers names below the suffix, not the suffix itself.
        assert_eq!(find(&t, Some("example.com"), Protocol::Tls), None);
        assert_eq!(find(&t, Some("other.test"), Protocol::Tls), None);
        assert_eq!(find(&t, None, Protocol::Tls), None);
    }

    #[test]
    fn a_one_label_wildcard_matches_one_label_only() {
        let mut ingress = document(BASE);
        ingress.routes.clear();
        let to = |name: &str| Targets {
            tls: Some(name.into()),
            http: Some(name.into()),
            limits: None,
        };
        ingress
            .routes
            .push((RouteKey::OneLabel("apps.example.com".into()), to("a")));
        ingress
            .routes
            .push((RouteKey::Wildcard("example.com".into()), to("b")));
        ingress
            .routes
            .push((RouteKey::OneLabel("example.com".into()), to("c")));
        let (t, warnings) = RouteTable::merge(&[&ingress], &|_| true).unwrap();
        assert_eq!(warnings.len(), 1, "the second *.example.com is a conflict");
        assert_eq!(
            find(&t, Some("x.apps.example.com"), Protocol::Tls),
            pair("*.apps.example.com", "a")
        );
        // Two labels in front: not the Ingress wildcard, but the any-depth one above it.
        assert_eq!(
            find(&t, Some("x.y.apps.example.com"), Protocol::Tls),
            pair("*.example.com", "b")
        );
        let mut only = document(BASE);
        only.routes = vec![(RouteKey::OneLabel("example.com".into()), to("c"))];
        let (t, _) = RouteTable::merge(&[&only], &|_| true).unwrap();
        assert_eq!(
            find(&t, Some("x.example.com"), Protocol::Http),
            pair("*.example.com", "c")
        );
        assert_eq!(find(&t, Some("x.y.example.com"), Protocol::Http), None);
    }

    #[test]
    fn a_route_without_the_protocol_falls_through() {
        let (t, _) = table(&[BASE]);
        assert_eq!(
            find(&t, Some("split.example.com"), Protocol::Tls),
            pair("split.example.com", "a")
        );
        assert_eq!(
            find(&t, Some("split.example.com"), Protocol::Http),
            pair("*.example.com", "b")
        );
    }

    #[test]
    fn default_serves_unmatched_and_nameless() {
        let (t, _) = table(&[BASE, r#"{"default": "local"}"#]);
        assert_eq!(
            find(&t, Some("other.test"), Protocol::Tls),
            pair("default", "local")
        );
        assert_eq!(find(&t, None, Protocol::Http), pair("default", "local"));
        assert!(
            matches!(t.lookup(None, Protocol::Http).unwrap().upstream.kind, Backend::Nginx(ref n) if &**n == "vhosts")
        );
    }

    #[test]
    fn merge_keeps_first_definition_and_resolves_across_files() {
        let (t, warnings) = table(&[
            BASE,
            r#"{"upstreams": {"a": {"servers": ["10.9.9.9"]}, "d": {"servers": ["127.0.0.4"]}},
                "routes": {"exact.example.com": "d", "new.test": "a"}, "default": "b"}"#,
            r#"{"routes": {"other.test": "d"}, "default": "c"}"#,
        ]);
        assert_eq!(
            find(&t, Some("exact.example.com"), Protocol::Tls),
            pair("exact.example.com", "a")
        );
        assert_eq!(
            find(&t, Some("other.test"), Protocol::Tls),
            pair("other.test", "d")
        );
        assert_eq!(
            find(&t, Some("nowhere.test"), Protocol::Tls),
            pair("default", "b")
        );
        let files: Vec<usize> = warnings.iter().map(|w| w.file).collect();
        assert_eq!(files, [1, 1, 2], "{warnings:?}");
        assert!(warnings[0]
            .message
            .starts_with("upstreams.a: already defined"));
        assert!(warnings[1]
            .message
            .starts_with("routes[\"exact.example.com\"]: already routed"));
    }

    #[test]
    fn unknown_references_name_file_and_path() {
        let docs = [
            document(BASE),
            document(r#"{"routes": {"x.test": {"http": "nope"}}}"#),
        ];
        let err = RouteTable::merge(&[&docs[0], &docs[1]], &|_| true).unwrap_err();
        assert_eq!(
            err,
            MergeError {
                file: 1,
                message: "routes[\"x.test\"].http: unknown upstream \"nope\"".into()
            }
        );
        let doc = document(r#"{"upstreams": {"l": {"nginx_upstream": "missing"}}}"#);
        let err = RouteTable::merge(&[&doc], &|_| false).unwrap_err();
        assert!(err
            .message
            .starts_with("upstreams.l.nginx_upstream: no \"upstream missing {}\""));
        let doc = document(r#"{"default": "x"}"#);
        let err = RouteTable::merge(&[&doc], &|_| false).unwrap_err();
        assert_eq!(err.message, "default: unknown upstream \"x\"");
    }

    #[test]
    fn lookup_does_not_depend_on_table_size() {
        let routes: Vec<String> = (0..20_000)
            .map(|i| format!("\"host{i}.example.net\": \"a\""))
            .collect();
        let text = format!(
            r#"{{"upstreams": {{"a": {{"servers": ["127.0.0.1"]}}}}, "routes": {{{}}}}}"#,
            routes.join(",")
        );
        let (t, _) = table(&[&text]);
        assert_eq!(t.route_count(), 20_000);
        assert_eq!(
            find(&t, Some("host19999.example.net"), Protocol::Tls),
            pair("host19999.example.net", "a")
        );
    }

    /// An upstream that discovers nodes: the eligible ones of its source's document, the
    /// previous servers when none is, a source not among the table's refused.
    #[test]
    fn discovered_upstreams_take_their_sources_nodes() {
        use crate::routes::discover::{Discovered, Node, NodeState};
        let file = document(
            r#"{"upstreams": {"ingress": {"discover": {"source": "a", "nodes": {"selector": "role=ingress"}}, "balance": "least_conn"}},
                "routes": {"x.test": "ingress"}}"#,
        );
        let node = |name: &str, ip: &str, ready: Option<bool>, role: &str| Node {
            name: name.into(),
            address: ip.parse().ok(),
            state: NodeState {
                ready,
                labels: [("role".to_owned(), role.to_owned())].into_iter().collect(),
                ..NodeState::default()
            },
            problem: false,
        };
        let source = |nodes: Vec<Node>| Document {
            discovered: Some(std::sync::Arc::new(Discovered {
                source: "a".into(),
                nodes,
                ..Discovered::default()
            })),
            ..Document::default()
        };
        let discovery = |previous: Option<&RouteTable>| Discovery {
            sources: vec![(
                "a".into(),
                Kinds {
                    nodes: true,
                    ..Kinds::default()
                },
            )],
            previous: previous
                .map(RouteTable::discovered_servers)
                .unwrap_or_default(),
            origins: Vec::new(),
        };
        let servers = |t: &RouteTable| -> Vec<String> {
            t.discovered_servers()["ingress"]
                .iter()
                .map(|s| s.ip.to_string())
                .collect()
        };
        let nodes = source(vec![
            node("a1", "10.0.0.1", Some(true), "ingress"),
            node("a2", "10.0.0.2", Some(true), "worker"),
            node("a3", "10.0.0.3", Some(false), "ingress"),
        ]);
        let (t, warnings) =
            RouteTable::merge_with(&[&file, &nodes], &|_| false, &discovery(None)).unwrap();
        assert_eq!(servers(&t), ["10.0.0.1"]);
        assert!(warnings.is_empty(), "{warnings:?}");
        // Every selected node NotReady: the previous servers are kept, and said.
        let down = source(vec![node("a1", "10.0.0.1", None, "ingress")]);
        let (t2, warnings) =
            RouteTable::merge_with(&[&file, &down], &|_| false, &discovery(Some(&t))).unwrap();
        assert_eq!(servers(&t2), ["10.0.0.1"]);
        assert!(
            warnings[0]
                .message
                .contains("previous server(s), unready, are kept (fail open)"),
            "{warnings:?}"
        );
        // The source has not answered yet: no server, said; the table is made all the same.
        let (t3, warnings) =
            RouteTable::merge_with(&[&file], &|_| false, &discovery(None)).unwrap();
        assert!(servers(&t3).is_empty());
        assert!(
            warnings[0]
                .message
                .contains("a has not answered yet; its 0 previous server(s)"),
            "{warnings:?}"
        );
        let image = crate::routes::image::Image::from_bytes(t3.image().bytes().to_vec());
        assert!(
            image.is_ok(),
            "an image with an empty discovered upstream reads back"
        );
        // What changed for new connections is told once, at notice; the first answer after
        // a start (no previous servers) tells nothing.
        let notices = |w: &[MergeWarning]| -> Vec<String> {
            w.iter()
                .filter(|w| w.notice)
                .map(|w| w.message.clone())
                .collect()
        };
        let cordoned = |name: &str, ip: &str, ready: Option<bool>| {
            let mut n = node(name, ip, ready, "ingress");
            n.state.unschedulable = true;
            n
        };
        let merged = |nodes: Vec<Node>, previous: &RouteTable| {
            RouteTable::merge_with(
                &[&file, &source(nodes)],
                &|_| false,
                &discovery(Some(previous)),
            )
            .unwrap()
        };
        let ready = || node("a1", "10.0.0.1", Some(true), "ingress");
        let (c1, w) = merged(
            vec![ready(), node("a4", "10.0.0.4", Some(true), "ingress")],
            &t3,
        );
        assert_eq!(servers(&c1), ["10.0.0.1", "10.0.0.4"]);
        assert!(notices(&w).is_empty(), "{w:?}");
        let (c2, w) = merged(vec![ready(), cordoned("a4", "10.0.0.4", Some(true))], &c1);
        assert_eq!(notices(&w), ["upstreams.ingress: server 10.0.0.4 is draining (cordoned): no new connection goes to it, the open ones continue"]);
        let (c3, w) = merged(vec![ready(), cordoned("a4", "10.0.0.4", Some(true))], &c2);
        assert!(notices(&w).is_empty(), "the same nodes again: {w:?}");
        // a1 NotReady: fail open keeps it, and the draining a4 leaves (said), then comes back.
        let (c4, w) = merged(
            vec![
                node("a1", "10.0.0.1", Some(false), "ingress"),
                cordoned("a4", "10.0.0.4", Some(true)),
            ],
            &c3,
        );
        assert_eq!(servers(&c4), ["10.0.0.1"]);
        assert_eq!(notices(&w), ["upstreams.ingress: server 10.0.0.4 is out (cordoned): no new connection goes to it, the open ones continue"]);
        let (c5, w) = merged(vec![ready(), cordoned("a4", "10.0.0.4", Some(true))], &c4);
        assert_eq!(servers(&c5), ["10.0.0.1", "10.0.0.4"]);
        assert_eq!(notices(&w), ["upstreams.ingress: server 10.0.0.4 is draining (cordoned): no new connection goes to it, the open ones continue"]);
        let (_, w) = merged(vec![node("a1", "10.0.0.1", Some(true), "worker")], &c5);
        assert_eq!(
            notices(&w),
            [
                "upstreams.ingress: server 10.0.0.1 is out (gone from the cluster, or no longer selected): no new connection goes to it, the open ones continue",
                "upstreams.ingress: server 10.0.0.4 is out (gone from the cluster, or no longer selected): no new connection goes to it, the open ones continue",
            ]
        );
        // A source that does not discover nodes.
        let err = RouteTable::merge_with(&[&file, &nodes], &|_| false, &Discovery::default())
            .unwrap_err();
        assert!(
            err.message
                .contains("no edge_routes_url name=a with discover=nodes"),
            "{}",
            err.message
        );
    }

    /// A connection's server and route, against the next table.
    #[test]
    fn still_serves_tells_what_moved() {
        let server = |ip: &str| ServerDef {
            ip: ip.parse().unwrap(),
            port: None,
            weight: 1,
            backup: false,
            draining: false,
        };
        let table = |text: &str| RouteTable::merge(&[&document(text)], &|_| true).unwrap().0;
        let before = table(
            r#"{"upstreams": {"u": {"servers": ["10.0.0.1", "10.0.0.2"]}}, "routes": {"x.test": "u"}}"#,
        );
        let q = |t: &RouteTable, ip: &str| {
            t.still_serves(Some("x.test"), Protocol::Http, "u", &server(ip))
        };
        assert_eq!(q(&before, "10.0.0.1"), Ok(()));
        assert_eq!(q(&before, "10.0.0.9"), Err(Gone::Removed));
        let removed =
            table(r#"{"upstreams": {"u": {"servers": ["10.0.0.2"]}}, "routes": {"x.test": "u"}}"#);
        assert_eq!(q(&removed, "10.0.0.1"), Err(Gone::Removed));
        assert_eq!(q(&removed, "10.0.0.2"), Ok(()));
        let moved = table(
            r#"{"upstreams": {"u": {"servers": ["10.0.0.1"]}, "v": {"servers": ["10.0.0.1"]}}, "routes": {"x.test": "v"}}"#,
        );
        assert_eq!(q(&moved, "10.0.0.1"), Err(Gone::RouteMoved));
        let gone = table(r#"{"upstreams": {"u": {"servers": ["10.0.0.1"]}}}"#);
        assert_eq!(q(&gone, "10.0.0.1"), Err(Gone::RouteMoved));
        let nginx =
            table(r#"{"upstreams": {"u": {"nginx_upstream": "n"}}, "routes": {"x.test": "u"}}"#);
        assert_eq!(q(&nginx, "10.0.0.1"), Err(Gone::RouteMoved));
        let with_port = table(
            r#"{"upstreams": {"u": {"servers": ["10.0.0.1:443"]}}, "routes": {"x.test": "u"}}"#,
        );
        assert_eq!(
            q(&with_port, "10.0.0.1"),
            Err(Gone::Removed),
            "another port is another server"
        );
    }
}
