//! The process allocator of `seckill-worker` and `seckill`: mimalloc, called
//! the way mimalloc is fastest.
//!
//! The `mimalloc` crate's `MiMalloc` hands every allocation to
//! `mi_malloc_aligned`, whatever its alignment. Rust passes an alignment
//! with every request, almost always 8 or less, and the aligned entry point
//! takes a longer path than the plain one; blocks over 1 KiB (the HTTP read
//! buffer, boxed request futures) even take its slow generic path.
//! [`Mimalloc`] calls the plain `mi_malloc`, `mi_zalloc` and `mi_realloc`
//! whenever a plain block is aligned enough, by mimalloc's own rule
//! (`mi_malloc_is_naturally_aligned` in its `alloc-aligned.c`: an alignment
//! of at most `MI_MAX_ALIGN_SIZE`, 16, and no larger than the size), and the
//! aligned ones otherwise. A grab is a few dozen allocations:
//! docs/BENCHMARKS.md has what this saved, counted with callgrind.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc's `MI_MAX_ALIGN_SIZE`: the alignment every block of at least
/// that size has.
const MAX_NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator]` in each binary).
pub struct Mimalloc;

/// Whether a plain mimalloc block of `size` bytes is aligned to `align`.
fn naturally_aligned(size: usize, align: usize) -> bool {
    align <= MAX_NATURAL_ALIGN && align <= size
}

// SAFETY: every method hands the request to mimalloc, whose blocks satisfy
// `layout` (the aligned entry points whenever a plain block might not), and
// frees only what mimalloc allocated.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain or aligned allocation of `layout`'s size; see above.
        unsafe {
            if naturally_aligned(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`, zeroed.
        unsafe {
            if naturally_aligned(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from mimalloc.
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block keeps `layout`'s
        // alignment (plain when natural for the new size, else aligned).
        unsafe {
            if naturally_aligned(new_size, layout.align()) {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, zero-allocates, grows and shrinks blocks of every
    /// alignment up to 4 KiB and of sizes around each, checking every
    /// address and that a reallocation keeps the contents.
    #[test]
    fn every_block_has_the_alignment_its_layout_asks_for() {
        let alloc = Mimalloc;
        for align in (0..13).map(|p| 1usize << p) {
            for size in [
                align,
                align + 1,
                2 * align,
                3 * align,
                1,
                7,
                8,
                24,
                48,
                1000,
                5000,
            ] {
                let layout = Layout::from_size_align(size, align).expect("a valid layout");
                // SAFETY: non-zero sizes; each block is freed once, by this
                // allocator, with the layout it has at that point.
                unsafe {
                    let p = alloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xab, size);
                    let grown = size * 4 + 3;
                    let q = alloc.realloc(p, layout, grown);
                    assert_eq!(q as usize % align, 0, "grown {size}->{grown} align {align}");
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xab));
                    let grown_layout = Layout::from_size_align(grown, align).expect("valid");
                    let shrunk = (size / 2).max(1);
                    let r = alloc.realloc(q, grown_layout, shrunk);
                    assert_eq!(
                        r as usize % align,
                        0,
                        "shrunk {grown}->{shrunk} align {align}"
                    );
                    assert!(std::slice::from_raw_parts(r, shrunk)
                        .iter()
                        .all(|&b| b == 0xab));
                    alloc.dealloc(r, Layout::from_size_align(shrunk, align).expect("valid"));

                    let z = alloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    alloc.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn plain_blocks_are_used_only_where_mimalloc_guarantees_the_alignment() {
        assert!(naturally_aligned(8, 8));
        assert!(naturally_aligned(1, 1));
        assert!(naturally_aligned(32, 16));
        assert!(
            !naturally_aligned(8, 16),
            "an 8-byte block may sit at an 8-byte boundary"
        );
        assert!(!naturally_aligned(64, 32), "beyond MI_MAX_ALIGN_SIZE");
    }
}
