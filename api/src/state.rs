//! What every handler can reach: the database, the event bus and hub, the job producer.

use std::sync::Arc;

use conveyor_shared::{
    config::ApiConfig,
    events::{EventBus, EventHub},
    queue::JobProducer,
};

use crate::{auth::Authenticator, limits::Limits, metrics::ApiMetrics};

/// Shared application state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub db: conveyor_shared::db::Db,
    pub bus: EventBus,
    pub hub: EventHub,
    pub producer: JobProducer,
    pub auth: Authenticator,
    pub limits: Limits,
    pub metrics: ApiMetrics,
    pub config: Arc<ApiConfig>,
}
