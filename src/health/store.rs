//! Health records in a fixed area, found through an open-addressing index of record numbers.
//! Records never move, so workers keep plain pointers to them; the index entries do move
//! (deletion shifts them back), so no tombstone ever lengthens a search. A record is reused
//! only once no table has listed its server for a while. The caller holds the zone's lock
//! around every call.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::record::{Key, Record, EMPTY};

/// The store's own counters, next to the records in shared memory.
#[repr(C)]
#[derive(Debug, Default)]
pub struct StoreMeta {
    live: AtomicU32,
    /// Records from this number on were never used.
    fresh: AtomicU32,
    /// The first free record's number + 1; 0 when none is free.
    free: AtomicU32,
    /// A full store does not look for stale records again before this time (ms).
    next_sweep_ms: AtomicU64,
}

pub struct Store<'a> {
    records: &'a [Record],
    /// Record number + 1, or 0 for an empty entry; its length is a power of two at least twice
    /// the number of records, so a search ends within a few entries.
    index: &'a [AtomicU32],
    meta: &'a StoreMeta,
}

/// The record for a key, and whether it was just made.
pub struct Entry<'a> {
    pub record: &'a Record,
    pub new: bool,
}

/// How long a full store waits before it looks for stale records again, when it found none.
const SWEEP_BACKOFF_MS: u64 = 5_000;

/// The index length for `records` records.
pub fn index_len(records: usize) -> usize {
    (records.max(1) * 2).next_power_of_two()
}

impl<'a> Store<'a> {
    pub fn new(records: &'a [Record], index: &'a [AtomicU32], meta: &'a StoreMeta) -> Store<'a> {
        debug_assert!(index.len().is_power_of_two() && index.len() >= 2 * records.len());
        Store {
            records,
            index,
            meta,
        }
    }

    pub fn capacity(&self) -> usize {
        self.records.len()
    }

    pub fn live(&self) -> usize {
        self.meta.live.load(Relaxed) as usize
    }

    /// The records in use, for a walk over all of them.
    pub fn records(&self) -> &'a [Record] {
        self.records
    }

    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    fn home(&self, key: &Key) -> usize {
        key.hash() as usize & self.mask()
    }

    /// The index position holding `key`, or the empty one where it would go; and how many
    /// entries were looked at.
    fn position(&self, key: &Key) -> (usize, Option<usize>, usize) {
        let mut i = self.home(key);
        let mut looked = 0;
        loop {
            looked += 1;
            match self.index[i].load(Relaxed) {
                0 => return (i, None, looked),
                n if self.records[n as usize - 1].key() == *key => {
                    return (i, Some(n as usize - 1), looked)
                }
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    pub fn find(&self, key: &Key) -> Option<&'a Record> {
        self.position(key).1.map(|r| &self.records[r])
    }

    /// The record for `key`, made (up, or down if `start_down`) when absent. `None` when every
    /// record is in use even after reusing those untouched since `stale_before`.
    pub fn find_or_insert(
        &self,
        key: &Key,
        now: u64,
        stale_before: u64,
        start_down: bool,
    ) -> Option<Entry<'a>> {
        let (at, found, _) = self.position(key);
        if let Some(r) = found {
            let record = &self.records[r];
            record.touch(now);
            return Some(Entry { record, new: false });
        }
        let (at, r) = match self.allocate() {
            Some(r) => (at, r),
            None => {
                if now < self.meta.next_sweep_ms.load(Relaxed) {
                    return None;
                }
                if self.sweep(stale_before) == 0 {
                    self.meta
                        .next_sweep_ms
                        .store(now + SWEEP_BACKOFF_MS, Relaxed);
                    return None;
                }
                // The sweep moved index entries: find the place again.
                let r = self.allocate()?;
                (self.position(key).0, r)
            }
        };
        let record = &self.records[r];
        record.init(*key, now, start_down);
        self.index[at].store(r as u32 + 1, Relaxed);
        self.meta.live.fetch_add(1, Relaxed);
        Some(Entry { record, new: true })
    }

    /// A free record's number, taken off the free list or from the never-used ones.
    fn allocate(&self) -> Option<usize> {
        let head = self.meta.free.load(Relaxed);
        if head != 0 {
            let r = head as usize - 1;
            self.meta
                .free
                .store(self.records[r].next_free.load(Relaxed), Relaxed);
            return Some(r);
        }
        let fresh = self.meta.fresh.load(Relaxed) as usize;
        if fresh < self.records.len() {
            self.meta.fresh.store(fresh as u32 + 1, Relaxed);
            return Some(fresh);
        }
        None
    }

    /// Frees the records no table has touched since `stale_before` and no connection uses;
    /// returns how many.
    pub fn sweep(&self, stale_before: u64) -> usize {
        let mut removed = 0;
        let used = self.meta.fresh.load(Relaxed) as usize;
        for (r, record) in self.records[..used].iter().enumerate() {
            if record.group() != EMPTY && record.touched_ms() < stale_before && record.conns() == 0
            {
                self.remove(r);
                removed += 1;
            }
        }
        removed
    }

    fn remove(&self, r: usize) {
        let record = &self.records[r];
        let (hole, found, _) = self.position(&record.key());
        debug_assert_eq!(found, Some(r));
        self.shift_back(hole);
        record.mark_free();
        record
            .next_free
            .store(self.meta.free.load(Relaxed), Relaxed);
        self.meta.free.store(r as u32 + 1, Relaxed);
        self.meta.live.fetch_sub(1, Relaxed);
    }

    /// Empties index entry `hole` and moves back the entries after it that would otherwise no
    /// longer be found (linear probing's deletion without tombstones).
    fn shift_back(&self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            self.index[hole].store(0, Relaxed);
            loop {
                j = (j + 1) & mask;
                let n = self.index[j].load(Relaxed);
                if n == 0 {
                    return;
                }
                let home = self.home(&self.records[n as usize - 1].key());
                // The entry may stay if its home lies cyclically in (hole, j].
                let stays = if hole <= j {
                    hole < home && home <= j
                } else {
                    hole < home || home <= j
                };
                if !stays {
                    self.index[hole].store(n, Relaxed);
                    hole = j;
                    break;
                }
            }
        }
    }

    /// Index entries a search for `key` looks at: a bound on the cost of every lookup.
    #[cfg(test)]
    fn search_len(&self, key: &Key) -> usize {
        self.position(key).2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(upstream: &str, last: u8) -> Key {
        Key::new(upstream, [10, 0, 0, last].into(), Some(443))
    }

    struct Area {
        records: Vec<Record>,
        index: Vec<AtomicU32>,
        meta: StoreMeta,
    }

    fn area(n: usize) -> Area {
        Area {
            records: (0..n).map(|_| Record::default()).collect(),
            index: (0..index_len(n)).map(|_| AtomicU32::new(0)).collect(),
            meta: StoreMeta::default(),
        }
    }

    impl Area {
        fn store(&self) -> Store<'_> {
            Store::new(&self.records, &self.index, &self.meta)
        }
    }

    #[test]
    fn finds_what_it_inserted_and_keeps_state() {
        let area = area(16);
        let store = area.store();
        let a = store.find_or_insert(&key("a", 1), 5, 0, false).unwrap();
        assert!(a.new);
        a.record.failed(10, 1, 1000);
        let again = store.find_or_insert(&key("a", 1), 6, 0, false).unwrap();
        assert!(!again.new);
        assert!(std::ptr::eq(a.record, again.record));
        assert!(!again.record.available(20), "state survives a re-attach");
        // Same address, another upstream: a record of its own.
        let b = store.find_or_insert(&key("b", 1), 6, 0, false).unwrap();
        assert!(b.new && b.record.available(20));
        assert_eq!(store.live(), 2);
        assert!(store.find(&key("a", 2)).is_none());
    }

    #[test]
    fn full_store_reuses_stale_records_only() {
        let area = area(8);
        let store = area.store();
        for i in 0..8 {
            store
                .find_or_insert(&key("a", i), 100 + u64::from(i), 0, false)
                .unwrap();
        }
        // Nothing is stale yet: full.
        assert!(store
            .find_or_insert(&key("a", 99), 200, 50, false)
            .is_none());
        // Records touched before 103 are stale (100, 101, 102), once the backoff is over.
        let later = 200 + SWEEP_BACKOFF_MS;
        let e = store
            .find_or_insert(&key("a", 99), later, 103, false)
            .unwrap();
        assert!(e.new);
        assert_eq!(store.live(), 6);
        assert!(store.find(&key("a", 0)).is_none());
        for i in 3..8 {
            assert!(
                store.find(&key("a", i)).is_some(),
                "{i} found after removals"
            );
        }
        // A record with live connections is not reused.
        store.find(&key("a", 6)).unwrap().connected(None);
        assert_eq!(store.sweep(u64::MAX), 5);
        assert!(store.find(&key("a", 6)).is_some());
        assert_eq!(store.live(), 1);
    }

    #[test]
    fn a_full_store_does_not_sweep_on_every_miss() {
        let area = area(4);
        let store = area.store();
        for i in 0..4 {
            store.find_or_insert(&key("a", i), 100, 0, false).unwrap();
        }
        assert!(store.find_or_insert(&key("b", 1), 200, 0, false).is_none());
        // Everything is stale now, but the last sweep found nothing a moment ago.
        assert!(store
            .find_or_insert(&key("b", 1), 300, u64::MAX, false)
            .is_none());
        assert!(store
            .find_or_insert(&key("b", 1), 200 + SWEEP_BACKOFF_MS, u64::MAX, false)
            .is_some());
    }

    /// The defect this store replaces: removed slots stayed as tombstones, so after churn every
    /// miss walked the whole table under the zone's lock.
    #[test]
    fn lookups_stay_short_after_any_churn() {
        let n = 1024;
        let area = area(n);
        let store = area.store();
        let k = |round: u32, i: u32| {
            Key::new(
                "churn",
                std::net::Ipv4Addr::from(round << 16 | i).into(),
                Some(443),
            )
        };
        for round in 0..20u32 {
            let now = u64::from(round + 1) * 1_000_000;
            for i in 0..(n as u32 * 7 / 8) {
                store
                    .find_or_insert(&k(round, i), now, now - 1, false)
                    .unwrap();
            }
            // Everything of this round goes stale before the next.
            assert_eq!(store.sweep(now + 1), n * 7 / 8);
            assert_eq!(store.live(), 0);
        }
        assert!(area.index.iter().all(|e| e.load(Relaxed) == 0));
        for i in 0..(n as u32 / 2) {
            store.find_or_insert(&k(99, i), 1, 0, false).unwrap();
        }
        let worst = (0..1000u32)
            .map(|i| store.search_len(&k(1000, i)))
            .max()
            .unwrap();
        assert!(worst <= 64, "a miss looked at {worst} index entries");
        for i in 0..(n as u32 / 2) {
            assert!(store.find(&k(99, i)).is_some());
        }
    }

    #[test]
    fn start_down_only_for_new_records() {
        let area = area(8);
        let store = area.store();
        let e = store.find_or_insert(&key("a", 1), 1, 0, true).unwrap();
        assert!(!e.record.available(1));
        e.record.checked(2, super::super::Outcome::Ok, 1, 1);
        assert!(e.record.available(2));
        let again = store.find_or_insert(&key("a", 1), 3, 0, true).unwrap();
        assert!(again.record.available(3), "a known server keeps its state");
    }

    /// A probe or a session that outlives its record's server writes nothing into the record
    /// once it belongs to another server.
    #[test]
    fn a_late_writer_leaves_a_reused_record_alone() {
        let area = area(1);
        let store = area.store();
        let a = store.find_or_insert(&key("a", 1), 1, 0, false).unwrap();
        let probe_generation = a.record.generation();
        a.record.connected(Some(0));
        let session_generation = a.record.generation();
        a.record.released(Some(0), session_generation);
        let b = store
            .find_or_insert(&key("b", 2), SWEEP_BACKOFF_MS, 2, false)
            .unwrap();
        assert!(
            b.new && std::ptr::eq(a.record, b.record),
            "the one record reused"
        );
        b.record.connected(Some(0));
        // The probe for a's server times out now, with fall 1.
        assert_eq!(
            b.record
                .checked_as(probe_generation, 10, crate::health::Outcome::Timeout, 1, 1),
            None
        );
        assert!(b.record.available(10), "b's server is not taken down");
        b.record.released(Some(0), session_generation);
        assert_eq!(
            b.record.conns(),
            1,
            "a's session does not release b's connection"
        );
    }

    #[test]
    fn a_dead_workers_connections_are_taken_back() {
        let area = area(2);
        let store = area.store();
        let r = store
            .find_or_insert(&key("a", 1), 1, 0, false)
            .unwrap()
            .record;
        r.connected(Some(0));
        r.connected(Some(3));
        r.connected(Some(3));
        assert_eq!(r.conns(), 3);
        assert_eq!(r.forget_slot(3), 2);
        assert_eq!(r.conns(), 1);
        r.released(Some(0), r.generation());
        assert_eq!(r.conns(), 0);
    }
}
