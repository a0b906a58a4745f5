//! The connections every service process opens at start-up: the database (migrated), the event
//! bus and the job producer.

use crate::{
    config::CommonConfig,
    db::{CommitMode, Db, DbError},
    events::{EventBus, EventError},
    queue::{JobProducer, QueueError},
};

/// A process's shared backends.
#[derive(Debug, Clone)]
pub struct Backends {
    pub db: Db,
    pub bus: EventBus,
    pub producer: JobProducer,
}

/// A backend that could not be reached at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Events(#[from] EventError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A Redis client for `url` whose TCP connections send at once (`TCP_NODELAY`).
///
/// redis-rs leaves Nagle's algorithm on by default. On a multiplexed connection, a command
/// written while an earlier one is still unacknowledged then waits for the server's delayed
/// ACK — tens of milliseconds added to an event or a job push, under exactly the concurrent
/// load the multiplexing is for.
pub fn redis_client(url: &str) -> redis::RedisResult<redis::Client> {
    use redis::{IntoConnectionInfo, io::tcp::TcpSettings};
    let info = url
        .into_connection_info()?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
}

impl Backends {
    /// Connects to Postgres (applying migrations) and Redis; `commit` is the pool's default
    /// commit durability.
    pub async fn connect(common: &CommonConfig, commit: CommitMode) -> Result<Self, BackendError> {
        let db = Db::connect(
            common.database_url.expose(),
            common.database_pool_size,
            commit,
        )
        .await?;
        let redis_url = common.redis_url.expose();
        let bus =
            EventBus::connect(redis_url, &common.redis_prefix, common.event_stream_ttl).await?;
        let producer = JobProducer::connect(redis_url, &common.redis_prefix).await?;
        Ok(Self { db, bus, producer })
    }
}
