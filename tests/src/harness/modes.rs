//! The two ways Conveyor runs.

/// How a [`Stack`](super::Stack) runs Conveyor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// `conveyor-api` and `conveyor-worker` processes on the machine's Postgres and Redis.
    #[default]
    Distributed,
    /// One `conveyor dev` process on a fresh SQLite file: API, worker pool and task tools,
    /// no Postgres, no Redis.
    Embedded,
}

impl Mode {
    /// Both modes, distributed first.
    pub const ALL: [Self; 2] = [Self::Distributed, Self::Embedded];
}
