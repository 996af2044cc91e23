//! The shared traffic structures under arbitrary operations: per-route records (pin, close,
//! eviction when full) and the unrouted names' Space-Saving entries never panic, never hold
//! more than their capacity, keep every live record reachable through the index, and never
//! reuse a record a connection still holds.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicU32;

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::traffic::routes::{index_len, Closed};
use ngx_stream_edge_module::traffic::unrouted::{count, views, Heavy, Outcome};
use ngx_stream_edge_module::traffic::{Fingerprint, RouteKind, RouteRecord, RouteStore, StoreHeader};

fuzz_target!(|data: &[u8]| {
    let Some((&size, ops)) = data.split_first() else { return };
    let capacity = usize::from(size % 8) + 1;
    let records: Vec<RouteRecord> = (0..capacity).map(|_| RouteRecord::default()).collect();
    let index: Vec<AtomicU32> = (0..index_len(capacity)).map(|_| AtomicU32::new(0)).collect();
    let header = StoreHeader::default();
    let store = RouteStore::new(&records, &index, &header);
    let mut held: Vec<(ngx_stream_edge_module::traffic::Pin, String)> = Vec::new();
    let mut heavy = vec![Heavy::default(); capacity];
    for (t, op) in ops.chunks(2).enumerate() {
        let (a, b) = (op[0], *op.get(1).unwrap_or(&0));
        let name = format!("r{}.test", b % 16);
        let fp = Fingerprint::of(7, RouteKind::Exact, name.as_bytes());
        match a % 4 {
            // A connection opens, and stays open.
            0 => {
                if let Some(pin) = store.find_or_insert(fp, RouteKind::Exact, name.as_bytes(), t as u64) {
                    store.opened(pin, usize::from(b & 1), 0, t as u64);
                    held.push((pin, name));
                }
            }
            // The oldest open connection closes.
            1 => {
                if !held.is_empty() {
                    let (pin, _) = held.remove(0);
                    store.close(pin, 0, Closed { received: 1, sent: 2, ..Closed::default() });
                }
            }
            // A lock-free lookup.
            2 => {
                if let Some(pin) = store.find(fp) {
                    store.close(pin, 0, Closed::default());
                }
            }
            _ => count(&mut heavy, name.as_bytes(), Outcome::Closed, t as u64, IpAddr::V4(Ipv4Addr::LOCALHOST)),
        }
        assert!(store.live() <= capacity);
        // A held record is never taken over by another route.
        for (pin, name) in &held {
            let fp = Fingerprint::of(7, RouteKind::Exact, name.as_bytes());
            let found = store.find(fp).expect("a held route stays findable");
            assert_eq!(found, *pin);
            store.close(found, 0, Closed::default());
        }
    }
    let v = store.views();
    assert!(v.len() <= capacity);
    assert!(views(&heavy).len() <= capacity);
});
