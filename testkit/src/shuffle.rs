//! A small deterministic shuffle (xorshift): crowds arrive in a random but
//! repeatable order, so a failure can be replayed with the same seed.

/// Shuffles `items` in place, the order fixed by `seed` (not 0: xorshift
/// stays at 0).
pub fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}
