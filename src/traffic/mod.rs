//! Traffic as every worker sees it: per-route counters (`routes`), the names nobody routes
//! (`unrouted`), and connections without a name, all in fixed-size areas of shared memory
//! laid out by `zone`. Pure: the caller maps the memory and holds its lock where a function
//! says so.

pub mod limits;
pub mod routes;
pub mod unrouted;

pub use routes::{
    Closed, CountersView, Fingerprint, Pin, RouteKind, RouteRecord, RouteStore, RouteView,
    StoreHeader,
};
pub use unrouted::{Heavy, HeavyView, Nameless, NamelessCounts, Outcome as UnroutedOutcome};

/// Protocols counted apart: TLS, then HTTP.
pub const PROTOCOLS: usize = 2;

/// Upper bounds (ms) of the routing decision time histogram's buckets; the last bucket
/// (`+Inf`) follows them.
pub const DECISION_BUCKETS_MS: [u64; 10] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000];

/// Everything a report shows of the counters, read at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub capacity: usize,
    /// Routes with a record; `routes` has the busiest of them.
    pub tracked: usize,
    pub evicted: u64,
    pub untracked: u64,
    /// Unrouted connections counted in the totals only (the names' lock was busy).
    pub sampled_out: u64,
    pub routes: Vec<RouteView>,
    /// The routes with the most connections that found no server or failed to connect.
    pub failing: Vec<RouteView>,
    pub unrouted: [Vec<HeavyView>; PROTOCOLS],
    pub defaulted: [u64; PROTOCOLS],
    pub closed: [u64; PROTOCOLS],
    pub nameless: Vec<(Nameless, u64)>,
    pub decisions: [[u64; DECISION_BUCKETS_MS.len() + 1]; PROTOCOLS],
    pub decision_ms: [u64; PROTOCOLS],
    /// Per protocol, connections refused by a route's limits, by `limits::Refusal`.
    pub refused: [[u64; limits::REASONS]; PROTOCOLS],
    /// (route, client) pairs the clients' table holds at most, and holds now.
    pub clients_capacity: usize,
    pub clients_used: usize,
    /// Connections refused because the clients' table was full.
    pub clients_full: u64,
    /// Connections refused because their route, which has limits, found no record to keep
    /// them in (every record held by an open connection).
    pub unlimited: u64,
}

/// A 128-bit hash of `bytes`, two 64-bit lanes a word at a time; the same in every process.
#[inline]
pub fn hash128(seed: u64, bytes: &[u8]) -> [u64; 2] {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let mut a = seed ^ (bytes.len() as u64).wrapping_mul(K1);
    let mut b = seed.rotate_left(32) ^ (bytes.len() as u64).wrapping_mul(K2);
    let mut chunks = bytes.chunks_exact(8);
    let mut step = |w: u64| {
        a = (a ^ w).wrapping_mul(K1).rotate_left(29);
        b = (b ^ w).wrapping_mul(K2).rotate_left(31);
    };
    for c in &mut chunks {
        step(u64::from_le_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
        ]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        step(u64::from_le_bytes(w));
    }
    [crate::health::mix(a), crate::health::mix(b ^ a)]
}

/// The histogram bucket of a decision that took `ms`: an index into `DECISION_BUCKETS_MS`,
/// or its length for `+Inf`.
#[inline]
pub fn decision_bucket(ms: u64) -> usize {
    DECISION_BUCKETS_MS
        .iter()
        .position(|&le| ms <= le)
        .unwrap_or(DECISION_BUCKETS_MS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(decision_bucket(0), 0);
        assert_eq!(decision_bucket(1), 0);
        assert_eq!(decision_bucket(2), 1);
        assert_eq!(decision_bucket(5000), 9);
        assert_eq!(decision_bucket(5001), 10);
    }

    #[test]
    fn hash_lanes_differ_and_depend_on_every_byte() {
        let a = hash128(1, b"shop.example.com");
        assert_ne!(a[0], a[1]);
        assert_ne!(a, hash128(1, b"shop.example.con"));
        assert_ne!(a, hash128(2, b"shop.example.com"));
        assert_ne!(hash128(1, b"ab"), hash128(1, b"ab\0"));
    }
}
