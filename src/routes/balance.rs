//! Choosing a server of an upstream: smooth weighted round robin (as nginx's), skipping servers
//! already tried by the session, backups only once every primary has been tried.

use std::cell::Cell;

use super::document::{limits::MAX_SERVERS, ServerDef};

/// Servers a session has tried, by index. Fixed size: no allocation per connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried([u64; MAX_SERVERS / 64]);

impl Tried {
    pub fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

#[derive(Debug)]
pub struct RoundRobin {
    servers: Vec<ServerDef>,
    /// Per-worker smooth weighted round robin state, one per server.
    current: Vec<Cell<i64>>,
}

impl RoundRobin {
    pub fn new(servers: Vec<ServerDef>) -> RoundRobin {
        debug_assert!(servers.len() <= MAX_SERVERS);
        let current = servers.iter().map(|_| Cell::new(0)).collect();
        RoundRobin { servers, current }
    }

    pub fn servers(&self) -> &[ServerDef] {
        &self.servers
    }

    /// The next server to try, or `None` once every server has been tried.
    pub fn pick(&self, tried: &Tried) -> Option<usize> {
        self.pick_among(tried, false)
            .or_else(|| self.pick_among(tried, true))
    }

    fn pick_among(&self, tried: &Tried, backup: bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total = 0i64;
        for (i, server) in self.servers.iter().enumerate() {
            if server.backup != backup || tried.contains(i) {
                continue;
            }
            let weight = i64::from(server.weight);
            self.current[i].set(self.current[i].get() + weight);
            total += weight;
            if best.is_none_or(|b| self.current[i].get() > self.current[b].get()) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best].set(self.current[best].get() - total);
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(spec: &[(u32, bool)]) -> RoundRobin {
        RoundRobin::new(
            spec.iter()
                .enumerate()
                .map(|(i, &(weight, backup))| ServerDef {
                    ip: [127, 0, 0, i as u8 + 1].into(),
                    port: None,
                    weight,
                    backup,
                })
                .collect(),
        )
    }

    #[test]
    fn smooth_weighted_order() {
        let rr = servers(&[(5, false), (1, false), (1, false)]);
        let picks: Vec<usize> = (0..7)
            .map(|_| rr.pick(&Tried::default()).unwrap())
            .collect();
        // nginx's smooth sequence for 5,1,1: a a b a c a a.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn retries_skip_tried_servers_then_use_backups() {
        let rr = servers(&[(1, false), (1, true), (1, false)]);
        let mut tried = Tried::default();
        let mut order = Vec::new();
        while let Some(i) = rr.pick(&tried) {
            tried.insert(i);
            order.push(i);
        }
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], 1, "the backup comes last: {order:?}");
    }

    #[test]
    fn tried_covers_every_index() {
        let mut t = Tried::default();
        for i in [0, 63, 64, 255] {
            assert!(!t.contains(i));
            t.insert(i);
            assert!(t.contains(i));
        }
        assert!(!t.contains(1));
    }
}
