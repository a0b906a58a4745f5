//! Faults: a worker killed mid-answer or between a tool's commit and its journal row, and a
//! model that fails transiently; in embedded mode, the one `conveyor dev` process killed
//! mid-answer (with a tool call done, or with a turn queued behind) and started again on its
//! file.

use std::{
    os::unix::process::ExitStatusExt,
    time::{Duration, Instant},
};

use anyhow::Context;
use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{
    Backends, Mode, RedisMode, SseEvent, SseStream, Stack, StackOptions, assert_gap_free,
    eventually,
};
use serde_json::json;

/// Starts a turn over SSE and reads its events up to the first text delta of the answer.
async fn start_and_read_to_the_answer(
    stack: &Stack,
    user: &str,
    message: &str,
) -> anyhow::Result<(SseStream, Vec<SseEvent>)> {
    start_and_read_to(stack, user, message, "message.delta").await
}

/// Starts a turn over SSE and reads its events up to the first one of kind `until`.
async fn start_and_read_to(
    stack: &Stack,
    user: &str,
    message: &str,
    until: &str,
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
        let last = event.event == until;
        events.push(event);
        if last {
            break;
        }
    }
    Ok((sse, events))
}

// Distributed only: another worker process takes over; the embedded process's own kill -9 is
// tested by the `a_killed_dev_process_…` tests below.
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

both_modes!(transient_model_failures_are_retried_and_permanent_ones_fail_the_run);
async fn transient_model_failures_are_retried_and_permanent_ones_fail_the_run(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
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

// Distributed only: it loses Redis's data; the embedded mode keeps its counters in its file.
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

both_modes!(a_crash_between_the_tools_commit_and_the_journal_write_creates_the_task_once);
/// The worker dies exactly between the MCP server's commit and its own journal write (it
/// aborts there on purpose with `CONVEYOR_FAULT_INJECT=abort_after_tool_call`): the task exists
/// but the run's journal does not know it. The attempt that takes over calls the tool again
/// with the same idempotency key and gets the stored result, so the user has one task, one
/// answer and one terminal state, and a stream resumed with `Last-Event-ID` has no gap.
/// Embedded, the worker is the whole `conveyor dev` process, and the attempt that takes over is
/// the next start's on the same file.
async fn a_crash_between_the_tools_commit_and_the_journal_write_creates_the_task_once(
    mode: Mode,
) -> anyhow::Result<()> {
    const USER: &str = "noa";
    const FAULT: (&str, &str) = ("CONVEYOR_FAULT_INJECT", "abort_after_tool_call");
    // Only the first process crashes on purpose: the first worker (the one that takes over is
    // a normal worker), or the first start of conveyor dev (started again without it).
    let mut stack = Stack::start(match mode {
        Mode::Distributed => StackOptions {
            workers: 0,
            ..StackOptions::in_mode(mode)
        },
        Mode::Embedded => StackOptions {
            env: vec![(FAULT.0.into(), FAULT.1.into())],
            ..StackOptions::in_mode(mode)
        },
    })
    .await?;
    let db = stack.sql().await?;
    let victim = match mode {
        Mode::Distributed => Some(stack.add_worker_with_env(&[FAULT])?),
        Mode::Embedded => None,
    };

    let (sse, seen) = start_and_read_to(&stack, USER, "add buy milk", "tool.call").await?;
    let run_id = seen[0].data["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    assert_eq!(
        seen.last().map(|e| e.event.as_str()),
        Some("tool.call"),
        "{seen:?}"
    );
    // The client loses its connection; it will resume after the last event it saw.
    drop(sse);

    let status = eventually(Duration::from_secs(30), || {
        let status = match victim {
            Some(index) => stack.worker_exit_status(index),
            None => stack.embedded_exit_status(),
        };
        async move { status }
    })
    .await
    .context("the process with the fault injection did not crash")?;
    let crashed_at = Instant::now();
    assert_eq!(
        status.signal(),
        Some(6),
        "the worker aborted (SIGABRT) at the injected point: {status:?}"
    );

    // The crash point: the server committed the task and its idempotency record, the worker
    // journaled nothing, and the run is still held by the dead attempt.
    let tasks: Vec<i64> = db
        .query("SELECT id FROM tasks WHERE user_id = $1 AND title = 'buy milk'")
        .bind(USER)
        .scalars()
        .await?;
    assert_eq!(tasks.len(), 1, "the tool committed before the crash");
    let journaled: i64 = db
        .query("SELECT count(*) FROM run_steps WHERE run_id = $1")
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(journaled, 0, "the crash came before the journal write");
    let keys: i64 = db
        .query("SELECT count(*) FROM tool_idempotency WHERE user_id = $1 AND key LIKE $2 || ':%'")
        .bind(USER)
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(
        keys, 1,
        "the effect was stored with the run's idempotency key"
    );
    let (status, attempt): (String, i32) = db
        .query("SELECT status, attempt FROM runs WHERE id = $1")
        .bind(&run_id)
        .row()
        .await?;
    assert_eq!((status.as_str(), attempt), ("running", 1));

    // Another worker takes the run over once the dead one's heartbeats are stale; embedded,
    // conveyor dev started again on the file takes it over at start.
    let survivor = match mode {
        Mode::Distributed => Some(stack.add_worker_with_env(&[])?),
        Mode::Embedded => {
            stack
                .restart_embedded_with(|options| options.env.retain(|(key, _)| key != FAULT.0))
                .await?;
            None
        }
    };
    let survivor_pid = match survivor {
        Some(_) => stack.worker_pids().last().copied(),
        None => stack.api_pid(),
    }
    .context("survivor pid")?;
    let resume_after = seen.last().map(SseEvent::seq).context("a seen event")?;
    let mut resumed = stack
        .open_sse(
            &format!("/api/{USER}/runs/{run_id}/events"),
            Some(resume_after),
        )
        .await?;
    assert_eq!(resumed.status, 200);
    let rest = resumed
        .collect_until_terminal(Duration::from_secs(90))
        .await?;
    let recovered_after = crashed_at.elapsed();
    let survivor_status = match survivor {
        Some(index) => stack.worker_exit_status(index)?,
        None => stack.embedded_exit_status()?,
    };
    assert!(survivor_status.is_none(), "{survivor_status:?}");

    let mut events = seen;
    events.extend(rest);
    assert_taken_over_once(&events);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    let restarted = events
        .iter()
        .rfind(|e| e.event == "run.started")
        .context("run.started")?;
    assert!(
        restarted.data["worker"]
            .as_str()
            .is_some_and(|w| w.contains(&format!(":{survivor_pid}:"))),
        "the survivor ran the second attempt: {restarted:?}"
    );
    // The second attempt's tool call was answered with the stored result: the same task.
    let results: Vec<&SseEvent> = events.iter().filter(|e| e.event == "tool.result").collect();
    assert_eq!(results.len(), 1, "{kinds:?}");
    assert_eq!(results[0].data["ok"], true, "{:?}", results[0]);
    assert_eq!(
        results[0].data["result"]["task"]["id"], tasks[0],
        "{:?}",
        results[0]
    );

    let count_tasks: i64 = db
        .query("SELECT count(*) FROM tasks WHERE user_id = $1")
        .bind(USER)
        .scalar()
        .await?;
    assert_eq!(count_tasks, 1, "the task was created exactly once");
    let journaled: i64 = db
        .query("SELECT count(*) FROM run_steps WHERE run_id = $1")
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(journaled, 1, "the takeover journaled the call");
    let conversation_id = events[0].data["conversation_id"]
        .as_str()
        .context("conversation_id")?;
    let (_, history) = stack
        .get_json(&format!(
            "/api/{USER}/conversations/{conversation_id}/messages"
        ))
        .await?;
    let messages = history["data"].as_array().context("history")?;
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "tool", "assistant"],
        "no lost user message, no duplicated assistant message"
    );
    assert_eq!(messages[0]["content"], "add buy milk");
    let (_, run) = stack
        .get_json(&format!("/api/{USER}/runs/{run_id}"))
        .await?;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["attempt"], 2);
    let terminal_rows: i64 = db
        .query(
            "SELECT count(*) FROM run_events WHERE run_id = $1 \
             AND kind IN ('run.completed', 'run.failed', 'run.cancelled')",
        )
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(terminal_rows, 1, "one terminal state is stored");
    let process = match mode {
        Mode::Distributed => "worker",
        Mode::Embedded => "conveyor dev",
    };
    println!(
        "FAULT-MATRIX | {process} crash between the MCP server's commit and the journal write \
         (CONVEYOR_FAULT_INJECT=abort_after_tool_call) | runs=1 completed=1 failed=0 lost=0 \
         duplicated_side_effects=0 | recovery={:.1}s (stored result replayed by idempotency key)",
        recovered_after.as_secs_f64()
    );
    Ok(())
}

/// Kills `conveyor dev` (SIGKILL) while `sse`, the client's stream of a turn, is open, starts
/// it again on the same file and address, and resumes the run's stream with `Last-Event-ID`
/// after the last event in `seen`, as a reconnecting client would. Returns every event (`seen`
/// and the resumed rest up to the terminal one) and the time from the kill to that end.
async fn kill_restart_and_resume(
    stack: &mut Stack,
    user: &str,
    sse: SseStream,
    seen: Vec<SseEvent>,
) -> anyhow::Result<(Vec<SseEvent>, Duration)> {
    let run_id = seen[0].data["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    stack.kill_embedded().await?;
    drop(sse);
    let killed_at = Instant::now();
    stack.restart_embedded().await?;
    let last = seen.last().map(SseEvent::seq).context("a seen event")?;
    let mut resumed = stack
        .open_sse(&format!("/api/{user}/runs/{run_id}/events"), Some(last))
        .await?;
    assert_eq!(resumed.status, 200);
    let rest = resumed
        .collect_until_terminal(Duration::from_secs(90))
        .await?;
    let recovered_after = killed_at.elapsed();
    let mut events = seen;
    events.extend(rest);
    Ok((events, recovered_after))
}

/// The run's history roles, oldest first.
async fn roles(stack: &Stack, user: &str, conversation_id: &str) -> anyhow::Result<Vec<String>> {
    let (status, history) = stack
        .get_json(&format!(
            "/api/{user}/conversations/{conversation_id}/messages"
        ))
        .await?;
    assert_eq!(status, 200, "{history}");
    Ok(history["data"]
        .as_array()
        .context("history")?
        .iter()
        .map(|m| m["role"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// Asserts what a resumed stream of a run taken over after a crash must show: seqs 1, 2, 3, …
/// with no gap or repeat, one terminal event (`run.completed`) and one `message.completed`,
/// and a second attempt that announces itself with `run.retrying` before its `run.started`.
fn assert_taken_over_once(events: &[SseEvent]) {
    assert_gap_free(events, 1);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        events.iter().filter(|e| e.is_terminal()).count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"run.completed"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "message.completed").count(),
        1,
        "{kinds:?}"
    );
    let retry = kinds.iter().position(|k| *k == "run.retrying");
    let restarted = kinds.iter().rposition(|k| *k == "run.started");
    assert!(
        matches!((retry, restarted), (Some(r), Some(s)) if r < s),
        "the takeover announces itself: {kinds:?}"
    );
    assert_eq!(events[restarted.unwrap_or_default()].data["attempt"], 2);
}

/// `conveyor dev` killed with SIGKILL in the middle of an answer and started again on its file:
/// the run is taken over and completes exactly once, and the client that reconnects with
/// `Last-Event-ID` gets the rest of the stream without a gap or a repeat.
#[tokio::test]
async fn a_killed_dev_process_completes_the_answer_after_a_restart_and_the_resumed_stream_is_gap_free()
-> anyhow::Result<()> {
    const USER: &str = "oli";
    let mut stack = Stack::start(StackOptions::in_mode(Mode::Embedded)).await?;
    // A slow answer (80 chunks × 50 ms) to kill the process in; a few deltas are read first.
    let (mut sse, mut seen) = start_and_read_to_the_answer(
        &stack,
        USER,
        "tell me a long story [[chunks=80 chunk_delay_ms=50]]",
    )
    .await?;
    seen.extend(sse.take(3, Duration::from_secs(10)).await?);
    assert!(seen.iter().all(|e| !e.is_terminal()), "{seen:?}");
    let run_id = seen[0].data["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    let conversation_id = seen[0].data["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_owned();

    let (events, recovered_after) = kill_restart_and_resume(&mut stack, USER, sse, seen).await?;
    assert_taken_over_once(&events);
    // The answer after the retry is whole: the text of the one final message.
    let retry = events
        .iter()
        .rposition(|e| e.event == "run.retrying")
        .context("run.retrying")?;
    let after_retry: String = events[retry..]
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["text"].as_str().unwrap_or_default())
        .collect();
    let completed = events
        .iter()
        .find(|e| e.event == "message.completed")
        .context("message.completed")?;
    assert_eq!(completed.data["text"], after_retry.as_str());
    assert_eq!(after_retry.split_whitespace().count(), 80, "{after_retry}");

    assert_eq!(
        roles(&stack, USER, &conversation_id).await?,
        ["user", "assistant"]
    );
    let (_, run) = stack
        .get_json(&format!("/api/{USER}/runs/{run_id}"))
        .await?;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["attempt"], 2);
    let db = stack.sql().await?;
    let (assistant, terminal): (i64, i64) = db
        .query(
            "SELECT (SELECT count(*) FROM messages WHERE run_id = $1 AND role = 'assistant'), \
                    (SELECT count(*) FROM run_events WHERE run_id = $1 \
                     AND kind IN ('run.completed', 'run.failed', 'run.cancelled'))",
        )
        .bind(&run_id)
        .row()
        .await?;
    assert_eq!(
        (assistant, terminal),
        (1, 1),
        "one final answer, one terminal state"
    );
    // A client that reconnects once more, from the start, gets the same stream.
    assert_eq!(stack.run_events(USER, &run_id).await?, events);
    println!(
        "FAULT-MATRIX | conveyor dev kill -9 mid-answer, restarted on its file | runs=1 \
         completed=1 failed=0 lost=0 duplicated_side_effects=0 | recovery={:.1}s",
        recovered_after.as_secs_f64()
    );
    Ok(())
}

/// The same with a tool call done before the kill: the journal holds it, so the attempt after
/// the restart reuses its result and the task exists once.
#[tokio::test]
async fn a_killed_dev_process_does_not_repeat_a_tool_call_after_a_restart() -> anyhow::Result<()> {
    const USER: &str = "pia";
    let mut stack = Stack::start(StackOptions::in_mode(Mode::Embedded)).await?;
    // The answer after the tool result (`Done. …`, a few words) streams slowly enough to
    // kill the process in.
    let (sse, seen) =
        start_and_read_to_the_answer(&stack, USER, "add buy milk [[chunk_delay_ms=500]]").await?;
    let kinds: Vec<&str> = seen.iter().map(|e| e.event.as_str()).collect();
    assert!(kinds.contains(&"tool.result"), "{kinds:?}");
    let run_id = seen[0].data["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    let conversation_id = seen[0].data["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_owned();
    let db = stack.sql().await?;
    // The answer streams after the journal write, so the call is journaled by now.
    let journaled: i64 = db
        .query("SELECT count(*) FROM run_steps WHERE run_id = $1")
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(journaled, 1);

    let (events, recovered_after) = kill_restart_and_resume(&mut stack, USER, sse, seen).await?;
    assert_taken_over_once(&events);
    let tasks: i64 = db
        .query("SELECT count(*) FROM tasks WHERE user_id = $1 AND title = 'buy milk'")
        .bind(USER)
        .scalar()
        .await?;
    assert_eq!(tasks, 1, "the tool's side effect happened once");
    let journaled: i64 = db
        .query("SELECT count(*) FROM run_steps WHERE run_id = $1")
        .bind(&run_id)
        .scalar()
        .await?;
    assert_eq!(journaled, 1, "the call was not made again");
    println!(
        "FAULT-MATRIX | conveyor dev kill -9 mid-answer after its tool call, restarted on its \
         file | runs=1 completed=1 failed=0 lost=0 duplicated_side_effects=0 | recovery={:.1}s",
        recovered_after.as_secs_f64()
    );
    assert_eq!(
        roles(&stack, USER, &conversation_id).await?,
        ["user", "assistant", "tool", "assistant"]
    );
    let (_, run) = stack
        .get_json(&format!("/api/{USER}/runs/{run_id}"))
        .await?;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["attempt"], 2);
    Ok(())
}

/// `conveyor dev` killed with a run answering and a second turn of the same conversation queued
/// behind it (`multitask: enqueue`): after the restart both complete, in order, each once.
#[tokio::test]
async fn runs_running_and_queued_when_the_dev_process_is_killed_complete_in_order_after_a_restart()
-> anyhow::Result<()> {
    const USER: &str = "quinn";
    let mut stack = Stack::start(StackOptions::in_mode(Mode::Embedded)).await?;
    let (mut sse, mut seen) = start_and_read_to_the_answer(
        &stack,
        USER,
        "tell me a long story [[chunks=80 chunk_delay_ms=50]]",
    )
    .await?;
    let first = seen[0].data["run_id"]
        .as_str()
        .context("run_id")?
        .to_owned();
    let conversation_id = seen[0].data["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_owned();
    let (status, queued) = stack
        .post_chat(
            USER,
            json!({"conversation_id": conversation_id, "message": "add after the restart", "multitask": "enqueue"}),
        )
        .await?;
    assert_eq!(status, 202, "{queued}");
    let second = queued["run_id"].as_str().context("run_id")?.to_owned();
    seen.extend(sse.take(2, Duration::from_secs(10)).await?);
    let (_, run) = stack
        .get_json(&format!("/api/{USER}/runs/{second}"))
        .await?;
    assert_eq!(run["status"], "queued", "waits behind the answering run");

    let (events, recovered_after) = kill_restart_and_resume(&mut stack, USER, sse, seen).await?;
    assert_taken_over_once(&events);
    let second_events = stack.run_events(USER, &second).await?;
    assert_gap_free(&second_events, 1);
    let kinds: Vec<&str> = second_events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        second_events.iter().filter(|e| e.is_terminal()).count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"run.completed"), "{kinds:?}");

    let (_, first_run) = stack.get_json(&format!("/api/{USER}/runs/{first}")).await?;
    let (_, second_run) = stack
        .get_json(&format!("/api/{USER}/runs/{second}"))
        .await?;
    assert_eq!(first_run["status"], "completed");
    assert_eq!(second_run["status"], "completed");
    assert_eq!(
        second_run["attempt"], 1,
        "the queued run never started before the kill"
    );
    let time = |run: &serde_json::Value, field: &str| {
        run[field]
            .as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .with_context(|| format!("{field} in {run}"))
    };
    assert!(
        time(&second_run, "started_at")? >= time(&first_run, "finished_at")?,
        "the queued run started before the first ended: {first_run} {second_run}"
    );
    let db = stack.sql().await?;
    let titles: Vec<String> = db
        .query("SELECT title FROM tasks WHERE user_id = $1")
        .bind(USER)
        .scalars()
        .await?;
    assert_eq!(titles, ["after the restart"]);
    let roles = roles(&stack, USER, &conversation_id).await?;
    assert_eq!(
        roles.iter().filter(|r| *r == "user").count(),
        2,
        "no user message lost: {roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| *r == "assistant").count(),
        3,
        "one answer to the first turn, a tool call and an answer to the second: {roles:?}"
    );
    println!(
        "FAULT-MATRIX | conveyor dev kill -9 with a run answering and one queued behind it, \
         restarted on its file | runs=2 completed=2 failed=0 lost=0 duplicated_side_effects=0 \
         | recovery={:.1}s (first run)",
        recovered_after.as_secs_f64()
    );
    Ok(())
}
