//! Faults: a worker killed mid-answer, and a model that fails transiently.

use std::time::{Duration, Instant};

use conveyor_e2e::harness::{
    Backends, RedisMode, SseEvent, SseStream, Stack, StackOptions, assert_gap_free, eventually,
};
use serde_json::json;

/// Starts a turn over SSE and reads its events up to the first text delta of the answer.
async fn start_and_read_to_the_answer(
    stack: &Stack,
    user: &str,
    message: &str,
) -> anyhow::Result<(SseStream, Vec<SseEvent>)> {
    let mut sse = SseStream::open(
        stack
            .http
            .post(stack.url(&format!("/api/{user}/chat")))
            .json(&json!({ "message": message })),
    )
    .await?;
    let mut events = Vec::new();
    while let Some(event) = sse.next_event().await? {
        let delta = event.event == "message.delta";
        events.push(event);
        if delta {
            break;
        }
    }
    Ok((sse, events))
}

#[tokio::test]
async fn a_run_resumes_on_another_worker_after_kill_9_without_repeating_its_tool_call()
-> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions::default()).await?;
    // A tool call, then a slow answer (80 chunks × 50 ms) to kill the worker in.
    let (mut sse, mut events) = start_and_read_to_the_answer(
        &stack,
        "kim",
        "add crash test [[chunks=80 chunk_delay_ms=50]]",
    )
    .await?;
    let run_id = events[0].data["run_id"].as_str().unwrap().to_owned();
    assert!(
        events.iter().any(|e| e.event == "tool.result"),
        "{events:?}"
    );
    let pid = stack
        .holder_pid(&run_id)
        .await?
        .expect("a worker holds the run");
    assert!(
        stack.kill_worker_with_pid(pid).await?,
        "the holder is one of our workers"
    );
    let killed_at = Instant::now();

    // The same SSE connection carries on: run.retrying, then the new attempt to the end.
    let rest = sse.collect_until_terminal(Duration::from_secs(90)).await?;
    let recovered_after = killed_at.elapsed();
    events.extend(rest);
    assert_gap_free(&events, 1);
    let retry = events
        .iter()
        .position(|e| e.event == "run.retrying")
        .expect("a run.retrying event");
    let restarted = events
        .iter()
        .rposition(|e| e.event == "run.started")
        .unwrap();
    assert!(restarted > retry);
    assert_eq!(events[restarted].data["attempt"], 2);
    assert_eq!(events.last().unwrap().event, "run.completed");
    eprintln!("recovered after {recovered_after:?}");

    // One task, one final answer.
    let db = stack.db.pool().await?;
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE title = 'crash test'")
        .fetch_one(&db)
        .await?;
    assert_eq!(tasks, 1, "the tool's side effect happened once");
    let conversation_id = events[0].data["conversation_id"].as_str().unwrap();
    let (_, history) = stack
        .get_json(&format!(
            "/api/kim/conversations/{conversation_id}/messages"
        ))
        .await?;
    let roles: Vec<&str> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    let (_, run) = stack.get_json(&format!("/api/kim/runs/{run_id}")).await?;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["attempt"], 2);
    Ok(())
}

#[tokio::test]
async fn transient_model_failures_are_retried_and_permanent_ones_fail_the_run() -> anyhow::Result<()>
{
    let stack = Stack::start(StackOptions::default()).await?;
    // 429 with Retry-After twice, then success.
    let (_, accepted) = stack
        .post_chat("lee", json!({"message": "hello [[fail=429 fail_times=2]]"}))
        .await?;
    let events = stack
        .run_events("lee", accepted["run_id"].as_str().unwrap())
        .await?;
    assert_eq!(events.last().unwrap().event, "run.completed", "{events:?}");
    // A stream cut before [DONE] after text went out: run.retrying, then the whole answer.
    let (_, accepted) = stack
        .post_chat(
            "lee",
            json!({"message": "cut me [[fail=cut fail_times=1 chunks=10 chunk_delay_ms=20]]"}),
        )
        .await?;
    let events = stack
        .run_events("lee", accepted["run_id"].as_str().unwrap())
        .await?;
    assert_gap_free(&events, 1);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    let retry = kinds
        .iter()
        .position(|k| *k == "run.retrying")
        .expect("run.retrying after streamed text");
    assert!(kinds[..retry].contains(&"message.delta"));
    assert_eq!(kinds.last(), Some(&"run.completed"));
    let after_retry: String = events[retry..]
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    let completed = events
        .iter()
        .find(|e| e.event == "message.completed")
        .unwrap();
    assert_eq!(
        completed.data["text"],
        after_retry.as_str(),
        "the answer after the retry is whole"
    );
    // A 401 is not retried: the run fails with a clear reason.
    let (_, accepted) = stack
        .post_chat("lee", json!({"message": "nope [[fail=401]]"}))
        .await?;
    let run_id = accepted["run_id"].as_str().unwrap();
    let events = stack.run_events("lee", run_id).await?;
    let last = events.last().unwrap();
    assert_eq!(last.event, "run.failed");
    assert_eq!(last.data["error"]["code"], "llm_http_401");
    let (_, run) = stack.get_json(&format!("/api/lee/runs/{run_id}")).await?;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["attempt"], 1, "never retried");
    assert_eq!(run["error"]["code"], "llm_http_401");
    Ok(())
}

#[tokio::test]
async fn a_takeover_after_redis_lost_its_data_never_reuses_a_seq() -> anyhow::Result<()> {
    let mut stack = Stack::start_with(
        StackOptions::default(),
        Backends {
            redis: RedisMode::Private { appendonly: false },
            postgres_proxy: false,
        },
    )
    .await?;
    // A tool call, then a slow answer to crash in.
    let (mut sse, mut events) = start_and_read_to_the_answer(
        &stack,
        "ida",
        "add amnesia test [[chunks=20 chunk_delay_ms=300]]",
    )
    .await?;
    let run_id = events[0].data["run_id"].as_str().unwrap().to_owned();
    let seen = events.last().unwrap().seq();
    // Wait until the attempt's heartbeat has recorded what it published, then lose both the
    // worker and every Redis key: the run's counter, its replay buffer and its job.
    let db = stack.db.pool().await?;
    eventually(Duration::from_secs(10), || async {
        let floor: i64 = sqlx::query_scalar("SELECT seq_floor FROM runs WHERE id = $1")
            .bind(&run_id)
            .fetch_one(&db)
            .await?;
        Ok((u64::try_from(floor)? >= seen).then_some(()))
    })
    .await?;
    let pid = stack
        .holder_pid(&run_id)
        .await?
        .expect("a worker holds the run");
    assert!(stack.kill_worker_with_pid(pid).await?);
    let mut redis = redis::Client::open(stack.redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let () = redis::cmd("FLUSHALL").query_async(&mut redis).await?;
    let faulted_at = Instant::now();

    // The sweeper finds the run without a live worker and another worker takes it over. Its
    // events reach the same connection with seqs above everything the client has seen.
    let rest = sse.collect_until_terminal(Duration::from_secs(90)).await?;
    let recovered_after = faulted_at.elapsed();
    let last_before = events.last().unwrap().seq();
    assert!(
        rest.iter().all(|e| e.seq() > seen),
        "a seq was reused after the takeover: seen up to {seen}, then {:?}",
        rest.iter().map(SseEvent::seq).collect::<Vec<_>>()
    );
    events.extend(rest);
    assert!(
        events.windows(2).all(|w| w[0].seq() < w[1].seq()),
        "seqs must increase"
    );
    let after: Vec<&str> = events
        .iter()
        .filter(|e| e.seq() > last_before)
        .map(|e| e.event.as_str())
        .collect();
    let retrying = after.iter().position(|k| *k == "run.retrying");
    let started = after.iter().position(|k| *k == "run.started");
    assert!(
        matches!((retrying, started), (Some(r), Some(s)) if r < s),
        "the takeover announces itself: {after:?}"
    );
    assert_eq!(events.last().unwrap().event, "run.completed");
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE title = 'amnesia test'")
        .fetch_one(&db)
        .await?;
    assert_eq!(tasks, 1, "the tool's side effect happened once");
    println!(
        "FAULT-MATRIX | worker kill -9 and Redis data loss mid-answer | runs=1 completed=1 failed=0 lost=0 duplicated_side_effects=0 | recovery={:.1}s",
        recovered_after.as_secs_f64()
    );
    Ok(())
}
