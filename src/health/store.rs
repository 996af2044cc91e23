//! A fixed-size open-addressing table of health records. Records never move, so workers keep
//! plain pointers to them; a slot is reused only once no table has listed its server for a
//! while. The caller holds the zone's lock around every call.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use super::record::{Key, Record, EMPTY, REMOVED};

pub struct Store<'a> {
    slots: &'a [Record],
    live: &'a AtomicU32,
}

/// The record for a key, and whether it was just made.
pub struct Entry<'a> {
    pub record: &'a Record,
    pub new: bool,
}

impl<'a> Store<'a> {
    pub fn new(slots: &'a [Record], live: &'a AtomicU32) -> Store<'a> {
        Store { slots, live }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Live records at most; past this the store is full (linear probing needs room).
    pub fn limit(&self) -> usize {
        self.slots.len() - self.slots.len() / 8
    }

    pub fn live(&self) -> usize {
        self.live.load(Relaxed) as usize
    }

    fn probe(&self, key: &Key) -> impl Iterator<Item = &'a Record> + 'a {
        let n = self.slots.len();
        let start = (key.hash() % n as u64) as usize;
        let slots = self.slots;
        (0..n).map(move |i| &slots[(start + i) % n])
    }

    pub fn find(&self, key: &Key) -> Option<&'a Record> {
        for slot in self.probe(key) {
            match slot.group() {
                EMPTY => return None,
                REMOVED => continue,
                _ if slot.key() == *key => return Some(slot),
                _ => continue,
            }
        }
        None
    }

    /// The record for `key`, made (up, or down if `start_down`) when absent. `None` when the
    /// store is full even after reusing records untouched since `stale_before`.
    pub fn find_or_insert(
        &self,
        key: &Key,
        now: u64,
        stale_before: u64,
        start_down: bool,
    ) -> Option<Entry<'a>> {
        if let Some(record) = self.find(key) {
            record.touch(now);
            return Some(Entry { record, new: false });
        }
        if self.live() >= self.limit() && self.sweep(stale_before) == 0 {
            return None;
        }
        let slot = self
            .probe(key)
            .find(|s| matches!(s.group(), EMPTY | REMOVED))?;
        slot.init(*key, now, start_down);
        self.live.fetch_add(1, Relaxed);
        Some(Entry {
            record: slot,
            new: true,
        })
    }

    /// Removes records no table has touched since `stale_before`; returns how many.
    pub fn sweep(&self, stale_before: u64) -> usize {
        let mut removed = 0;
        for slot in self.slots {
            if slot.group() > REMOVED && slot.touched_ms() < stale_before && slot.conns() == 0 {
                slot.mark_removed();
                removed += 1;
            }
        }
        self.live.fetch_sub(removed as u32, Relaxed);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(upstream: &str, last: u8) -> Key {
        Key::new(upstream, [10, 0, 0, last].into(), Some(443))
    }

    #[test]
    fn finds_what_it_inserted_and_keeps_state() {
        let slots: Vec<Record> = (0..16).map(|_| Record::default()).collect();
        let live = AtomicU32::new(0);
        let store = Store::new(&slots, &live);
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
        let slots: Vec<Record> = (0..8).map(|_| Record::default()).collect();
        let live = AtomicU32::new(0);
        let store = Store::new(&slots, &live);
        assert_eq!(store.limit(), 7);
        for i in 0..7 {
            store
                .find_or_insert(&key("a", i), 100 + u64::from(i), 0, false)
                .unwrap();
        }
        // Nothing is stale yet: full.
        assert!(store
            .find_or_insert(&key("a", 99), 200, 50, false)
            .is_none());
        // Records touched before 103 are stale: 100, 101, 102.
        let e = store
            .find_or_insert(&key("a", 99), 200, 103, false)
            .unwrap();
        assert!(e.new);
        assert_eq!(store.live(), 5);
        assert!(store.find(&key("a", 0)).is_none());
        assert!(
            store.find(&key("a", 6)).is_some(),
            "found past removed slots"
        );
        // A record with live connections is not reused.
        store.find(&key("a", 6)).unwrap().connected();
        assert_eq!(store.sweep(u64::MAX), 4);
        assert!(store.find(&key("a", 6)).is_some());
    }

    #[test]
    fn start_down_only_for_new_records() {
        let slots: Vec<Record> = (0..8).map(|_| Record::default()).collect();
        let live = AtomicU32::new(0);
        let store = Store::new(&slots, &live);
        let e = store.find_or_insert(&key("a", 1), 1, 0, true).unwrap();
        assert!(!e.record.available(1));
        e.record.checked(2, super::super::Outcome::Ok, 1, 1);
        assert!(e.record.available(2));
        let again = store.find_or_insert(&key("a", 1), 3, 0, true).unwrap();
        assert!(again.record.available(3), "a known server keeps its state");
    }
}
