//! Coupon numbers as the sharded data model writes them: ranges
//! `"lo-hi,lo-hi"` (a shard's `more`, a move's record), and the initial deal
//! of 1..N over the shards. The Lua functions do the arithmetic on the hot
//! path; this is how Rust reads what they wrote (recovery parses move
//! records, tests check conservation number by number).

use std::fmt;

/// Inclusive ranges of coupon numbers, in the order written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumberRanges(Vec<(u64, u64)>);

/// A range list that is not `lo-hi[,lo-hi...]` with lo <= hi.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not coupon number ranges: {0:?}")]
pub struct RangesError(pub String);

impl NumberRanges {
    /// Parses `"lo-hi,lo-hi"`; the empty string is no numbers.
    pub fn parse(text: &str) -> Result<Self, RangesError> {
        let bad = || RangesError(text.to_owned());
        let mut out = Vec::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').ok_or_else(bad)?;
            let (lo, hi): (u64, u64) = (
                lo.parse().map_err(|_| bad())?,
                hi.parse().map_err(|_| bad())?,
            );
            if lo > hi {
                return Err(bad());
            }
            out.push((lo, hi));
        }
        Ok(Self(out))
    }

    /// The numbers `lo..=hi` (none when lo > hi, as a used-up `next..upto`).
    pub fn span(lo: u64, hi: u64) -> Self {
        Self(if lo <= hi { vec![(lo, hi)] } else { Vec::new() })
    }

    /// Appends `other`'s ranges after these.
    pub fn extend(&mut self, other: &NumberRanges) {
        self.0.extend_from_slice(&other.0);
    }

    /// How many numbers.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every number, range by range.
    pub fn numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|&(lo, hi)| lo..=hi)
    }

    /// The ranges, in the order written.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

impl fmt::Display for NumberRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{lo}-{hi}")?;
        }
        Ok(())
    }
}

/// The initial deal of numbers 1..=`coupons` over `shards` shards: contiguous
/// blocks in shard order, ⌈N/S⌉ for the first `N mod S` shards and ⌊N/S⌋ for
/// the rest, so every shard starts within one coupon of the others.
pub fn initial_deal(coupons: u64, shards: u32) -> Vec<NumberRanges> {
    let s = u64::from(shards.max(1));
    let mut lo = 1;
    (0..s)
        .map(|i| {
            let n = coupons / s + u64::from(i < coupons % s);
            // lo >= 1, so an empty block is the empty span lo..lo-1.
            let block = NumberRanges::span(lo, lo + n - 1);
            lo += n;
            block
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_back_from_their_spelling() {
        let r = NumberRanges::parse("1-3,7-7,10-12").unwrap();
        assert_eq!(r.len(), 7);
        assert_eq!(r.numbers().collect::<Vec<_>>(), [1, 2, 3, 7, 10, 11, 12]);
        assert_eq!(r.to_string(), "1-3,7-7,10-12");
        assert_eq!(NumberRanges::parse("").unwrap(), NumberRanges::default());
        for bad in ["1", "3-1", "a-2", "1-2;3-4", "-1-2"] {
            assert!(NumberRanges::parse(bad).is_err(), "{bad}");
        }
        assert!(NumberRanges::span(5, 4).is_empty());
    }

    #[test]
    fn the_initial_deal_covers_one_to_n_once_in_blocks_within_one_of_each_other() {
        for (coupons, shards) in [(10, 3), (3, 3), (1000, 7), (5, 1), (2, 4)] {
            let deal = initial_deal(coupons, shards);
            assert_eq!(deal.len(), shards as usize);
            let all: Vec<u64> = deal
                .iter()
                .flat_map(|r| r.numbers().collect::<Vec<_>>())
                .collect();
            assert_eq!(all, (1..=coupons).collect::<Vec<_>>(), "{coupons}/{shards}");
            let sizes: Vec<u64> = deal.iter().map(NumberRanges::len).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{sizes:?}");
        }
        assert_eq!(initial_deal(10, 3)[0].to_string(), "1-4");
        assert_eq!(initial_deal(10, 3)[2].to_string(), "8-10");
    }
}
