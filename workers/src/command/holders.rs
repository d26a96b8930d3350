//! Who holds a coupon of a promotion that is over, as compactly as a
//! worker can know it: the promise of the idempotent retry ("a retry is safe
//! and answers your coupon if you got one") holds after the sale, while
//! everyone else keeps getting the prepared 410 from memory.
//!
//! A promotion has at most `numberOfCoupons` holders. When a worker learns
//! that one is over, it reads the holders once (HSCAN of the customers hash:
//! once the promotion is over nobody is added) into a sorted array of 64-bit
//! hashes of their ids: 8 bytes per coupon, 8 MB per million coupons. A
//! customer whose hash is not in it is no holder: 410 at once. One whose hash
//! is (a holder, or a one-in-2^64 collision) is sent to Redis like any grab,
//! which answers the holder its coupon (alreadyGranted) and anyone else the
//! 410: the array only decides who may skip Redis, never what a holder gets.
//! Until the array is loaded, every grab of the promotion goes to Redis.
//!
//! The hash is foldhash's, seeded at random per worker: a customer cannot
//! aim at a holder's hash without the seed, and at a few instructions per
//! short id it is a quarter of std's SipHash on the sold-out path.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::protocol::CustomerId;

/// The hashes of a finished promotion's holders.
#[derive(Debug)]
pub struct HolderSet {
    hasher: RandomState,
    hashes: Box<[u64]>,
}

/// A [`HolderSet`] being read, one id at a time.
#[derive(Debug, Default)]
pub struct HolderSetBuilder {
    hasher: RandomState,
    hashes: Vec<u64>,
}

impl HolderSetBuilder {
    pub fn add(&mut self, id: &[u8]) {
        self.hashes.push(self.hasher.hash_one(id));
    }

    pub fn build(self) -> HolderSet {
        let mut hashes = self.hashes;
        hashes.sort_unstable();
        hashes.dedup();
        HolderSet {
            hasher: self.hasher,
            hashes: hashes.into_boxed_slice(),
        }
    }
}

impl HolderSet {
    /// Builds the set from the holders' ids, as Redis lists them.
    pub fn from_ids<'a>(ids: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut builder = HolderSetBuilder::default();
        for id in ids {
            builder.add(id);
        }
        builder.build()
    }

    /// False: `customer` holds no coupon. True: it may (ask Redis).
    pub fn may_hold(&self, customer: &CustomerId) -> bool {
        let h = self.hasher.hash_one(customer.as_str().as_bytes());
        self.hashes.binary_search(&h).is_ok()
    }

    /// Bytes of the hashes.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.hashes)
    }
}

/// A finished promotion's holders: absent until loaded, loaded once.
#[derive(Debug, Default)]
pub struct Holders {
    set: OnceLock<HolderSet>,
    loading: AtomicBool,
}

impl Holders {
    /// The set, once loaded.
    pub fn get(&self) -> Option<&HolderSet> {
        self.set.get()
    }

    /// True for the one caller that should load the set now (none is
    /// loaded nor being loaded).
    pub fn start_loading(&self) -> bool {
        self.set.get().is_none()
            && self
                .loading
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Stores the loaded set.
    pub fn loaded(&self, set: HolderSet) {
        let _ = self.set.set(set);
        self.loading.store(false, Ordering::Release);
    }

    /// The load failed: the next grab may try again.
    pub fn failed(&self) {
        self.loading.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CustomerId {
        CustomerId::parse(s).unwrap()
    }

    #[test]
    fn holders_may_hold_others_do_not() {
        let set = HolderSet::from_ids(["alice".as_bytes(), b"bob", b"alice"]);
        assert!(set.may_hold(&c("alice")));
        assert!(set.may_hold(&c("bob")));
        assert!(!set.may_hold(&c("carol")));
        assert_eq!(set.bytes(), 16, "8 bytes per holder, repeats once");
    }

    #[test]
    fn one_caller_loads_and_a_failure_lets_the_next_try() {
        let h = Holders::default();
        assert!(h.start_loading());
        assert!(!h.start_loading(), "already loading");
        h.failed();
        assert!(h.start_loading());
        h.loaded(HolderSet::from_ids([b"x".as_slice()]));
        assert!(!h.start_loading(), "loaded: never again");
        assert!(h.get().is_some());
    }
}
