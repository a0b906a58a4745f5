//! The two ways Conveyor runs, and [`both_modes!`](crate::both_modes), which runs one test
//! body against each so that the embedded mode is held to the same contract as the
//! distributed one.

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

/// Runs a test body once per mode: for each `async fn name(mode: Mode) -> anyhow::Result<()>`
/// named, two `#[tokio::test]`s, `name::distributed` and `name::embedded` (a module beside
/// the function of the same name).
///
/// ```ignore
/// /// What the test proves.
/// async fn a_turn_completes(mode: Mode) -> anyhow::Result<()> {
///     let stack = Stack::start(StackOptions::in_mode(mode)).await?;
///     …
/// }
///
/// both_modes!(a_turn_completes);
/// ```
///
/// The body stays an ordinary function, so rustfmt and the compiler's messages treat it as
/// one. A filter picks a mode: `cargo nextest run -E 'test(/::embedded$/)'`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn distributed() -> anyhow::Result<()> {
                super::$name($crate::harness::Mode::Distributed).await
            }

            #[tokio::test]
            async fn embedded() -> anyhow::Result<()> {
                super::$name($crate::harness::Mode::Embedded).await
            }
        }
    )+};
}
