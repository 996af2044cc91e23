//! Pure: a global allocator that is the system's `malloc`, except inside `Arena::scoped`,
//! where every allocation of the calling thread goes to a private mapping instead.
//!
//! Why: reading a large route table at configuration time allocates and frees megabytes in
//! the master, which leaves holes between what stays in glibc's main heap. Every worker forked
//! from it inherits them, and nginx's three 16 KB buffers per connection are then cut from
//! those holes through glibc's slow bins: about 400 instructions more per connection at
//! 10,000 routes than at 10 (docs/performance.md). A thread would have its own glibc arena,
//! but the master must not start one (the workers would inherit glibc's multi-threaded
//! paths). So the read runs in a scope whose allocations are bumped out of an anonymous
//! mapping of the module's: the main heap is left exactly as it was found.
//!
//! What the scope keeps (the table, the source's state) stays in the mapping; each page is
//! given back to the system (`MADV_DONTNEED`) once nothing on it is live and nothing more
//! will be placed on it, and the mapping itself once its last allocation is freed. Freed
//! room is never reused (a bump allocator), which is fine for a scope that lasts one read.
//! Anything that goes wrong (no mapping, a scope already open, a full mapping) falls back
//! to the system allocator: the arena is an optimisation, never a condition.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::alloc::System;

use Ordering::{AcqRel, Acquire, Relaxed, Release};

/// The page the counters count (the arena is not used where the system's differs).
const PAGE: usize = 4096;
/// Mappings alive at once: a configuration's (and the one before it during a reload), and
/// in a worker those of the tables its threads built or loaded (in service, retiring, kept
/// by a long connection).
const SLOTS: usize = 16;
/// Emptied pages are given back in runs of at least this many while a scope runs (fewer
/// system calls, each of which costs the CPUs a TLB flush); every one when it ends.
const GIVE_BACK_RUN: usize = 16;
/// `starts` of a slot being set up.
const CLAIMED: usize = 1;

/// No lock anywhere: a slot's owner (the thread whose scope it is) alone moves `next`, and
/// page counters and the live count are atomic, so that a thread freeing into a mapping
/// never waits for another (the retire thread runs at idle priority: a lock it held while
/// preempted would stall the event loop).
pub struct Arena {
    /// Address space per mapping (reserved, not committed: pages are made as touched).
    span: usize,
    /// Scopes open, on any thread: while 0, an allocation looks no further.
    active: AtomicUsize,
    /// Mappings alive: while 0, a free looks no further.
    mapped: AtomicUsize,
    /// Scopes that ran on the system allocator for want of a mapping.
    fallbacks: AtomicUsize,
    slots: [Slot; SLOTS],
}

struct Slot {
    /// The mapping's start (0: none, `CLAIMED`: being set up) and length (the span, then
    /// what its scope used).
    start: AtomicUsize,
    len: AtomicUsize,
    /// Where the next allocation goes, as an offset: moved by the owner only.
    next: AtomicUsize,
    /// Live allocations, plus one while the scope is open.
    live: AtomicUsize,
    open: AtomicBool,
}

impl Slot {
    const fn idle() -> Slot {
        Slot {
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            open: AtomicBool::new(false),
        }
    }
}

impl Arena {
    /// `span`: the address space each scope may use, a multiple of the page size; past it, a
    /// scope's allocations go to the system allocator.
    pub const fn new(span: usize) -> Self {
        Arena {
            span,
            active: AtomicUsize::new(0),
            mapped: AtomicUsize::new(0),
            fallbacks: AtomicUsize::new(0),
            slots: [const { Slot::idle() }; SLOTS],
        }
    }

    /// Runs `f` with every allocation it makes on this thread in a mapping of its own (other
    /// threads allocate as usual). What it returns may keep allocations there; they are freed
    /// as usual, from any thread. Also says whether it had a mapping (false: `f` ran on the
    /// system allocator: no room for another mapping, or a scope already open here).
    pub fn scoped<T>(&self, f: impl FnOnce() -> T) -> (T, bool) {
        if self.current().is_some() {
            return (f(), false);
        }
        let Some(slot) = self.open() else {
            self.fallbacks.fetch_add(1, Relaxed);
            return (f(), false);
        };
        /// Closes the scope on the way out, panics included.
        struct Close<'a>(&'a Arena, usize);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.close(self.1);
            }
        }
        let _close = Close(self, slot);
        (f(), true)
    }

    /// Scopes that ran without a mapping of their own (all were in use, or none could be
    /// made), since the start.
    pub fn fallbacks(&self) -> usize {
        self.fallbacks.load(Relaxed)
    }

    /// A slot claimed, mapped and made this thread's scope; None to run without one.
    fn open(&self) -> Option<usize> {
        // SAFETY: sysconf has no preconditions.
        if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
            return None;
        }
        let slot = (0..SLOTS).find(|&i| {
            self.slots[i]
                .start
                .compare_exchange(0, CLAIMED, Acquire, Relaxed)
                .is_ok()
        })?;
        let s = &self.slots[slot];
        // SAFETY: a new private anonymous mapping; nothing else points into it.
        let start = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                self.span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            s.start.store(0, Release);
            return None;
        }
        // The page counters come first, then the allocations.
        s.next.store(self.counters_len(), Relaxed);
        s.live.store(1, Relaxed);
        s.open.store(true, Relaxed);
        s.len.store(self.span, Release);
        self.mapped.fetch_add(1, Relaxed);
        s.start.store(start as usize, Release);
        SCOPE.set((self as *const Arena as usize, slot + 1));
        self.active.fetch_add(1, Release);
        Some(slot)
    }

    /// The slot of the scope open on this thread, if any.
    fn current(&self) -> Option<usize> {
        let (arena, slot) = SCOPE.get();
        (arena == self as *const Arena as usize)
            .then_some(slot)?
            .checked_sub(1)
    }

    fn close(&self, slot: usize) {
        SCOPE.set((0, 0));
        self.active.fetch_sub(1, Release);
        let s = &self.slots[slot];
        // From here on no page gets anything more: whoever empties one may give it back.
        s.open.store(false, Release);
        let start = s.start.load(Relaxed);
        let next = s.next.load(Relaxed);
        // Every page emptied, the one the last allocation went to included.
        self.give_back(start, self.counters_len(), next, usize::MAX, 1);
        // Nothing more goes past what was used: the rest of the span goes back to the system
        // (under strict overcommit, each process forked from this one would be charged for
        // all of it). The length is shortened before the unmap, so that a later mapping of
        // the system's there is never taken for ours.
        let used = next.next_multiple_of(PAGE);
        if used < self.span {
            s.len.store(used, Release);
            // SAFETY: past every allocation of the mapping; nothing points there.
            unsafe { libc::munmap((start + used) as *mut libc::c_void, self.span - used) };
        }
        self.unref(slot);
    }

    /// Bytes of page counters at the start of a mapping (a u32 per page).
    fn counters_len(&self) -> usize {
        (self.span / PAGE * 4).next_multiple_of(PAGE)
    }

    /// The slot whose mapping holds `p`, if any, and that mapping's start.
    fn slot_of(&self, p: usize) -> Option<(usize, usize)> {
        if self.mapped.load(Acquire) == 0 {
            return None;
        }
        (0..SLOTS).find_map(|i| {
            let s = &self.slots[i];
            let start = s.start.load(Acquire);
            if start <= CLAIMED || p < start {
                return None;
            }
            let len = s.len.load(Acquire);
            // Still the same mapping: a thread that slept between the two reads must not pair
            // this start with the length of a later mapping of the slot (a pointer of the
            // system's, in this mapping's unmapped tail, would be taken for the next one's).
            (p - start < len && s.start.load(Acquire) == start).then_some((i, start))
        })
    }

    /// Page `page`'s live-allocation counter in the mapping at `start`.
    fn counter(start: usize, page: usize) -> &'static AtomicU32 {
        // SAFETY: the counters lie at the start of the mapping, which stays mapped while
        // anything in it is live (the callers hold an allocation of it, or its scope).
        unsafe { &*(start as *const AtomicU32).add(page) }
    }

    /// Gives back the runs of at least `min_run` pages in `[from, to)` (offsets) that hold
    /// nothing live, below page `limit`: no page there will get anything more (below the
    /// owner's next allocation while the scope is open; any page once it is closed).
    fn give_back(&self, start: usize, from: usize, to: usize, limit: usize, min_run: usize) {
        let first = from / PAGE;
        let last = to.div_ceil(PAGE).min(limit);
        let mut run: Option<usize> = None;
        for page in first..=last {
            let empty = page < last && Self::counter(start, page).load(Acquire) == 0;
            match (empty, run) {
                (true, None) => run = Some(page),
                (false, Some(r)) if page - r < min_run => run = None,
                (false, Some(r)) => {
                    // SAFETY: pages of our own mapping with nothing live on them, and none
                    // will be placed there.
                    unsafe {
                        libc::madvise(
                            (start + r * PAGE) as *mut libc::c_void,
                            (page - r) * PAGE,
                            libc::MADV_DONTNEED,
                        );
                    }
                    run = None;
                }
                _ => {}
            }
        }
    }

    /// One reference fewer; the mapping is unmapped with its last one.
    fn unref(&self, slot: usize) {
        let s = &self.slots[slot];
        if s.live.fetch_sub(1, AcqRel) == 1 {
            let len = s.len.load(Acquire);
            let start = s.start.swap(CLAIMED, AcqRel);
            self.mapped.fetch_sub(1, Relaxed);
            // SAFETY: nothing is live in it any more.
            unsafe { libc::munmap(start as *mut libc::c_void, len) };
            s.len.store(0, Relaxed);
            s.start.store(0, Release);
        }
    }

    /// An allocation in the mapping of the scope open on this thread, or None (no scope, or
    /// no room left). Only the owner moves `next`.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        let slot = self.current()?;
        let s = &self.slots[slot];
        let start = s.start.load(Relaxed);
        let next = s.next.load(Relaxed);
        let at = (start + next).next_multiple_of(layout.align().max(1)) - start;
        let end = at.checked_add(layout.size().max(1))?;
        if end > self.span {
            return None;
        }
        s.live.fetch_add(1, Relaxed);
        for page in at / PAGE..end.div_ceil(PAGE) {
            Self::counter(start, page).fetch_add(1, Relaxed);
        }
        s.next.store(end, Relaxed);
        Some((start + at) as *mut u8)
    }

    /// Frees an allocation of slot `slot`, whose mapping starts at `start`, from any thread.
    fn free(&self, slot: usize, start: usize, p: usize, size: usize) {
        let s = &self.slots[slot];
        let at = p - start;
        let end = at + size.max(1);
        for page in at / PAGE..end.div_ceil(PAGE) {
            Self::counter(start, page).fetch_sub(1, Release);
        }
        if end - at >= GIVE_BACK_RUN * PAGE {
            if self.current() == Some(slot) {
                // The owner, its scope open: below its next allocation's page.
                let limit = s.next.load(Relaxed) / PAGE;
                self.give_back(start, at, end, limit, GIVE_BACK_RUN);
            } else if !s.open.load(Acquire) {
                // Closed: no page gets anything more.
                self.give_back(start, at, end, usize::MAX, GIVE_BACK_RUN);
            }
        }
        self.unref(slot);
    }

    /// Live mappings (for tests and logs).
    pub fn mappings(&self) -> usize {
        self.mapped.load(Relaxed)
    }

    /// Whether `p` lies in one of the arena's mappings.
    pub fn holds(&self, p: *const u8) -> bool {
        self.slot_of(p as usize).is_some()
    }
}

std::thread_local! {
    /// The arena (its address) and slot (plus one) of the scope open on this thread. A
    /// constant initialiser and no destructor: reading it never allocates.
    static SCOPE: core::cell::Cell<(usize, usize)> = const { core::cell::Cell::new((0, 0)) };
}

// SAFETY: every allocation is either the system allocator's, or a fresh range of a mapping of
// ours, aligned as asked, not handed out twice, and kept mapped while live.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.active.load(Relaxed) != 0 {
            if let Some(p) = self.bump(layout) {
                return p;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.active.load(Relaxed) != 0 {
            // No byte of the mapping is handed out twice, and pages given back read as zero.
            if let Some(p) = self.bump(layout) {
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match self.slot_of(p as usize) {
            Some((slot, start)) => self.free(slot, start, p as usize, layout.size()),
            None => System.dealloc(p, layout),
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.slot_of(p as usize).is_none() {
            return System.realloc(p, layout, new_size);
        }
        // SAFETY: the caller guarantees a valid layout for new_size.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let q = self.alloc(new_layout);
        if !q.is_null() {
            core::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
            self.dealloc(p, layout);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: usize = 1 << 20;

    /// Whether the page holding `p` is resident.
    fn resident(p: *const u8) -> bool {
        let page = (p as usize) & !(PAGE - 1);
        let mut v = 0u8;
        // SAFETY: one page's residency into one byte.
        let r = unsafe { libc::mincore(page as *mut libc::c_void, PAGE, &mut v) };
        r == 0 && v & 1 == 1
    }

    fn alloc(a: &Arena, size: usize, align: usize) -> (*mut u8, Layout) {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        assert!((p as usize).is_multiple_of(align));
        // SAFETY: ours, `size` bytes.
        unsafe { p.write_bytes(0xa5, size) };
        (p, layout)
    }

    fn free(a: &Arena, (p, l): (*mut u8, Layout)) {
        // SAFETY: allocated by `alloc` with this layout, freed once.
        unsafe { a.dealloc(p, l) };
    }

    #[test]
    fn outside_a_scope_is_the_system_allocator() {
        let a = Arena::new(SPAN);
        let p = alloc(&a, 100, 8);
        assert!(!a.holds(p.0));
        assert_eq!(a.mappings(), 0);
        free(&a, p);
    }

    #[test]
    fn a_scope_allocates_in_its_mapping_and_unmaps_with_the_last_free() {
        let a = Arena::new(SPAN);
        let (kept, mapped) = a.scoped(|| {
            let t = alloc(&a, 3000, 8);
            let k = alloc(&a, 40, 16);
            assert!(a.holds(t.0) && a.holds(k.0));
            free(&a, t);
            k
        });
        assert!(mapped);
        assert_eq!(a.mappings(), 1, "what the scope kept keeps the mapping");
        // Outside the scope again: the system's.
        let p = alloc(&a, 40, 8);
        assert!(!a.holds(p.0));
        free(&a, p);
        // SAFETY: allocated in the scope, still live.
        assert_eq!(unsafe { *kept.0 }, 0xa5);
        free(&a, kept);
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn emptied_pages_are_given_back() {
        let a = Arena::new(SPAN);
        let ((late, keep, small), _) = a.scoped(|| {
            let keep = alloc(&a, PAGE, PAGE);
            let big = alloc(&a, 32 * PAGE, PAGE);
            let late = alloc(&a, 20 * PAGE, PAGE);
            assert!(resident(big.0) && resident(big.0.wrapping_add(31 * PAGE)));
            free(&a, big);
            // A long run below the next allocation's page: given back at once.
            assert!(!resident(big.0) && !resident(big.0.wrapping_add(31 * PAGE)));
            // A short one, on the page the next allocation would go to: at the end.
            let small = alloc(&a, 64, 8);
            free(&a, small);
            assert!(resident(small.0));
            (late, keep, small)
        });
        assert!(!resident(small.0), "the last page goes when the scope ends");
        free(&a, late);
        assert!(
            !resident(late.0.wrapping_add(PAGE)),
            "a closed scope's pages go once empty"
        );
        assert!(resident(keep.0));
        free(&a, keep);
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn the_unused_span_is_unmapped_when_the_scope_ends() {
        let a = Arena::new(SPAN);
        let (p, _) = a.scoped(|| {
            let p = alloc(&a, 100, 8);
            assert!(a.holds(p.0.wrapping_add(4 * PAGE)));
            p
        });
        assert!(a.holds(p.0));
        assert!(!a.holds(p.0.wrapping_add(4 * PAGE)));
        free(&a, p);
    }

    #[test]
    fn zeroed_allocations_are_zero() {
        let a = Arena::new(SPAN);
        a.scoped(|| {
            let p = alloc(&a, 3 * PAGE, 8);
            free(&a, p);
            let layout = Layout::from_size_align(5 * PAGE, 8).unwrap();
            // SAFETY: a non-zero size; read back then freed with its layout.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(a.holds(z));
                assert!(core::slice::from_raw_parts(z, 5 * PAGE)
                    .iter()
                    .all(|&b| b == 0));
                a.dealloc(z, layout);
            }
        });
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn realloc_keeps_the_bytes_in_and_out_of_the_scope() {
        let a = Arena::new(SPAN);
        let ((p, l), _) = a.scoped(|| {
            let (p, l) = alloc(&a, 100, 8);
            // SAFETY: allocated above, grown to a valid size.
            let q = unsafe { a.realloc(p, l, 300) };
            assert!(a.holds(q));
            (q, Layout::from_size_align(300, 8).unwrap())
        });
        // SAFETY: allocated above, grown to a valid size.
        let q = unsafe { a.realloc(p, l, 5000) };
        assert!(!a.holds(q));
        assert_eq!(a.mappings(), 0);
        // SAFETY: 100 bytes were copied twice; freed with its new layout.
        unsafe {
            assert!(core::slice::from_raw_parts(q, 100)
                .iter()
                .all(|&b| b == 0xa5));
            a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
        }
    }

    #[test]
    fn a_full_mapping_a_nested_scope_and_one_too_many_fall_back_to_the_system() {
        let a = Arena::new(SPAN);
        let (kept, _) = a.scoped(|| {
            let (inner, nested) = a.scoped(|| alloc(&a, 16, 8));
            assert!(
                !nested && a.holds(inner.0),
                "a nested scope uses the open one"
            );
            let huge = alloc(&a, SPAN, 8);
            assert!(!a.holds(huge.0));
            free(&a, huge);
            inner
        });
        let mut kept = vec![kept];
        for _ in 1..SLOTS {
            let (p, mapped) = a.scoped(|| alloc(&a, 16, 8));
            assert!(mapped && a.holds(p.0));
            kept.push(p);
        }
        let (extra, mapped) = a.scoped(|| alloc(&a, 16, 8));
        assert!(!mapped && !a.holds(extra.0), "{SLOTS} mappings at most");
        assert_eq!(a.mappings(), SLOTS);
        kept.push(extra);
        for p in kept {
            free(&a, p);
        }
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn other_threads_allocate_as_usual_while_a_scope_runs() {
        static A: Arena = Arena::new(SPAN);
        let (outside, _) = A.scoped(|| {
            let mine = alloc(&A, 64, 8);
            let theirs = std::thread::spawn(|| {
                let (p, l) = alloc(&A, 64, 8);
                (p as usize, l)
            })
            .join()
            .unwrap();
            assert!(A.holds(mine.0) && !A.holds(theirs.0 as *const u8));
            free(&A, mine);
            theirs
        });
        free(&A, (outside.0 as *mut u8, outside.1));
        assert_eq!(A.mappings(), 0);
    }

    /// Random sizes and alignments, freed and grown in any order, in the scope and after it:
    /// every live block keeps its bytes (nothing is given back under it).
    #[test]
    fn live_blocks_keep_their_bytes_under_any_order_of_frees() {
        let a = Arena::new(64 << 20);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        let check = |live: &[(*mut u8, Layout, u8)]| {
            for &(p, l, tag) in live {
                // SAFETY: live blocks of `l.size()` bytes.
                let bytes = unsafe { core::slice::from_raw_parts(p, l.size()) };
                assert!(
                    bytes.iter().all(|&b| b == tag),
                    "a live block lost its bytes"
                );
            }
        };
        let mut step = |live: &mut Vec<(*mut u8, Layout, u8)>, i: usize| match next(4) {
            0 if !live.is_empty() => {
                let (p, l, _) = live.swap_remove(next(live.len()));
                // SAFETY: live, freed once.
                unsafe { a.dealloc(p, l) };
            }
            1 if !live.is_empty() => {
                let k = next(live.len());
                let (p, l, tag) = live[k];
                let size = 1 + next(3 * PAGE);
                // SAFETY: live; the new block gets the old bytes up to the shorter length.
                let q = unsafe { a.realloc(p, l, size) };
                assert!(!q.is_null());
                // SAFETY: `size` bytes of ours.
                unsafe { q.write_bytes(tag, size) };
                live[k] = (q, Layout::from_size_align(size, l.align()).unwrap(), tag);
            }
            _ => {
                let size = 1 + next(3 * PAGE);
                let align = 1 << next(14);
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size.
                let p = unsafe { a.alloc(layout) };
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                let tag = (i % 251) as u8;
                // SAFETY: `size` bytes of ours.
                unsafe { p.write_bytes(tag, size) };
                live.push((p, layout, tag));
            }
        };
        a.scoped(|| {
            for i in 0..3000 {
                step(&mut live, i);
                if i % 50 == 0 {
                    check(&live);
                }
            }
        });
        for i in 0..3000 {
            step(&mut live, i);
            if i % 50 == 0 {
                check(&live);
            }
        }
        check(&live);
        for (p, l, _) in live.drain(..) {
            // SAFETY: live, freed once.
            unsafe { a.dealloc(p, l) };
        }
        assert_eq!(a.mappings(), 0);
    }

    /// Blocks of a closed scope, large and small, freed by four threads at once: the pages
    /// they give back never hold a block still live.
    #[test]
    fn concurrent_frees_after_the_scope_keep_live_blocks() {
        static A: Arena = Arena::new(64 << 20);
        let (blocks, _) = A.scoped(|| {
            (0..400)
                .map(|i| {
                    let size = if i % 5 == 0 {
                        17 * PAGE + i
                    } else {
                        24 + i % 700
                    };
                    let (p, l) = alloc(&A, size, 8);
                    // SAFETY: ours, `size` bytes.
                    unsafe { p.write_bytes((i % 251) as u8, size) };
                    (p as usize, l, (i % 251) as u8)
                })
                .collect::<Vec<_>>()
        });
        let (keep, give): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|b| b.2 % 7 == 0);
        let threads: Vec<_> = give
            .chunks(give.len().div_ceil(4))
            .map(|part| {
                let part = part.to_vec();
                std::thread::spawn(move || {
                    for (p, l, _) in part {
                        free(&A, (p as *mut u8, l));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for (p, l, tag) in keep {
            // SAFETY: live blocks of `l.size()` bytes.
            let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, l.size()) };
            assert!(
                bytes.iter().all(|&b| b == tag),
                "a live block lost its bytes"
            );
            free(&A, (p as *mut u8, l));
        }
        assert_eq!(A.mappings(), 0);
    }

    #[test]
    fn frees_from_other_threads_while_the_scope_allocates() {
        static A: Arena = Arena::new(16 << 20);
        let (kept, _) = A.scoped(|| {
            let made: Vec<(usize, Layout)> = (0..2000)
                .map(|i| {
                    let (p, l) = alloc(&A, 16 + i % 300, 8);
                    (p as usize, l)
                })
                .collect();
            let (give, keep): (Vec<_>, Vec<_>) = made.into_iter().partition(|(p, _)| p % 3 != 0);
            let t = std::thread::spawn(move || {
                for (p, l) in give {
                    free(&A, (p as *mut u8, l));
                }
            });
            for _ in 0..2000 {
                let p = alloc(&A, 24, 8);
                free(&A, p);
            }
            t.join().unwrap();
            keep
        });
        assert_eq!(A.mappings(), 1);
        for (p, l) in kept {
            // SAFETY: allocated in the scope, still live.
            assert_eq!(unsafe { *(p as *const u8) }, 0xa5);
            free(&A, (p as *mut u8, l));
        }
        assert_eq!(A.mappings(), 0);
    }
}
