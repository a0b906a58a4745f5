//! The connections every service process opens at start-up: Postgres (migrated), the event bus
//! and the job producer.

use sqlx::PgPool;

use crate::{
    config::CommonConfig,
    db::{DbError, connect_and_migrate},
    events::{EventBus, EventError},
    queue::{JobProducer, QueueError},
};

/// A process's shared backends.
#[derive(Debug, Clone)]
pub struct Backends {
    pub db: PgPool,
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

impl Backends {
    /// Connects to Postgres (applying migrations) and Redis.
    pub async fn connect(common: &CommonConfig) -> Result<Self, BackendError> {
        let db =
            connect_and_migrate(common.database_url.expose(), common.database_pool_size).await?;
        let redis_url = common.redis_url.expose();
        let bus =
            EventBus::connect(redis_url, &common.redis_prefix, common.event_stream_ttl).await?;
        let producer = JobProducer::connect(redis_url, &common.redis_prefix).await?;
        Ok(Self { db, bus, producer })
    }
}
