//! Server health shared by all workers: passive failure counting, active check state, and
//! connection counts, in records every worker can update without a lock.

pub mod probe;
mod record;
mod store;

pub use record::{fnv1a, mix, Key, Outcome, Record, Transition, View, Why, EMPTY, SLOTS};
pub use store::{index_len, Entry, Store, StoreMeta};

/// Milliseconds on CLOCK_MONOTONIC: the same clock in every process of the machine, so a
/// `down_until` written by one worker means the same instant to another.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_failures_within_the_window() {
        let r = Record::default();
        assert_eq!(r.failed(1000, 3, 500), None);
        assert_eq!(r.failed(1100, 3, 500), None);
        // The window (500 ms from the first failure) has passed: counting starts over.
        assert_eq!(r.failed(1600, 3, 500), None);
        assert_eq!(r.failed(1700, 3, 500), None);
        assert_eq!(r.failed(1800, 3, 500), Some(Transition::Down(Why::Passive)));
        assert!(!r.available(1800));
        assert!(!r.available(2299));
        // After fail_timeout it is tried again; one more failure takes it out at once.
        assert!(r.available(2300));
        assert_eq!(r.failed(2300, 3, 500), None);
        assert!(!r.available(2301));
        // A success brings it back, once.
        assert_eq!(r.succeeded(), Some(Transition::Up(Why::Passive)));
        assert_eq!(r.succeeded(), None);
        assert!(r.available(2302));
        assert_eq!(r.view(2302).fails, 0);
    }

    #[test]
    fn a_passing_check_ends_passive_probation() {
        let r = Record::default();
        assert_eq!(r.failed(1000, 1, 500), Some(Transition::Down(Why::Passive)));
        // Within fail_timeout a passing check does not override the passive failure.
        assert_eq!(r.checked(1200, Outcome::Ok, 2, 3), None);
        assert!(!r.available(1200));
        // After it, the server is on probation ("checking") until a success: a check's too.
        assert!(r.view(1500).checking && !r.view(1500).down);
        assert_eq!(
            r.checked(1500, Outcome::Ok, 2, 3),
            Some(Transition::CheckedBack)
        );
        let v = r.view(1500);
        assert!(!v.checking && !v.down && v.why == Why::None && v.fails == 0);
        assert_eq!(r.checked(1600, Outcome::Ok, 2, 3), None);
    }

    #[test]
    fn max_fails_zero_turns_passive_off() {
        let r = Record::default();
        for t in 0..10 {
            assert_eq!(r.failed(t, 0, 10_000), None);
        }
        assert!(r.available(10));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let r = Record::default();
        r.failed(10, 2, 1000);
        r.succeeded();
        assert_eq!(r.failed(20, 2, 1000), None);
        assert!(r.available(20));
    }

    #[test]
    fn active_fall_and_rise() {
        let r = Record::default();
        assert_eq!(r.checked(1, Outcome::Refused, 2, 3), None);
        assert_eq!(r.checked(2, Outcome::Timeout, 2, 3), None);
        assert!(r.view(2).checking && !r.view(2).down);
        assert_eq!(
            r.checked(3, Outcome::Refused, 2, 3),
            Some(Transition::Down(Why::Check))
        );
        assert!(!r.available(3));
        assert_eq!(r.view(3).why, Why::Check);
        assert_eq!(r.view(3).last_outcome, Outcome::Refused);
        // A passive failure meanwhile is cleared when the check brings it up.
        r.failed(3, 1, 60_000);
        assert_eq!(r.checked(4, Outcome::Ok, 2, 3), None);
        assert!(r.view(4).checking && r.view(4).down);
        assert_eq!(
            r.checked(5, Outcome::Ok, 2, 3),
            Some(Transition::Up(Why::Check))
        );
        assert!(r.available(5));
        assert_eq!(r.view(5).why, Why::None);
        // A failure in between resets the run.
        r.checked(6, Outcome::Refused, 2, 3);
        r.checked(7, Outcome::Refused, 2, 3);
        r.checked(8, Outcome::Ok, 2, 3);
        r.checked(9, Outcome::Refused, 2, 3);
        r.checked(10, Outcome::Refused, 2, 3);
        assert!(r.available(10));
    }

    #[test]
    fn one_claim_per_interval() {
        let r = Record::default();
        assert!(r.claim_check(100, 2000));
        assert!(!r.claim_check(100, 2000), "a second worker loses");
        assert!(!r.claim_check(2099, 2000));
        assert!(r.claim_check(2100, 2000));
    }

    #[test]
    fn removing_the_check_releases_the_server() {
        let r = Record::default();
        r.init(Key::new("u", [10, 0, 0, 1].into(), None), 0, true);
        assert!(!r.available(1));
        assert_eq!(r.view(1).why, Why::StartDown);
        r.clear_active();
        assert!(r.available(1));
    }

    #[test]
    fn connection_counts_never_underflow() {
        let r = Record::default();
        r.connected(None);
        r.released(None, r.generation());
        r.released(None, r.generation());
        assert_eq!(r.conns(), 0);
        assert_eq!(r.view(0).total, 1);
    }

    #[test]
    fn record_size_is_what_the_readme_says() {
        // With two to four index entries of 4 bytes each.
        assert_eq!(std::mem::size_of::<Record>(), 256);
    }

    #[test]
    fn keys_tell_upstreams_ports_and_families_apart() {
        let ip4: std::net::IpAddr = [10, 0, 0, 1].into();
        let a = Key::new("a", ip4, Some(443));
        assert_eq!(a, Key::new("a", ip4, Some(443)));
        assert_ne!(a, Key::new("b", ip4, Some(443)));
        assert_ne!(a, Key::new("a", ip4, None));
        assert_ne!(a.hash(), Key::new("a", ip4, None).hash());
        assert!(a.group >= 2);
    }
}
