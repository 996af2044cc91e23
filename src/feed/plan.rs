//! Pure: the list-and-watch protocol of one resource of a URL source, the Kubernetes way:
//! list (paged), then watch from the list's resourceVersion; `410 Gone` lists again; a server
//! that answers a watch with a plain list (a static exporter) is polled instead, with
//! `If-None-Match`. Native route documents are polled. The worker layer makes the requests
//! this asks for and reports what came back.

use std::sync::Arc;

use super::kube::{Event, Kind, Object, Page, MAX_OBJECTS};
use super::Url;

/// Objects asked for per list page.
pub const PAGE_LIMIT: usize = 500;
/// Longest wait between attempts after failures.
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// How long a watch may stay silent past its `timeoutSeconds` before it is given up.
pub const WATCH_GRACE_MS: u64 = 60_000;
/// How often a kind the API server does not serve (a Gateway API CRD not installed) is
/// looked for again.
pub const ABSENT_RETRY_MS: u64 = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    List,
    Watch,
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Listing,
    Watching,
    Polling,
    Backoff,
    /// The API server does not serve this kind.
    Absent,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Listing => "listing",
            State::Watching => "watching",
            State::Polling => "polling",
            State::Backoff => "backoff",
            State::Absent => "absent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub target: String,
    pub mode: Mode,
    pub etag: Option<String>,
    /// For a watch: the longest silence to wait for, once the answer has begun. The server
    /// may say nothing until `timeoutSeconds` ends the watch.
    pub idle_ms: Option<u64>,
}

/// What to do with a response's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Read it whole, then hand it to `listed` or `polled`.
    Collect,
    /// Hand it over line by line (`event`).
    Stream,
    /// Nothing to read: ask again after this long.
    Again(u64),
    /// An error: ask again after this long.
    Fail(String, u64),
    /// The API server does not serve this kind (logged once, at info).
    Absent,
}

/// A list finished: the objects of the kind, all pages together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub kind: Kind,
    pub objects: Vec<Arc<Object>>,
    /// Objects past `MAX_OBJECTS`, not kept.
    pub beyond: usize,
    /// Items skipped because they could not be read, and the first reason.
    pub unreadable: usize,
    pub first_unreadable: Option<String>,
}

/// One resource of a source: one kind at one list path, or one polled document.
#[derive(Debug)]
pub struct Resource {
    /// `None`: a native route document (or, for `format=auto`, not known yet).
    pub kind: Option<Kind>,
    /// List paths to try in order: a kind's API versions.
    paths: Vec<String>,
    /// The source can do without it: before it was ever listed, a 404 or a 403 means it has
    /// none (see `Kind::optional`); after, an error like any other (its objects stay).
    optional: bool,
    listed_once: bool,
    query: Option<String>,
    at: usize,
    pub state: State,
    pub resource_version: Option<String>,
    continue_token: Option<String>,
    gathered: Vec<Arc<Object>>,
    /// Of the list under way: objects past `MAX_OBJECTS`, pages, unreadable items.
    beyond: usize,
    pages: usize,
    unreadable: usize,
    first_unreadable: Option<String>,
    /// Objects asked for per page: halved when a page is too large to take.
    limit: usize,
    pub etag: Option<String>,
    /// The server answers watches with a plain list (or the document is native): poll.
    pub polling: bool,
    pub failures: u32,
    interval_ms: u64,
    /// The watch's `timeoutSeconds`.
    watch_seconds: u64,
}

impl Resource {
    /// The resources a source reads: one per kind under an API server's URL, else the URL.
    pub fn for_url(url: &Url, k8s: bool, interval_ms: u64, seed: u64) -> Vec<Resource> {
        let make = |kind: Option<Kind>, paths: Vec<String>, polling: bool, i: u64| Resource {
            optional: kind.is_some_and(Kind::optional),
            listed_once: false,
            kind,
            paths,
            query: url.query.clone(),
            at: 0,
            state: State::Listing,
            resource_version: None,
            continue_token: None,
            gathered: Vec::new(),
            beyond: 0,
            pages: 0,
            unreadable: 0,
            first_unreadable: None,
            limit: PAGE_LIMIT,
            etag: None,
            polling,
            failures: 0,
            interval_ms,
            // 5 to 10 minutes, as client-go: watches of many edges do not end together.
            watch_seconds: 300 + (seed.wrapping_add(i * 0x9e37_79b9)) % 300,
        };
        if !k8s {
            return vec![make(None, vec![url.path.clone()], true, 0)];
        }
        match super::kube::Target::of(&url.path) {
            // One list path: that kind, and the kinds it needs beside it (an Ingress list's
            // IngressClasses, a route list's Gateways).
            Some(kind) => std::iter::once((kind, url.path.clone()))
                .chain(kind.companions(&url.path))
                .enumerate()
                .map(|(i, (kind, path))| make(Some(kind), vec![path], false, i as u64))
                .collect(),
            None => Kind::ALL
                .into_iter()
                .enumerate()
                .map(|(i, kind)| {
                    let paths = kind
                        .api_paths()
                        .iter()
                        .map(|api| format!("{}{api}/{}", url.path, kind.plural()))
                        .collect();
                    make(Some(kind), paths, false, i as u64)
                })
                .collect(),
        }
    }

    /// The Nodes or EndpointSlices of the API server at `url` (`discover=`): read after the
    /// source's other kinds, as more of them.
    pub fn discovered(url: &Url, kind: Kind, interval_ms: u64, seed: u64) -> Resource {
        let mut r = Resource::for_url(url, true, interval_ms, seed).remove(0);
        r.kind = Some(kind);
        // The URL's query (a labelSelector for Ingresses, say) is not theirs.
        r.query = None;
        r.optional = kind.optional();
        r.paths = kind
            .api_paths()
            .iter()
            .map(|api| format!("{}{api}/{}", url.path, kind.plural()))
            .collect();
        r.watch_seconds = 300 + seed.wrapping_add((7 + kind as u64) * 0x9e37_79b9) % 300;
        r
    }

    pub fn path(&self) -> &str {
        &self.paths[self.at]
    }

    /// The next request to make.
    pub fn request(&mut self) -> Request {
        let path = self.path().to_owned();
        let mut params: Vec<String> = self.query.iter().cloned().collect();
        let mode = if self.polling {
            self.state = State::Polling;
            Mode::Poll
        } else if let (Some(rv), None) = (&self.resource_version, &self.continue_token) {
            self.state = State::Watching;
            params.push(format!(
                "watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={}",
                encode(rv),
                self.watch_seconds
            ));
            Mode::Watch
        } else {
            self.state = State::Listing;
            params.push(format!("limit={}", self.limit));
            if let Some(c) = &self.continue_token {
                params.push(format!("continue={}", encode(c)));
            }
            Mode::List
        };
        let target = if path.is_empty() { "/" } else { &path };
        let target = if params.is_empty() {
            target.to_owned()
        } else {
            format!("{target}?{}", params.join("&"))
        };
        Request {
            target,
            mode,
            etag: if mode == Mode::Poll {
                self.etag.clone()
            } else {
                None
            },
            idle_ms: (mode == Mode::Watch).then_some(self.watch_seconds * 1000 + WATCH_GRACE_MS),
        }
    }

    /// A response head came for a request of `mode`; `jitter` is a random number.
    pub fn head(&mut self, mode: Mode, status: u16, etag: Option<String>, jitter: u64) -> Body {
        match (status, mode) {
            (200, Mode::Watch) => Body::Stream,
            (200, _) => {
                if mode == Mode::Poll {
                    self.etag = etag;
                }
                Body::Collect
            }
            (304, Mode::Poll) => {
                self.failures = 0;
                Body::Again(self.interval_ms)
            }
            (410, _) => {
                // Too old a resourceVersion or continue token: list from scratch.
                self.restart();
                Body::Again(0)
            }
            (404, _) if self.optional && self.at + 1 < self.paths.len() => {
                self.at += 1;
                Body::Again(0)
            }
            // Not served (its CRDs are not installed), or not readable by the edge's role:
            // the source has none of it.
            (404 | 403, _) if self.optional && !self.listed_once => {
                self.state = State::Absent;
                self.at = 0;
                Body::Absent
            }
            (status, _) => {
                let why = match status {
                    401 => "401 Unauthorized: check token_file=".to_owned(),
                    403 => "403 Forbidden: the token's role may not list and watch this kind"
                        .to_owned(),
                    _ => format!("HTTP status {status}"),
                };
                self.fail(why, jitter)
            }
        }
    }

    /// Something went wrong (connection, timeout, a broken body): wait, then try again.
    pub fn fail(&mut self, why: String, jitter: u64) -> Body {
        self.failures = self.failures.saturating_add(1);
        self.state = State::Backoff;
        // A list cut short starts over; a watch resumes from its resourceVersion.
        self.continue_token = None;
        self.clear_list();
        Body::Fail(why, self.backoff(jitter))
    }

    /// 1 s, doubling up to `MAX_BACKOFF_MS`, ±25 %.
    fn backoff(&self, jitter: u64) -> u64 {
        let base = 1000u64 << self.failures.saturating_sub(1).min(5);
        let base = base.min(MAX_BACKOFF_MS);
        base * 3 / 4 + jitter % (base / 2 + 1)
    }

    /// After `Absent`: when to look for the kind again.
    pub fn absent_retry(&self) -> u64 {
        ABSENT_RETRY_MS
    }

    fn restart(&mut self) {
        self.resource_version = None;
        self.continue_token = None;
        self.clear_list();
    }

    fn clear_list(&mut self) {
        self.gathered = Vec::new();
        self.beyond = 0;
        self.pages = 0;
        self.unreadable = 0;
        self.first_unreadable = None;
    }

    /// Lists the kind again from scratch at the next request: an event could not be applied,
    /// or objects refused for want of room may fit now.
    pub fn relist(&mut self) {
        self.restart();
    }

    /// The page asked for was too large to take: ask for pages half as large, from the page
    /// that failed. `false` when a page of one object already is.
    pub fn too_large(&mut self) -> bool {
        if self.limit == 1 {
            return false;
        }
        self.limit = (self.limit / 2).max(1);
        true
    }

    /// Pages a list may take: enough for four times `MAX_OBJECTS` at the current page size
    /// (past `MAX_OBJECTS`, objects are only counted), and some.
    fn max_pages(&self) -> usize {
        4 * MAX_OBJECTS / self.limit + 16
    }

    /// A list page arrived. `Some` once the last page is in; an error when the list goes on
    /// past any list the catalog could take (the list is given up, and starts over).
    pub fn listed(&mut self, page: Page) -> Result<Option<Listed>, String> {
        let kind = self.kind.or(page.kind).unwrap_or(Kind::Ingress);
        self.kind = Some(kind);
        self.failures = 0;
        self.pages += 1;
        self.unreadable += page.unreadable;
        if self.first_unreadable.is_none() {
            self.first_unreadable = page.first_unreadable;
        }
        let room = MAX_OBJECTS - self.gathered.len();
        self.beyond += page.objects.len().saturating_sub(room);
        if self.gathered.is_empty() {
            self.gathered = page.objects;
            self.gathered.truncate(room);
        } else {
            self.gathered.extend(page.objects.into_iter().take(room));
        }
        if let Some(c) = page.continue_token {
            if self.pages >= self.max_pages() {
                let pages = self.pages;
                self.restart();
                return Err(format!(
                    "a list of more than {pages} pages, more than any list of {MAX_OBJECTS} objects"
                ));
            }
            self.continue_token = Some(c);
            return Ok(None);
        }
        self.continue_token = None;
        self.resource_version = page.resource_version;
        self.listed_once = true;
        if self.resource_version.is_none() {
            // Nothing to watch from: a static list.
            self.polling = true;
        }
        let listed = Listed {
            kind,
            objects: std::mem::take(&mut self.gathered),
            beyond: self.beyond,
            unreadable: self.unreadable,
            first_unreadable: self.first_unreadable.take(),
        };
        self.clear_list();
        Ok(Some(listed))
    }

    /// The server answered a watch with a plain list: it cannot watch; poll it.
    pub fn cannot_watch(&mut self) {
        self.polling = true;
        self.resource_version = None;
    }

    /// A polled document was taken (or refused): the next poll is one interval away.
    pub fn polled(&mut self, ok: bool) -> u64 {
        if ok {
            self.failures = 0;
        } else {
            // Fetch it again next time even if unchanged: it was refused.
            self.etag = None;
        }
        self.interval_ms
    }

    /// A watch event: its resourceVersion is where to resume. `false` for `Expired`: list
    /// again.
    pub fn event(&mut self, event: &Event) -> bool {
        self.failures = 0;
        match event {
            Event::Put(_, Some(rv)) | Event::Delete(_, Some(rv)) | Event::Bookmark(rv) => {
                self.resource_version = Some(rv.clone());
                true
            }
            Event::Put(_, None) | Event::Delete(_, None) => true,
            Event::Expired | Event::Error(_) | Event::Unreadable(_) => {
                self.restart();
                false
            }
        }
    }

    /// The watch ended as watches do (`timeoutSeconds`): watch again at once.
    pub fn watch_ended(&mut self) -> u64 {
        0
    }
}

/// Percent-encodes a query value (resourceVersions and continue tokens are opaque).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn page(n: usize, rv: Option<&str>, cont: Option<&str>) -> Page {
        Page {
            kind: None,
            objects: (0..n)
                .map(|i| {
                    Arc::new(Object::new(
                        Kind::Ingress,
                        "ns".into(),
                        format!("o{i}-{}", cont.unwrap_or("")),
                    ))
                })
                .collect(),
            resource_version: rv.map(Into::into),
            continue_token: cont.map(Into::into),
            unreadable: 0,
            first_unreadable: None,
        }
    }

    #[test]
    fn an_api_server_is_read_kind_by_kind_list_then_watch() {
        let rs = Resource::for_url(
            &url("https://10.0.0.1:6443/k8s/clusters/c-1"),
            true,
            10_000,
            1,
        );
        let paths: Vec<&str> = rs.iter().map(|r| r.path()).collect();
        assert_eq!(
            paths,
            [
                "/k8s/clusters/c-1/apis/networking.k8s.io/v1/ingresses",
                "/k8s/clusters/c-1/apis/gateway.networking.k8s.io/v1/httproutes",
                "/k8s/clusters/c-1/apis/gateway.networking.k8s.io/v1/tlsroutes",
                "/k8s/clusters/c-1/apis/networking.k8s.io/v1/ingressclasses",
                "/k8s/clusters/c-1/apis/gateway.networking.k8s.io/v1/gateways",
            ]
        );
        // One list path brings the kind it needs beside it.
        let paths = |u: &str| -> Vec<String> {
            Resource::for_url(&url(u), true, 10_000, 1)
                .iter()
                .map(|r| r.path().to_owned())
                .collect()
        };
        assert_eq!(
            paths("http://h/apis/networking.k8s.io/v1/namespaces/web/ingresses"),
            [
                "/apis/networking.k8s.io/v1/namespaces/web/ingresses",
                "/apis/networking.k8s.io/v1/ingressclasses"
            ]
        );
        assert_eq!(
            paths("http://h/apis/gateway.networking.k8s.io/v1alpha2/tlsroutes"),
            [
                "/apis/gateway.networking.k8s.io/v1alpha2/tlsroutes",
                "/apis/gateway.networking.k8s.io/v1/gateways"
            ]
        );
        let mut r = Resource::for_url(
            &url("http://h/apis/networking.k8s.io/v1/ingresses"),
            true,
            10_000,
            1,
        )
        .remove(0);
        let q = r.request();
        assert_eq!(
            (q.mode, q.target.as_str()),
            (Mode::List, "/apis/networking.k8s.io/v1/ingresses?limit=500")
        );
        assert_eq!(r.head(Mode::List, 200, None, 0), Body::Collect);
        assert_eq!(r.listed(page(500, Some("9"), Some("a b"))), Ok(None));
        let q = r.request();
        assert!(
            q.target.ends_with("limit=500&continue=a%20b"),
            "{}",
            q.target
        );
        let done = r.listed(page(3, Some("12"), None)).unwrap().unwrap();
        assert_eq!(done.objects.len(), 503);
        let q = r.request();
        assert_eq!(q.mode, Mode::Watch);
        // The server may stay silent for the whole timeoutSeconds it was given (it was 395 s
        // for watches of up to 599 s).
        let seconds: u64 = q
            .target
            .rsplit("timeoutSeconds=")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(q.idle_ms.unwrap() > seconds * 1000, "{q:?}");
        assert!(q
            .target
            .contains("watch=1&resourceVersion=12&allowWatchBookmarks=true&timeoutSeconds="));
        assert_eq!(r.state, State::Watching);
        assert!(r.event(&Event::Bookmark("15".into())));
        assert!(r.request().target.contains("resourceVersion=15"));
        // 410 as an event, and as a status: list again from scratch.
        assert!(!r.event(&Event::Expired));
        assert_eq!(r.request().mode, Mode::List);
        r.resource_version = Some("20".into());
        assert_eq!(r.head(Mode::Watch, 410, None, 0), Body::Again(0));
        assert_eq!(r.request().mode, Mode::List);
    }

    /// It was: a page larger than MAX_BODY failed and was asked for again, the same, forever.
    #[test]
    fn a_page_too_large_is_asked_for_again_smaller() {
        let mut r = Resource::for_url(&url("http://h/ingresses"), true, 10_000, 1).remove(0);
        assert!(r.request().target.ends_with("limit=500"));
        assert!(r.too_large());
        assert!(r.request().target.ends_with("limit=250"));
        for _ in 0..8 {
            r.too_large();
        }
        assert!(r.request().target.ends_with("limit=1"));
        assert!(
            !r.too_large(),
            "one object per page: nothing smaller to ask for"
        );
    }

    /// A server that pages forever, or past what the catalog can hold, is bounded.
    #[test]
    fn a_list_is_bounded_in_objects_and_pages() {
        let mut r = Resource::for_url(&url("http://h/ingresses"), true, 10_000, 1).remove(0);
        let mut result = Ok(None);
        let mut pages = 0;
        while result == Ok(None) {
            result = r.listed(page(PAGE_LIMIT, Some("1"), Some("more")));
            pages += 1;
        }
        let err = result.unwrap_err();
        assert!(err.contains("more than any list"), "{err}");
        assert_eq!(pages, 4 * MAX_OBJECTS / PAGE_LIMIT + 16);
        assert_eq!(r.request().mode, Mode::List, "starts over");
        assert!(!r.request().target.contains("continue="));
        // Past MAX_OBJECTS, objects are counted, not kept.
        for _ in 0..MAX_OBJECTS / PAGE_LIMIT {
            assert_eq!(r.listed(page(PAGE_LIMIT, Some("1"), Some("c"))), Ok(None));
        }
        let done = r.listed(page(7, Some("2"), None)).unwrap().unwrap();
        assert_eq!((done.objects.len(), done.beyond), (MAX_OBJECTS, 7));
    }

    #[test]
    fn an_event_that_cannot_be_applied_lists_again() {
        let mut r = Resource::for_url(&url("http://h/ingresses"), true, 10_000, 1).remove(0);
        r.listed(page(1, Some("3"), None)).unwrap().unwrap();
        assert_eq!(r.request().mode, Mode::Watch);
        assert!(!r.event(&Event::Unreadable("broken".into())));
        assert_eq!(r.request().mode, Mode::List);
    }

    #[test]
    fn a_missing_kind_tries_older_versions_then_is_absent() {
        let mut rs = Resource::for_url(&url("http://h"), true, 10_000, 1);
        let tls = &mut rs[2];
        assert_eq!(tls.head(Mode::List, 404, None, 0), Body::Again(0));
        assert_eq!(
            tls.path(),
            "/apis/gateway.networking.k8s.io/v1alpha2/tlsroutes"
        );
        assert_eq!(tls.head(Mode::List, 404, None, 0), Body::Absent);
        assert_eq!(tls.state, State::Absent);
        let ingress = &mut rs[0];
        assert!(matches!(
            ingress.head(Mode::List, 404, None, 0),
            Body::Fail(_, _)
        ));
        assert!(matches!(
            ingress.head(Mode::List, 403, None, 0),
            Body::Fail(_, _)
        ));
        // The edge's role may not read IngressClasses: it does without them.
        assert_eq!(rs[3].head(Mode::List, 403, None, 0), Body::Absent);
        // Once listed, a 403 (a role being reconciled) keeps its objects: a failure.
        let classes = &mut rs[3];
        classes.listed(page(1, Some("5"), None)).unwrap().unwrap();
        assert!(matches!(
            classes.head(Mode::Watch, 403, None, 0),
            Body::Fail(..)
        ));
        assert!(matches!(
            classes.head(Mode::List, 404, None, 0),
            Body::Fail(..)
        ));
    }

    #[test]
    fn failures_back_off_with_jitter_up_to_a_limit() {
        let mut r = Resource::for_url(&url("http://h/edge.json"), false, 10_000, 1).remove(0);
        let delay = |b: Body| match b {
            Body::Fail(_, ms) => ms,
            other => panic!("{other:?}"),
        };
        let first = delay(r.head(Mode::Poll, 500, None, 0));
        assert_eq!(first, 750);
        let mut last = 0;
        for _ in 0..10 {
            last = delay(r.fail("x".into(), u64::MAX));
        }
        assert!(
            (MAX_BACKOFF_MS * 3 / 4..=MAX_BACKOFF_MS * 5 / 4).contains(&last),
            "{last}"
        );
        assert!(
            matches!(r.head(Mode::Poll, 401, None, 0), Body::Fail(m, _) if m.contains("token_file"))
        );
    }

    #[test]
    fn documents_and_static_lists_are_polled_with_their_etag() {
        let mut r = Resource::for_url(&url("http://h/edge.json?x=1"), false, 7_000, 1).remove(0);
        let q = r.request();
        assert_eq!(
            (q.mode, q.target.as_str(), q.etag),
            (Mode::Poll, "/edge.json?x=1", None)
        );
        assert_eq!(q.idle_ms, None);
        assert_eq!(
            r.head(Mode::Poll, 200, Some("\"v1\"".into()), 0),
            Body::Collect
        );
        assert_eq!(r.polled(true), 7_000);
        assert_eq!(r.request().etag.as_deref(), Some("\"v1\""));
        assert_eq!(r.head(Mode::Poll, 304, None, 0), Body::Again(7_000));
        assert_eq!(r.polled(false), 7_000);
        assert_eq!(
            r.request().etag,
            None,
            "a refused document is fetched again whole"
        );
        // A list path whose server does not watch.
        let mut r = Resource::for_url(&url("http://h/ingresses"), true, 7_000, 1).remove(0);
        r.listed(page(1, Some("3"), None)).unwrap().unwrap();
        assert_eq!(r.request().mode, Mode::Watch);
        r.cannot_watch();
        assert_eq!(r.request().mode, Mode::Poll);
    }
}
