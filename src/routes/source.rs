//! A route source on disk: one JSON file, or a folder whose `*.json` files are merged in name
//! order. Change is detected by (device, inode, size, mtime) after following symlinks, so both
//! an atomic rename and a Kubernetes ConfigMap `..data` symlink swap are seen.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::document::limits::{MAX_FILES, MAX_FILE_BYTES};
use super::document::Document;
use super::json::Json;
use super::table::{Discovery, MergeError, MergeWarning, RouteTable};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Notice,
}

/// Something to log about a refresh, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Folder,
    /// No file source: only URL sources' last good documents.
    Nothing,
}

impl Kind {
    fn of(meta: &fs::Metadata) -> Kind {
        if meta.is_dir() {
            Kind::Folder
        } else {
            Kind::File
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "a file",
            Kind::Folder => "a folder",
            Kind::Nothing => "nothing",
        }
    }
}

/// Reads a URL source's last good document from its file in the state folder.
/// How a URL source's file is read.
type ReadFn = dyn Fn(&Path) -> Result<Arc<Document>, String> + Send + Sync;

#[derive(Clone)]
pub struct Reader(Arc<ReadFn>);

impl Reader {
    pub fn new(
        f: impl Fn(&Path) -> Result<Arc<Document>, String> + Send + Sync + 'static,
    ) -> Reader {
        Reader(Arc::new(f))
    }

    pub fn read(&self, path: &Path) -> Result<Arc<Document>, String> {
        (self.0)(path)
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reader")
    }
}

/// A URL source, as the table sees it: the files where the worker that fetches it keeps what
/// it brought, read as any route file is, by its own reader. A missing file is a source that
/// has not answered yet: it adds nothing.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The last version a table accepted: what a table starts from.
    pub file: PathBuf,
    /// What the source brought last, once it has answered: what a running table reads (set
    /// in the workers: see `Source::name_candidates`).
    pub candidate: Option<PathBuf>,
    pub read: Reader,
    /// What messages call it (`edge_routes_url NAME`), rather than its file.
    pub label: String,
    /// Its name and what it discovers for the table's upstreams (`discover=`), if anything.
    pub discovers: Option<(String, crate::routes::discover::Kinds)>,
}

/// What a table is made of, in configuration order (the first wins a conflict): at most one
/// file or folder, and any number of URL sources.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub path: Option<PathBuf>,
    /// URL sources declared before the path come first.
    pub before: Vec<Cached>,
    pub after: Vec<Cached>,
}

impl Inputs {
    /// A file or a folder alone.
    pub fn file(path: &Path) -> Inputs {
        Inputs {
            path: Some(path.to_owned()),
            ..Inputs::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// One file of a source: the version last seen, and the last version that was accepted.
#[derive(Debug)]
struct Unit {
    name: OsString,
    path: PathBuf,
    /// For a URL source's file: what messages call it.
    label: Option<String>,
    /// A URL source's file: how to read it.
    read: Option<Reader>,
    stamp: Stamp,
    /// A URL source's candidate (see `Cached`), rather than its accepted version.
    candidate: bool,
    good: Option<Arc<Document>>,
    /// The accepted version before `good`, while `good` is new in this refresh.
    previous: Option<Option<Arc<Document>>>,
}

#[derive(Debug)]
pub struct Source {
    /// The file source's path, or the first URL source's file: for messages.
    path: PathBuf,
    kind: Kind,
    inputs: Inputs,
    units: Vec<Unit>,
    table: Rc<RouteTable>,
    generation: u64,
    /// When the current table was swapped in.
    loaded_at: Option<std::time::SystemTime>,
    last_error: Option<String>,
    /// The problem last reported for the source as a whole, so that it is logged once.
    unreadable: Option<String>,
    /// A refresh waiting for its work (parsing, merging) to be done.
    pending: Option<Pending>,
    /// What a refresh replaced, to be dropped where it costs the event loop nothing.
    retired: Retired,
    /// Reading at configuration time: URL sources from their accepted versions, and what
    /// they hold may only fall back (it is not the operator's).
    starting: bool,
    /// The candidates of URL sources the last refresh accepted.
    accepted: Vec<PathBuf>,
}

/// The state of a refresh between its steps.
#[derive(Debug)]
struct Pending {
    started: Instant,
    events: Vec<Event>,
    accepted_before: Vec<(OsString, *const Document)>,
    /// Units whose files are being parsed.
    reading: Vec<usize>,
    /// For a merge: the unit of each document merged.
    owners: Vec<usize>,
}

/// The slow part of a refresh: pure, so that a worker can run it on another thread.
#[derive(Debug)]
pub enum Work {
    /// Read and check these files (a URL source's with its reader).
    Parse(Vec<(PathBuf, Option<Reader>)>),
    /// Merge these documents into a table.
    Merge(Vec<Arc<Document>>, Discovery),
}

#[derive(Debug)]
pub enum Done {
    Parsed(Vec<Result<Arc<Document>, String>>),
    /// Boxed: a table is large, and `Done` travels by value between threads.
    Merged(Box<Result<(RouteTable, Vec<MergeWarning>), MergeError>>),
}

/// Work this small is done in the event loop rather than on a thread (see `Work::is_small`):
/// up to this many regular files...
pub const SMALL_FILES: usize = 16;
/// ...of up to this many bytes in all...
pub const SMALL_BYTES: u64 = 64 * 1024;
/// ...and merges of documents up to this weight (routes, upstreams and servers, see
/// `Document::weight`): well under a millisecond.
pub const SMALL_ROUTES: usize = 1_000;

impl Work {
    /// Whether the work is cheap enough to do in the event loop: a worker that never starts a
    /// thread keeps glibc's single-threaded system calls and malloc (about 1,000-1,200 instructions
    /// less per connection, see docs/performance.md).
    pub fn is_small(&self) -> bool {
        match self {
            Work::Parse(paths) => {
                if paths.len() > SMALL_FILES {
                    return false;
                }
                let mut bytes = 0u64;
                for (path, _) in paths {
                    // Only regular files: opening anything else (a FIFO) may block, which a
                    // thread can afford and the event loop cannot.
                    match fs::metadata(path) {
                        Ok(meta) if meta.is_file() => bytes = bytes.saturating_add(meta.len()),
                        _ => return false,
                    }
                    if bytes > SMALL_BYTES {
                        return false;
                    }
                }
                true
            }
            Work::Merge(docs, _) => {
                let mut weight = 0usize;
                for doc in docs {
                    weight = weight.saturating_add(doc.weight());
                    if weight > SMALL_ROUTES {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// `upstream_exists` tells which nginx.conf upstream blocks a route may name.
    pub fn run(self, upstream_exists: &dyn Fn(&str) -> bool) -> Done {
        match self {
            Work::Parse(paths) => Done::Parsed(
                paths
                    .iter()
                    .map(|(p, read)| match read {
                        Some(read) => read.read(p),
                        None => read_document(p).map(Arc::new),
                    })
                    .collect(),
            ),
            Work::Merge(docs, discovery) => {
                let docs: Vec<&Document> = docs.iter().map(|d| &**d).collect();
                Done::Merged(Box::new(RouteTable::merge_with(
                    &docs,
                    upstream_exists,
                    &discovery,
                )))
            }
        }
    }
}

/// Where a refresh stands: done with its events, or waiting for `work`.
#[derive(Debug)]
pub enum Step {
    Finished(Vec<Event>),
    NeedWork(Work),
}

/// A replaced table and documents no longer in force.
#[derive(Debug, Default)]
pub struct Retired {
    pub table: Option<Rc<RouteTable>>,
    pub documents: Vec<Arc<Document>>,
}

/// `nginx_upstream` names that exist in nginx.conf.
pub type UpstreamCheck<'a> = &'a dyn Fn(&str) -> bool;

impl Source {
    /// Reads a source at configuration time: any error, in any file, is fatal.
    pub fn open(
        inputs: Inputs,
        upstream_exists: UpstreamCheck,
    ) -> Result<(Source, Vec<Event>), String> {
        let (path, kind) = match &inputs.path {
            Some(path) => {
                let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
                (path.clone(), Kind::of(&meta))
            }
            None => (
                inputs
                    .before
                    .iter()
                    .chain(&inputs.after)
                    .next()
                    .map(|c| PathBuf::from(&c.label))
                    .unwrap_or_default(),
                Kind::Nothing,
            ),
        };
        let mut source = Source {
            path,
            kind,
            inputs,
            units: Vec::new(),
            table: Rc::default(),
            generation: 0,
            loaded_at: None,
            last_error: None,
            unreadable: None,
            pending: None,
            retired: Retired::default(),
            starting: true,
            accepted: Vec::new(),
        };
        let events = source.refresh(upstream_exists);
        source.starting = false;
        source.accepted.clear();
        if let Some(e) = events
            .iter()
            .find(|e| e.level != Level::Notice && !is_warning_at_start(e))
        {
            return Err(e.message.clone());
        }
        let warnings = events.into_iter().filter(is_warning_at_start).collect();
        Ok((source, warnings))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn table(&self) -> &Rc<RouteTable> {
        &self.table
    }

    /// How many tables have been swapped in, the first included.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn loaded_at(&self) -> Option<std::time::SystemTime> {
        self.loaded_at
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Looks for changes and swaps in a new table if there are any. Never fails: problems come
    /// back as events, and the last good table keeps serving. Does the work in place: see
    /// `start` and `resume` for doing it elsewhere.
    pub fn refresh(&mut self, upstream_exists: UpstreamCheck) -> Vec<Event> {
        let mut step = self.start();
        loop {
            match step {
                Step::Finished(events) => {
                    self.retired = Retired::default();
                    return events;
                }
                Step::NeedWork(work) => step = self.resume(work.run(upstream_exists)),
            }
        }
    }

    /// Serves a table built elsewhere from this source (by the worker that reads it for the
    /// whole edge): it replaces the table in service; no file is read here.
    pub fn adopt(&mut self, table: RouteTable, generation: u64) {
        let old = std::mem::replace(&mut self.table, Rc::new(table));
        self.retired.table = Some(old);
        self.generation = generation;
        self.loaded_at = Some(std::time::SystemTime::now());
    }

    /// Numbers the table in service as the edge does (a worker that takes over reading the
    /// source goes on from the last number published).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Gives up a refresh whose work was lost: every file is read again next time.
    pub fn abandon(&mut self) {
        self.pending = None;
        for unit in &mut self.units {
            unit.stamp = Stamp::default();
            if let Some(previous) = unit.previous.take() {
                unit.good = previous;
            }
        }
    }

    /// Names the URL sources' candidates (in a worker: see `Cached::candidate`).
    pub fn name_candidates(&mut self, name: &dyn Fn(&Path) -> Option<PathBuf>) {
        for c in self.inputs.before.iter_mut().chain(&mut self.inputs.after) {
            c.candidate = name(&c.file);
        }
    }

    /// The candidates of URL sources the last refresh accepted: for the caller to keep as
    /// their accepted versions.
    pub fn take_accepted(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.accepted)
    }

    /// What the last refresh replaced: for the caller to drop off the event loop.
    pub fn take_retired(&mut self) -> Retired {
        std::mem::take(&mut self.retired)
    }

    /// Begins a refresh: lists the source (cheap: one stat per file) and says what work the
    /// changes need, if any. Call `resume` with the work's result until it finishes.
    pub fn start(&mut self) -> Step {
        debug_assert!(self.pending.is_none(), "a refresh is already under way");
        let started = Instant::now();
        let mut events = Vec::new();
        let listing = match self.list() {
            Ok(listing) => {
                if self.unreadable.take().is_some() {
                    events.push(notice(format!("{} is readable again", self.path.display())));
                }
                listing
            }
            Err(message) => {
                if self.unreadable.as_ref() != Some(&message) {
                    self.unreadable = Some(message.clone());
                    let message = format!("{message}; the last good table keeps serving");
                    self.last_error = Some(message.clone());
                    events.push(Event {
                        level: Level::Warn,
                        message,
                    });
                }
                return Step::Finished(events);
            }
        };

        let accepted_before = self.accepted();
        let mut units = Vec::with_capacity(listing.len());
        let mut reading = Vec::new();
        let mut old = std::mem::take(&mut self.units).into_iter().peekable();
        for (name, path, stamp, read, candidate) in listing {
            while let Some(gone) = old.next_if(|u| u.name < name) {
                self.retired.documents.extend(gone.good);
            }
            let mut unit = match old.next_if(|u| u.name == name) {
                Some(unit) if unit.stamp == stamp => {
                    units.push(unit);
                    continue;
                }
                Some(mut unit) => {
                    unit.path = path;
                    unit
                }
                None => Unit {
                    name,
                    path,
                    label: read.as_ref().map(|(_, label)| label.clone()),
                    read: read.map(|(r, _)| r),
                    stamp,
                    candidate,
                    good: None,
                    previous: None,
                },
            };
            unit.stamp = stamp;
            unit.candidate = candidate;
            reading.push(units.len());
            units.push(unit);
        }
        self.retired.documents.extend(old.filter_map(|u| u.good));
        self.units = units;
        self.pending = Some(Pending {
            started,
            events,
            accepted_before,
            reading,
            owners: Vec::new(),
        });
        let reading = self.pending.as_ref().map_or(&[][..], |p| &p.reading[..]);
        if !reading.is_empty() {
            let paths = reading
                .iter()
                .map(|&i| (self.units[i].path.clone(), self.units[i].read.clone()))
                .collect();
            return Step::NeedWork(Work::Parse(paths));
        }
        self.after_parse()
    }

    /// Goes on with a refresh once its work is done.
    pub fn resume(&mut self, done: Done) -> Step {
        match done {
            Done::Parsed(results) => {
                let Some(mut pending) = self.pending.take() else {
                    return not_under_way();
                };
                let fresh = self.generation > 0;
                for (&i, result) in pending.reading.iter().zip(results) {
                    let unit = &mut self.units[i];
                    match result {
                        Ok(doc) => unit.previous = Some(unit.good.replace(doc)),
                        Err(message) if self.starting && unit.read.is_some() => {
                            pending.events.push(not_used(&message));
                        }
                        Err(message) => {
                            pending
                                .events
                                .push(rejected(&message, unit.good.is_some() || fresh));
                            self.last_error = Some(message);
                        }
                    }
                }
                self.pending = Some(pending);
                self.after_parse()
            }
            Done::Merged(result) => self.merged(*result),
        }
    }

    fn after_parse(&mut self) -> Step {
        let Some(pending) = self.pending.as_ref() else {
            return not_under_way();
        };
        if self.generation > 0 && self.accepted() == pending.accepted_before {
            return self.finish();
        }
        self.merge_work()
    }

    /// The accepted documents, to merge.
    fn merge_work(&mut self) -> Step {
        let (docs, owners): (Vec<Arc<Document>>, Vec<usize>) = self
            .units
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.good.clone().map(|d| (d, i)))
            .unzip();
        let origins = owners.iter().map(|&i| self.units[i].origin()).collect();
        let Some(pending) = self.pending.as_mut() else {
            return not_under_way();
        };
        pending.owners = owners;
        let discovery = Discovery {
            sources: (self.inputs.before.iter())
                .chain(&self.inputs.after)
                .filter_map(|c| c.discovers.clone())
                .collect(),
            previous: self.table.discovered_servers(),
            origins,
        };
        Step::NeedWork(Work::Merge(docs, discovery))
    }

    /// A file whose references do not resolve is rejected (reverted to its previous version,
    /// or left out) and the rest merged again, until a merge succeeds.
    fn merged(&mut self, result: Result<(RouteTable, Vec<MergeWarning>), MergeError>) -> Step {
        let Some(mut pending) = self.pending.take() else {
            return not_under_way();
        };
        let owners = std::mem::take(&mut pending.owners);
        match result {
            Ok((table, warnings)) => {
                for w in warnings {
                    let file = self.units[owners[w.file]].shown();
                    pending.events.push(Event {
                        level: if w.notice { Level::Notice } else { Level::Warn },
                        message: format!("{file}: {}", w.message),
                    });
                }
                self.generation += 1;
                self.loaded_at = Some(std::time::SystemTime::now());
                self.accepted = self
                    .units
                    .iter()
                    .filter(|u| u.candidate && u.previous.is_some())
                    .map(|u| u.path.clone())
                    .collect();
                let old = std::mem::replace(&mut self.table, Rc::new(table));
                self.retired.table = Some(old);
                if self.single_file() {
                    // A single file is merged with nothing else: its table is all that is
                    // needed of it. The document (the larger of the two) is not kept; an empty
                    // stand-in marks the version accepted.
                    for unit in &mut self.units {
                        if let Some(doc) = unit.good.replace(Arc::new(Document::default())) {
                            self.retired.documents.push(doc);
                        }
                    }
                }
                let routes = self.table.route_count();
                let files = owners.len();
                // From the first stat to the new table, wherever the work was done (in a
                // worker, mostly on a thread of its own).
                let ms = pending.started.elapsed().as_secs_f64() * 1000.0;
                pending.events.push(notice(format!(
                    "{}: table {} loaded, {routes} routes from {files} file(s) in {ms:.1} ms",
                    self.path.display(),
                    self.generation
                )));
                self.pending = Some(pending);
                self.finish()
            }
            Err(err) => {
                let culprit = owners[err.file];
                let message = format!("{}: {}", self.units[culprit].shown(), err.message);
                if self.starting && self.units[culprit].read.is_some() {
                    pending.events.push(not_used(&message));
                } else {
                    pending.events.push(rejected(&message, self.generation > 0));
                    self.last_error = Some(message);
                }
                if self.single_file() {
                    // The table in service is the last good one: nothing to merge again.
                    for unit in &mut self.units {
                        if let Some(back) = unit.previous.take() {
                            self.retired
                                .documents
                                .extend(std::mem::replace(&mut unit.good, back));
                        }
                    }
                    self.pending = Some(pending);
                    return self.finish();
                }
                // Revert the culprit if it is new; otherwise what changed around it.
                let revert: Vec<usize> = if self.units[culprit].previous.is_some() {
                    vec![culprit]
                } else {
                    let fresh: Vec<usize> = (0..self.units.len())
                        .filter(|&i| self.units[i].previous.is_some())
                        .collect();
                    if fresh.is_empty() {
                        vec![culprit]
                    } else {
                        fresh
                    }
                };
                for i in revert {
                    let unit = &mut self.units[i];
                    let back = unit.previous.take().unwrap_or(None);
                    self.retired
                        .documents
                        .extend(std::mem::replace(&mut unit.good, back));
                }
                self.pending = Some(pending);
                self.merge_work()
            }
        }
    }

    fn finish(&mut self) -> Step {
        let Some(pending) = self.pending.take() else {
            return not_under_way();
        };
        for unit in &mut self.units {
            if let Some(Some(previous)) = unit.previous.take() {
                self.retired.documents.push(previous);
            }
        }
        Step::Finished(pending.events)
    }

    /// Identifies the documents in force: a refresh that leaves it unchanged swaps nothing.
    fn accepted(&self) -> Vec<(OsString, *const Document)> {
        self.units
            .iter()
            .filter_map(|u| u.good.as_ref().map(|d| (u.name.clone(), Arc::as_ptr(d))))
            .collect()
    }

    /// One file and nothing else: its table is all that needs keeping.
    fn single_file(&self) -> bool {
        self.kind == Kind::File && self.inputs.before.is_empty() && self.inputs.after.is_empty()
    }

    /// The files of the table, in merge order, with their stamps: URL sources declared
    /// before the file source, its file or its folder's files sorted by name, the URL sources
    /// declared after it. Names are prefixed so that this order is also theirs.
    fn list(&self) -> Result<Vec<Listed>, String> {
        let mut all = Vec::new();
        let starting = self.starting;
        // A URL source's files are the module's own, in the state folder: read only as regular
        // files, not through a link; at start, one that cannot be looked at is left aside.
        let cached = |all: &mut Vec<Listed>, at: usize, c: &Cached| -> Result<(), String> {
            let candidate = c.candidate.as_ref().filter(|_| !starting);
            let files = candidate
                .map(|p| (p, true))
                .into_iter()
                .chain([(&c.file, false)]);
            for (file, candidate) in files {
                match fs::symlink_metadata(file) {
                    Ok(meta) if meta.is_file() => {
                        all.push((
                            format!("{at:04}").into(),
                            file.clone(),
                            Stamp::of(&meta),
                            Some((c.read.clone(), c.label.clone())),
                            candidate,
                        ));
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound || starting => {}
                    Err(e) => return Err(format!("{}: {e}", file.display())),
                }
            }
            Ok(())
        };
        let mut at = 0;
        for c in &self.inputs.before {
            cached(&mut all, at, c)?;
            at += 1;
        }
        if self.kind != Kind::Nothing {
            for (name, path, stamp) in self.list_path()? {
                let mut prefixed: OsString = format!("{at:04}/").into();
                prefixed.push(name);
                all.push((prefixed, path, stamp, None, false));
            }
            at += 1;
        }
        for c in &self.inputs.after {
            cached(&mut all, at, c)?;
            at += 1;
        }
        Ok(all)
    }

    /// The files of the file source, sorted by name, with their stamps.
    fn list_path(&self) -> Result<Vec<(OsString, PathBuf, Stamp)>, String> {
        let shown = self.path.display();
        let meta = fs::metadata(&self.path).map_err(|e| format!("{shown}: {e}"))?;
        let kind = Kind::of(&meta);
        if kind != self.kind {
            return Err(format!(
                "{shown} is now {} (it was {})",
                kind.as_str(),
                self.kind.as_str()
            ));
        }
        if kind == Kind::File {
            let name = self.path.file_name().unwrap_or_default().to_owned();
            return Ok(vec![(name, self.path.clone(), Stamp::of(&meta))]);
        }
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(|e| format!("{shown}: {e}"))? {
            let entry = entry.map_err(|e| format!("{shown}: {e}"))?;
            let name = entry.file_name();
            let bytes = name.as_encoded_bytes();
            // Kubernetes mounts keep their versions in hidden "..data" folders.
            if bytes.starts_with(b".") || !bytes.ends_with(b".json") {
                continue;
            }
            let path = entry.path();
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => files.push((name, path, Stamp::of(&meta))),
                Ok(_) => {}
                // A dangling symlink or a file removed since the listing: not a route file.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
            if files.len() > MAX_FILES {
                return Err(format!("{shown}: more than {MAX_FILES} *.json files"));
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(files)
    }
}

impl Unit {
    /// The file's path, or the URL source's name: what `$edge_source` shows.
    fn origin(&self) -> String {
        match &self.label {
            Some(label) => label
                .strip_prefix("edge_routes_url ")
                .unwrap_or(label)
                .to_owned(),
            None => self.path.display().to_string(),
        }
    }

    /// The file, or the URL source, as messages name it.
    fn shown(&self) -> String {
        match &self.label {
            Some(label) => label.clone(),
            None => self.path.display().to_string(),
        }
    }
}

/// A file of a table: its name for ordering, path, stamp, a URL source's reader and label, and
/// whether it is a URL source's candidate.
type Listed = (OsString, PathBuf, Stamp, Option<(Reader, String)>, bool);

/// A step of a refresh that is not under way (work that finished after `abandon`): nothing
/// changes, and the caller's worker goes on.
fn not_under_way() -> Step {
    Step::Finished(vec![Event {
        level: Level::Error,
        message: "a refresh step arrived with no refresh under way; ignored".into(),
    }])
}

/// A warning that does not stop a start: a name defined twice, a URL source's last good
/// document that cannot be used.
fn is_warning_at_start(e: &Event) -> bool {
    e.level == Level::Warn
        && (e.message.contains(", ignored")
            || e.message.ends_with(NOT_USED)
            // What a cluster's nodes say (see `table::merge_with`): remote data, never fatal.
            || e.message.contains(": no node is eligible (")
            || e.message.contains(": no endpoint is eligible (")
            || e.message.contains(" has not answered yet; its ")
            || e.message.contains(&format!(
                "(s) past the limit of {} servers are left out",
                crate::upstream::MAX_SERVERS
            )))
}

/// A URL source's last good document that cannot be used at start: the source adds nothing
/// until it answers (remote data may only fall back).
fn not_used(message: &str) -> Event {
    Event {
        level: Level::Warn,
        message: format!("{message}{NOT_USED}"),
    }
}

const NOT_USED: &str = "; not used: the source adds its routes once it answers";

fn notice(message: String) -> Event {
    Event {
        level: Level::Notice,
        message,
    }
}

fn rejected(message: &str, keeps_serving: bool) -> Event {
    let tail = if keeps_serving {
        "; rejected, the last good version keeps serving"
    } else {
        ""
    };
    Event {
        level: Level::Error,
        message: format!("{message}{tail}"),
    }
}

/// Reads and validates one file. Errors name the file and give line:column for syntax errors
/// and the JSON path for schema errors.
pub fn read_document(path: &Path) -> Result<Document, String> {
    let shown = path.display();
    let mut text = Vec::new();
    // Not blocking on what is not a file (a FIFO put in a route file's place).
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("{shown}: larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{shown}: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{shown}: larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    parse_document(&text).map_err(|e| match e {
        DocumentError::Syntax { .. } => format!("{shown}:{e}"),
        DocumentError::Schema(_) => format!("{shown}: {e}"),
    })
}

/// Why a route file's bytes are not a document.
#[derive(Debug)]
pub enum DocumentError {
    /// Not JSON, or a duplicate key: `line:column: what`.
    Syntax {
        line: usize,
        column: usize,
        what: String,
    },
    Schema(super::document::SchemaError),
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DocumentError::Syntax { line, column, what } => write!(f, "{line}:{column}: {what}"),
            DocumentError::Schema(e) => write!(f, "{e}"),
        }
    }
}

/// Parses and checks one route file's contents.
pub fn parse_document(text: &[u8]) -> Result<Document, DocumentError> {
    let json: Json = serde_json::from_slice(text).map_err(|e| {
        let full = e.to_string();
        let what = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(what, _)| what);
        DocumentError::Syntax {
            line: e.line(),
            column: e.column(),
            what: what.to_owned(),
        }
    })?;
    Document::from_json(&json).map_err(DocumentError::Schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::Protocol;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("edge-source-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        /// Writes atomically, as operators are told to.
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            let tmp = self.0.join(format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, &path).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn small_work_is_told_from_large() {
        let dir = Dir::new("small");
        let routes = |n: usize| {
            let names: Vec<String> = (0..n).map(|i| format!(r#""r{i}.test": "a""#)).collect();
            format!(
                r#"{{"upstreams": {{"a": {{"servers": ["10.0.0.1:443"]}}}}, "routes": {{{}}}}}"#,
                names.join(", ")
            )
        };
        let small = dir.write("small.json", &routes(10));
        let large = dir.write("large.json", &routes(5_000));
        assert!(fs::metadata(&large).unwrap().len() > SMALL_BYTES);
        let parse =
            |paths: &[&PathBuf]| Work::Parse(paths.iter().map(|p| ((*p).clone(), None)).collect());
        assert!(parse(&[&small]).is_small());
        assert!(!parse(&[&large]).is_small());
        assert!(!parse(&[&small, &large]).is_small());
        // A file that cannot be looked at goes to a thread, which reports it.
        assert!(!parse(&[&dir.0.join("missing.json")]).is_small());
        let doc = |n: usize| Arc::new(parse_document(routes(n).as_bytes()).unwrap());
        let merge = |docs: Vec<Arc<Document>>| Work::Merge(docs, Discovery::default());
        assert!(merge(vec![doc(10), doc(10)]).is_small());
        // A document weighs its routes, its upstream, its server and one.
        assert_eq!(doc(10).weight(), 13);
        assert!(merge(vec![doc(SMALL_ROUTES - 3)]).is_small());
        assert!(!merge(vec![doc(SMALL_ROUTES - 2)]).is_small());
        assert!(!merge(vec![doc(600), doc(600)]).is_small());
        // More files than the event loop opens at once.
        let many: Vec<PathBuf> = (0..=SMALL_FILES)
            .map(|i| dir.write(&format!("f{i}.json"), &routes(1)))
            .collect();
        assert!(!parse(&many.iter().collect::<Vec<_>>()).is_small());
    }

    /// A FIFO in a route file's place: never opened in the event loop, and read on a thread
    /// without waiting for a writer.
    #[test]
    fn a_fifo_is_no_route_file() {
        let dir = Dir::new("fifo");
        let fifo = dir.0.join("routes.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(!Work::Parse(vec![(fifo.clone(), None)]).is_small());
        let err = read_document(&fifo).unwrap_err();
        assert!(err.ends_with("not a regular file"), "{err}");
    }

    fn upstream_of(source: &Source, name: &str) -> Option<String> {
        source
            .table()
            .lookup(Some(name), Protocol::Tls)
            .map(|m| m.upstream.name.to_string())
    }

    const A: &str =
        r#"{"upstreams": {"a": {"servers": ["127.0.0.1"]}}, "routes": {"a.test": "a"}}"#;
    const B: &str = r#"{"upstreams": {"b": {"servers": ["127.0.0.2"]}}, "routes": {"b.test": "b", "x.test": "a"}}"#;

    #[test]
    fn config_time_errors_are_fatal_and_precise() {
        let dir = Dir::new("fatal");
        let file = dir.write(
            "r.json",
            "{\n  \"routes\": {\n    \"a.test\": \"a\",\n  }\n}",
        );
        let err = Source::open(Inputs::file(&file), &|_| true).unwrap_err();
        assert_eq!(err, format!("{}:4:3: trailing comma", file.display()));
        dir.write("r.json", r#"{"routes": {"a.test": "nope"}}"#);
        let err = Source::open(Inputs::file(&file), &|_| true).unwrap_err();
        assert_eq!(
            err,
            format!(
                "{}: routes[\"a.test\"]: unknown upstream \"nope\"",
                file.display()
            )
        );
        dir.write(
            "r.json",
            r#"{"upstreams": {"a": {"servers": ["10.0.0.1", "10.0.0.x"]}}}"#,
        );
        let err = Source::open(Inputs::file(&file), &|_| true).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: upstreams.a.servers[1]: ", file.display())),
            "{err}"
        );
        let err = Source::open(Inputs::file(&dir.0.join("missing.json")), &|_| true).unwrap_err();
        assert!(err.contains("No such file"), "{err}");
    }

    /// Work that finishes after its refresh was abandoned reaches a worker callback: it must
    /// be refused, not panic (a panic there aborts the worker).
    #[test]
    fn a_step_without_a_refresh_is_ignored() {
        let dir = Dir::new("stray");
        let file = dir.write("r.json", A);
        let (mut source, _) = Source::open(Inputs::file(&file), &|_| true).unwrap();
        let stray = [
            Done::Parsed(vec![]),
            Done::Merged(Box::new(Err(MergeError {
                file: 0,
                message: "x".into(),
            }))),
        ];
        for done in stray {
            match source.resume(done) {
                Step::Finished(events) => {
                    assert_eq!(events.len(), 1);
                    assert_eq!(events[0].level, Level::Error);
                }
                Step::NeedWork(w) => panic!("{w:?}"),
            }
        }
        assert_eq!(source.generation(), 1, "the table in service stays");
        assert!(source
            .table()
            .lookup(Some("a.test"), Protocol::Tls)
            .is_some());
    }

    #[test]
    fn a_bad_file_keeps_the_last_good_table_and_is_reported_once() {
        let dir = Dir::new("keep");
        let file = dir.write("r.json", A);
        let (mut source, _) = Source::open(Inputs::file(&file), &|_| true).unwrap();
        assert_eq!(source.generation(), 1);
        assert!(source.refresh(&|_| true).is_empty(), "nothing changed");
        dir.write("r.json", "{oops");
        let events = source.refresh(&|_| true);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].level, Level::Error);
        assert!(
            events[0]
                .message
                .contains("r.json:1:2: key must be a string; rejected"),
            "{events:?}"
        );
        assert!(
            source.refresh(&|_| true).is_empty(),
            "reported once per change"
        );
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        dir.write("r.json", B.replace("\"a\"", "\"b\"").as_str());
        let events = source.refresh(&|_| true);
        assert_eq!(events[0].level, Level::Notice, "{events:?}");
        assert_eq!(source.generation(), 2);
        assert_eq!(upstream_of(&source, "a.test"), None);
        assert_eq!(upstream_of(&source, "x.test").as_deref(), Some("b"));
    }

    /// A single file keeps no document once its table is built: a later version that does
    /// not merge (an unknown upstream) leaves the table in service, and the next good one
    /// replaces it.
    #[test]
    fn a_single_file_keeps_its_table_not_its_document() {
        let dir = Dir::new("single");
        let file = dir.write("r.json", A);
        let (mut source, _) = Source::open(Inputs::file(&file), &|_| true).unwrap();
        assert!(source
            .units
            .iter()
            .all(|u| u.good.as_deref() == Some(&Document::default())));
        dir.write("r.json", r#"{"routes": {"a.test": "nope"}}"#);
        let events = source.refresh(&|_| true);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0]
                .message
                .contains("unknown upstream \"nope\"; rejected"),
            "{events:?}"
        );
        assert_eq!(source.generation(), 1);
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        assert!(source.refresh(&|_| true).is_empty(), "reported once");
        dir.write("r.json", B.replace("\"a\"", "\"b\"").as_str());
        let events = source.refresh(&|_| true);
        assert_eq!(events[0].level, Level::Notice, "{events:?}");
        assert_eq!(upstream_of(&source, "x.test").as_deref(), Some("b"));
        assert_eq!(upstream_of(&source, "a.test"), None);
    }

    #[test]
    fn missing_source_warns_once_and_keeps_serving() {
        let dir = Dir::new("missing");
        let file = dir.write("r.json", A);
        let (mut source, _) = Source::open(Inputs::file(&file), &|_| true).unwrap();
        fs::remove_file(&file).unwrap();
        let events = source.refresh(&|_| true);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].level, Level::Warn);
        assert!(source.refresh(&|_| true).is_empty());
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        fs::create_dir(&file).unwrap();
        let events = source.refresh(&|_| true);
        assert!(
            events[0]
                .message
                .contains("is now a folder (it was a file)"),
            "{events:?}"
        );
        fs::remove_dir(&file).unwrap();
        dir.write("r.json", A);
        let events = source.refresh(&|_| true);
        assert_eq!(
            events[0].message,
            format!("{} is readable again", file.display())
        );
    }

    /// A URL source's file holds a document in its own form; this reader takes the form
    /// "host upstream" (one per line).
    fn line_reader() -> Reader {
        Reader::new(|p: &Path| {
            let text = fs::read_to_string(p).map_err(|e| e.to_string())?;
            let mut doc = Document::default();
            for line in text.lines() {
                let (host, up) = line.split_once(' ').ok_or("a bad line")?;
                doc.routes.push((
                    crate::routes::document::RouteKey::Exact(host.into()),
                    crate::routes::document::Targets {
                        tls: Some(up.into()),
                        http: Some(up.into()),
                        limits: None,
                    },
                ));
            }
            Ok(Arc::new(doc))
        })
    }

    fn cached(dir: &Dir, name: &str, read: &Reader) -> Cached {
        Cached {
            file: dir.0.join(format!("{name}.cache")),
            candidate: Some(dir.0.join(format!("{name}.next"))),
            read: read.clone(),
            label: name.into(),
            discovers: None,
        }
    }

    #[test]
    fn url_sources_merge_in_configuration_order_from_their_files() {
        let dir = Dir::new("cached");
        let file = dir.write("routes.json", A);
        // Every upstream the URL sources name is in the file source.
        let read = line_reader();
        let before = dir.0.join("url-1.cache");
        let after = dir.0.join("url-2.cache");
        let inputs = Inputs {
            path: Some(file.clone()),
            before: vec![cached(&dir, "url-1", &read)],
            after: vec![cached(&dir, "url-2", &read)],
        };
        // Neither URL source has answered yet: the file alone.
        let (mut source, _) = Source::open(inputs, &|_| true).unwrap();
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        assert_eq!(upstream_of(&source, "c.test"), None);

        fs::write(&after, "c.test a\nd.test a").unwrap();
        source.refresh(&|_| true);
        assert_eq!(upstream_of(&source, "c.test").as_deref(), Some("a"));

        // The source declared first wins a conflict; the later one's route is a warning.
        fs::write(&before, "d.test nowhere").unwrap();
        let events = source.refresh(&|_| true);
        assert!(
            events
                .iter()
                .any(|e| e.level == Level::Error
                    && e.message.contains("unknown upstream \"nowhere\"")),
            "{events:?}"
        );
        assert_eq!(
            upstream_of(&source, "d.test").as_deref(),
            Some("a"),
            "rejected, not served"
        );
        dir.write(
            "routes.json",
            r#"{"upstreams": {"a": {"servers": ["127.0.0.1"]}, "b": {"servers": ["127.0.0.2"]}},
                "routes": {"a.test": "b"}}"#,
        );
        fs::write(&before, "d.test b").unwrap();
        let events = source.refresh(&|_| true);
        assert!(
            events.iter().any(|e| e.level == Level::Warn
                && e.message
                    .contains("url-2: routes[\"d.test\"]: already routed")),
            "{events:?}"
        );
        assert_eq!(upstream_of(&source, "d.test").as_deref(), Some("b"));

        // A URL source whose file goes away adds nothing any more.
        fs::remove_file(&before).unwrap();
        fs::remove_file(&after).unwrap();
        source.refresh(&|_| true);
        assert_eq!(upstream_of(&source, "c.test"), None);
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("b"));
    }

    /// It was: a URL source's last good file that did not merge (or could not be read) made
    /// `nginx -t` fail, and so the next reload or start.
    #[test]
    fn a_url_source_is_read_from_its_candidate_and_only_falls_back_at_start() {
        let dir = Dir::new("candidate");
        let file = dir.write("routes.json", A);
        let read = line_reader();
        let url = cached(&dir, "url", &read);
        let inputs = || Inputs {
            path: Some(file.clone()),
            before: vec![],
            after: vec![url.clone()],
        };
        fs::write(&url.file, "d.test nowhere").unwrap();
        let (mut source, warnings) = Source::open(inputs(), &|_| true).unwrap();
        assert!(
            warnings.iter().any(|e| e.level == Level::Warn
                && e.message.contains("unknown upstream \"nowhere\"")
                && e.message.ends_with(NOT_USED)),
            "{warnings:?}"
        );
        assert_eq!(upstream_of(&source, "d.test"), None);
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        fs::write(&url.file, "not a line").unwrap();
        assert!(Source::open(inputs(), &|_| true).is_ok(), "unreadable");
        // A file source's own errors still stop a start.
        dir.write("routes.json", "{oops");
        assert!(Source::open(inputs(), &|_| true).is_err());
        dir.write("routes.json", A);

        // Running: the candidate, once there, is what the table reads; accepted, it is said so.
        let candidate = url.candidate.clone().unwrap();
        fs::write(&candidate, "c.test a").unwrap();
        source.refresh(&|_| true);
        assert_eq!(upstream_of(&source, "c.test").as_deref(), Some("a"));
        assert_eq!(source.take_accepted(), std::slice::from_ref(&candidate));
        // A refused candidate is not.
        fs::write(&candidate, "e.test nowhere").unwrap();
        let events = source.refresh(&|_| true);
        assert!(events.iter().any(|e| e.level == Level::Error), "{events:?}");
        assert!(source.take_accepted().is_empty());
        assert_eq!(
            upstream_of(&source, "c.test").as_deref(),
            Some("a"),
            "the last good"
        );
        // At start, the accepted version, not the candidate.
        fs::write(&url.file, "c.test a").unwrap();
        let (started, _) = Source::open(inputs(), &|_| true).unwrap();
        assert_eq!(upstream_of(&started, "c.test").as_deref(), Some("a"));
        assert_eq!(upstream_of(&started, "e.test"), None);
    }

    #[test]
    fn folder_files_are_units() {
        let dir = Dir::new("folder");
        dir.write("10-a.json", A);
        dir.write("20-b.json", B);
        fs::write(dir.0.join("notes.txt"), "ignored").unwrap();
        let (mut source, warnings) = Source::open(Inputs::file(&dir.0), &|_| true).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            upstream_of(&source, "x.test").as_deref(),
            Some("a"),
            "reference across files"
        );

        // A broken file keeps its last good version; the others update.
        dir.write("20-b.json", "[");
        dir.write("10-a.json", &A.replace("a.test", "a2.test"));
        let events = source.refresh(&|_| true);
        assert!(
            events
                .iter()
                .any(|e| e.level == Level::Error && e.message.contains("20-b.json:1:1")),
            "{events:?}"
        );
        assert_eq!(upstream_of(&source, "a2.test").as_deref(), Some("a"));
        assert_eq!(upstream_of(&source, "b.test").as_deref(), Some("b"));

        // A new version that removes an upstream another file uses is rejected whole.
        dir.write("20-b.json", B);
        source.refresh(&|_| true);
        dir.write("10-a.json", r#"{"routes": {"a.test": "b"}}"#);
        let events = source.refresh(&|_| true);
        assert!(
            events.iter().any(|e| e.level == Level::Error
                && e.message
                    .contains("20-b.json: routes[\"x.test\"]: unknown upstream \"a\"")),
            "{events:?}"
        );
        assert_eq!(
            upstream_of(&source, "a2.test").as_deref(),
            Some("a"),
            "10-a.json reverted"
        );

        // The same route in two files: the earlier file's stands, with a warning.
        dir.write("30-c.json", r#"{"routes": {"b.test": "a"}}"#);
        let events = source.refresh(&|_| true);
        assert!(
            events.iter().any(|e| e.level == Level::Warn
                && e.message
                    .contains("30-c.json: routes[\"b.test\"]: already routed")),
            "{events:?}"
        );
        assert_eq!(upstream_of(&source, "b.test").as_deref(), Some("b"));

        // Removing a file removes its routes.
        fs::remove_file(dir.0.join("20-b.json")).unwrap();
        fs::remove_file(dir.0.join("30-c.json")).unwrap();
        source.refresh(&|_| true);
        assert_eq!(upstream_of(&source, "b.test"), None);
        assert_eq!(upstream_of(&source, "a2.test").as_deref(), Some("a"));
    }

    #[test]
    fn symlink_swap_is_seen() {
        let dir = Dir::new("symlink");
        fs::create_dir(dir.0.join("..v1")).unwrap();
        fs::write(dir.0.join("..v1/routes.json"), A).unwrap();
        std::os::unix::fs::symlink("..v1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/routes.json", dir.0.join("routes.json")).unwrap();
        let (mut source, _) = Source::open(Inputs::file(&dir.0), &|_| true).unwrap();
        assert_eq!(upstream_of(&source, "a.test").as_deref(), Some("a"));
        fs::create_dir(dir.0.join("..v2")).unwrap();
        fs::write(
            dir.0.join("..v2/routes.json"),
            A.replace("a.test", "v2.test"),
        )
        .unwrap();
        std::os::unix::fs::symlink("..v2", dir.0.join("..data_tmp")).unwrap();
        fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
        source.refresh(&|_| true);
        assert_eq!(upstream_of(&source, "v2.test").as_deref(), Some("a"));
        assert_eq!(source.generation(), 2);
    }
}
