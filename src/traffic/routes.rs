//! Per-route counters in a fixed number of records, found through an open-addressing index
//! of record numbers (as the health store's). Only routes that carried traffic have one; when
//! every record is taken, the one least recently used that has no connection open is reused,
//! and the eviction counted.
//!
//! A connection finds its record without a lock and *pins* it (its open-connection count,
//! in the same word as the record's generation, goes up by a compare-and-swap that fails if
//! the record changed hands meanwhile); a pinned record is never reused. Inserting and
//! evicting take the caller's lock: `find_or_insert` says so.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed};
use std::sync::atomic::{Ordering::AcqRel, Ordering::Release};

use super::limits::{self, Refusal, REASONS};
use super::{hash128, PROTOCOLS};

/// The longest route key kept (a name is at most 255 bytes; a wildcard is kept as its suffix).
pub const NAME_MAX: usize = 255;
const NAME_WORDS: usize = 32;

/// Records an eviction looks at before taking the least recently used of them.
const SAMPLE: usize = 32;

/// In `RouteRecord::state`: being rewritten; readers look again under the lock.
const BUSY: u64 = 1 << 32;
const GENERATION: u64 = 1 << 33;
const OPEN_MASK: u64 = BUSY - 1;

/// How a route's key matches a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RouteKind {
    Exact = 1,
    Wildcard = 2,
    Default = 3,
}

impl RouteKind {
    fn from_u32(v: u32) -> Option<RouteKind> {
        match v {
            1 => Some(RouteKind::Exact),
            2 => Some(RouteKind::Wildcard),
            3 => Some(RouteKind::Default),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Exact => "exact",
            RouteKind::Wildcard => "wildcard",
            RouteKind::Default => "default",
        }
    }
}

/// A route's identity: its kind and key, hashed to 128 bits (never all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u64; 2]);

impl Fingerprint {
    /// `key` is the exact name, the wildcard's suffix (after `*.`), or empty for `default`.
    /// `seed` is the zone's secret: tenants who choose route names cannot choose collisions
    /// or long probe chains.
    #[inline]
    pub fn of(seed: u64, kind: RouteKind, key: &[u8]) -> Fingerprint {
        let mut h = hash128(seed ^ kind as u64, key);
        if h == [0, 0] {
            h[0] = 1;
        }
        Fingerprint(h)
    }

    #[inline]
    fn home(&self, mask: usize) -> usize {
        self.0[0] as usize & mask
    }

    /// Its two words, to derive other keys from.
    #[inline]
    pub fn words(&self) -> [u64; 2] {
        self.0
    }
}

/// One protocol's counters of a route.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the client, and to it.
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Connections whose upstream had no server to give, and whose connect failed.
    pub no_server: AtomicU64,
    pub failed: AtomicU64,
    /// Sum of the times from accept to the routing decision (ms).
    pub decision_ms: AtomicU64,
    /// Connections a limit of the route refused, by `Refusal`.
    pub refused: [AtomicU64; REASONS],
}

/// The counters of one route, in shared memory.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RouteRecord {
    /// `generation << 33 | BUSY | connections open now`.
    state: AtomicU64,
    fp: [AtomicU64; 2],
    /// When it was first counted, and last (monotonic ms).
    first_ms: AtomicU64,
    last_ms: AtomicU64,
    /// `kind << 16 | key length`.
    kind_len: AtomicU32,
    /// Per protocol: connections the route admitted that are still open (`max_conns`).
    admitted: [AtomicU32; PROTOCOLS],
    /// Per protocol: the rate limit's theoretical arrival time (µs, nginx's monotonic clock).
    tat_us: [AtomicU64; PROTOCOLS],
    name: [AtomicU64; NAME_WORDS],
    pub by_protocol: [Counters; PROTOCOLS],
}

/// The store's own counters, next to the records.
#[repr(C)]
#[derive(Debug, Default)]
pub struct StoreHeader {
    /// Records from this number on were never used.
    live: AtomicU32,
    /// Where the next eviction starts looking.
    cursor: AtomicU32,
    evicted: AtomicU64,
    /// Connections not counted: every record had a connection open.
    untracked: AtomicU64,
}

/// A record a connection holds: it is not reused before `RouteStore::close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin(u32);

/// What a session's end adds to its route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Closed {
    pub received: u64,
    pub sent: u64,
    pub no_server: bool,
    pub failed: bool,
}

/// A route's counters, read for a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub kind: RouteKind,
    /// The key as the route table writes it: `shop.test`, `*.apps.test`, `default`.
    pub route: String,
    pub first_ms: u64,
    pub last_ms: u64,
    pub by_protocol: [CountersView; PROTOCOLS],
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersView {
    pub connections: u64,
    pub active: u64,
    pub received: u64,
    pub sent: u64,
    pub no_server: u64,
    pub failed: u64,
    pub decision_ms: u64,
    /// By `Refusal`.
    pub refused: [u64; REASONS],
}

impl RouteView {
    pub fn connections(&self) -> u64 {
        self.by_protocol.iter().map(|c| c.connections).sum()
    }

    pub fn refused(&self) -> u64 {
        self.by_protocol.iter().flat_map(|c| c.refused).sum()
    }
}

/// The index length for `records` records.
pub fn index_len(records: usize) -> usize {
    (records.max(1) * 2).next_power_of_two()
}

pub struct RouteStore<'a> {
    records: &'a [RouteRecord],
    /// Record number + 1, or 0 for an empty entry.
    index: &'a [AtomicU32],
    header: &'a StoreHeader,
}

impl<'a> RouteStore<'a> {
    #[inline]
    pub fn new(
        records: &'a [RouteRecord],
        index: &'a [AtomicU32],
        header: &'a StoreHeader,
    ) -> RouteStore<'a> {
        debug_assert!(index.len().is_power_of_two() && index.len() >= 2 * records.len());
        RouteStore {
            records,
            index,
            header,
        }
    }

    pub fn capacity(&self) -> usize {
        self.records.len()
    }

    pub fn live(&self) -> usize {
        self.header.live.load(Relaxed) as usize
    }

    pub fn evicted(&self) -> u64 {
        self.header.evicted.load(Relaxed)
    }

    pub fn untracked(&self) -> u64 {
        self.header.untracked.load(Relaxed)
    }

    #[inline]
    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    #[inline]
    fn fp_of(&self, r: usize) -> Fingerprint {
        let fp = &self.records[r].fp;
        Fingerprint([fp[0].load(Acquire), fp[1].load(Acquire)])
    }

    /// The index position holding `fp`, or the empty one where it would go.
    #[inline]
    fn position(&self, fp: Fingerprint) -> (usize, Option<usize>) {
        let mask = self.mask();
        let mut i = fp.home(mask);
        for _ in 0..self.index.len() {
            match self.index[i].load(Acquire) {
                0 => return (i, None),
                n if self.fp_of(n as usize - 1) == fp => return (i, Some(n as usize - 1)),
                _ => i = (i + 1) & mask,
            }
        }
        (i, None)
    }

    /// Pins the record of `fp`, without a lock. `None` when it has none, or when an insert
    /// or an eviction under way hid it: `find_or_insert` then decides, under the lock.
    #[inline]
    pub fn find(&self, fp: Fingerprint) -> Option<Pin> {
        let (_, r) = self.position(fp);
        let r = r?;
        let state = &self.records[r].state;
        let mut s = state.load(Acquire);
        loop {
            // Read after the state: a record whose fingerprint changed since is also a record
            // whose generation did, and the exchange below fails.
            if s & BUSY != 0 || self.fp_of(r) != fp {
                return None;
            }
            match state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => return Some(Pin(r as u32)),
                Err(now) => s = now,
            }
        }
    }

    /// Pins the record of `fp`, making it (from `kind` and `key`) when absent; when every
    /// record is taken, reuses the least recently used of a sample that has no connection
    /// open. `None` when every record has one (the connection is counted as untracked).
    /// The caller holds the lock.
    pub fn find_or_insert(
        &self,
        fp: Fingerprint,
        kind: RouteKind,
        key: &[u8],
        now_ms: u64,
    ) -> Option<Pin> {
        if let Some(pin) = self.find(fp) {
            return Some(pin);
        }
        let live = self.live();
        let r = if live < self.records.len() {
            self.header.live.store(live as u32 + 1, Relaxed);
            let state = &self.records[live].state;
            state.store(state.load(Relaxed) | BUSY, Release);
            live
        } else {
            let Some(r) = self.evict() else {
                self.header.untracked.fetch_add(1, Relaxed);
                return None;
            };
            r
        };
        let record = &self.records[r];
        record.fp[0].store(fp.0[0], Release);
        record.fp[1].store(fp.0[1], Release);
        let key = &key[..key.len().min(NAME_MAX)];
        let mut words = [0u64; NAME_WORDS];
        for (i, b) in key.iter().enumerate() {
            words[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        for (w, v) in record.name.iter().zip(words) {
            w.store(v, Relaxed);
        }
        record
            .kind_len
            .store((kind as u32) << 16 | key.len() as u32, Relaxed);
        record.first_ms.store(now_ms, Relaxed);
        record.last_ms.store(now_ms, Relaxed);
        for c in &record.by_protocol {
            for v in [
                &c.connections,
                &c.closed,
                &c.received,
                &c.sent,
                &c.no_server,
                &c.failed,
                &c.decision_ms,
            ]
            .into_iter()
            .chain(&c.refused)
            {
                v.store(0, Relaxed);
            }
        }
        for p in 0..PROTOCOLS {
            record.admitted[p].store(0, Relaxed);
            record.tat_us[p].store(0, Relaxed);
        }
        let (at, _) = self.position(fp);
        self.index[at].store(r as u32 + 1, Release);
        // Open for readers, pinned once by this connection.
        let s = record.state.load(Relaxed);
        record.state.store((s & !BUSY & !OPEN_MASK) + 1, Release);
        Some(Pin(r as u32))
    }

    /// Takes the least recently used record without a connection open, out of the index;
    /// it is left BUSY for its new owner.
    fn evict(&self) -> Option<usize> {
        // A connection may pin the chosen record before it is taken: choose again.
        for _ in 0..4 {
            let r = self.least_recently_used()?;
            let state = &self.records[r].state;
            let s = state.load(Acquire);
            if s & (BUSY | OPEN_MASK) != 0
                || state
                    .compare_exchange(s, (s & !OPEN_MASK) + GENERATION + BUSY, AcqRel, Acquire)
                    .is_err()
            {
                continue;
            }
            let (hole, found) = self.position(self.fp_of(r));
            if found == Some(r) {
                self.shift_back(hole);
            }
            self.header.evicted.fetch_add(1, Relaxed);
            return Some(r);
        }
        None
    }

    /// The least recently used record without a connection open, among the next `SAMPLE`
    /// from the cursor (or further, while none of them qualifies).
    fn least_recently_used(&self) -> Option<usize> {
        let n = self.records.len();
        let start = self.header.cursor.load(Relaxed) as usize % n;
        let mut best: Option<(u64, usize)> = None;
        let mut looked = 0;
        for k in 0..n {
            let r = (start + k) % n;
            let s = self.records[r].state.load(Acquire);
            if s & (BUSY | OPEN_MASK) == 0 {
                let last = self.records[r].last_ms.load(Relaxed);
                if best.is_none_or(|(b, _)| last < b) {
                    best = Some((last, r));
                }
            }
            looked += 1;
            if looked >= SAMPLE && best.is_some() {
                break;
            }
        }
        self.header
            .cursor
            .store(((start + looked) % n) as u32, Relaxed);
        best.map(|(_, r)| r)
    }

    /// Empties index entry `hole` and moves back the entries after it that would otherwise no
    /// longer be found (linear probing's deletion without tombstones).
    fn shift_back(&self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            self.index[hole].store(0, Release);
            loop {
                j = (j + 1) & mask;
                let n = self.index[j].load(Relaxed);
                if n == 0 {
                    return;
                }
                let home = self.fp_of(n as usize - 1).home(mask);
                let stays = if hole <= j {
                    hole < home && home <= j
                } else {
                    hole < home || home <= j
                };
                if !stays {
                    self.index[hole].store(n, Release);
                    hole = j;
                    break;
                }
            }
        }
    }

    /// A connection of `protocol` that the route took, `decision_ms` after its accept;
    /// `admitted` if `admit` counted it already.
    #[inline]
    pub fn opened(&self, pin: Pin, protocol: usize, decision_ms: u64, now_ms: u64, admitted: bool) {
        let record = &self.records[pin.0 as usize];
        if !admitted {
            record.admitted[protocol].fetch_add(1, Relaxed);
        }
        let c = &record.by_protocol[protocol];
        c.connections.fetch_add(1, Relaxed);
        if decision_ms > 0 {
            c.decision_ms.fetch_add(decision_ms, Relaxed);
        }
        if record.last_ms.load(Relaxed) != now_ms {
            record.last_ms.store(now_ms, Relaxed);
        }
    }

    /// The end of a connection `opened` on `pin`: the record is unpinned.
    #[inline]
    pub fn close(&self, pin: Pin, protocol: usize, end: Closed) {
        let record = &self.records[pin.0 as usize];
        let c = &record.by_protocol[protocol];
        c.closed.fetch_add(1, Relaxed);
        c.received.fetch_add(end.received, Relaxed);
        c.sent.fetch_add(end.sent, Relaxed);
        if end.no_server {
            c.no_server.fetch_add(1, Relaxed);
        }
        if end.failed {
            c.failed.fetch_add(1, Relaxed);
        }
        // Every connection closed here was admitted (`opened` or `admit`).
        record.admitted[protocol].fetch_sub(1, Relaxed);
        record.state.fetch_sub(1, Release);
    }

    /// Counts a connection of `protocol` the route admits, if it has fewer than `max_conns`
    /// (0: no maximum) of that protocol admitted and still open. `opened` follows, with
    /// `admitted`, or `unadmit`.
    #[inline]
    pub fn admit(&self, pin: Pin, protocol: usize, max_conns: u32) -> bool {
        let count = &self.records[pin.0 as usize].admitted[protocol];
        if max_conns == 0 {
            count.fetch_add(1, Relaxed);
            true
        } else {
            limits::reserve(count, max_conns)
        }
    }

    /// One new connection of `protocol` at `now_us` against the route's rate: one per
    /// `interval_us`, with `burst` more at once.
    #[inline]
    pub fn take_token(
        &self,
        pin: Pin,
        protocol: usize,
        now_us: u64,
        interval_us: u64,
        burst: u32,
    ) -> bool {
        let record = &self.records[pin.0 as usize];
        limits::take_token(
            &record.tat_us[protocol],
            now_us,
            interval_us,
            u64::from(burst),
        )
    }

    /// Gives back what `admit` took, for a connection a later check refused.
    pub fn unadmit(&self, pin: Pin, protocol: usize) {
        limits::release(&self.records[pin.0 as usize].admitted[protocol]);
    }

    /// Connections of `protocol` the route admitted that are still open, all workers
    /// together.
    pub fn admitted(&self, pin: Pin, protocol: usize) -> u32 {
        self.records[pin.0 as usize].admitted[protocol].load(Relaxed)
    }

    /// Lets go of a record pinned by `find` without a connection counted on it.
    pub fn unpin(&self, pin: Pin) {
        self.records[pin.0 as usize].state.fetch_sub(1, Release);
    }

    /// The fingerprint of a pinned record.
    pub fn fingerprint(&self, pin: Pin) -> Fingerprint {
        self.fp_of(pin.0 as usize)
    }

    /// A connection refused by a limit of the route (it was never `opened`); unpins too.
    pub fn refused(&self, pin: Pin, protocol: usize, why: Refusal) {
        let record = &self.records[pin.0 as usize];
        record.by_protocol[protocol].refused[why as usize].fetch_add(1, Relaxed);
        record.state.fetch_sub(1, Release);
    }

    /// The `top` busiest routes, busiest first, and how many routes have a record. Needs no
    /// lock: a record that changes hands while it is read is left out.
    pub fn top(&self, top: usize) -> (Vec<RouteView>, usize) {
        self.select(top, By::Connections)
    }

    /// The `top` routes with the most connections that found no server or failed to connect.
    pub fn failing(&self, top: usize) -> Vec<RouteView> {
        self.select(top, By::Failures).0
    }

    /// The `top` routes by `key` (those with a key above 0), and how many routes have a record.
    fn select(&self, top: usize, by: By) -> (Vec<RouteView>, usize) {
        let live = &self.records[..self.live()];
        let mut tracked = 0;
        let mut chosen: Vec<(u64, u32)> = live
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state.load(Acquire) & BUSY == 0)
            .inspect(|_| tracked += 1)
            .map(|(i, r)| (by.record(r), i as u32))
            .filter(|&(k, _)| k > 0)
            .collect();
        let by_key = |a: &(u64, u32), b: &(u64, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        if chosen.len() > top {
            if top == 0 {
                chosen.clear();
            } else {
                chosen.select_nth_unstable_by(top - 1, by_key);
                chosen.truncate(top);
            }
        }
        chosen.sort_unstable_by(by_key);
        let mut out: Vec<RouteView> = chosen
            .iter()
            .filter_map(|&(_, i)| view(&live[i as usize]))
            .collect();
        out.sort_by(|a, b| {
            by.view(b)
                .cmp(&by.view(a))
                .then_with(|| a.route.cmp(&b.route))
        });
        (out, tracked)
    }

    /// Every route counted, busiest first.
    pub fn views(&self) -> Vec<RouteView> {
        self.top(usize::MAX).0
    }
}

impl RouteRecord {
    /// Connections taken and refused: what ranks the busiest routes.
    fn connections(&self) -> u64 {
        self.by_protocol
            .iter()
            .map(|c| {
                c.connections.load(Relaxed) + c.refused.iter().map(|n| n.load(Relaxed)).sum::<u64>()
            })
            .sum()
    }

    fn failures(&self) -> u64 {
        self.by_protocol
            .iter()
            .map(|c| c.failed.load(Relaxed) + c.no_server.load(Relaxed))
            .sum()
    }
}

/// What a selection of routes ranks them by.
#[derive(Clone, Copy)]
enum By {
    Connections,
    /// Connections that found no server or failed to connect.
    Failures,
}

impl By {
    fn record(self, r: &RouteRecord) -> u64 {
        match self {
            By::Connections => r.connections(),
            By::Failures => r.failures(),
        }
    }

    fn view(self, v: &RouteView) -> u64 {
        match self {
            By::Connections => v.connections() + v.refused(),
            By::Failures => v.by_protocol.iter().map(|c| c.failed + c.no_server).sum(),
        }
    }
}

/// A record as it is now; `None` if it changed hands (or was being made) while it was read.
fn view(r: &RouteRecord) -> Option<RouteView> {
    let before = r.state.load(Acquire);
    if before & BUSY != 0 {
        return None;
    }
    let v = read(r)?;
    // Same generation after the reads: the name and counters belong to this route.
    let after = r.state.load(Acquire);
    (after & !OPEN_MASK == before & !OPEN_MASK).then_some(v)
}

fn read(r: &RouteRecord) -> Option<RouteView> {
    let kind_len = r.kind_len.load(Relaxed);
    let kind = RouteKind::from_u32(kind_len >> 16)?;
    let len = ((kind_len & 0xffff) as usize).min(NAME_MAX);
    let mut bytes = Vec::with_capacity(len + 2);
    for (i, w) in r.name.iter().enumerate().take(len.div_ceil(8)) {
        let word = w.load(Relaxed).to_le_bytes();
        bytes.extend_from_slice(&word[..(len - 8 * i).min(8)]);
    }
    let key = String::from_utf8_lossy(&bytes);
    let route = match kind {
        RouteKind::Exact => key.into_owned(),
        RouteKind::Wildcard => format!("*.{key}"),
        RouteKind::Default => "default".to_owned(),
    };
    let by_protocol = core::array::from_fn(|p| {
        let c = &r.by_protocol[p];
        let connections = c.connections.load(Relaxed);
        CountersView {
            connections,
            active: connections.saturating_sub(c.closed.load(Relaxed)),
            received: c.received.load(Relaxed),
            sent: c.sent.load(Relaxed),
            no_server: c.no_server.load(Relaxed),
            failed: c.failed.load(Relaxed),
            decision_ms: c.decision_ms.load(Relaxed),
            refused: core::array::from_fn(|k| c.refused[k].load(Relaxed)),
        }
    });
    Some(RouteView {
        kind,
        route,
        first_ms: r.first_ms.load(Relaxed),
        last_ms: r.last_ms.load(Relaxed),
        by_protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x5eed;

    struct Area {
        records: Vec<RouteRecord>,
        index: Vec<AtomicU32>,
        header: StoreHeader,
    }

    fn area(n: usize) -> Area {
        Area {
            records: (0..n).map(|_| RouteRecord::default()).collect(),
            index: (0..index_len(n)).map(|_| AtomicU32::new(0)).collect(),
            header: StoreHeader::default(),
        }
    }

    impl Area {
        fn store(&self) -> RouteStore<'_> {
            RouteStore::new(&self.records, &self.index, &self.header)
        }
    }

    fn exact(name: &str) -> (Fingerprint, RouteKind, &[u8]) {
        (
            Fingerprint::of(SEED, RouteKind::Exact, name.as_bytes()),
            RouteKind::Exact,
            name.as_bytes(),
        )
    }

    /// One whole connection on `name`.
    fn connect(store: &RouteStore, name: &str, now: u64) -> Option<Pin> {
        let (fp, kind, key) = exact(name);
        let pin = store.find_or_insert(fp, kind, key, now)?;
        store.opened(pin, 0, 2, now, false);
        Some(pin)
    }

    #[test]
    fn counts_per_route_and_protocol() {
        let a = area(8);
        let s = a.store();
        for _ in 0..3 {
            let pin = connect(&s, "a.test", 1).unwrap();
            s.close(
                pin,
                0,
                Closed {
                    received: 10,
                    sent: 100,
                    ..Closed::default()
                },
            );
        }
        let (fp, kind, key) = exact("a.test");
        let pin = s.find_or_insert(fp, kind, key, 2).unwrap();
        s.opened(pin, 1, 0, 2, false);
        let wild = Fingerprint::of(SEED, RouteKind::Wildcard, b"test");
        let w = s
            .find_or_insert(wild, RouteKind::Wildcard, b"test", 3)
            .unwrap();
        s.opened(w, 0, 0, 3, false);
        s.close(
            w,
            0,
            Closed {
                failed: true,
                ..Closed::default()
            },
        );
        let views = s.views();
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].route, "a.test");
        let tls = views[0].by_protocol[0];
        assert_eq!(
            (
                tls.connections,
                tls.active,
                tls.received,
                tls.sent,
                tls.decision_ms
            ),
            (3, 0, 30, 300, 6)
        );
        assert_eq!(views[0].by_protocol[1].active, 1);
        assert_eq!(views[1].route, "*.test");
        assert_eq!(views[1].by_protocol[0].failed, 1);
        // Exact `test` is another route than `*.test`.
        assert!(s
            .find(Fingerprint::of(SEED, RouteKind::Exact, b"test"))
            .is_none());
    }

    #[test]
    fn full_store_reuses_the_least_recently_used_without_connections() {
        let a = area(4);
        let s = a.store();
        let open = connect(&s, "open.test", 0).unwrap();
        for (i, name) in ["b.test", "c.test", "d.test"].iter().enumerate() {
            let pin = connect(&s, name, 10 + i as u64).unwrap();
            s.close(pin, 0, Closed::default());
        }
        // open.test is the oldest but has a connection open: b.test goes.
        let pin = connect(&s, "e.test", 20).unwrap();
        s.close(pin, 0, Closed::default());
        assert_eq!(s.evicted(), 1);
        let names: Vec<String> = s.views().into_iter().map(|v| v.route).collect();
        assert!(names.contains(&"open.test".to_owned()));
        assert!(!names.contains(&"b.test".to_owned()));
        assert!(s.find(exact("b.test").0).is_none());
        // The others are still found, through the index the eviction shifted.
        for name in ["c.test", "d.test", "e.test", "open.test"] {
            let pin = s.find(exact(name).0).unwrap_or_else(|| panic!("{name}"));
            s.close(pin, 0, Closed::default());
        }
        s.close(open, 0, Closed::default());
        // A route that comes back starts fresh.
        let pin = connect(&s, "b.test", 30).unwrap();
        s.close(pin, 0, Closed::default());
        let b = s.views().into_iter().find(|v| v.route == "b.test").unwrap();
        assert_eq!(b.by_protocol[0].connections, 1);
    }

    #[test]
    fn every_record_pinned_leaves_the_connection_untracked() {
        let a = area(2);
        let s = a.store();
        let _x = connect(&s, "x.test", 0).unwrap();
        let _y = connect(&s, "y.test", 0).unwrap();
        assert!(connect(&s, "z.test", 1).is_none());
        assert_eq!((s.untracked(), s.evicted()), (1, 0));
    }

    #[test]
    fn bounded_under_many_distinct_routes() {
        let a = area(64);
        let s = a.store();
        for i in 0..100_000u64 {
            let pin = connect(&s, &format!("r{i}.test"), i).unwrap();
            s.close(pin, 0, Closed::default());
            // A busy route used all along is never the least recently used.
            let hot = connect(&s, "hot.test", i).unwrap();
            s.close(hot, 0, Closed::default());
        }
        assert_eq!(s.live(), 64);
        let views = s.views();
        assert_eq!(views.len(), 64);
        assert_eq!(views[0].route, "hot.test");
        assert_eq!(views[0].connections(), 100_000);
        assert_eq!(s.evicted(), 100_000 - 63);
        // Every record is still reachable through the index.
        for v in &views {
            let fp = exact(&v.route).0;
            let pin = s.find(fp).unwrap_or_else(|| panic!("{}", v.route));
            s.close(pin, 0, Closed::default());
        }
    }

    #[test]
    fn a_pin_fails_once_the_record_changed_hands() {
        let a = area(1);
        let s = a.store();
        let pin = connect(&s, "a.test", 0).unwrap();
        s.close(pin, 0, Closed::default());
        let old = a.records[0].state.load(Relaxed);
        let pin = connect(&s, "b.test", 1).unwrap();
        assert_ne!(a.records[0].state.load(Relaxed) >> 33, old >> 33);
        assert!(s.find(exact("a.test").0).is_none());
        s.close(pin, 0, Closed::default());
    }

    #[test]
    fn top_selects_the_busiest_without_reading_the_rest() {
        let a = area(64);
        let s = a.store();
        for i in 0..50u64 {
            for _ in 0..i {
                let pin = connect(&s, &format!("r{i}.test"), i).unwrap();
                s.close(pin, 0, Closed::default());
            }
        }
        let (top, tracked) = s.top(3);
        assert_eq!(tracked, 49);
        let names: Vec<&str> = top.iter().map(|v| v.route.as_str()).collect();
        assert_eq!(names, ["r49.test", "r48.test", "r47.test"]);
        assert_eq!(s.top(0), (vec![], 49));
        assert_eq!(s.top(1000).0.len(), 49);
        assert!(s.failing(10).is_empty(), "no route failed");
        let pin = connect(&s, "r1.test", 60).unwrap();
        s.close(
            pin,
            0,
            Closed {
                failed: true,
                ..Closed::default()
            },
        );
        let failing = s.failing(10);
        assert_eq!(failing.len(), 1);
        assert_eq!(failing[0].route, "r1.test");
    }

    #[test]
    fn long_keys_are_kept_whole() {
        let a = area(2);
        let s = a.store();
        let name = format!("{}.test", "a".repeat(250));
        let pin = connect(&s, &name[..255], 0).unwrap();
        s.close(pin, 0, Closed::default());
        assert_eq!(s.views()[0].route, &name[..255]);
    }
}
