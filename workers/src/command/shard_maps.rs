//! The shard map of every promotion this worker grabs for (issue 14), read
//! once and kept: a grab must know S to pick its lane (its home shard), and
//! a map is immutable once its promotion has started, so one HMGET per
//! promotion per worker is all it costs. An unsharded promotion (no map,
//! S = 1) costs the hot path one lookup here and nothing else.
//!
//! A map can still change before the start (the operator replans), so a
//! cached one is dropped ([`ShardMaps::forget`]) whenever Redis says it is
//! wrong: a shard refusing the caller's S (`stale_map`), the unsharded grab
//! meeting a sharded promotion, or a promotion answered unknown (which also
//! keeps names that do not exist from piling up here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;
use redis::aio::ConnectionLike;
use tokio::sync::OnceCell;

use super::group_commit::Home;
use crate::metrics::CommandMetrics;
use crate::protocol::shards::{self, ShardError, ShardMap, SoldOutGate, StockView};
use crate::protocol::{CustomerId, PromotionId};

/// Bound on remembered maps, so that grabs of random names (each one is
/// read before Redis says it is unknown) cannot grow the worker's memory
/// without limit. Past it the cache starts over: every promotion's map is
/// read once more.
pub const MAX_REMEMBERED_MAPS: usize = 10_000;

/// How a promotion's grabs reach Redis.
#[derive(Debug, Clone)]
pub enum Route {
    /// No shard map: the unsharded grab, one lane.
    Unsharded,
    Sharded(Arc<Sharded>),
}

impl Route {
    /// The lane of `customer`: their home shard.
    pub fn home(&self, customer: &CustomerId) -> Home {
        match self {
            Route::Unsharded => Home::UNSHARDED,
            Route::Sharded(s) => Home {
                shards: s.map.shards(),
                shard: s.map.home(customer),
            },
        }
    }
}

/// A sharded promotion as this worker serves it: its map, and the last
/// stock it saw on each shard (where a refill looks for a donor), shared by
/// the promotion's lanes, as is their sold-out check (one at a time per
/// worker and promotion, see [`SoldOutGate`]).
#[derive(Debug)]
pub struct Sharded {
    pub map: ShardMap,
    view: Mutex<StockView>,
    /// Where its batches' stock moves are counted and timed.
    pub(crate) metrics: Option<CommandMetrics>,
}

impl Sharded {
    /// `map`'s promotion, whose finishes wait up to `skew_wait` for shard
    /// 0's clock ([`shards::FINISH_SKEW_WAIT`]).
    pub fn new(map: ShardMap, skew_wait: Duration) -> Self {
        let view = StockView::new(map.shards())
            .sharing_checks(Arc::new(SoldOutGate::default()))
            .waiting_for_skew(skew_wait);
        let view = Mutex::new(view);
        Self {
            map,
            view,
            metrics: None,
        }
    }

    /// A copy of the shared view for one batch: the lock is never held
    /// across a Redis call, so the lanes of one promotion never wait for
    /// each other.
    pub fn view(&self) -> StockView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records in the shared view what a batch saw: the shards whose stock
    /// differs from the copy it started from (`before`). Another lane's
    /// newer sighting of a shard this batch did not see is kept.
    pub fn saw(&self, before: &StockView, after: &StockView) {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        for shard in 0..self.map.shards() {
            match after.stock(shard) {
                Some(stock) if after.stock(shard) != before.stock(shard) => view.saw(shard, stock),
                _ => {}
            }
        }
    }
}

/// The maps of the promotions this worker has grabbed for.
#[derive(Debug)]
pub struct ShardMaps {
    /// One cell per promotion: concurrent first grabs of a promotion wait
    /// for one read of its map instead of each reading it.
    routes: RwLock<HashMap<PromotionId, Arc<OnceCell<Route>>, RandomState>>,
    /// How long a sharded promotion's finish waits for shard 0's clock.
    skew_wait: Duration,
    metrics: Option<CommandMetrics>,
}

impl Default for ShardMaps {
    fn default() -> Self {
        Self::new(shards::FINISH_SKEW_WAIT)
    }
}

impl ShardMaps {
    /// No map known yet; sharded promotions' finishes wait up to
    /// `skew_wait` for shard 0's clock (`--finish-skew-wait-ms`).
    pub fn new(skew_wait: Duration) -> Self {
        Self {
            routes: RwLock::default(),
            skew_wait,
            metrics: None,
        }
    }

    /// The sharded promotions' stock moves are counted and timed in
    /// `metrics`.
    pub fn observed(mut self, metrics: CommandMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The route of `id`, if its map is known.
    pub fn cached(&self, id: &PromotionId) -> Option<Route> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(id)?.get().cloned()
    }

    /// The route of `id`: from memory, else its map read from Redis (one
    /// read however many grabs ask at once). A map not ready yet is an
    /// error and is not remembered.
    pub async fn route<C: ConnectionLike>(
        &self,
        con: &mut C,
        id: &PromotionId,
    ) -> Result<Route, ShardError> {
        if let Some(route) = self.cached(id) {
            return Ok(route);
        }
        let cell = {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            if routes.len() >= MAX_REMEMBERED_MAPS && !routes.contains_key(id) {
                routes.clear();
            }
            routes.entry(id.clone()).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            let map = shards::load_map(con, id).await?;
            Ok::<_, ShardError>(if map.is_sharded() {
                let mut sharded = Sharded::new(map, self.skew_wait);
                sharded.metrics = self.metrics.clone();
                Route::Sharded(Arc::new(sharded))
            } else {
                Route::Unsharded
            })
        })
        .await
        .cloned()
    }

    /// Drops what is known of `id`'s map: the next grab reads it again.
    pub fn forget(&self, id: &PromotionId) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes.remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> PromotionId {
        PromotionId::new("shop", name).unwrap()
    }

    fn customer(s: &str) -> CustomerId {
        CustomerId::parse(s).unwrap()
    }

    #[test]
    fn an_unsharded_promotion_has_one_lane_and_a_sharded_one_a_lane_per_home_shard() {
        let alice = customer("alice");
        assert_eq!(Route::Unsharded.home(&alice), Home::UNSHARDED);
        let map = ShardMap::new(&id("sale"), &[4, 9]);
        let home = map.home(&alice);
        let route = Route::Sharded(Arc::new(Sharded::new(map, shards::FINISH_SKEW_WAIT)));
        assert_eq!(
            route.home(&alice),
            Home {
                shards: 3,
                shard: home
            }
        );
        let homes: std::collections::BTreeSet<u32> = (0..60)
            .map(|i| route.home(&customer(&format!("c{i}"))).shard)
            .collect();
        assert_eq!(homes, [0, 1, 2].into(), "customers spread over every shard");
    }

    #[test]
    fn a_batch_merges_back_only_the_shards_it_saw_change() {
        let sharded = Sharded::new(
            ShardMap::new(&id("sale"), &[4, 9]),
            shards::FINISH_SKEW_WAIT,
        );
        let before = sharded.view();
        // Another lane sees shard 2 with 7 left meanwhile.
        let mut other = sharded.view();
        other.saw(2, 7);
        sharded.saw(&before, &other);
        // This batch saw shard 0 empty and shard 1 with 5.
        let mut mine = before.clone();
        mine.saw(0, 0);
        mine.saw(1, 5);
        sharded.saw(&before, &mine);
        let view = sharded.view();
        assert_eq!(
            (view.stock(0), view.stock(1), view.stock(2)),
            (Some(0), Some(5), Some(7)),
            "each lane's sighting kept"
        );
    }

    /// A connection that answers every command `reply`, counting them.
    struct Scripted {
        reply: Option<redis::Value>,
        calls: usize,
    }

    impl ConnectionLike for Scripted {
        fn req_packed_command<'a>(
            &'a mut self,
            _: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, redis::Value> {
            self.calls += 1;
            let reply = self.reply.clone().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Io, "no Redis behind this"))
            });
            Box::pin(async move { reply })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    #[tokio::test]
    async fn a_map_is_read_once_a_failed_read_is_not_kept_and_a_forgotten_one_is_read_again() {
        let maps = ShardMaps::default();
        let mut down = Scripted {
            reply: None,
            calls: 0,
        };
        assert!(maps.route(&mut down, &id("a")).await.is_err());
        assert!(maps.cached(&id("a")).is_none(), "a failure is not kept");
        let absent = redis::Value::Array(vec![redis::Value::Nil; 3]);
        let mut up = Scripted {
            reply: Some(absent),
            calls: 0,
        };
        for _ in 0..3 {
            assert!(matches!(
                maps.route(&mut up, &id("a")).await,
                Ok(Route::Unsharded)
            ));
        }
        assert_eq!(up.calls, 1, "read once");
        maps.forget(&id("a"));
        assert!(maps.cached(&id("a")).is_none());
        maps.route(&mut up, &id("a")).await.unwrap();
        assert_eq!(up.calls, 2, "read again once forgotten");
    }

    #[tokio::test]
    async fn remembered_maps_are_bounded() {
        let maps = ShardMaps::default();
        let absent = redis::Value::Array(vec![redis::Value::Nil; 3]);
        let mut up = Scripted {
            reply: Some(absent),
            calls: 0,
        };
        for i in 0..MAX_REMEMBERED_MAPS + 5 {
            maps.route(&mut up, &id(&format!("p{i}"))).await.unwrap();
        }
        assert_eq!(maps.len(), 5, "past the bound the cache started over");
    }
}
