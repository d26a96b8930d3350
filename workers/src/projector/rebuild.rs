//! `projector --rebuild`: every stream replayed from its start into fresh
//! read models, built aside and swapped in on a standalone Redis, or dropped
//! and replayed in place otherwise (see [`rebuild`]).

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use redis::aio::ConnectionLike;
use redis::Value;

use super::discovery;
use super::entries::{decode_in, entries_of, Decoded, RawEntry};
use super::metrics::{EventTypeLabels, ProjectorMetrics, SkipKindLabels};
use super::ProjectorError;
use crate::protocol::{self, Event, Phase, PromotionId, PROMOTION_INDEX_KEY};
use crate::read_model::{self, ReadModelError, ShardStream};
use crate::redis_connection::{RedisArgs, RedisConnection, RedisSetupError};

/// What a rebuild did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Read-model keys deleted: the old read models (after a swap) or the
    /// ones dropped before replaying in place.
    pub keys_dropped: u64,
    /// Streams replayed: one per unsharded promotion, one per shard of a
    /// sharded one.
    pub streams: usize,
    /// Events applied (every grant of a batch entry one, a stock move one),
    /// the catch-up after a swap included.
    pub applied: usize,
    pub skipped: usize,
    /// Built aside and swapped in: readers kept the old read models until
    /// the new ones were complete.
    pub swapped: bool,
    /// Events applied after the swap (appended while the rebuild ran).
    pub caught_up: usize,
}

/// Entries per XRANGE page of a rebuild (at least; `--batch-size` may ask
/// for more): large pages, few round trips.
pub const REBUILD_PAGE: usize = 2_000;

/// Streams a rebuild replays at the same time.
const REBUILD_STREAMS_AT_ONCE: usize = 4;

/// Pages of one stream a rebuild applies at the same time (while reading
/// the next one).
const REBUILD_PAGES_AT_ONCE: usize = 3;

/// Rebuilds the read models from every indexed stream, reading the streams
/// through `con`, and returns what it did. Safe while live projectors run:
/// every write is idempotent and order-tolerant.
///
/// With `scratch` (another logical database of a standalone server whose
/// read models have a database of their own, see `--rebuild-db`) the read
/// models are built there and swapped in with one SWAPDB, so readers keep
/// the old ones until the new ones are complete, a rebuild that dies halfway
/// leaves them untouched, and the old keys are freed after the replay, not
/// during it. What the streams received meanwhile (live projectors may have
/// applied it to the old read models only) is then replayed from where the
/// rebuild stopped, into the swapped-in ones; the old ones are dropped last.
///
/// Without it (a cluster, the read models sharing the streams' database, or
/// an ACL user denied SWAPDB) they are dropped in place, then replayed: one
/// FLUSHDB ASYNC of their own database, else key by key, found by SCAN on a
/// standalone server and from the streams on a cluster (where SCAN reaches
/// one node). Readers see them fill up meanwhile.
///
/// Fast because order does not matter to the read models: each stream is
/// read page after page (`page` entries per XRANGE) while the pages already
/// read are decoded and applied concurrently, several streams at once. The
/// active index of a promotion is written once, after its whole stream.
pub async fn rebuild(
    con: &mut RedisConnection,
    models: &mut RedisConnection,
    scratch: Option<&mut RedisConnection>,
    metrics: &ProjectorMetrics,
    page: usize,
) -> Result<RebuildReport, ProjectorError> {
    let page = page.max(1);
    let ids = indexed_streams(con).await?;
    let mut report = RebuildReport {
        streams: ids.len(),
        ..RebuildReport::default()
    };
    let scratch = match scratch {
        Some(s) => can_swap(con, models, s).await?.then_some(s),
        None => None,
    };
    if let Some(scratch) = scratch {
        // Both databases change hands: neither may hold anything else.
        read_model::ensure_only_read_models(models).await?;
        // Leftovers of a rebuild that died halfway.
        read_model::drop_database(scratch).await?;
        tracing::info!(
            streams = ids.len(),
            db = scratch.get_db(),
            "replaying aside"
        );
        let replayed = replay_all(con, scratch, metrics, page, &ids, &HashMap::new()).await?;
        read_model::mark_layout_complete(scratch).await?;
        read_model::swap_databases(models, scratch).await?;
        report.swapped = true;
        report.applied += replayed.applied;
        report.skipped += replayed.skipped;
        // Entries appended since each stream was read, and new streams.
        let ids = indexed_streams(con).await?;
        report.streams = ids.len();
        let caught = replay_all(con, models, metrics, page, &ids, &replayed.read_up_to).await?;
        report.caught_up = caught.applied;
        report.applied += caught.applied;
        report.skipped += caught.skipped;
        // The old read models, now in the scratch database.
        report.keys_dropped = read_model::drop_database(scratch).await?;
        return Ok(report);
    }
    report.keys_dropped = if models.other_database_than(con) {
        read_model::drop_database(models).await?
    } else if con.is_cluster() {
        // SCAN reaches one node of a cluster; the read-model keys that can
        // exist are known from the index and the streams instead.
        let keys = cluster_read_model_keys(con, &ids, page).await?;
        read_model::drop_keys(models, &keys).await?
    } else {
        read_model::drop_all_scanned(models).await?
    };
    tracing::info!(
        keys = report.keys_dropped,
        streams = ids.len(),
        "read models dropped; replaying"
    );
    let replayed = replay_all(con, models, metrics, page, &ids, &HashMap::new()).await?;
    read_model::mark_layout_complete(models).await?;
    report.applied = replayed.applied;
    report.skipped = replayed.skipped;
    Ok(report)
}

/// What [`upgrade_layout`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutUpgrade {
    /// The layout marker was there: nothing to do.
    Complete,
    /// No marker and no read model of any promotion: a fresh install (or
    /// read models that are gone); marked without replaying.
    Marked,
    /// Read models without the marker (written by a release before this
    /// layout): every stream was replayed into this layout beside them,
    /// then marked. `applied` entries.
    Replayed { applied: usize },
}

/// The upgrade from the version 1 read-model layout (a key per customer,
/// no layout marker), run by every projector before it projects: when the
/// marker [`protocol::read_model::LAYOUT`] is missing and a promotion's read
/// model exists, every stream is replayed from its start into the read
/// models in place (idempotent: the promotion hashes, the active set and
/// the progress keep their meaning and converge; the customers' coupons are
/// written into their buckets beside the version 1 keys), then the marker
/// is written. Until then query workers read the version 1 keys too, so no
/// customer sees less than before; `--rebuild` drops the version 1 keys
/// once no worker of the old release reads them (docs/RUNBOOK.md).
///
/// Several replicas starting at once each replay: more work, same result.
pub async fn upgrade_layout(
    con: &mut RedisConnection,
    models: &mut RedisConnection,
    page: usize,
) -> Result<LayoutUpgrade, ProjectorError> {
    if read_model::layout_complete(models).await? {
        return Ok(LayoutUpgrade::Complete);
    }
    let promotions = indexed_promotions(con).await?;
    let built = if promotions.is_empty() {
        Vec::new()
    } else {
        let exists = promotions
            .iter()
            .map(|id| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(protocol::read_model::promotion(id));
                cmd
            })
            .collect();
        models.query_each::<bool>(exists).await?
    };
    if !built.iter().any(|b| *b) {
        read_model::mark_layout_complete(models).await?;
        return Ok(LayoutUpgrade::Marked);
    }
    let ids = streams_of_promotions(con, &promotions).await?;
    tracing::warn!(
        streams = ids.len(),
        "the read models have no layout marker (written by an older release): replaying every stream into layout {} beside them",
        protocol::read_model::LAYOUT_VERSION
    );
    let replayed = replay_all(
        con,
        models,
        &ProjectorMetrics::unregistered(),
        page.max(1),
        &ids,
        &HashMap::new(),
    )
    .await?;
    read_model::mark_layout_complete(models).await?;
    tracing::info!(
        applied = replayed.applied,
        skipped = replayed.skipped,
        "read models upgraded to layout {}",
        protocol::read_model::LAYOUT_VERSION
    );
    Ok(LayoutUpgrade::Replayed {
        applied: replayed.applied,
    })
}

/// The database a rebuild builds aside in (`--rebuild-db`, by default the
/// read models' + 1); `None` on a cluster, which has database 0 only.
pub fn connect_rebuild_database(
    redis: &RedisArgs,
    rebuild_db: Option<i64>,
) -> Result<Option<RedisConnection>, RedisSetupError> {
    match redis.read_model_db() {
        Some(db) => redis.connect_database(rebuild_db.unwrap_or(db + 1)),
        None => Ok(None),
    }
}

/// One stream to replay: shard `stream.shard` of promotion `id`, key `key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReplayStream {
    id: PromotionId,
    stream: ShardStream,
    key: String,
}

/// Every stream of every promotion of the index: promotions sorted, each
/// promotion's streams in shard order.
async fn indexed_streams(con: &mut RedisConnection) -> Result<Vec<ReplayStream>, ProjectorError> {
    let ids = indexed_promotions(con).await?;
    streams_of_promotions(con, &ids).await
}

/// The streams of `ids`, found through their shard maps as they are now
/// ([`discovery::locked_map`]; an unstarted promotion's other shards are
/// empty, so reading a map that may still be replanned costs nothing).
async fn streams_of_promotions(
    con: &RedisConnection,
    ids: &[PromotionId],
) -> Result<Vec<ReplayStream>, ProjectorError> {
    let maps = discovery::locked_maps_of(con, ids).await?;
    Ok(maps
        .iter()
        .flat_map(|map| {
            discovery::streams_of(map)
                .into_iter()
                .map(|(stream, key)| ReplayStream {
                    id: map.id().clone(),
                    stream,
                    key,
                })
        })
        .collect())
}

/// Every promotion of the index, sorted.
async fn indexed_promotions(con: &mut RedisConnection) -> Result<Vec<PromotionId>, ProjectorError> {
    let mut raw_ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(PROMOTION_INDEX_KEY)
        .query_async(con)
        .await?;
    raw_ids.sort();
    Ok(raw_ids
        .iter()
        .filter_map(|r| PromotionId::parse(r).ok())
        .collect())
}

/// Whether a rebuild can build in `scratch` and swap it in: a database of
/// its own (neither the streams' nor the read models', which must have
/// their own too), and a user allowed SWAPDB. Anything else but the ACL
/// refusal is a misconfiguration worth stopping for.
async fn can_swap(
    con: &RedisConnection,
    models: &RedisConnection,
    scratch: &mut RedisConnection,
) -> Result<bool, ProjectorError> {
    if !models.other_database_than(con) {
        return Ok(false);
    }
    if !scratch.other_database_than(con) || !scratch.other_database_than(models) {
        return Err(ProjectorError::RebuildDatabase(scratch.get_db()));
    }
    if !read_model::may_swap_databases(scratch).await? {
        tracing::warn!("SWAPDB is not allowed; rebuilding the read models in place");
        return Ok(false);
    }
    Ok(true)
}

/// Totals of replaying several streams.
#[derive(Default)]
struct Replayed {
    applied: usize,
    skipped: usize,
    /// Per stream, the last entry id read.
    read_up_to: HashMap<ReplayStream, String>,
}

/// Replays the streams `ids` into `models`, each after the entry id
/// `after` holds for it (from the start when none), several at once.
async fn replay_all(
    con: &RedisConnection,
    models: &RedisConnection,
    metrics: &ProjectorMetrics,
    page: usize,
    ids: &[ReplayStream],
    after: &HashMap<ReplayStream, String>,
) -> Result<Replayed, ProjectorError> {
    // Built before they are polled, so that no borrowing closure is held
    // across an await (the projector's task must be Send).
    let replays: Vec<_> = ids
        .iter()
        .map(|id| {
            let (con, models) = (con.clone(), models.clone());
            let (metrics, id) = (metrics.clone(), id.clone());
            let from = after.get(&id).cloned();
            async move {
                let done = replay_stream(con, models, metrics, id.clone(), page, from).await?;
                Ok::<_, ProjectorError>((id, done))
            }
        })
        .collect();
    let replays = futures::stream::iter(replays).buffer_unordered(REBUILD_STREAMS_AT_ONCE);
    let totals: Vec<(ReplayStream, StreamReplayed)> = replays.try_collect().await?;
    let mut out = Replayed::default();
    for (id, done) in totals {
        out.applied += done.applied;
        out.skipped += done.skipped;
        if let Some(last) = done.last_read {
            out.read_up_to.insert(id, last);
        }
    }
    Ok(out)
}

/// One XRANGE page of `stream` after `after` (`None`: from the start).
async fn read_page(
    con: &mut RedisConnection,
    stream: &str,
    after: Option<&str>,
    page: usize,
) -> Result<Vec<RawEntry>, ProjectorError> {
    let from = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let answer: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(from)
        .arg("+")
        .arg("COUNT")
        .arg(page)
        .query_async(con)
        .await?;
    Ok(entries_of(answer)?)
}

/// What replaying one stream did.
struct StreamReplayed {
    applied: usize,
    skipped: usize,
    /// The last entry id read (the `after` given when nothing was).
    last_read: Option<String>,
}

/// Replays one stream, after entry `after` (`None`: from the start).
async fn replay_stream(
    con: RedisConnection,
    models: RedisConnection,
    metrics: ProjectorMetrics,
    replay: ReplayStream,
    page: usize,
    after: Option<String>,
) -> Result<StreamReplayed, ProjectorError> {
    let ReplayStream {
        id,
        stream: shard,
        key: stream,
    } = replay;
    let mut applying: tokio::task::JoinSet<Result<PageApplied, ProjectorError>> =
        tokio::task::JoinSet::new();
    let (mut applied, mut skipped, mut phase) = (0, 0, None::<Phase>);
    let mut collect = |r: Result<Result<PageApplied, ProjectorError>, tokio::task::JoinError>|
     -> Result<(), ProjectorError> {
        let page = r.map_err(|e| {
            ProjectorError::ReadModel(ReadModelError::BadData(format!("replay task: {e}")))
        })??;
        applied += page.applied;
        skipped += page.skipped;
        phase = phase.max(page.phase);
        Ok(())
    };
    let mut reader = con;
    let mut after = after;
    loop {
        let entries = read_page(&mut reader, &stream, after.as_deref(), page).await?;
        let Some(last) = entries.last() else { break };
        after = Some(last.id.clone());
        let full = entries.len() >= page;
        while applying.len() >= REBUILD_PAGES_AT_ONCE {
            if let Some(r) = applying.join_next().await {
                collect(r)?;
            }
        }
        let (mut models, metrics, id) = (models.clone(), metrics.clone(), id.clone());
        applying.spawn(async move { apply_page(&mut models, &metrics, &id, shard, entries).await });
        if !full {
            break;
        }
    }
    while let Some(r) = applying.join_next().await {
        collect(r)?;
    }
    if let Some(phase) = phase {
        let mut models = models;
        read_model::index_phase(&mut models, &id, phase).await?;
    }
    Ok(StreamReplayed {
        applied,
        skipped,
        last_read: after,
    })
}

/// What applying one rebuild page did.
struct PageApplied {
    applied: usize,
    skipped: usize,
    /// The phase the promotion's read model answered.
    phase: Option<Phase>,
}

/// Decodes and applies one rebuild page of `stream`.
async fn apply_page(
    con: &mut RedisConnection,
    metrics: &ProjectorMetrics,
    id: &PromotionId,
    stream: ShardStream,
    entries: Vec<RawEntry>,
) -> Result<PageApplied, ProjectorError> {
    let mut events = Vec::with_capacity(entries.len());
    let mut skipped = 0;
    let mut moves = 0;
    for entry in &entries {
        match decode_in(id, stream, entry) {
            Ok(Decoded::Events(e)) => events.extend(e),
            Ok(Decoded::StockMove(kind)) => {
                moves += 1;
                metrics
                    .applied
                    .get_or_create(&EventTypeLabels { r#type: kind })
                    .inc();
            }
            Err(reason) => {
                skipped += 1;
                metrics
                    .decode_failures
                    .get_or_create(&SkipKindLabels {
                        kind: reason.kind(),
                    })
                    .inc();
                tracing::warn!(promotion = %id, entry = %entry.id, error = %reason,
                    "rebuild skips an entry it cannot apply");
            }
        }
    }
    drop(entries);
    let phase = read_model::apply_stream_to_models(con, id, stream, &events).await?;
    for e in &events {
        metrics
            .applied
            .get_or_create(&EventTypeLabels {
                r#type: e.type_name(),
            })
            .inc();
    }
    Ok(PageApplied {
        applied: events.len() + moves,
        skipped,
        phase,
    })
}

/// Every read-model key that can exist in a cluster: the fixed ones, one per
/// indexed promotion, the bucket of every customer seen in a stream (and its
/// version 1 key, left by an upgrade).
async fn cluster_read_model_keys(
    con: &mut RedisConnection,
    ids: &[ReplayStream],
    page: usize,
) -> Result<Vec<String>, ProjectorError> {
    let mut keys: HashSet<String> = [
        protocol::read_model::ACTIVE.to_owned(),
        protocol::read_model::PROGRESS.to_owned(),
        protocol::read_model::LAYOUT.to_owned(),
    ]
    .into_iter()
    .collect();
    for ReplayStream {
        id,
        stream: shard,
        key: stream,
    } in ids
    {
        keys.insert(protocol::read_model::promotion(id));
        let mut after: Option<String> = None;
        loop {
            let entries = read_page(con, stream, after.as_deref(), page).await?;
            let Some(last) = entries.last() else { break };
            after = Some(last.id.clone());
            for entry in &entries {
                let Ok(Decoded::Events(events)) = decode_in(id, *shard, entry) else {
                    continue;
                };
                for event in events {
                    let Event::CouponGrabbed(g) = event else {
                        continue;
                    };
                    if let Ok(c) = protocol::CustomerId::parse(&g.customer_id) {
                        keys.insert(protocol::read_model::customer_coupons(&c));
                        keys.insert(protocol::read_model::legacy_customer_coupons(&c));
                    }
                }
            }
            if entries.len() < page {
                break;
            }
        }
    }
    Ok(keys.into_iter().collect())
}
