//! The event bus's sequence numbers against the machine's Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`), each test under its own key prefix, removed when it ends.

use std::time::Duration;

use conveyor_shared::{
    events::{EventBus, RunEvent},
    ids::RunId,
};
use redis::AsyncCommands as _;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct TestBus {
    prefix: String,
    bus: EventBus,
    redis: redis::aio::MultiplexedConnection,
}

impl TestBus {
    async fn new() -> anyhow::Result<Self> {
        let prefix = format!("test:{}", ulid::Ulid::new());
        let bus = EventBus::connect(&redis_url(), &prefix, Duration::from_mins(1)).await?;
        let redis = redis::Client::open(redis_url())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self { prefix, bus, redis })
    }

    /// Forgets every key of this test, as a Redis restart without persistence would.
    async fn lose_data(&mut self) -> anyhow::Result<()> {
        let keys: Vec<String> = self.redis.keys(format!("{}:*", self.prefix)).await?;
        if !keys.is_empty() {
            let () = self.redis.del(keys).await?;
        }
        Ok(())
    }
}

fn started() -> RunEvent {
    RunEvent::Started {
        attempt: 1,
        worker: "test".to_owned(),
    }
}

#[tokio::test]
async fn seqs_follow_the_counter_and_never_fall_below_the_floor() -> anyhow::Result<()> {
    let mut t = TestBus::new().await?;
    let run = RunId::new();
    // A new run: seq 1, then on from the counter even when the floor is lower.
    assert_eq!(t.bus.publish(&run, &started(), 0).await?, 1);
    assert_eq!(t.bus.publish(&run, &started(), 0).await?, 2);
    // A floor above the counter wins.
    assert_eq!(t.bus.publish(&run, &started(), 7).await?, 8);
    // Reserving hands out a block; the next event follows it.
    assert_eq!(t.bus.reserve(&run, 2, 0).await?, 9);
    assert_eq!(t.bus.publish(&run, &started(), 0).await?, 11);
    t.lose_data().await?;
    Ok(())
}

#[tokio::test]
async fn a_lost_counter_of_a_run_under_way_leaves_a_gap_instead_of_reusing_seqs()
-> anyhow::Result<()> {
    let mut t = TestBus::new().await?;
    let run = RunId::new();
    for expected in 1..=5 {
        assert_eq!(t.bus.publish(&run, &started(), 0).await?, expected);
    }
    t.lose_data().await?;
    // A worker taking over knows only an older floor (3): it must not hand out 4 or 5 again.
    let seq = t.bus.publish(&run, &started(), 3).await?;
    assert!(seq > 5, "seq {seq} was handed out before the loss");
    assert_eq!(t.bus.publish(&run, &started(), 3).await?, seq + 1);

    // A run that only has its `run.queued` (floor 1) and no counter yet starts at 2, no gap.
    let fresh = RunId::new();
    assert_eq!(t.bus.publish(&fresh, &started(), 1).await?, 2);
    t.lose_data().await?;
    Ok(())
}
