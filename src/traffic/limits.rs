//! Per-route limits as every worker enforces them, on the shared counters: the route's
//! admitted connections (`max_conns`), a table of (route, client) pairs with connections open
//! (`max_conns_per_client`), and a token bucket kept as one theoretical arrival time (GCRA:
//! `rate` with a `burst`). Pure: the caller maps the memory and holds the zone's lock where a
//! function says so.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address is on the route's `deny` list, or not on its `allow` list.
    Denied = 0,
    MaxConns = 1,
    MaxConnsPerClient = 2,
    Rate = 3,
}

/// The reasons, in the order counters keep them.
pub const REASONS: usize = 4;

impl Refusal {
    pub const ALL: [Refusal; REASONS] = [
        Refusal::Denied,
        Refusal::MaxConns,
        Refusal::MaxConnsPerClient,
        Refusal::Rate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::MaxConns => "max_conns",
            Refusal::MaxConnsPerClient => "max_conns_per_client",
            Refusal::Rate => "rate",
        }
    }

    /// What an HTTP client is answered: `403` for its address, `429` for a limit, with a
    /// one-line body.
    pub fn http_answer(self) -> Vec<u8> {
        let (status, extra, body) = match self {
            Refusal::Denied => ("403 Forbidden", "", "Access to this host is denied.\n"),
            _ => (
                "429 Too Many Requests",
                "Retry-After: 1\r\n",
                "Too many connections to this host; retry later.\n",
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Takes a slot of at most `max` from `count`; `false`, and no change, when all are taken.
#[inline]
pub fn reserve(count: &AtomicU32, max: u32) -> bool {
    let mut now = count.load(Relaxed);
    loop {
        if now >= max {
            return false;
        }
        match count.compare_exchange_weak(now, now + 1, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(seen) => now = seen,
        }
    }
}

/// Gives back a slot `reserve` took.
#[inline]
pub fn release(count: &AtomicU32) {
    // Never below zero, whatever a caller does twice.
    let _ = count.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
}

/// One arrival at `now_us` against a bucket of `burst` tokens refilled every `interval_us`
/// (the generic cell rate algorithm: `tat` is when the bucket would be full again). Admits
/// `burst + 1` at once from a full bucket, then one per interval. Clocks of different workers
/// may differ by a few milliseconds: an arrival stamped earlier than the last one is judged
/// against the later time, never given extra tokens. A `tat` further ahead than these settings
/// can put it (left by a slower rate or a larger burst before a table swap) is brought back
/// to an empty bucket under them: a raised rate applies within one of its intervals.
#[inline]
pub fn take_token(tat: &AtomicU64, now_us: u64, interval_us: u64, burst: u64) -> bool {
    let tolerance = interval_us.saturating_mul(burst);
    let furthest = now_us.saturating_add(tolerance).saturating_add(interval_us);
    let mut seen = tat.load(Relaxed);
    loop {
        if seen > furthest {
            match tat.compare_exchange_weak(seen, furthest, Relaxed, Relaxed) {
                Ok(_) => return false,
                Err(now) => {
                    seen = now;
                    continue;
                }
            }
        }
        let from = seen.max(now_us);
        if from - now_us > tolerance {
            return false;
        }
        match tat.compare_exchange_weak(seen, from + interval_us, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(now) => seen = now,
        }
    }
}

/// One (route, client) pair with connections open; `key == 0` is an empty slot.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ClientSlot {
    key: AtomicU64,
    count: AtomicU32,
    _pad: AtomicU32,
}

/// What `Clients::acquire` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Admitted,
    /// The pair has `max` connections open.
    Refused,
    /// Every slot is taken: the pair cannot be counted (the connection is let through).
    Full,
}

/// The (route, client) pairs with connections open, in an open-addressing table (linear
/// probing, deletion by shifting back) of a power-of-two number of slots, kept at most half
/// full. Every function needs the zone's lock.
pub struct Clients<'a> {
    slots: &'a [ClientSlot],
    /// Pairs kept now.
    used: &'a AtomicU32,
    /// Pairs kept at most: half the slots, or fewer.
    capacity: usize,
}

impl<'a> Clients<'a> {
    pub fn new(slots: &'a [ClientSlot], used: &'a AtomicU32) -> Clients<'a> {
        debug_assert!(slots.is_empty() || slots.len().is_power_of_two());
        Clients {
            slots,
            used,
            capacity: slots.len() / 2,
        }
    }

    /// At most `pairs` pairs, even if the slots could take more.
    pub fn at_most(mut self, pairs: usize) -> Clients<'a> {
        self.capacity = self.capacity.min(pairs);
        self
    }

    /// Slots for `pairs` pairs at most half full.
    pub fn slots_for(pairs: usize) -> usize {
        if pairs == 0 {
            0
        } else {
            (pairs * 2).next_power_of_two()
        }
    }

    /// The most pairs kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pairs with connections open now.
    pub fn len(&self) -> usize {
        self.used.load(Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn position(&self, key: u64) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut i = key as usize & mask;
        for _ in 0..self.slots.len() {
            match self.slots[i].key.load(Relaxed) {
                0 => return (i, false),
                k if k == key => return (i, true),
                _ => i = (i + 1) & mask,
            }
        }
        (i, false)
    }

    /// One more connection of `key` (never 0), if it has fewer than `max` open.
    pub fn acquire(&self, key: u64, max: u32) -> Acquired {
        if self.slots.is_empty() {
            return Acquired::Full;
        }
        let (i, found) = self.position(key);
        let slot = &self.slots[i];
        if found {
            let n = slot.count.load(Relaxed);
            if n >= max {
                return Acquired::Refused;
            }
            slot.count.store(n + 1, Relaxed);
            return Acquired::Admitted;
        }
        if max == 0 {
            return Acquired::Refused;
        }
        if self.len() >= self.capacity() {
            return Acquired::Full;
        }
        slot.key.store(key, Relaxed);
        slot.count.store(1, Relaxed);
        self.used.fetch_add(1, Relaxed);
        Acquired::Admitted
    }

    /// The end of a connection `acquire` admitted.
    pub fn release(&self, key: u64) {
        if self.slots.is_empty() {
            return;
        }
        let (i, found) = self.position(key);
        if !found {
            return;
        }
        let n = self.slots[i].count.load(Relaxed);
        if n > 1 {
            self.slots[i].count.store(n - 1, Relaxed);
            return;
        }
        self.remove(i);
        self.used.fetch_sub(1, Relaxed);
    }

    /// Empties slot `hole` and moves back the entries after it that would otherwise no longer
    /// be found.
    fn remove(&self, mut hole: usize) {
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            self.slots[hole].key.store(0, Relaxed);
            self.slots[hole].count.store(0, Relaxed);
            loop {
                j = (j + 1) & mask;
                let key = self.slots[j].key.load(Relaxed);
                if key == 0 {
                    return;
                }
                let home = key as usize & mask;
                let stays = if hole <= j {
                    hole < home && home <= j
                } else {
                    hole < home || home <= j
                };
                if !stays {
                    self.slots[hole].key.store(key, Relaxed);
                    self.slots[hole]
                        .count
                        .store(self.slots[j].count.load(Relaxed), Relaxed);
                    hole = j;
                    break;
                }
            }
        }
    }
}

/// A worker's log of refusals for one reason: the first is logged at once, later ones at most
/// once per `interval_ms`, with how many were not logged since.
#[derive(Debug, Default, Clone, Copy)]
pub struct Throttle {
    last_ms: Option<u64>,
    unlogged: u64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            last_ms: None,
            unlogged: 0,
        }
    }
    /// A refusal at `now_ms`: `Some(refusals not logged before this one)` when it is to be
    /// logged.
    pub fn hit(&mut self, now_ms: u64, interval_ms: u64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms.wrapping_sub(last) < interval_ms => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(core::mem::take(&mut self.unlogged))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_stops_at_the_maximum_and_release_gives_back() {
        let n = AtomicU32::new(0);
        assert!((0..3).all(|_| reserve(&n, 3)));
        assert!(!reserve(&n, 3));
        release(&n);
        assert!(reserve(&n, 3));
        assert!(!reserve(&n, 3));
        let zero = AtomicU32::new(0);
        release(&zero);
        assert_eq!(zero.load(Relaxed), 0);
    }

    #[test]
    fn token_bucket_admits_the_burst_then_the_rate() {
        let tat = AtomicU64::new(0);
        // 50 per second (20 ms), burst 10: 11 at once.
        let at_once = (0..100)
            .filter(|_| take_token(&tat, 1_000_000, 20_000, 10))
            .count();
        assert_eq!(at_once, 11);
        // Then one per 20 ms: over 10 s of arrivals every millisecond, 500 more.
        let mut admitted = 0;
        for ms in 1..=10_000u64 {
            if take_token(&tat, 1_000_000 + ms * 1000, 20_000, 10) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 500);
        // Idle long enough, the bucket is full again.
        let later = 1_000_000 + 20_000_000;
        let refill = (0..100)
            .filter(|_| take_token(&tat, later, 20_000, 10))
            .count();
        assert_eq!(refill, 11);
    }

    /// A bucket emptied under a slow rate with a large burst, then given a fast rate (a table
    /// swap): the fast rate applies after one of its intervals, not hours later.
    #[test]
    fn a_raised_rate_applies_at_once() {
        let tat = AtomicU64::new(0);
        let per_minute = 60_000_000;
        let taken = (0..1001)
            .filter(|_| take_token(&tat, 0, per_minute, 1000))
            .count();
        assert_eq!(taken, 1001);
        assert!(tat.load(Relaxed) > 16 * 3_600 * 1_000_000);
        // 100r/s, burst 20: the first arrival finds an empty bucket, the next interval a token.
        assert!(!take_token(&tat, 0, 10_000, 20));
        assert!(take_token(&tat, 10_000, 10_000, 20));
        assert!(!take_token(&tat, 10_000, 10_000, 20));
    }

    #[test]
    fn token_bucket_without_burst_spaces_arrivals() {
        let tat = AtomicU64::new(0);
        assert!(take_token(&tat, 5_000, 1_000, 0));
        assert!(!take_token(&tat, 5_500, 1_000, 0));
        assert!(take_token(&tat, 6_000, 1_000, 0));
        // An arrival stamped before the last (another worker's clock) gets nothing extra.
        assert!(!take_token(&tat, 4_000, 1_000, 0));
    }

    fn table(n: usize) -> Vec<ClientSlot> {
        (0..n).map(|_| ClientSlot::default()).collect()
    }

    #[test]
    fn clients_are_limited_per_key() {
        let slots = table(8);
        let used = AtomicU32::new(0);
        let c = Clients::new(&slots, &used);
        assert_eq!(c.acquire(7, 2), Acquired::Admitted);
        assert_eq!(c.acquire(7, 2), Acquired::Admitted);
        assert_eq!(c.acquire(7, 2), Acquired::Refused);
        assert_eq!(c.acquire(15, 2), Acquired::Admitted); // same home slot as 7
        c.release(7);
        assert_eq!(c.acquire(7, 2), Acquired::Admitted);
        c.release(7);
        c.release(7);
        assert_eq!(c.len(), 1);
        // 15 was placed after 7 and moved back when 7 went: still found.
        assert_eq!(c.acquire(15, 1), Acquired::Refused);
        c.release(15);
        assert!(c.is_empty());
        c.release(99); // unknown: nothing happens
        assert!(c.is_empty());
    }

    #[test]
    fn clients_table_is_bounded_and_lets_through_when_full() {
        let slots = table(Clients::slots_for(4));
        let used = AtomicU32::new(0);
        let c = Clients::new(&slots, &used);
        assert_eq!(c.capacity(), 4);
        for k in 1..=4 {
            assert_eq!(c.acquire(k, 1), Acquired::Admitted);
        }
        assert_eq!(c.acquire(5, 1), Acquired::Full);
        // A pair already kept is still limited.
        assert_eq!(c.acquire(3, 1), Acquired::Refused);
        c.release(2);
        assert_eq!(c.acquire(5, 1), Acquired::Admitted);
        let slots3 = table(8);
        let used3 = AtomicU32::new(0);
        let three = Clients::new(&slots3, &used3).at_most(3);
        assert_eq!(
            (1..=4).map(|k| three.acquire(k, 1)).collect::<Vec<_>>(),
            [
                Acquired::Admitted,
                Acquired::Admitted,
                Acquired::Admitted,
                Acquired::Full
            ]
        );
        let none = Clients::new(&[], &used);
        assert_eq!(none.acquire(1, 1), Acquired::Full);
        none.release(1);
    }

    /// Against a map, under random acquires and releases with colliding keys.
    #[test]
    fn clients_match_a_model() {
        use std::collections::HashMap;
        let slots = table(64);
        let used = AtomicU32::new(0);
        let c = Clients::new(&slots, &used);
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 40) * 64 + 1; // all in a few home slots
            if x & (1 << 40) != 0 {
                let held = model.get(&key).copied().unwrap_or(0);
                let got = c.acquire(key, 3);
                let want = if held >= 3 {
                    Acquired::Refused
                } else if held == 0 && model.len() >= 32 {
                    Acquired::Full
                } else {
                    Acquired::Admitted
                };
                assert_eq!(got, want);
                if got == Acquired::Admitted {
                    *model.entry(key).or_default() += 1;
                }
            } else if let Some(n) = model.get_mut(&key) {
                c.release(key);
                *n -= 1;
                if *n == 0 {
                    model.remove(&key);
                }
            }
            assert_eq!(c.len(), model.len());
        }
    }

    #[test]
    fn http_answers_are_whole_responses() {
        for why in Refusal::ALL {
            let a = String::from_utf8(why.http_answer()).unwrap();
            let (head, body) = a.split_once("\r\n\r\n").unwrap();
            let want = if why == Refusal::Denied { "403" } else { "429" };
            assert!(head.starts_with(&format!("HTTP/1.1 {want} ")), "{head}");
            assert!(head.contains(&format!("Content-Length: {}", body.len())));
            assert_eq!(body.matches('\n').count(), 1);
        }
    }

    #[test]
    fn throttle_logs_once_per_interval_with_what_it_held_back() {
        let mut t = Throttle::default();
        assert_eq!(t.hit(1_000, 10_000), Some(0));
        assert_eq!(t.hit(2_000, 10_000), None);
        assert_eq!(t.hit(10_999, 10_000), None);
        assert_eq!(t.hit(11_000, 10_000), Some(2));
        assert_eq!(t.hit(11_001, 10_000), None);
    }
}
