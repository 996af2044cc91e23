//! Pure: a global allocator that is the system's `malloc`, except inside `Arena::scoped`,
//! where every allocation of the process goes to a private mapping instead.
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
use core::sync::atomic::{AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::alloc::System;
use std::sync::Mutex;

const PAGE: usize = 4096;
/// Mappings alive at once: a configuration's, and the one before it during a reload.
const SLOTS: usize = 2;

pub struct Arena {
    /// Address space per mapping (reserved, not committed: pages are made as touched).
    span: usize,
    /// The slot of the open scope, plus one; 0 when none is open.
    active: AtomicUsize,
    /// Each slot's mapping start (0: none), read without the lock by `dealloc`.
    starts: [AtomicUsize; SLOTS],
    state: Mutex<[Slot; SLOTS]>,
}

#[derive(Clone, Copy)]
struct Slot {
    /// Where the next allocation goes, as an offset in the mapping.
    next: usize,
    /// Live allocations, plus one while the scope is open.
    live: usize,
    open: bool,
}

const IDLE: Slot = Slot {
    next: 0,
    live: 0,
    open: false,
};

impl Arena {
    /// `span`: the address space each scope may use, a multiple of the page size; past it, a
    /// scope's allocations go to the system allocator.
    pub const fn new(span: usize) -> Self {
        Arena {
            span,
            active: AtomicUsize::new(0),
            starts: [AtomicUsize::new(0), AtomicUsize::new(0)],
            state: Mutex::new([IDLE; SLOTS]),
        }
    }

    /// Runs `f` with every allocation it makes (on any thread) in a mapping of its own. What
    /// it returns may keep allocations there; they are freed as usual, from any thread.
    pub fn scoped<T>(&self, f: impl FnOnce() -> T) -> T {
        let Some(slot) = self.open() else {
            return f();
        };
        /// Closes the scope on the way out, panics included.
        struct Close<'a>(&'a Arena, usize);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.close(self.1);
            }
        }
        let _close = Close(self, slot);
        f()
    }

    /// The slot a new scope may use, mapped, and made active; None to run without one.
    fn open(&self) -> Option<usize> {
        if self.active.load(Acquire) != 0 {
            return None;
        }
        let mut state = self.state.lock().ok()?;
        let slot = (0..SLOTS).find(|&i| self.starts[i].load(Relaxed) == 0)?;
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
            return None;
        }
        // The page counters come first, then the allocations.
        state[slot] = Slot {
            next: self.counters_len(),
            live: 1,
            open: true,
        };
        self.starts[slot].store(start as usize, Release);
        self.active.store(slot + 1, Release);
        Some(slot)
    }

    fn close(&self, slot: usize) {
        self.active.store(0, Release);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state[slot].open = false;
        let start = self.starts[slot].load(Relaxed);
        // Pages emptied while they were the last one allocations went to.
        self.give_back(start, self.counters_len(), state[slot].next, &state[slot]);
        self.unref(&mut state, slot);
    }

    /// Bytes of page counters at the start of a mapping (a u32 per page).
    fn counters_len(&self) -> usize {
        (self.span / PAGE * 4).next_multiple_of(PAGE)
    }

    /// The slot whose mapping holds `p`, if any.
    fn slot_of(&self, p: usize) -> Option<usize> {
        (0..SLOTS).find(|&i| {
            let start = self.starts[i].load(Acquire);
            start != 0 && p >= start && p < start + self.span
        })
    }

    /// Page `page`'s live-allocation counter in the mapping at `start`.
    ///
    /// # Safety
    /// `start` is a live slot's mapping and `page` one of its pages; the state lock is held.
    unsafe fn counter(start: usize, page: usize) -> *mut u32 {
        (start as *mut u32).add(page)
    }

    /// Gives back the pages in `[from, to)` (offsets) that hold nothing live and will get
    /// nothing more: below the next allocation's page while the scope is open, any once
    /// closed. The state lock is held.
    fn give_back(&self, start: usize, from: usize, to: usize, slot: &Slot) {
        let first = from / PAGE;
        let mut last = to.div_ceil(PAGE);
        if slot.open {
            last = last.min(slot.next / PAGE);
        }
        let mut run: Option<usize> = None;
        for page in first..=last {
            // SAFETY: the pages are the mapping's, counters below `counters_len`.
            let empty = page < last && unsafe { *Self::counter(start, page) } == 0;
            match (empty, run) {
                (true, None) => run = Some(page),
                (false, Some(r)) => {
                    // SAFETY: pages of our own mapping with nothing live on them.
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
    fn unref(&self, state: &mut [Slot; SLOTS], slot: usize) {
        state[slot].live -= 1;
        if state[slot].live == 0 {
            let start = self.starts[slot].swap(0, Release);
            state[slot] = IDLE;
            // SAFETY: nothing is live in it any more.
            unsafe { libc::munmap(start as *mut libc::c_void, self.span) };
        }
    }

    /// An allocation in the open scope's mapping, or None (no scope, or no room left).
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        let slot = self.active.load(Acquire).checked_sub(1)?;
        let mut state = self.state.lock().ok()?;
        let s = &mut state[slot];
        if !s.open {
            return None;
        }
        let start = self.starts[slot].load(Relaxed);
        let at = (start + s.next).next_multiple_of(layout.align().max(1)) - start;
        let end = at.checked_add(layout.size().max(1))?;
        if end > self.span {
            return None;
        }
        s.next = end;
        s.live += 1;
        for page in at / PAGE..end.div_ceil(PAGE) {
            // SAFETY: a page of the mapping; the lock is held.
            unsafe { *Self::counter(start, page) += 1 };
        }
        Some((start + at) as *mut u8)
    }

    /// Frees an allocation of slot `slot`.
    fn free(&self, slot: usize, p: usize, size: usize) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let start = self.starts[slot].load(Relaxed);
        let at = p - start;
        let end = at + size.max(1);
        for page in at / PAGE..end.div_ceil(PAGE) {
            // SAFETY: a page of the mapping; the lock is held.
            unsafe { *Self::counter(start, page) -= 1 };
        }
        let s = state[slot];
        self.give_back(start, at, end, &s);
        self.unref(&mut state, slot);
    }

    /// Live mappings (for tests and logs).
    pub fn mappings(&self) -> usize {
        self.starts.iter().filter(|s| s.load(Relaxed) != 0).count()
    }

    /// Whether `p` lies in one of the arena's mappings.
    pub fn holds(&self, p: *const u8) -> bool {
        self.slot_of(p as usize).is_some()
    }
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
            if let Some(p) = self.bump(layout) {
                // Fresh pages are zero, but a page may hold freed allocations.
                p.write_bytes(0, layout.size());
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match self.slot_of(p as usize) {
            Some(slot) => self.free(slot, p as usize, layout.size()),
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
        assert_eq!(p as usize % align, 0);
        // SAFETY: ours, `size` bytes.
        unsafe { p.write_bytes(0xa5, size) };
        (p, layout)
    }

    #[test]
    fn outside_a_scope_is_the_system_allocator() {
        let a = Arena::new(SPAN);
        let (p, l) = alloc(&a, 100, 8);
        assert!(!a.holds(p));
        assert_eq!(a.mappings(), 0);
        // SAFETY: allocated above with this layout.
        unsafe { a.dealloc(p, l) };
    }

    #[test]
    fn a_scope_allocates_in_its_mapping_and_unmaps_with_the_last_free() {
        let a = Arena::new(SPAN);
        let (kept, l) = a.scoped(|| {
            let (t, tl) = alloc(&a, 3000, 8);
            let k = alloc(&a, 40, 16);
            assert!(a.holds(t) && a.holds(k.0));
            // SAFETY: allocated above.
            unsafe { a.dealloc(t, tl) };
            k
        });
        assert_eq!(a.mappings(), 1, "what the scope kept keeps the mapping");
        // Outside the scope again: the system's.
        let (p, pl) = alloc(&a, 40, 8);
        assert!(!a.holds(p));
        // SAFETY: allocated above with these layouts.
        unsafe {
            assert_eq!(*kept, 0xa5);
            a.dealloc(p, pl);
            a.dealloc(kept, l);
        }
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn emptied_pages_are_given_back() {
        let a = Arena::new(SPAN);
        let (big, bl, small, sl) = a.scoped(|| {
            let (big, bl) = alloc(&a, 8 * PAGE, PAGE);
            let (small, sl) = alloc(&a, 64, 8);
            assert!(resident(big) && resident(big.wrapping_add(7 * PAGE)));
            // SAFETY: allocated above; the mapping stays for `small`.
            unsafe { a.dealloc(big, bl) };
            // Below the next allocation's page: given back at once.
            assert!(!resident(big) && !resident(big.wrapping_add(6 * PAGE)));
            let (big2, bl2) = alloc(&a, 2 * PAGE, 8);
            (big2, bl2, small, sl)
        });
        // SAFETY: allocated in the scope.
        unsafe { a.dealloc(big, bl) };
        assert!(
            !resident(big.wrapping_add(PAGE)),
            "a closed scope's pages go once empty"
        );
        assert!(resident(small));
        // SAFETY: allocated in the scope.
        unsafe { a.dealloc(small, sl) };
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn realloc_moves_out_of_a_closed_scope_and_keeps_the_bytes() {
        let a = Arena::new(SPAN);
        let (p, l) = a.scoped(|| alloc(&a, 100, 8));
        // SAFETY: allocated above, grown to a valid size.
        let q = unsafe { a.realloc(p, l, 5000) };
        assert!(!a.holds(q));
        assert_eq!(a.mappings(), 0);
        // SAFETY: 100 bytes were copied; freed with its new layout.
        unsafe {
            assert!(core::slice::from_raw_parts(q, 100)
                .iter()
                .all(|&b| b == 0xa5));
            a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
        }
    }

    #[test]
    fn a_full_mapping_and_a_nested_scope_fall_back_to_the_system() {
        let a = Arena::new(SPAN);
        a.scoped(|| {
            let (inner, il) = a.scoped(|| alloc(&a, 16, 8));
            assert!(a.holds(inner), "a nested scope uses the open one");
            let (huge, hl) = alloc(&a, SPAN, 8);
            assert!(!a.holds(huge));
            // SAFETY: allocated above.
            unsafe {
                a.dealloc(huge, hl);
                a.dealloc(inner, il);
            }
        });
        assert_eq!(a.mappings(), 0);
    }

    #[test]
    fn frees_from_other_threads_while_the_scope_allocates() {
        static A: Arena = Arena::new(16 << 20);
        let kept: Vec<(usize, Layout)> = A.scoped(|| {
            let made: Vec<(usize, Layout)> = (0..2000)
                .map(|i| {
                    let (p, l) = alloc(&A, 16 + i % 300, 8);
                    (p as usize, l)
                })
                .collect();
            let (give, keep): (Vec<_>, Vec<_>) = made.into_iter().partition(|(p, _)| p % 3 != 0);
            let t = std::thread::spawn(move || {
                for (p, l) in give {
                    // SAFETY: allocated above, freed once.
                    unsafe { A.dealloc(p as *mut u8, l) };
                }
            });
            for _ in 0..2000 {
                let (p, l) = alloc(&A, 24, 8);
                // SAFETY: allocated just now.
                unsafe { A.dealloc(p, l) };
            }
            t.join().unwrap();
            keep
        });
        assert_eq!(A.mappings(), 1);
        for (p, l) in kept {
            // SAFETY: allocated in the scope, each freed once.
            unsafe {
                assert_eq!(*(p as *const u8), 0xa5);
                A.dealloc(p as *mut u8, l);
            }
        }
        assert_eq!(A.mappings(), 0);
    }
}
