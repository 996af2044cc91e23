//! The names nobody routes: the heaviest hitters among names that fell to `default` or were
//! closed, kept by the Space-Saving algorithm (Metwally et al.) in a fixed number of entries,
//! so that a scanner spraying random names costs no more memory than a typo repeated. Every
//! name seen at least `n / entries` times out of `n` is kept, and each count is over by at
//! most its entry's `error`. Also the connections that carried no name at all, by kind.
//!
//! The entries are updated under the caller's lock; `Nameless` counts are atomics.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::hash128;

pub const NAME_MAX: usize = 255;

/// What became of a connection whose name no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the `default` route.
    Defaulted,
    /// Closed: no route and no default.
    Closed,
}

/// One monitored name.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Heavy {
    /// Of the name; 0 for an empty entry.
    fp: u64,
    count: u64,
    /// How much of `count` may belong to names this entry monitored before.
    error: u64,
    closed: u64,
    first_s: u64,
    last_s: u64,
    /// The last client that sent it (v4 as v4-mapped).
    client: [u8; 16],
    name_len: u16,
    name: [u8; NAME_MAX],
}

impl Default for Heavy {
    fn default() -> Heavy {
        Heavy {
            fp: 0,
            count: 0,
            error: 0,
            closed: 0,
            first_s: 0,
            last_s: 0,
            client: [0; 16],
            name_len: 0,
            name: [0; NAME_MAX],
        }
    }
}

/// An entry, read for a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeavyView {
    pub name: String,
    pub count: u64,
    pub error: u64,
    pub closed: u64,
    pub first_s: u64,
    pub last_s: u64,
    pub client: IpAddr,
}

fn fingerprint(name: &[u8]) -> u64 {
    hash128(0x756e_726f_7574_6564, name)[0] | 1
}

/// Counts one connection for `name` (at most `NAME_MAX` bytes are kept). The caller holds
/// the lock.
pub fn count(entries: &mut [Heavy], name: &[u8], outcome: Outcome, now_s: u64, client: IpAddr) {
    let name = &name[..name.len().min(NAME_MAX)];
    let fp = fingerprint(name);
    let closed = u64::from(outcome == Outcome::Closed);
    let client = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let found = entries
        .iter()
        .position(|e| e.fp == fp && &e.name[..e.name_len as usize] == name);
    if let Some(i) = found {
        let e = &mut entries[i];
        e.count += 1;
        e.closed += closed;
        e.last_s = now_s;
        e.client = client;
        return;
    }
    // An empty entry, or the one with the smallest count, which the new name takes over.
    let Some(e) = entries
        .iter_mut()
        .min_by_key(|e| if e.fp == 0 { (0, 0) } else { (1, e.count) })
    else {
        return;
    };
    let error = if e.fp == 0 { 0 } else { e.count };
    e.fp = fp;
    e.count = error + 1;
    e.error = error;
    e.closed = closed;
    e.first_s = now_s;
    e.last_s = now_s;
    e.client = client;
    e.name_len = name.len() as u16;
    e.name[..name.len()].copy_from_slice(name);
}

/// The monitored names, most counted first.
pub fn views(entries: &[Heavy]) -> Vec<HeavyView> {
    let mut out: Vec<HeavyView> = entries
        .iter()
        .filter(|e| e.fp != 0)
        .map(|e| {
            let v6 = Ipv6Addr::from(e.client);
            HeavyView {
                name: String::from_utf8_lossy(&e.name[..e.name_len as usize]).into_owned(),
                count: e.count,
                error: e.error,
                closed: e.closed,
                first_s: e.first_s,
                last_s: e.last_s,
                client: v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            }
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    out
}

/// Why a connection carried no name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nameless {
    /// A ClientHello without server_name (or with one that is not a host name).
    NoSni,
    /// An HTTP request without Host (HTTP/1.0), or with one that is not a host name.
    NoHost,
    /// Neither a ClientHello nor an HTTP request head.
    Unreadable,
    /// Larger than `preread_buffer_size`.
    TooLarge,
    /// Nothing complete within `preread_timeout`.
    TimedOut,
    /// The client closed before sending it all.
    ClientClosed,
}

impl Nameless {
    pub const ALL: [Nameless; 6] = [
        Nameless::NoSni,
        Nameless::NoHost,
        Nameless::Unreadable,
        Nameless::TooLarge,
        Nameless::TimedOut,
        Nameless::ClientClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Nameless::NoSni => "no_sni",
            Nameless::NoHost => "no_host",
            Nameless::Unreadable => "unreadable",
            Nameless::TooLarge => "too_large",
            Nameless::TimedOut => "timed_out",
            Nameless::ClientClosed => "client_closed",
        }
    }
}

/// Nameless connections by kind, shared.
#[repr(C)]
#[derive(Debug, Default)]
pub struct NamelessCounts([AtomicU64; 6]);

impl NamelessCounts {
    pub fn add(&self, why: Nameless) {
        self.0[why as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, why: Nameless) -> u64 {
        self.0[why as usize].load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn counts_names_and_keeps_the_last_client() {
        let mut e = vec![Heavy::default(); 4];
        count(&mut e, b"typo.test", Outcome::Defaulted, 10, CLIENT);
        count(
            &mut e,
            b"typo.test",
            Outcome::Closed,
            12,
            "2001:db8::1".parse().unwrap(),
        );
        count(&mut e, b"other.test", Outcome::Closed, 11, CLIENT);
        let v = views(&e);
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            HeavyView {
                name: "typo.test".into(),
                count: 2,
                error: 0,
                closed: 1,
                first_s: 10,
                last_s: 12,
                client: "2001:db8::1".parse().unwrap(),
            }
        );
        assert_eq!(v[1].client, CLIENT);
    }

    /// A small deterministic generator: the tests need no crate for randomness.
    fn next(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::health::mix(*x)
    }

    #[test]
    fn keeps_the_true_heavy_hitters_under_a_spray_of_random_names() {
        let mut e = vec![Heavy::default(); 100];
        let mut seed = 42;
        // 1,000,000 connections: 10 names at 2 % each (200,000 in all), the rest random.
        let mut truth = [0u64; 10];
        for _ in 0..1_000_000 {
            let r = next(&mut seed);
            if r % 100 < 20 {
                let k = (r >> 8) % 10;
                truth[k as usize] += 1;
                count(
                    &mut e,
                    format!("heavy{k}.test").as_bytes(),
                    Outcome::Defaulted,
                    1,
                    CLIENT,
                );
            } else {
                let name = format!("{:x}.scan.test", next(&mut seed));
                count(&mut e, name.as_bytes(), Outcome::Closed, 1, CLIENT);
            }
        }
        let v = views(&e);
        assert_eq!(v.len(), 100);
        for (k, &n) in truth.iter().enumerate() {
            let name = format!("heavy{k}.test");
            let found = v[..10].iter().find(|h| h.name == name);
            let h = found.unwrap_or_else(|| panic!("{name} not among the top 10"));
            // Space-Saving's guarantee: count - error <= true count <= count.
            assert!(
                h.count >= n && h.count - h.error <= n,
                "{name}: {h:?} vs {n}"
            );
        }
    }

    #[test]
    fn known_distribution_in_order() {
        let mut e = vec![Heavy::default(); 8];
        for (name, n) in [
            ("a.test", 50),
            ("b.test", 30),
            ("c.test", 20),
            ("d.test", 5),
        ] {
            for _ in 0..n {
                count(&mut e, name.as_bytes(), Outcome::Defaulted, 1, CLIENT);
            }
        }
        let v: Vec<(String, u64, u64)> = views(&e)
            .into_iter()
            .map(|h| (h.name, h.count, h.error))
            .collect();
        assert_eq!(
            v,
            [
                ("a.test".into(), 50, 0),
                ("b.test".into(), 30, 0),
                ("c.test".into(), 20, 0),
                ("d.test".into(), 5, 0)
            ]
        );
    }

    #[test]
    fn long_names_are_cut_and_no_entries_is_harmless() {
        let mut e = vec![Heavy::default(); 1];
        let long = vec![b'a'; 300];
        count(&mut e, &long, Outcome::Closed, 1, CLIENT);
        assert_eq!(views(&e)[0].name.len(), NAME_MAX);
        count(&mut [], b"x", Outcome::Closed, 1, CLIENT);
    }
}
