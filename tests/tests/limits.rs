//! Per-user limits: request rate and unfinished runs, in both modes (and across API replicas,
//! which only the distributed mode has).

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, Stack, StackOptions};
use serde_json::json;

/// Runs stay unfinished, 6 requests a minute and 2 unfinished runs per user.
fn limited(mode: Mode) -> StackOptions {
    StackOptions {
        env: vec![
            ("RATE_LIMIT_PER_MINUTE".into(), "6".into()),
            ("MAX_ACTIVE_RUNS_PER_USER".into(), "2".into()),
        ],
        ..StackOptions::in_mode(mode)
    }
    .with_unfinished_runs()
}

both_modes!(request_rate_and_active_runs_are_limited_per_user);
async fn request_rate_and_active_runs_are_limited_per_user(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(limited(mode)).await?;
    // Two runs stay queued (no worker); the third is refused and nothing is written for it.
    assert_eq!(
        stack.post_chat("mia", json!({"message": "one"})).await?.0,
        202
    );
    assert_eq!(
        stack.post_chat("mia", json!({"message": "two"})).await?.0,
        202
    );
    let response = stack
        .http
        .post(stack.url("/api/mia/chat"))
        .header("accept", "application/json")
        .json(&json!({"message": "three"}))
        .send()
        .await?;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited");
    let db = stack.sql().await?;
    let runs: i64 = db
        .query("SELECT count(*) FROM runs WHERE user_id = 'mia'")
        .scalar()
        .await?;
    assert_eq!(runs, 2);
    // Another user is not affected.
    assert_eq!(
        stack.post_chat("noah", json!({"message": "one"})).await?.0,
        202
    );

    // mia has used 3 of 6 requests this minute; 3 more pass, then 429.
    for _ in 0..3 {
        assert_eq!(stack.get_json("/api/mia/conversations").await?.0, 200);
    }
    let response = stack
        .http
        .get(stack.url("/api/mia/conversations"))
        .send()
        .await?;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry_after));
    assert_eq!(stack.get_json("/api/noah/conversations").await?.0, 200);
    Ok(())
}

// Distributed only: the embedded mode is one process, with no replica to share limits with.
#[tokio::test]
async fn limits_hold_across_two_api_replicas_sharing_redis_and_postgres() -> anyhow::Result<()> {
    let mut stack = Stack::start(limited(Mode::Distributed)).await?;
    let second = stack.add_api().await?;
    let apis = [stack.api_url.clone(), second];
    let post = |api: &str, message: &str| {
        stack
            .http
            .post(format!("{api}/api/mia/chat"))
            .header("accept", "application/json")
            .json(&json!({ "message": message }))
            .send()
    };
    // One run through each replica; the third, on either, is over the limit of 2.
    assert_eq!(post(&apis[0], "one").await?.status(), 202);
    assert_eq!(post(&apis[1], "two").await?.status(), 202);
    for api in &apis {
        let refused = post(api, "three").await?;
        assert_eq!(refused.status(), 429, "{api}");
        let body: serde_json::Value = refused.json().await?;
        assert_eq!(body["error"]["code"], "rate_limited");
    }
    let db = stack.sql().await?;
    let runs: i64 = db
        .query("SELECT count(*) FROM runs WHERE user_id = 'mia'")
        .scalar()
        .await?;
    assert_eq!(runs, 2, "nothing written for the refused turns");

    // 4 of mia's 6 requests this minute are used, spread over both replicas: two more pass
    // (one on each), then both refuse.
    for api in &apis {
        let listed = stack
            .http
            .get(format!("{api}/api/mia/conversations"))
            .send()
            .await?;
        assert_eq!(listed.status(), 200, "{api}");
    }
    for api in &apis {
        let refused = stack
            .http
            .get(format!("{api}/api/mia/conversations"))
            .send()
            .await?;
        assert_eq!(refused.status(), 429, "{api}");
        assert!(refused.headers().get("retry-after").is_some());
    }
    Ok(())
}
