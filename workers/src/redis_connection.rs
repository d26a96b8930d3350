//! How every component reaches Redis: one standalone server (`--redis-url`,
//! `redis://` or `rediss://` for TLS) or a Redis Cluster
//! (`--redis-cluster-nodes`), with the same password, ACL user, CA and timeout
//! settings. Connections are lazy and reconnect by themselves, so a component
//! starts (and reports not-ready) while Redis is down, and recovers when it is
//! back, without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value};

use crate::protocol::Durability;

/// Flags of durable writes on replicated Redis (see
/// `protocol::durability`), shared by the command workers, the operator and
/// `seckill up`: a write that someone builds on is taken as done only once
/// replicas hold it, so a failover cannot lose it.
#[derive(clap::Args, Debug, Clone)]
pub struct DurableArgs {
    /// Answer a grant 200 only once this many replicas of the promotion's
    /// master hold it (Redis WAIT), and take a sharded promotion's step
    /// that another shard's step builds on only once they hold the one
    /// before it. A grant not confirmed in time is answered 503 and its
    /// retry returns the same coupon. Use the number of replicas per master
    /// (a failover may elect any of them). 0 = plain grabs; sharded
    /// promotions are then refused unless
    /// --shards-without-replicas-needs-fsync-always (operator, seckill up).
    #[arg(long, env = "SECKILL_DURABLE_REPLICAS", default_value_t = 0)]
    pub durable_replicas: u32,

    /// Longest wait for those replicas, in milliseconds; must be below
    /// --redis-timeout-ms.
    #[arg(long, env = "SECKILL_DURABLE_TIMEOUT_MS", default_value_t = 200)]
    pub durable_timeout_ms: u64,
}

/// The replica wait does not fit in the Redis response timeout: every
/// pipeline would be abandoned before `WAIT` answers.
#[derive(Debug, thiserror::Error)]
#[error(
    "--durable-timeout-ms {durable_ms} must be below --redis-timeout-ms {redis_ms}: \
     the replica wait has to fit in the Redis response timeout"
)]
pub struct DurableTimeoutError {
    pub durable_ms: u64,
    pub redis_ms: u64,
}

impl DurableArgs {
    /// The durability asked for, `None` for plain writes.
    pub fn durability(
        &self,
        redis_timeout: Duration,
    ) -> Result<Option<Durability>, DurableTimeoutError> {
        if self.durable_replicas == 0 {
            return Ok(None);
        }
        let timeout = Duration::from_millis(self.durable_timeout_ms.max(1));
        if timeout >= redis_timeout {
            return Err(DurableTimeoutError {
                durable_ms: self.durable_timeout_ms,
                redis_ms: redis_timeout.as_millis() as u64,
            });
        }
        Ok(Some(Durability {
            replicas: self.durable_replicas,
            timeout,
        }))
    }
}

/// Redis flags shared by every binary.
#[derive(clap::Args, Debug, Clone)]
pub struct RedisArgs {
    /// Standalone Redis: redis://[user:password@]host:port/[db], or rediss:// for TLS.
    // The line above is also the flag's --help text, so it keeps the URL's
    // usual spelling rather than rustdoc's escapes.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, env = "SECKILL_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster seed nodes, host:port,host:port,... (instead of --redis-url).
    #[arg(
        long,
        env = "SECKILL_REDIS_CLUSTER_NODES",
        value_delimiter = ',',
        conflicts_with = "redis_url"
    )]
    pub redis_cluster_nodes: Vec<String>,

    /// ACL user name (overrides one in the URL).
    #[arg(long, env = "SECKILL_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Password (overrides one in the URL); prefer the environment variable.
    #[arg(long, env = "SECKILL_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Connect with TLS to the cluster nodes (for --redis-url use rediss://).
    #[arg(long, env = "SECKILL_REDIS_TLS")]
    pub redis_tls: bool,

    /// PEM file of the CA that signed the Redis server certificate (TLS).
    #[arg(long, env = "SECKILL_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,

    /// Bound on every Redis command, in milliseconds; past it a request fails
    /// with 503 instead of hanging.
    #[arg(long, env = "SECKILL_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// Logical database of the read models on a standalone Redis [default: 1].
    /// A database of their own keeps them apart from the event streams and lets
    /// `projector --rebuild` build new ones aside and swap them in (SWAPDB),
    /// so give it to nothing else; the URL's database instead shares the
    /// keyspace (the rebuild then works in place, key by key). A Redis Cluster
    /// has only database 0, where the read models live beside the streams.
    #[arg(long, env = "SECKILL_REDIS_READ_MODEL_DB")]
    pub redis_read_model_db: Option<i64>,
}

/// Redis could not be set up from the flags given.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("invalid Redis address {address:?}: {source}")]
    Address {
        address: String,
        source: redis::RedisError,
    },
    #[error("cannot read Redis CA certificate {path:?}: {source}")]
    CaCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a Redis Cluster has only database 0; --redis-read-model-db {0} cannot be used with --redis-cluster-nodes")]
    ClusterDatabase(i64),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Read-model database of a standalone Redis when `--redis-read-model-db` is
/// not given.
pub const DEFAULT_READ_MODEL_DB: i64 = 1;

/// The flags' own defaults (see [`crate::flags`]).
impl Default for RedisArgs {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

impl RedisArgs {
    /// Args for one standalone server URL with the defaults otherwise.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            redis_url: Some(url.into()),
            ..Self::default()
        }
    }

    /// Args for a cluster given its seed nodes.
    pub fn for_cluster(nodes: Vec<String>) -> Self {
        Self {
            redis_cluster_nodes: nodes,
            ..Self::default()
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms.max(1))
    }

    /// Where this connects, without secrets, for logs.
    pub fn describe(&self) -> String {
        if self.redis_cluster_nodes.is_empty() {
            let url = self
                .redis_url
                .as_deref()
                .unwrap_or("redis://127.0.0.1:6379/");
            match url.split_once('@') {
                Some((scheme_auth, rest)) => {
                    let scheme = scheme_auth.split("://").next().unwrap_or("redis");
                    format!("{scheme}://***@{rest}")
                }
                None => url.to_owned(),
            }
        } else {
            format!("cluster {}", self.redis_cluster_nodes.join(","))
        }
    }

    fn certificates(&self) -> Result<Option<TlsCertificates>, RedisSetupError> {
        match &self.redis_ca_cert {
            None => Ok(None),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| RedisSetupError::CaCert {
                    path: path.clone(),
                    source,
                })?;
                Ok(Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                }))
            }
        }
    }

    /// Builds the connection to the command side (streams, promotion state);
    /// does not wait for Redis to be reachable.
    pub fn connect(&self) -> Result<RedisConnection, RedisSetupError> {
        self.connect_to(None)
    }

    /// Builds the connection to the read models: the same server, in the
    /// read-model database on a standalone Redis (see
    /// `--redis-read-model-db`); on a cluster, a connection like
    /// [`connect`](Self::connect)'s.
    pub fn connect_read_models(&self) -> Result<RedisConnection, RedisSetupError> {
        if let Some(db) = self.read_model_db() {
            self.connect_to(Some(db))
        } else {
            match self.redis_read_model_db {
                Some(db) if db != 0 => Err(RedisSetupError::ClusterDatabase(db)),
                _ => self.connect_to(None),
            }
        }
    }

    /// The read models' database on a standalone Redis; `None` on a cluster.
    pub fn read_model_db(&self) -> Option<i64> {
        self.redis_cluster_nodes
            .is_empty()
            .then(|| self.redis_read_model_db.unwrap_or(DEFAULT_READ_MODEL_DB))
    }

    /// Builds a connection to logical database `db` of a standalone Redis;
    /// `None` on a cluster, which has database 0 only.
    pub fn connect_database(&self, db: i64) -> Result<Option<RedisConnection>, RedisSetupError> {
        if self.redis_cluster_nodes.is_empty() {
            self.connect_to(Some(db)).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Builds a connection, to database `db` instead of the URL's when given
    /// (standalone only).
    fn connect_to(&self, db: Option<i64>) -> Result<RedisConnection, RedisSetupError> {
        // rustls needs one process-wide crypto provider; the first caller wins
        // and later ones (kube's client in the operator) find it installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeout = self.timeout();
        if !self.redis_cluster_nodes.is_empty() {
            let mut nodes = Vec::new();
            for node in &self.redis_cluster_nodes {
                let address = if node.contains("://") {
                    node.clone()
                } else if self.redis_tls {
                    format!("rediss://{node}")
                } else {
                    format!("redis://{node}")
                };
                let info = address.as_str().into_connection_info().map_err(|source| {
                    RedisSetupError::Address {
                        address: address.clone(),
                        source,
                    }
                })?;
                nodes.push(info);
            }
            let mut builder = ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(3);
            if let Some(u) = &self.redis_username {
                builder = builder.username(u);
            }
            if let Some(p) = &self.redis_password {
                builder = builder.password(p);
            }
            if let Some(certs) = self.certificates()? {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            return Ok(RedisConnection::open(Opener::Cluster(client))?);
        }
        let url = self
            .redis_url
            .clone()
            .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
        let mut info =
            url.as_str()
                .into_connection_info()
                .map_err(|source| RedisSetupError::Address {
                    address: self.describe(),
                    source,
                })?;
        let mut settings = info.redis_settings().clone();
        if let Some(db) = db {
            settings = settings.set_db(db);
        }
        if let Some(u) = &self.redis_username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.redis_password {
            settings = settings.set_password(p);
        }
        info = info.set_redis_settings(settings);
        let client = match self.certificates()? {
            Some(certs) => redis::Client::build_with_tls(info, certs)?,
            None => redis::Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisConnection::open(Opener::Single(client, config))?)
    }
}

/// A cheap-to-clone handle to Redis, standalone or cluster; commands on
/// clones are multiplexed over the same connections.
#[derive(Clone)]
pub struct RedisConnection {
    link: Link,
    opener: Arc<Opener>,
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What builds a [`RedisConnection`]'s links, kept so that
/// [`RedisConnection::independent`] can build another.
enum Opener {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

impl RedisConnection {
    fn open(opener: Opener) -> redis::RedisResult<Self> {
        let opener = Arc::new(opener);
        Ok(Self {
            link: Self::link(&opener)?,
            opener,
        })
    }

    fn link(opener: &Opener) -> redis::RedisResult<Link> {
        Ok(match opener {
            Opener::Single(client, config) => Link::Single(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            ),
            Opener::Cluster(client) => Link::Cluster(
                client
                    .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new()),
            ),
        })
    }

    /// A handle with connections of its own to the same Redis, with the same
    /// settings (lazy, as the first). For blocking commands: Redis serves a
    /// connection's commands in order, so a `WAIT` on a shared connection
    /// would hold up every command multiplexed behind it.
    pub fn independent(&self) -> redis::RedisResult<Self> {
        Ok(Self {
            link: Self::link(&self.opener)?,
            opener: self.opener.clone(),
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// Whether `other` reaches another logical database of the same
    /// standalone server than this one (false on a cluster: one database).
    pub fn other_database_than(&self, other: &Self) -> bool {
        !self.is_cluster() && !other.is_cluster() && self.get_db() != other.get_db()
    }

    /// Runs commands that each touch their own key, answers in order: one
    /// pipeline on a standalone Redis; on a cluster, which refuses pipelines
    /// whose keys cross slots, each command on its own, all at once (the
    /// connections multiplex them, so this still costs about one round trip
    /// per node).
    pub async fn query_each<T: redis::FromRedisValue>(
        &mut self,
        commands: Vec<Cmd>,
    ) -> redis::RedisResult<Vec<T>> {
        match &mut self.link {
            Link::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in commands {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            Link::Cluster(c) => {
                let each = commands.into_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<T>(&mut c).await }
                });
                futures::future::try_join_all(each).await
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.link {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_built_in_code_take_the_flags_defaults() {
        let args = RedisArgs::for_url("redis://127.0.0.1:1/");
        assert_eq!(args.redis_timeout_ms, 1000);
        assert_eq!(args.timeout(), Duration::from_secs(1));
        assert_eq!(args.read_model_db(), Some(DEFAULT_READ_MODEL_DB));
        assert!(!args.redis_tls);
        let cluster = RedisArgs::for_cluster(vec!["127.0.0.1:1".into()]);
        assert_eq!(cluster.redis_timeout_ms, 1000);
        assert_eq!(cluster.read_model_db(), None);
    }

    #[test]
    fn a_password_is_not_shown_in_descriptions() {
        let args = RedisArgs::for_url("redis://user:secret@example:6379/0");
        assert_eq!(args.describe(), "redis://***@example:6379/0");
    }
}
