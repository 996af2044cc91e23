//! Choosing a server of an upstream: smooth weighted round robin (as nginx's), least
//! connections, or a consistent hash of the client address; skipping servers the session has
//! tried and servers that are down, backups only once no primary is left.

use std::cell::{Cell, UnsafeCell};
use std::net::SocketAddr;

use crate::health::{mix, Key, Record};
use crate::upstream::{socket_address, Balance, Policy, ServerDef, MAX_SERVERS};

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

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
}

/// The servers of one upstream, its policy, and this worker's view of their health.
#[derive(Debug)]
pub struct Pool {
    servers: Vec<ServerDef>,
    policy: Policy,
    /// Smooth weighted round robin state, per worker, one per server.
    current: Vec<Cell<i64>>,
    /// Per server, for `hash`: a hash of its address.
    address_hash: Vec<u64>,
    /// Per server, its address as nginx names peers (`10.0.0.1`, `[2001:db8::1]`), without
    /// the port, which may be the listener's.
    ip_text: Vec<Box<str>>,
    /// Per-worker records, used until (or instead of, when the zone is full) shared ones.
    local: Box<[Record]>,
    shared: Box<[Cell<Option<&'static Record>>]>,
    /// This worker is sending connections to servers that are all down.
    fail_open: Cell<bool>,
    /// The name an active check sends (SNI or Host): the check's own, else a route's.
    check_name: Option<Box<str>>,
    /// Per server, its address as a peer connection takes it, by port (a server listed
    /// without a port has one per listener port): made at first use, then only read.
    peers: Box<[PeerCache]>,
    /// A Service's node ports: for servers without a port, the listener's port to theirs.
    port_map: Box<[(u16, u16)]>,
}

/// A server's address for nginx's peer connection: made once per table, server and port, so
/// that choosing a server allocates and formats nothing.
pub struct PeerAddr {
    pub sockaddr: libc::sockaddr_in6,
    pub socklen: u32,
    /// nginx's `ngx_str_t` for the peer's name (`10.0.0.1:443`), pointing into `text`.
    pub name: NameRef,
    text: Box<[u8]>,
}

/// The layout of nginx's `ngx_str_t`, holding its pointer as an integer so that a table stays
/// `Send` (it is built and freed on other threads).
#[repr(C)]
pub struct NameRef {
    pub len: usize,
    pub data: usize,
}

impl PeerAddr {
    fn new(addr: SocketAddr, ip_text: &str) -> Box<PeerAddr> {
        let (sockaddr, socklen) = socket_address(addr);
        let mut text = vec![0u8; ip_text.len() + 6];
        let len = crate::upstream::peer_name(ip_text, addr.port(), &mut text);
        text.truncate(len);
        let text = text.into_boxed_slice();
        Box::new(PeerAddr {
            sockaddr,
            socklen,
            name: NameRef {
                len,
                data: text.as_ptr() as usize,
            },
            text,
        })
    }

    pub fn name_text(&self) -> &[u8] {
        &self.text
    }
}

/// The addresses made for one server, by port; entries are only ever added, and each is
/// boxed, so a reference handed out stays valid while the pool lives.
#[derive(Default)]
struct PeerCache(UnsafeCell<Vec<(u16, Box<PeerAddr>)>>);

impl std::fmt::Debug for PeerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCache")
    }
}

/// A server chosen for a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    /// `Some(true)`: every server is down and this worker starts trying them anyway;
    /// `Some(false)`: it stops, a server is up again. Each is logged once.
    pub fail_open: Option<bool>,
}

impl Pool {
    pub fn new(servers: Vec<ServerDef>, policy: Policy) -> Pool {
        debug_assert!(servers.len() <= MAX_SERVERS);
        let n = servers.len();
        let address_hash = servers
            .iter()
            .map(|s| Key::new("", s.ip, s.port).hash())
            .collect();
        let ip_text = servers.iter().map(|s| s.host().into()).collect();
        let local = servers
            .iter()
            .map(|s| {
                let r = Record::default();
                if policy.start_down {
                    r.init(Key::new("", s.ip, s.port), 0, true);
                }
                r
            })
            .collect();
        Pool {
            servers,
            policy,
            ip_text,
            local,
            current: (0..n).map(|_| Cell::new(0)).collect(),
            address_hash,
            shared: (0..n).map(|_| Cell::new(None)).collect(),
            fail_open: Cell::new(false),
            check_name: None,
            peers: (0..n).map(|_| PeerCache::default()).collect(),
            port_map: Box::new([]),
        }
    }

    /// Servers without a port take the port `map` gives the listener's (a Service's node
    /// ports), instead of the listener's own.
    pub fn set_port_map(&mut self, map: Vec<(u16, u16)>) {
        self.port_map = map.into();
    }

    pub fn port_map(&self) -> &[(u16, u16)] {
        &self.port_map
    }

    /// The port a server without one takes for a connection to `local_port`: the listener's,
    /// or its node port; `None` when the Service has no port for that listener.
    pub fn port_for(&self, local_port: u16) -> Option<u16> {
        if self.port_map.is_empty() {
            return Some(local_port);
        }
        self.port_map
            .iter()
            .find(|&&(listener, _)| listener == local_port)
            .map(|&(_, node)| node)
    }

    pub fn servers(&self) -> &[ServerDef] {
        &self.servers
    }

    pub fn ip_text(&self, i: usize) -> &str {
        &self.ip_text[i]
    }

    /// Server `i`'s address with its own port, or `local_port` (the listener's) if it has
    /// none; made at the first call for each port.
    pub fn peer(&self, i: usize, local_port: u16) -> &PeerAddr {
        let server = &self.servers[i];
        let port = server
            .port
            .or_else(|| self.port_for(local_port))
            .unwrap_or(local_port);
        // SAFETY: one thread (the worker's) uses a pool; entries are appended, never removed
        // or moved out of their boxes, so the returned reference outlives any later push.
        let cache = unsafe { &mut *self.peers[i].0.get() };
        let at = match cache.iter().position(|(p, _)| *p == port) {
            Some(at) => at,
            None => {
                let peer = PeerAddr::new(SocketAddr::new(server.ip, port), &self.ip_text[i]);
                cache.push((port, peer));
                cache.len() - 1
            }
        };
        let peer: *const PeerAddr = &*cache[at].1;
        // SAFETY: as above; the box's contents do not move when the vector grows.
        unsafe { &*peer }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn check_name(&self) -> Option<&str> {
        self.check_name.as_deref()
    }

    pub(super) fn set_check_name(&mut self, name: Option<Box<str>>) {
        self.check_name = name;
    }

    /// The health record of server `i`: the shared one once attached, else this worker's.
    pub fn health(&self, i: usize) -> &Record {
        self.shared[i].get().unwrap_or(&self.local[i])
    }

    pub fn is_shared(&self, i: usize) -> bool {
        self.shared[i].get().is_some()
    }

    /// Makes server `i` use a record shared with the other workers.
    pub fn attach(&self, i: usize, record: &'static Record) {
        self.shared[i].set(Some(record));
    }

    /// The server for the next try: an available one not tried yet (backups only once no
    /// primary is left), by the upstream's `balance`; when every server is down, an untried
    /// one all the same (fail open). A draining server is never chosen. `client` is a hash of
    /// the client address, for `hash`.
    pub fn pick(&self, tried: &Tried, client: u64, now: u64) -> Option<Pick> {
        let draining = |i: usize| self.servers[i].draining;
        let available =
            |i: usize| !tried.contains(i) && !draining(i) && self.health(i).available(now);
        // One server (never a backup: a list of backups only is refused): nothing to choose.
        if self.servers.len() == 1 && available(0) {
            return Some(self.picked(0, false));
        }
        if let Some(index) = self.choose(false, client, &available) {
            return Some(self.picked(index, false));
        }
        if let Some(index) = self.choose(true, client, &available) {
            return Some(self.picked(index, false));
        }
        if (0..self.servers.len()).any(|i| !draining(i) && self.health(i).available(now)) {
            // Some server is up, and this session has tried it already.
            return None;
        }
        let untried = |i: usize| !tried.contains(i) && !draining(i);
        let index = self
            .choose(false, client, &untried)
            .or_else(|| self.choose(true, client, &untried))?;
        Some(self.picked(index, true))
    }

    /// Whether this worker is failing open on the upstream.
    pub fn failing_open(&self) -> bool {
        self.fail_open.get()
    }

    /// Carries the worker's fail-open state over from the table this one replaces, so that
    /// a new table does not log the same state again.
    pub fn set_failing_open(&self, on: bool) {
        self.fail_open.set(on);
    }

    fn picked(&self, index: usize, fail_open: bool) -> Pick {
        let was = self.fail_open.replace(fail_open);
        Pick {
            index,
            fail_open: (was != fail_open).then_some(fail_open),
        }
    }

    fn choose(&self, backup: bool, client: u64, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let candidate = |i: usize| self.servers[i].backup == backup && eligible(i);
        match self.policy.balance {
            Balance::RoundRobin => self.round_robin(&candidate),
            Balance::LeastConn => {
                // Fewest active connections per unit of weight, ties by round robin, decided
                // on one snapshot: other workers change the shared counts (and health)
                // between two reads.
                let mut chosen = Tried::default();
                let mut conns = [0u32; MAX_SERVERS];
                let mut best: Option<(u64, u64)> = None;
                for i in (0..self.servers.len()).filter(|&i| candidate(i)) {
                    chosen.insert(i);
                    conns[i] = self.health(i).conns();
                    let (c, w) = (u64::from(conns[i]), u64::from(self.servers[i].weight));
                    if best.is_none_or(|(bc, bw)| c * bw < bc * w) {
                        best = Some((c, w));
                    }
                }
                let (bc, bw) = best?;
                self.round_robin(&|i| {
                    chosen.contains(i)
                        && u64::from(conns[i]) * bw == bc * u64::from(self.servers[i].weight)
                })
            }
            Balance::Hash => {
                // Weighted rendezvous hashing: a client keeps its server while that server
                // is up, and only the clients of a server that goes down move.
                let mut best: Option<(f64, usize)> = None;
                for i in (0..self.servers.len()).filter(|&i| candidate(i)) {
                    let h = mix(client ^ self.address_hash[i]);
                    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    let score = f64::from(self.servers[i].weight) / -u.ln();
                    if best.is_none_or(|(b, _)| score > b) {
                        best = Some((score, i));
                    }
                }
                best.map(|(_, i)| i)
            }
        }
    }

    /// nginx's smooth weighted round robin among the servers `candidate` admits.
    fn round_robin(&self, candidate: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut total = 0i64;
        for (i, server) in self.servers.iter().enumerate() {
            if !candidate(i) {
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

    fn pool(spec: &[(u32, bool)], balance: Balance) -> Pool {
        Pool::new(
            spec.iter()
                .enumerate()
                .map(|(i, &(weight, backup))| ServerDef {
                    ip: [127, 0, 0, i as u8 + 1].into(),
                    port: None,
                    weight,
                    backup,
                    draining: false,
                })
                .collect(),
            Policy {
                balance,
                ..Policy::default()
            },
        )
    }

    fn next(p: &Pool) -> usize {
        p.pick(&Tried::default(), 0, 0).unwrap().index
    }

    #[test]
    fn smooth_weighted_order() {
        let rr = pool(&[(5, false), (1, false), (1, false)], Balance::RoundRobin);
        let picks: Vec<usize> = (0..7).map(|_| next(&rr)).collect();
        // nginx's smooth sequence for 5,1,1: a a b a c a a.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn retries_skip_tried_servers_then_use_backups() {
        let rr = pool(&[(1, false), (1, true), (1, false)], Balance::RoundRobin);
        let mut tried = Tried::default();
        let mut order = Vec::new();
        while let Some(p) = rr.pick(&tried, 0, 0) {
            tried.insert(p.index);
            order.push(p.index);
        }
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], 1, "the backup comes last: {order:?}");
    }

    #[test]
    fn down_servers_are_skipped_and_backups_used_when_all_primaries_are_down() {
        let p = pool(&[(1, false), (1, false), (1, true)], Balance::RoundRobin);
        p.health(0).failed(10, 1, 1000);
        for _ in 0..4 {
            assert_eq!(next_at(&p, 20), 1);
        }
        p.health(1).failed(10, 1, 1000);
        assert_eq!(next_at(&p, 20), 2, "backup once every primary is down");
        // fail_timeout over: the primaries are tried again.
        assert_ne!(next_at(&p, 2000), 2);
    }

    fn next_at(p: &Pool, now: u64) -> usize {
        p.pick(&Tried::default(), 0, now).unwrap().index
    }

    #[test]
    fn fail_open_when_every_server_is_down_logged_once_each_way() {
        let p = pool(&[(1, false), (1, true)], Balance::RoundRobin);
        p.health(0).failed(0, 1, 1000);
        p.health(1).failed(0, 1, 1000);
        let first = p.pick(&Tried::default(), 0, 1).unwrap();
        assert_eq!(
            first,
            Pick {
                index: 0,
                fail_open: Some(true)
            },
            "primaries first"
        );
        assert_eq!(p.pick(&Tried::default(), 0, 1).unwrap().fail_open, None);
        let mut tried = Tried::default();
        tried.insert(0);
        assert_eq!(p.pick(&tried, 0, 1).unwrap().index, 1);
        tried.insert(1);
        assert_eq!(p.pick(&tried, 0, 1), None, "each server once per session");
        p.health(1).succeeded();
        assert_eq!(
            p.pick(&Tried::default(), 0, 1).unwrap(),
            Pick {
                index: 1,
                fail_open: Some(false)
            }
        );
    }

    #[test]
    fn no_fail_open_while_an_up_server_was_tried() {
        let p = pool(&[(1, false), (1, false)], Balance::RoundRobin);
        p.health(1).failed(0, 1, 1000);
        let mut tried = Tried::default();
        tried.insert(0);
        assert_eq!(p.pick(&tried, 0, 1), None);
    }

    #[test]
    fn least_conn_follows_shared_counts_and_weights() {
        let p = pool(&[(1, false), (1, false), (2, false)], Balance::LeastConn);
        // Counts another worker made are seen through the shared records.
        let shared: &'static [Record] = Box::leak((0..3).map(|_| Record::default()).collect());
        for (i, r) in shared.iter().enumerate() {
            p.attach(i, r);
        }
        shared[0].connected(None);
        shared[1].connected(None);
        shared[1].connected(None);
        shared[2].connected(None);
        shared[2].connected(None);
        // 1/1, 2/1, 2/2: server 0 and 2 tie at 1 per weight; 1 is never picked.
        let picks: Vec<usize> = (0..6).map(|_| next(&p)).collect();
        assert!(picks.iter().all(|&i| i != 1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
        shared[0].connected(None);
        shared[0].connected(None);
        assert_eq!(next(&p), 2);
    }

    /// Other workers connect and release while a pick runs: with every primary up, a pick
    /// must never fall to the backup or to nothing.
    #[test]
    fn least_conn_never_gives_up_while_counts_move() {
        let p = pool(
            &[(1, false), (1, false), (1, false), (1, true)],
            Balance::LeastConn,
        );
        let shared: &'static [Record] = Box::leak((0..4).map(|_| Record::default()).collect());
        for (i, r) in shared.iter().enumerate() {
            p.attach(i, r);
        }
        let stop: &'static std::sync::atomic::AtomicBool =
            Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
        let others = std::thread::spawn(move || {
            let mut x = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = mix(x);
                let r = &shared[(x % 3) as usize];
                r.connected(None);
                if x & 4 == 0 {
                    r.released(None, r.generation());
                }
                if r.conns() > 8 {
                    r.released(None, r.generation());
                    r.released(None, r.generation());
                }
            }
        });
        let mut backups = 0;
        let mut none = 0;
        for _ in 0..300_000 {
            match p.pick(&Tried::default(), 0, 0) {
                Some(pick) if pick.index == 3 => backups += 1,
                Some(_) => {}
                None => none += 1,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        others.join().unwrap();
        assert_eq!(
            (backups, none),
            (0, 0),
            "picks that gave up on live primaries"
        );
    }

    #[test]
    fn start_down_holds_for_servers_without_a_shared_record() {
        let p = Pool::new(
            vec![ServerDef {
                ip: [127, 0, 0, 1].into(),
                port: None,
                weight: 1,
                backup: false,
                draining: false,
            }],
            Policy {
                start_down: true,
                ..Policy::default()
            },
        );
        assert!(!p.health(0).available(1), "down until its check passes");
        assert!(!p.is_shared(0));
    }

    #[test]
    fn hash_keeps_clients_on_their_server_and_moves_only_a_downed_servers_clients() {
        let p = pool(&[(1, false), (1, false), (1, false)], Balance::Hash);
        let clients: Vec<u64> = (0..300u32)
            .map(|c| crate::health::fnv1a(&c.to_be_bytes()))
            .collect();
        let before: Vec<usize> = clients
            .iter()
            .map(|&c| p.pick(&Tried::default(), c, 0).unwrap().index)
            .collect();
        for (i, &c) in clients.iter().enumerate() {
            assert_eq!(
                p.pick(&Tried::default(), c, 0).unwrap().index,
                before[i],
                "stable"
            );
        }
        for s in 0..3 {
            let n = before.iter().filter(|&&b| b == s).count();
            assert!((60..=140).contains(&n), "server {s} has {n} of 300 clients");
        }
        p.health(1).failed(0, 1, 10_000);
        for (i, &c) in clients.iter().enumerate() {
            let now = p.pick(&Tried::default(), c, 1).unwrap().index;
            if before[i] == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, before[i], "client {i} moved although its server is up");
            }
        }
    }

    #[test]
    fn peer_addresses_are_made_once_per_port() {
        let p = Pool::new(
            vec![
                ServerDef {
                    ip: [10, 0, 0, 1].into(),
                    port: None,
                    weight: 1,
                    backup: false,
                    draining: false,
                },
                ServerDef {
                    ip: "2001:db8::1".parse().unwrap(),
                    port: Some(8443),
                    weight: 1,
                    backup: false,
                    draining: false,
                },
            ],
            Policy::default(),
        );
        let a443: *const PeerAddr = p.peer(0, 443);
        let a80 = p.peer(0, 80);
        assert_eq!(a80.name_text(), b"10.0.0.1:80");
        assert_eq!(
            u16::from_be(a80.sockaddr.sin6_port),
            80,
            "the port sits where sin_port does"
        );
        assert_eq!(
            a80.socklen as usize,
            std::mem::size_of::<libc::sockaddr_in>()
        );
        assert!(
            std::ptr::eq(a443, p.peer(0, 443)),
            "made once, and still valid after a push"
        );
        let v6 = p.peer(1, 443);
        assert_eq!(v6.name_text(), b"[2001:db8::1]:8443");
        assert_eq!(v6.sockaddr.sin6_family, libc::AF_INET6 as libc::sa_family_t);
        assert_eq!(
            v6.socklen as usize,
            std::mem::size_of::<libc::sockaddr_in6>()
        );
        assert_eq!(v6.name.len, 18);
        assert_eq!(v6.name.data, v6.name_text().as_ptr() as usize);
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
