//! Where the shards of a sharded promotion and its customers live: the
//! cluster slot of a key, each customer's home shard, and the salts that put
//! shard i on the master wanted for it.
//!
//! Tags never move once recorded; slots may (a failover or a resharding is
//! followed like any other key). The salts are chosen once, at the first
//! schedule, from the slot map of that moment, so that with S equal to the
//! number of masters each master holds one shard: chosen, not hoped for.

use super::keys::{customer_hash, shard_tag};
use super::{CustomerId, PromotionId};

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16_384;

/// Most salts tried for one shard before giving up. With M masters the
/// expected number is about M; a million means the slot map is unusable
/// (a master serving almost nothing).
const MAX_SALT_TRIES: u32 = 1_000_000;

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole
/// key, modulo [`SLOTS`], as Redis computes it.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % SLOTS
}

/// The home shard of `customer` among `shards`: where their one-coupon check
/// and their coupon live, so the per-customer rule stays a single-slot
/// atomic check. The same stable hash as the read-model bucket.
pub fn home_shard(customer: &CustomerId, shards: u32) -> u32 {
    customer_hash(customer) % shards.max(1)
}

/// Why no placement could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("the slot map serves no slot")]
    EmptySlotMap,
    #[error("slot {0} is served by no master in the slot map")]
    Unserved(u16),
    #[error("no salt within {MAX_SALT_TRIES} tries places shard {0} on its master")]
    NoSalt(u32),
    #[error("shards must be 1 to 1024, not {0}")]
    ShardCount(u32),
}

/// Which master serves each slot, masters ordered by the lowest slot they
/// serve: an order that survives a failover, since a promoted replica serves
/// the same slots.
#[derive(Debug, Clone)]
pub struct SlotMap {
    /// (first slot, last slot, master index), sorted by first slot.
    ranges: Vec<(u16, u16, usize)>,
    masters: Vec<String>,
}

impl SlotMap {
    /// From `(first slot, last slot, master address)` ranges, as `CLUSTER
    /// SLOTS` or `CLUSTER SHARDS` answer them.
    pub fn new(ranges: impl IntoIterator<Item = (u16, u16, String)>) -> Self {
        let mut ranges: Vec<(u16, u16, String)> = ranges.into_iter().collect();
        ranges.sort_by_key(|r| r.0);
        let mut masters: Vec<String> = Vec::new();
        let ranges = ranges
            .into_iter()
            .map(|(lo, hi, master)| {
                let index = masters
                    .iter()
                    .position(|m| *m == master)
                    .unwrap_or_else(|| {
                        masters.push(master);
                        masters.len() - 1
                    });
                (lo, hi, index)
            })
            .collect();
        Self { ranges, masters }
    }

    /// The masters, ordered by the lowest slot each serves.
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// Index (in [`masters`](Self::masters)) of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<usize> {
        self.ranges
            .iter()
            .find(|(lo, hi, _)| *lo <= slot && slot <= *hi)
            .map(|r| r.2)
    }
}

/// Where the shards of one promotion go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Salt of each shard i >= 1 (index i - 1).
    pub salts: Vec<u32>,
    /// Master index (in the slot map's order) wanted for each shard.
    pub masters: Vec<usize>,
    /// Salts tried in all.
    pub tries: u64,
}

impl Placement {
    /// `"i:slot,..."`: each shard's slot, for status (the shard map's
    /// `placement` field).
    pub fn describe(&self, id: &PromotionId) -> String {
        (0..=self.salts.len() as u32)
            .map(|i| {
                let salt = if i == 0 {
                    0
                } else {
                    self.salts[i as usize - 1]
                };
                format!("{i}:{}", key_slot(&shard_tag(id, i, salt)))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Chooses the salts of `shards` shards of `id` over the masters of `map`:
/// shard 0 is where the promotion's own tag is (master m0); shard i wants
/// master (m0 + i) mod M, so with S = M each master holds one shard and with
/// S > M they are dealt round-robin. Each salt is the smallest that lands the
/// shard's tag on its master.
pub fn place(id: &PromotionId, shards: u32, map: &SlotMap) -> Result<Placement, PlacementError> {
    if !(1..=1024).contains(&shards) {
        return Err(PlacementError::ShardCount(shards));
    }
    let m = map.masters().len();
    if m == 0 {
        return Err(PlacementError::EmptySlotMap);
    }
    let slot0 = key_slot(&id.hash_tag());
    let m0 = map
        .master_of(slot0)
        .ok_or(PlacementError::Unserved(slot0))?;
    let mut placement = Placement {
        salts: Vec::with_capacity(shards as usize - 1),
        masters: vec![m0],
        tries: 0,
    };
    for i in 1..shards {
        let want = (m0 + i as usize) % m;
        let salt = (0..MAX_SALT_TRIES)
            .find(|&salt| {
                placement.tries += 1;
                map.master_of(key_slot(&shard_tag(id, i, salt))) == Some(want)
            })
            .ok_or(PlacementError::NoSalt(i))?;
        placement.salts.push(salt);
        placement.masters.push(want);
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PromotionId {
        PromotionId::parse("shop/sale").unwrap()
    }

    /// The slot map `redis-cli --cluster create` makes for three masters.
    fn three_masters() -> SlotMap {
        SlotMap::new([
            (10923, 16383, "c:3".to_owned()),
            (0, 5460, "a:1".to_owned()),
            (5461, 10922, "b:2".to_owned()),
        ])
    }

    #[test]
    fn key_slots_are_crc16_of_the_hash_tag_as_redis_computes_them() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(key_slot("123456789"), 0x31C3 % SLOTS);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_ne!(
            key_slot("foo{}{bar}"),
            key_slot("bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }

    #[test]
    fn home_shard_is_the_customer_hash_modulo_s_and_one_shard_is_home_to_all() {
        let c = CustomerId::parse("alice").unwrap();
        assert_eq!(home_shard(&c, 3), customer_hash(&c) % 3);
        assert_eq!(home_shard(&c, 1), 0);
        let mut seen = [0u32; 3];
        for n in 0..3000 {
            seen[home_shard(&CustomerId::parse(&format!("c-{n}")).unwrap(), 3) as usize] += 1;
        }
        assert!(seen.iter().all(|&k| (900..=1100).contains(&k)), "{seen:?}");
    }

    #[test]
    fn masters_are_ordered_by_their_lowest_slot() {
        let map = three_masters();
        assert_eq!(map.masters(), ["a:1", "b:2", "c:3"]);
        assert_eq!(map.master_of(0), Some(0));
        assert_eq!(map.master_of(10923), Some(2));
    }

    #[test]
    fn with_as_many_shards_as_masters_each_master_gets_one_shard() {
        let map = three_masters();
        let p = place(&id(), 3, &map).unwrap();
        assert_eq!(p.salts.len(), 2);
        let masters: Vec<usize> = (0..3u32)
            .map(|i| {
                let salt = if i == 0 { 0 } else { p.salts[i as usize - 1] };
                map.master_of(key_slot(&shard_tag(&id(), i, salt))).unwrap()
            })
            .collect();
        assert_eq!(masters, p.masters);
        let mut sorted = masters.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2]);
        // Each salt is the smallest that works.
        for i in 1..3u32 {
            let salt = p.salts[i as usize - 1];
            for smaller in 0..salt {
                assert_ne!(
                    map.master_of(key_slot(&shard_tag(&id(), i, smaller))),
                    Some(p.masters[i as usize])
                );
            }
        }
        assert!(p
            .describe(&id())
            .starts_with(&format!("0:{}", key_slot("{shop/sale}"))));
    }

    #[test]
    fn more_shards_than_masters_are_dealt_round_robin() {
        let map = three_masters();
        let p = place(&id(), 1024, &map).unwrap();
        let mut per_master = [0; 3];
        for &m in &p.masters {
            per_master[m] += 1;
        }
        assert!(
            per_master.iter().all(|&k| k == 341 || k == 342),
            "{per_master:?}"
        );
        assert_eq!(place(&id(), 1, &map).unwrap().salts, Vec::<u32>::new());
        assert_eq!(place(&id(), 0, &map), Err(PlacementError::ShardCount(0)));
        assert_eq!(
            place(&id(), 1025, &map),
            Err(PlacementError::ShardCount(1025))
        );
        assert_eq!(
            place(&id(), 2, &SlotMap::new([])),
            Err(PlacementError::EmptySlotMap)
        );
    }
}
