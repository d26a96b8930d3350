//! A private Redis Cluster for tests, benchmarks and fault drills: N masters
//! and R replicas per master, each a [`RedisServer`] child process with
//! `cluster-enabled yes` on free loopback ports, joined by
//! `redis-cli --cluster create`. Nodes can be killed, paused and restarted one
//! by one, and the fixture answers which node serves the slot of a key, so a
//! test can fail over exactly the master that holds a promotion.
//!
//! Each node gets an explicit `cluster-port` (the cluster bus), because the
//! default `port + 10000` is out of range for most ephemeral ports.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use seckill_workers::protocol::placement::SlotMap;
use seckill_workers::redis_connection::{RedisArgs, RedisConnection};
use seckill_workers::redis_server::{
    free_port, Fsync, RedisServer, RedisServerError, RedisServerOptions,
};

use crate::eventually::eventually_blocking;

/// Why the cluster could not be started or asked.
#[derive(Debug, thiserror::Error)]
pub enum RedisClusterError {
    #[error("cluster node: {0}")]
    Server(#[from] RedisServerError),
    #[error("could not run redis-cli: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-cli --cluster create failed: {0}")]
    Create(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cluster not ready within {waited:?}: {detail}")]
    NotReady { waited: Duration, detail: String },
    #[error("no live node answers")]
    NoLiveNode,
    #[error("slot {0} is served by no known master")]
    SlotUnserved(u16),
}

/// How to build the cluster.
#[derive(Debug, Clone)]
pub struct RedisClusterOptions {
    pub masters: usize,
    pub replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a master may be unreachable before
    /// its replica is promoted. Short in tests so failover takes ~1-2 s.
    pub node_timeout: Duration,
    /// AOF policy of every node (`None`: AOF off).
    pub appendfsync: Option<Fsync>,
    /// Further `--name value` arguments for every node.
    pub extra: Vec<(String, String)>,
}

impl Default for RedisClusterOptions {
    fn default() -> Self {
        Self {
            masters: 3,
            replicas_per_master: 0,
            node_timeout: Duration::from_millis(1000),
            appendfsync: None,
            extra: Vec::new(),
        }
    }
}

/// How many times [`RedisCluster::start`] creates a cluster on fresh ports.
const CREATE_ATTEMPTS: usize = 3;

/// How long `redis-cli --cluster create` may take (it normally takes about a
/// second).
const CREATE_WITHIN: Duration = Duration::from_secs(60);

/// A running cluster; every node is killed when dropped.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
}

/// What `CLUSTER SLOTS` says serves one slot range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    /// `host:port` of the master.
    pub master: String,
    /// `host:port` of its replicas.
    pub replicas: Vec<String>,
}

fn address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn connect(port: u16, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The cluster most tests want: `masters` masters with `replicas` replicas
/// each, a short failover timeout, and `appendfsync always` on every node
/// when there are replicas (a failover test then loses only what it means
/// to lose).
pub fn cluster(masters: usize, replicas: usize) -> RedisCluster {
    RedisCluster::start(RedisClusterOptions {
        masters,
        replicas_per_master: replicas,
        appendfsync: (replicas > 0).then_some(Fsync::Always),
        ..RedisClusterOptions::default()
    })
    .expect("redis cluster starts")
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok`, knows every other node, and every replica's link
    /// to its master is up.
    ///
    /// Each node's ports are found free and released before the node binds
    /// them, so on a machine where other tests start servers at the same
    /// time a port can be taken in between, and the nodes then never meet
    /// (`redis-cli --cluster create` waits for them forever). Creation is
    /// therefore bounded, and retried on fresh ports a few times.
    pub fn start(options: RedisClusterOptions) -> Result<Self, RedisClusterError> {
        let mut last = None;
        for _ in 0..CREATE_ATTEMPTS {
            match Self::try_start(&options) {
                Ok(cluster) => return Ok(cluster),
                Err(e @ (RedisClusterError::NotReady { .. } | RedisClusterError::Create(_))) => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(RedisClusterError::NoLiveNode))
    }

    fn try_start(options: &RedisClusterOptions) -> Result<Self, RedisClusterError> {
        let total = options.masters * (1 + options.replicas_per_master);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            let mut extra = vec![
                ("cluster-enabled".to_owned(), "yes".to_owned()),
                ("cluster-config-file".to_owned(), "nodes.conf".to_owned()),
                (
                    "cluster-node-timeout".to_owned(),
                    options.node_timeout.as_millis().to_string(),
                ),
                ("cluster-port".to_owned(), free_port()?.to_string()),
                // A replica of a master that died long ago still fails over:
                // tests decide what is lost, not a staleness heuristic.
                ("cluster-replica-validity-factor".to_owned(), "0".to_owned()),
            ];
            extra.extend(options.extra.iter().cloned());
            nodes.push(RedisServer::start(RedisServerOptions {
                appendfsync: options.appendfsync,
                dir: None,
                extra,
                ..RedisServerOptions::default()
            })?);
        }
        let cluster = Self {
            nodes,
            masters: options.masters,
        };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(address(n.port()));
        }
        create
            .arg("--cluster-replicas")
            .arg(options.replicas_per_master.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = create.spawn()?;
        // Ok(Some(status)) once it exited, Ok(None) when it could not be
        // asked, Err while it is still running.
        let exited = eventually_blocking(CREATE_WITHIN, || match child.try_wait() {
            Ok(None) => Err(()),
            Ok(status) => Ok(status),
            Err(_) => Ok(None),
        });
        let succeeded = matches!(exited, Ok(Some(status)) if status.success());
        if exited.is_err() {
            let _ = child.kill();
        }
        let out = child.wait_with_output()?;
        if !succeeded {
            return Err(RedisClusterError::Create(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        cluster.wait_until_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every live node is `cluster_state:ok` with every slot
    /// assigned, all agree on the slot map (masters and replicas), as many
    /// masters serve slots as the cluster was made with, and every other live
    /// node is a replica whose link to its master is up.
    pub fn wait_until_ready(&self, waited: Duration) -> Result<(), RedisClusterError> {
        eventually_blocking(waited, || self.readiness())
            .map_err(|detail| RedisClusterError::NotReady { waited, detail })
    }

    fn readiness(&self) -> Result<(), String> {
        let mut views = BTreeSet::new();
        let live = self.live_ports();
        let mut replicas = 0;
        for &port in &live {
            let mut con =
                connect(port, Duration::from_secs(1)).map_err(|e| format!("{port}: {e}"))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut con)
                .map_err(|e| format!("{port}: {e}"))?;
            if info_field(&info, "cluster_state").as_deref() != Some("ok") {
                return Err(format!("{port}: cluster_state not ok"));
            }
            if info_field(&info, "cluster_slots_ok").as_deref() != Some("16384") {
                return Err(format!("{port}: not every slot ok"));
            }
            let repl: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut con)
                .map_err(|e| format!("{port}: {e}"))?;
            if info_field(&repl, "role").as_deref() == Some("slave") {
                if info_field(&repl, "master_link_status").as_deref() != Some("up") {
                    return Err(format!("{port}: replica link down"));
                }
                replicas += 1;
            }
            let ranges = slot_ranges(&mut con).map_err(|e| format!("{port}: {e}"))?;
            views.insert(format!("{ranges:?}"));
        }
        if views.len() > 1 {
            return Err(format!("nodes disagree on the slot map: {views:?}"));
        }
        if live.len() - replicas != self.masters {
            return Err(format!(
                "{} of {} live nodes are replicas; want {} masters",
                replicas,
                live.len(),
                self.masters
            ));
        }
        Ok(())
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(|n| n.port())
            .collect()
    }

    /// `host:port` of every node, for `--redis-cluster-nodes`.
    pub fn seed_nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| address(n.port())).collect()
    }

    /// A connection to the cluster the way the components open one.
    pub fn connect(&self) -> RedisConnection {
        RedisArgs::for_cluster(self.seed_nodes())
            .connect()
            .expect("cluster connection")
    }

    /// The node processes, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Index of the node listening on `host:port`.
    pub fn node_index(&self, address: &str) -> Option<usize> {
        let port: u16 = address.rsplit(':').next()?.parse().ok()?;
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// kill -9 node `i`: no shutdown, no final fsync.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGSTOP node `i`; its peers see it as unreachable.
    pub fn pause(&self, i: usize) {
        self.nodes[i].pause();
    }

    /// Cuts the replication of the master at `master` (an address): SIGSTOPs
    /// its replica, node `replica`, and drops the master's replica links, so
    /// the master goes on acknowledging writes no replica has (what a
    /// failover then loses).
    pub fn cut_replication(&self, master: &str, replica: usize) -> Result<(), RedisClusterError> {
        self.pause(replica);
        let mut con = redis::Client::open(format!("redis://{master}/"))?.get_connection()?;
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query::<()>(&mut con)?;
        Ok(())
    }

    /// SIGCONT node `i`.
    pub fn resume(&self, i: usize) {
        self.nodes[i].resume();
    }

    /// Starts node `i` again on its port and data directory; it rejoins with
    /// its `nodes.conf` (a former master comes back as a replica).
    pub fn restart(&mut self, i: usize) -> Result<(), RedisClusterError> {
        self.nodes[i].restart()?;
        Ok(())
    }

    /// A synchronous connection to the first live node that answers.
    fn any_node(&self) -> Result<redis::Connection, RedisClusterError> {
        for port in self.live_ports() {
            if let Ok(con) = connect(port, Duration::from_millis(500)) {
                return Ok(con);
            }
        }
        Err(RedisClusterError::NoLiveNode)
    }

    /// The slot of `key`, as the server computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> Result<u16, RedisClusterError> {
        let mut con = self.any_node()?;
        Ok(redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)?)
    }

    /// The slot map as a live node sees it (`CLUSTER SLOTS`).
    pub fn slot_map(&self) -> Result<Vec<SlotRange>, RedisClusterError> {
        let mut con = self.any_node()?;
        Ok(slot_ranges(&mut con)?)
    }

    /// The slot map as `protocol::placement` places shards on it: every
    /// range with its master.
    pub fn placement_slots(&self) -> Result<SlotMap, RedisClusterError> {
        Ok(SlotMap::new(
            self.slot_map()?
                .into_iter()
                .map(|r| (r.start, r.end, r.master)),
        ))
    }

    /// `host:port` of the master serving `slot`.
    pub fn master_for_slot(&self, slot: u16) -> Result<String, RedisClusterError> {
        self.slot_map()?
            .into_iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .map(|r| r.master)
            .ok_or(RedisClusterError::SlotUnserved(slot))
    }

    /// `host:port` of the master serving the slot of `key`.
    pub fn master_for_key(&self, key: &str) -> Result<String, RedisClusterError> {
        self.master_for_slot(self.keyslot(key)?)
    }

    /// Moves `slot` with its keys to the master at `to` (`SETSLOT
    /// IMPORTING/MIGRATING`, `MIGRATE`, `SETSLOT NODE`), as a resharding
    /// does: clients of the old owner get ASK while it runs and MOVED after.
    pub fn move_slot(&self, slot: u16, to: &str) -> Result<(), RedisClusterError> {
        let from = self.master_for_slot(slot)?;
        if from == to {
            return Ok(());
        }
        let port = |a: &str| -> u16 {
            a.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        let timeout = Duration::from_secs(5);
        let mut src = connect(port(&from), timeout)?;
        let mut dst = connect(port(to), timeout)?;
        let src_id: String = redis::cmd("CLUSTER").arg("MYID").query(&mut src)?;
        let dst_id: String = redis::cmd("CLUSTER").arg("MYID").query(&mut dst)?;
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&src_id)
            .exec(&mut dst)?;
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&dst_id)
            .exec(&mut src)?;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)?;
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(port(to))
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut src)?;
        }
        // The new owner first, then the old, then everyone else.
        let mut order = vec![port(to), port(&from)];
        let first = [port(to), port(&from)];
        order.extend(self.live_ports().into_iter().filter(|p| !first.contains(p)));
        for p in order {
            let mut con = connect(p, timeout)?;
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&dst_id)
                .exec(&mut con)?;
        }
        Ok(())
    }

    /// Waits until a live node other than `old_master` serves `slot` and the
    /// cluster is ready again (after a kill or pause of `old_master`).
    pub fn wait_for_failover(
        &self,
        slot: u16,
        old_master: &str,
        waited: Duration,
    ) -> Result<String, RedisClusterError> {
        eventually_blocking(waited, || {
            let master = self.master_for_slot(slot).map_err(|e| e.to_string())?;
            if master == old_master {
                return Err(format!("slot {slot} still on {old_master}"));
            }
            self.readiness()?;
            Ok(master)
        })
        .map_err(|detail| RedisClusterError::NotReady { waited, detail })
    }
}

/// The slot map from `CLUSTER NODES`. (`CLUSTER SLOTS` would be simpler, but
/// Redis 7.0 leaves out replicas whose replication offset is still 0, which
/// every replica of a cluster that has not yet been written to is.) A failed
/// master keeps its slots here until a replica is promoted; failed replicas
/// are left out.
fn slot_ranges(con: &mut redis::Connection) -> redis::RedisResult<Vec<SlotRange>> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(con)?;
    // Line: id addr flags master-id ping pong epoch link slot...
    let mut address_of = std::collections::HashMap::new();
    let mut replicas_of: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    let mut owned = Vec::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // ip:port@cport[,hostname] -> ip:port
        let addr = f[1].split('@').next().unwrap_or(f[1]).to_owned();
        address_of.insert(f[0].to_owned(), addr.clone());
        let flags: Vec<&str> = f[2].split(',').collect();
        if flags.contains(&"slave") {
            if !flags.contains(&"fail") {
                replicas_of.entry(f[3].to_owned()).or_default().push(addr);
            }
            continue;
        }
        for slots in &f[8..] {
            if slots.starts_with('[') {
                continue; // migrating or importing
            }
            let (start, end) = match slots.split_once('-') {
                Some((a, b)) => (a.parse(), b.parse()),
                None => (slots.parse(), slots.parse()),
            };
            if let (Ok(start), Ok(end)) = (start, end) {
                owned.push((start, end, f[0].to_owned()));
            }
        }
    }
    let mut ranges: Vec<SlotRange> = owned
        .into_iter()
        .map(|(start, end, id)| {
            let mut replicas = replicas_of.get(&id).cloned().unwrap_or_default();
            replicas.sort();
            SlotRange {
                start,
                end,
                master: address_of.get(&id).cloned().unwrap_or_default(),
                replicas,
            }
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    Ok(ranges)
}
