//! The shared traffic structures under arbitrary operations: per-route records (pin, close,
//! eviction when full, admission under a maximum), the unrouted names' Space-Saving entries
//! and the limits' (route, client) pairs never panic, never hold more than their capacity,
//! keep every live record reachable through the index, never reuse a record a connection still
//! holds, count exactly the connections a route admitted, and agree with a map on the pairs.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicU32;

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::traffic::limits::{Acquired, ClientSlot, Clients, Refusal};
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
    let mut held: Vec<(ngx_stream_edge_module::traffic::Pin, String, usize)> = Vec::new();
    let mut heavy = vec![Heavy::default(); capacity];
    let slots: Vec<ClientSlot> = (0..Clients::slots_for(capacity)).map(|_| ClientSlot::default()).collect();
    let used = AtomicU32::new(0);
    let clients = Clients::new(&slots, &used);
    let mut pairs: HashMap<u64, u32> = HashMap::new();
    for (t, op) in ops.chunks(2).enumerate() {
        let (a, b) = (op[0], *op.get(1).unwrap_or(&0));
        let name = format!("r{}.test", b % 16);
        let fp = Fingerprint::of(7, RouteKind::Exact, name.as_bytes());
        match a % 6 {
            // A connection opens, and stays open.
            0 => {
                if let Some(pin) = store.find_or_insert(fp, RouteKind::Exact, name.as_bytes(), t as u64) {
                    store.opened(pin, usize::from(b & 1), 0, t as u64, false);
                    held.push((pin, name, usize::from(b & 1)));
                }
            }
            // The oldest open connection closes.
            1 => {
                if !held.is_empty() {
                    let (pin, _, p) = held.remove(0);
                    store.close(pin, p, Closed { received: 1, sent: 2, ..Closed::default() });
                }
            }
            // A lock-free lookup.
            2 => {
                if let Some(pin) = store.find(fp) {
                    store.unpin(pin);
                }
            }
            // A connection under max_conns 2: admitted and held, or refused.
            3 => {
                if let Some(pin) = store.find_or_insert(fp, RouteKind::Exact, name.as_bytes(), t as u64) {
                    let open = held.iter().filter(|(_, n, p)| *n == name && *p == 0).count();
                    if store.admit(pin, 0, 2) {
                        assert!(open < 2, "admitted past the maximum");
                        store.opened(pin, 0, 0, t as u64, true);
                        held.push((pin, name, 0));
                    } else {
                        assert!(open >= 2, "refused under the maximum");
                        store.refused(pin, 0, Refusal::MaxConns);
                    }
                }
            }
            // A (route, client) pair: acquired under a maximum of 2, or released.
            4 => {
                let key = u64::from(b % 16) + 1;
                if b & 0x80 == 0 {
                    let n = pairs.get(&key).copied().unwrap_or(0);
                    let want = if n >= 2 {
                        Acquired::Refused
                    } else if n == 0 && pairs.len() >= clients.capacity() {
                        Acquired::Full
                    } else {
                        Acquired::Admitted
                    };
                    assert_eq!(clients.acquire(key, 2), want);
                    if want == Acquired::Admitted {
                        *pairs.entry(key).or_default() += 1;
                    }
                } else if let Some(n) = pairs.get_mut(&key) {
                    clients.release(key);
                    *n -= 1;
                    if *n == 0 {
                        pairs.remove(&key);
                    }
                }
                assert_eq!(clients.len(), pairs.len());
            }
            _ => count(&mut heavy, name.as_bytes(), Outcome::Closed, t as u64, IpAddr::V4(Ipv4Addr::LOCALHOST)),
        }
        assert!(store.live() <= capacity);
        // A held record is never taken over by another route, and counts its connections.
        for (pin, name, p) in &held {
            let fp = Fingerprint::of(7, RouteKind::Exact, name.as_bytes());
            let found = store.find(fp).expect("a held route stays findable");
            assert_eq!(found, *pin);
            let open = held.iter().filter(|(_, n, q)| n == name && q == p).count();
            assert_eq!(store.admitted(found, *p) as usize, open);
            store.unpin(found);
        }
    }
    let v = store.views();
    assert!(v.len() <= capacity);
    assert!(views(&heavy).len() <= capacity);
});
