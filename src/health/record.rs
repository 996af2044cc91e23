//! The health of one server of one upstream, as every worker sees it. Records live in the
//! shared zone (or, when it is full, in the worker), so every field is an atomic: the hot
//! path reads and updates them without taking the zone's lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a server is down (or was last taken down), for the log and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Why {
    None = 0,
    /// `max_fails` connect failures within `fail_timeout`.
    Passive = 1,
    /// The upstream says `"start": "down"` and the check has not passed `rise` times yet.
    StartDown = 2,
    /// The active check failed `fall` times in a row.
    Check = 3,
}

impl Why {
    fn from_u32(v: u32) -> Why {
        match v {
            1 => Why::Passive,
            2 => Why::StartDown,
            3 => Why::Check,
            _ => Why::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Why::None => "",
            Why::Passive => "passive",
            Why::StartDown => "start down",
            Why::Check => "check",
        }
    }
}

/// The outcome of one active probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Outcome {
    None = 0,
    Ok = 1,
    Refused = 2,
    Timeout = 3,
    /// Connected, but the answer was not the expected one (alert, wrong status, garbage).
    BadAnswer = 4,
    /// Connected, then the server closed or reset before answering.
    Closed = 5,
    /// Any other connect or socket error.
    Error = 6,
}

impl Outcome {
    fn from_u32(v: u32) -> Outcome {
        match v {
            1 => Outcome::Ok,
            2 => Outcome::Refused,
            3 => Outcome::Timeout,
            4 => Outcome::BadAnswer,
            5 => Outcome::Closed,
            6 => Outcome::Error,
            _ => Outcome::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "",
            Outcome::Ok => "ok",
            Outcome::Refused => "connection refused",
            Outcome::Timeout => "timed out",
            Outcome::BadAnswer => "unexpected answer",
            Outcome::Closed => "closed before answering",
            Outcome::Error => "socket error",
        }
    }
}

/// A state change to log, once, by the process that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Down(Why),
    Up(Why),
    /// Passively out, past `fail_timeout`, and its active check passed: back in service
    /// without waiting for a client's connection to try it.
    CheckedBack,
}

/// Identifies a server of an upstream across workers, reloads and table generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Hash of the upstream name; 0 and 1 are reserved.
    pub group: u64,
    pub ip: [u8; 16],
    /// 0 for a server listed without a port.
    pub port: u16,
}

impl Key {
    pub fn new(upstream: &str, ip: std::net::IpAddr, port: Option<u16>) -> Key {
        let ip = match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        Key {
            group: fnv1a(upstream.as_bytes()).max(2),
            ip,
            port: port.unwrap_or(0),
        }
    }

    pub fn hash(&self) -> u64 {
        let mut h = self.group;
        h = mix(h ^ u64::from_le_bytes(self.ip[..8].try_into().unwrap()));
        h = mix(h ^ u64::from_le_bytes(self.ip[8..].try_into().unwrap()));
        mix(h ^ u64::from(self.port))
    }
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A 64-bit finaliser (splitmix64's).
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The group of a free record.
pub const EMPTY: u64 = 0;

/// Worker processes whose connection counts a record keeps apart, so that the counts of a
/// worker that died can be taken back. Old and new workers overlap during a reload.
pub const SLOTS: usize = 32;

#[repr(C)]
#[derive(Debug, Default)]
pub struct Record {
    // The key: written under the zone's lock, read under it too.
    group: AtomicU64,
    ip_hi: AtomicU64,
    ip_lo: AtomicU64,
    port: AtomicU32,
    /// Last time a worker's table listed this server (ms); stale records may be reused.
    touched_ms: AtomicU64,
    /// Bumped each time the record is made anew: a probe or a session that started before
    /// checks it, so that it never writes into a record another server now owns.
    generation: AtomicU32,
    /// The next free record (its number + 1), while this one is free.
    pub(super) next_free: AtomicU32,

    // Passive health.
    window_start_ms: AtomicU64,
    window_fails: AtomicU32,
    /// Non-zero while passively down; the server is tried again once this time has passed.
    passive_down: AtomicU32,
    down_until_ms: AtomicU64,

    // Active health.
    active_down: AtomicU32,
    ok_run: AtomicU32,
    fail_run: AtomicU32,
    /// When the next probe is due; workers race to move it forward, the winner probes.
    next_check_ms: AtomicU64,
    last_check_ms: AtomicU64,
    last_outcome: AtomicU32,
    why: AtomicU32,

    // Traffic.
    conns: AtomicU32,
    total: AtomicU64,
    /// `conns` by worker slot; their sum is `conns`.
    by_slot: [AtomicU32; SLOTS],
}

/// A snapshot for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub down: bool,
    /// A check is between states: down with successes, or up with failures.
    pub checking: bool,
    pub why: Why,
    pub fails: u32,
    pub conns: u32,
    pub total: u64,
    pub last_outcome: Outcome,
    pub last_check_ms: u64,
}

fn saturating_decrement(count: &AtomicU32, n: u32) {
    let _ = count.fetch_update(Relaxed, Relaxed, |c| Some(c.saturating_sub(n)));
}

impl Record {
    pub fn key(&self) -> Key {
        let mut ip = [0u8; 16];
        ip[..8].copy_from_slice(&self.ip_hi.load(Relaxed).to_le_bytes());
        ip[8..].copy_from_slice(&self.ip_lo.load(Relaxed).to_le_bytes());
        Key {
            group: self.group.load(Relaxed),
            ip,
            port: self.port.load(Relaxed) as u16,
        }
    }

    pub fn group(&self) -> u64 {
        self.group.load(Relaxed)
    }

    /// Makes this slot a fresh record for `key`: up, or down until checked if `start_down`.
    pub fn init(&self, key: Key, now: u64, start_down: bool) {
        self.ip_hi
            .store(u64::from_le_bytes(key.ip[..8].try_into().unwrap()), Relaxed);
        self.ip_lo
            .store(u64::from_le_bytes(key.ip[8..].try_into().unwrap()), Relaxed);
        self.port.store(u32::from(key.port), Relaxed);
        self.touched_ms.store(now, Relaxed);
        for field in [
            &self.window_start_ms,
            &self.down_until_ms,
            &self.next_check_ms,
            &self.last_check_ms,
            &self.total,
        ] {
            field.store(0, Relaxed);
        }
        for field in [
            &self.window_fails,
            &self.passive_down,
            &self.ok_run,
            &self.fail_run,
            &self.last_outcome,
            &self.conns,
        ] {
            field.store(0, Relaxed);
        }
        for count in &self.by_slot {
            count.store(0, Relaxed);
        }
        self.generation.fetch_add(1, Relaxed);
        self.active_down.store(u32::from(start_down), Relaxed);
        self.why.store(
            if start_down {
                Why::StartDown
            } else {
                Why::None
            } as u32,
            Relaxed,
        );
        // Last: a reader that sees the group sees a whole record.
        self.group
            .store(key.group, std::sync::atomic::Ordering::Release);
    }

    /// Frees the record; the caller holds the zone's lock.
    pub fn mark_free(&self) {
        self.group.store(EMPTY, Relaxed);
    }

    /// Which making of this record a holder saw; see `generation`.
    pub fn generation(&self) -> u32 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn touch(&self, now: u64) {
        self.touched_ms.store(now, Relaxed);
    }

    pub fn touched_ms(&self) -> u64 {
        self.touched_ms.load(Relaxed)
    }

    /// Whether new connections may be sent here.
    pub fn available(&self, now: u64) -> bool {
        self.active_down.load(Relaxed) == 0
            && (self.passive_down.load(Relaxed) == 0 || self.down_until_ms.load(Relaxed) <= now)
    }

    /// A connection of the worker in `slot` (if it has one) was sent here.
    pub fn connected(&self, slot: Option<usize>) {
        self.conns.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        if let Some(count) = slot.and_then(|s| self.by_slot.get(s)) {
            count.fetch_add(1, Relaxed);
        }
    }

    /// That connection ended. `generation` is the one seen at `connected`: a record made anew
    /// since (for another server) is left alone.
    pub fn released(&self, slot: Option<usize>, generation: u32) {
        if self.generation() != generation {
            return;
        }
        if let Some(count) = slot.and_then(|s| self.by_slot.get(s)) {
            saturating_decrement(count, 1);
        }
        saturating_decrement(&self.conns, 1);
    }

    /// Takes back the connections a dead worker's `slot` still counted; returns how many.
    pub fn forget_slot(&self, slot: usize) -> u32 {
        let Some(count) = self.by_slot.get(slot) else {
            return 0;
        };
        let n = count.swap(0, Relaxed);
        if n > 0 {
            saturating_decrement(&self.conns, n);
        }
        n
    }

    pub fn conns(&self) -> u32 {
        self.conns.load(Relaxed)
    }

    /// A connect to this server failed. `max_fails == 0` turns passive checks off. Workers
    /// update the window without a lock: two failures racing at a window's edge may both
    /// count in the new window, which can only take a failing server out sooner.
    pub fn failed(&self, now: u64, max_fails: u32, fail_timeout_ms: u64) -> Option<Transition> {
        if max_fails == 0 {
            return None;
        }
        if self.passive_down.load(Relaxed) != 0 {
            // On probation after fail_timeout: one more failure takes it out again.
            self.down_until_ms.store(now + fail_timeout_ms, Relaxed);
            return None;
        }
        let start = self.window_start_ms.load(Relaxed);
        let fails = if now.saturating_sub(start) > fail_timeout_ms || start == 0 {
            self.window_start_ms.store(now, Relaxed);
            self.window_fails.store(1, Relaxed);
            1
        } else {
            self.window_fails.fetch_add(1, Relaxed) + 1
        };
        if fails < max_fails {
            return None;
        }
        self.down_until_ms.store(now + fail_timeout_ms, Relaxed);
        if self
            .passive_down
            .compare_exchange(0, 1, Relaxed, Relaxed)
            .is_ok()
        {
            if self.active_down.load(Relaxed) == 0 {
                self.why.store(Why::Passive as u32, Relaxed);
            }
            Some(Transition::Down(Why::Passive))
        } else {
            None
        }
    }

    /// A connect to this server succeeded.
    pub fn succeeded(&self) -> Option<Transition> {
        if self.window_fails.load(Relaxed) != 0 {
            self.window_fails.store(0, Relaxed);
        }
        if self.passive_down.load(Relaxed) != 0
            && self
                .passive_down
                .compare_exchange(1, 0, Relaxed, Relaxed)
                .is_ok()
        {
            self.down_until_ms.store(0, Relaxed);
            return Some(Transition::Up(Why::Passive));
        }
        None
    }

    /// Claims the probe due at or before `now`; the winner probes, next at `now + interval`.
    pub fn claim_check(&self, now: u64, interval_ms: u64) -> bool {
        let due = self.next_check_ms.load(Relaxed);
        due <= now
            && self
                .next_check_ms
                .compare_exchange(due, now + interval_ms, Relaxed, Relaxed)
                .is_ok()
    }

    /// Records the outcome of a probe started on the record's `generation`; a record made
    /// anew since then is left alone. Returns the transition it caused, if any.
    pub fn checked_as(
        &self,
        generation: u32,
        now: u64,
        outcome: Outcome,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        if self.generation() != generation {
            return None;
        }
        self.checked(now, outcome, rise, fall)
    }

    /// Records a probe's outcome. Returns the transition it caused, if any.
    pub fn checked(&self, now: u64, outcome: Outcome, rise: u32, fall: u32) -> Option<Transition> {
        self.last_check_ms.store(now, Relaxed);
        self.last_outcome.store(outcome as u32, Relaxed);
        let down = self.active_down.load(Relaxed) != 0;
        if outcome == Outcome::Ok {
            self.fail_run.store(0, Relaxed);
            let ok = self.ok_run.fetch_add(1, Relaxed) + 1;
            if down && ok >= rise && self.active_down.swap(0, Relaxed) != 0 {
                let why = Why::from_u32(self.why.swap(Why::None as u32, Relaxed));
                // An active check that brings a server up also clears its passive failures.
                self.window_fails.store(0, Relaxed);
                self.passive_down.store(0, Relaxed);
                self.down_until_ms.store(0, Relaxed);
                return Some(Transition::Up(why));
            }
            if !down
                && self.passive_down.load(Relaxed) != 0
                && self.down_until_ms.load(Relaxed) <= now
                && self
                    .passive_down
                    .compare_exchange(1, 0, Relaxed, Relaxed)
                    .is_ok()
            {
                self.window_fails.store(0, Relaxed);
                self.down_until_ms.store(0, Relaxed);
                self.why.store(Why::None as u32, Relaxed);
                return Some(Transition::CheckedBack);
            }
        } else {
            self.ok_run.store(0, Relaxed);
            let failed = self.fail_run.fetch_add(1, Relaxed) + 1;
            if !down && failed >= fall && self.active_down.swap(1, Relaxed) == 0 {
                self.why.store(Why::Check as u32, Relaxed);
                return Some(Transition::Down(Why::Check));
            }
        }
        None
    }

    /// The upstream has no (more) active check: nothing may keep the server down but passive.
    pub fn clear_active(&self) {
        // Every table load of every worker calls this: no shared-memory write when idle.
        let idle = [
            &self.active_down,
            &self.ok_run,
            &self.fail_run,
            &self.last_outcome,
        ]
        .iter()
        .all(|f| f.load(Relaxed) == 0)
            && self.next_check_ms.load(Relaxed) == 0;
        if idle {
            return;
        }
        if self.active_down.swap(0, Relaxed) != 0 {
            let passive = self.passive_down.load(Relaxed) != 0;
            self.why.store(
                if passive { Why::Passive } else { Why::None } as u32,
                Relaxed,
            );
        }
        self.ok_run.store(0, Relaxed);
        self.fail_run.store(0, Relaxed);
        self.next_check_ms.store(0, Relaxed);
        self.last_outcome.store(Outcome::None as u32, Relaxed);
    }

    pub fn view(&self, now: u64) -> View {
        let active_down = self.active_down.load(Relaxed) != 0;
        let passive = self.passive_down.load(Relaxed) != 0;
        let down = !self.available(now);
        let checking = if active_down {
            self.ok_run.load(Relaxed) > 0
        } else {
            self.fail_run.load(Relaxed) > 0 || (passive && !down)
        };
        let why = if down || passive || active_down {
            Why::from_u32(self.why.load(Relaxed))
        } else {
            Why::None
        };
        View {
            down,
            checking,
            why,
            fails: self.window_fails.load(Relaxed),
            conns: self.conns.load(Relaxed),
            total: self.total.load(Relaxed),
            last_outcome: Outcome::from_u32(self.last_outcome.load(Relaxed)),
            last_check_ms: self.last_check_ms.load(Relaxed),
        }
    }
}
