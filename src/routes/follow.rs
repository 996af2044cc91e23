//! Pure: how a worker serves a table that one worker (the leader) reads and publishes for the
//! whole edge. The leader reads the source and publishes what it builds. The others map each
//! generation it publishes; one that cannot (the leader's memfd is gone, /proc is not there)
//! tries again, backing off, then reads the source itself until the next generation, so that
//! it never serves a stale table for long. When the leader could not publish, every worker
//! reads the source itself until it can again.

/// How often a follower looks for a new generation: a number read in the zone.
pub const FOLLOW_MS: u64 = 100;
/// The first wait after a failed load; it doubles with each failure.
pub const RETRY_MS: u64 = 100;
/// Failed loads of one generation before the worker reads the source itself (after about
/// 100 + 200 + 400 + 800 ms).
pub const MAX_TRIES: u32 = 5;

/// What a failed load leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// It is tried again after a wait; `first`: the first failure of this generation.
    Retrying { first: bool },
    /// The worker reads the source itself until the next generation.
    GaveUp,
}

/// What to do at a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read the source and build the table here; `publish` it for the others (the leader).
    Read { publish: bool },
    /// Map the published generation.
    Load(u64),
    /// Nothing to do: look again after this long.
    Wait(u64),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Follow {
    /// The last generation mapped.
    seen: u64,
    /// Failed loads of the generation being tried.
    tries: u32,
    /// No load before this time.
    retry_at: u64,
    /// A generation given up on: the worker reads the source itself until a newer one.
    gave_up: u64,
}

impl Follow {
    /// `published`: the edge's last generation (0: none yet); `leading`: this worker leads;
    /// `their_own`: the leader could not publish its last table; `now` in ms.
    pub fn next(&mut self, published: u64, leading: bool, their_own: bool, now: u64) -> Action {
        if leading {
            return Action::Read { publish: true };
        }
        if their_own || (published > self.seen && published <= self.gave_up) {
            return Action::Read { publish: false };
        }
        if published <= self.seen {
            return Action::Wait(FOLLOW_MS);
        }
        if now < self.retry_at {
            return Action::Wait(self.retry_at - now);
        }
        Action::Load(published)
    }

    /// Generation `generation` is in service here.
    pub fn loaded(&mut self, generation: u64) {
        self.seen = self.seen.max(generation);
        self.tries = 0;
        self.retry_at = 0;
    }

    /// Loading `generation` failed at `now`.
    pub fn failed(&mut self, generation: u64, now: u64) -> Failed {
        self.tries += 1;
        if self.tries >= MAX_TRIES {
            self.gave_up = self.gave_up.max(generation);
            self.tries = 0;
            self.retry_at = 0;
            return Failed::GaveUp;
        }
        self.retry_at = now + (RETRY_MS << (self.tries - 1));
        Failed::Retrying {
            first: self.tries == 1,
        }
    }

    /// The last generation mapped.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_maps_each_new_generation() {
        let mut f = Follow::default();
        assert_eq!(
            f.next(0, false, false, 0),
            Action::Wait(FOLLOW_MS),
            "nothing yet"
        );
        assert_eq!(
            f.next(4, false, false, 0),
            Action::Load(4),
            "a restarted worker"
        );
        f.loaded(4);
        assert_eq!(f.next(4, false, false, 10), Action::Wait(FOLLOW_MS));
        assert_eq!(f.next(5, false, false, 20), Action::Load(5));
        assert_eq!(
            f.next(5, true, false, 20),
            Action::Read { publish: true },
            "took the lead"
        );
    }

    /// It was: a generation that failed once was never tried again, and the worker served
    /// its old table until the next change.
    #[test]
    fn a_failed_load_is_tried_again_then_the_source_is_read() {
        let mut f = Follow::default();
        let mut now = 1_000;
        let mut waited = 0;
        for tries in 1..MAX_TRIES {
            assert_eq!(f.next(2, false, false, now), Action::Load(2));
            assert_eq!(f.failed(2, now), Failed::Retrying { first: tries == 1 });
            let wait = RETRY_MS << (tries - 1);
            assert_eq!(
                f.next(2, false, false, now),
                Action::Wait(wait),
                "backs off"
            );
            now += wait;
            waited += wait;
        }
        assert_eq!(f.next(2, false, false, now), Action::Load(2));
        assert_eq!(f.failed(2, now), Failed::GaveUp, "after {MAX_TRIES} tries");
        assert!(waited < 2_000, "{waited} ms");
        for _ in 0..3 {
            assert_eq!(
                f.next(2, false, false, now),
                Action::Read { publish: false }
            );
        }
        assert_eq!(
            f.next(3, false, false, now),
            Action::Load(3),
            "the next one is tried"
        );
        f.loaded(3);
        assert_eq!(f.seen(), 3);
        assert_eq!(f.next(3, false, false, now), Action::Wait(FOLLOW_MS));
    }

    #[test]
    fn when_the_leader_cannot_publish_everyone_reads_the_source() {
        let mut f = Follow::default();
        f.loaded(6);
        assert_eq!(f.next(6, false, true, 0), Action::Read { publish: false });
        assert_eq!(
            f.next(7, false, false, 0),
            Action::Load(7),
            "published again"
        );
    }
}
