//! Run control: cancel (queued and running), and the `multitask` modes of a busy conversation,
//! in both modes.

use std::time::Duration;

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, Stack, StackOptions, assert_gap_free, eventually};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn post_cancel(stack: &Stack, user: &str, run_id: &str) -> anyhow::Result<(u16, Value)> {
    let response = stack
        .http
        .post(stack.url(&format!("/api/{user}/runs/{run_id}/cancel")))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

fn timestamp(run: &Value, field: &str) -> chrono::DateTime<chrono::Utc> {
    run[field]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{field} in {run}"))
}

both_modes!(cancelling_a_running_run_stops_it_and_keeps_the_partial_answer);
async fn cancelling_a_running_run_stops_it_and_keeps_the_partial_answer(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let (_, accepted) = stack
        .post_chat(
            "erin",
            json!({"message": "long story [[chunks=400 chunk_delay_ms=20]]"}),
        )
        .await?;
    let run_id = accepted["run_id"].as_str().unwrap();
    let mut sse = stack
        .open_sse(&format!("/api/erin/runs/{run_id}/events"), None)
        .await?;
    let head = sse.take(4, TIMEOUT).await?;
    assert_eq!(head[3].event, "message.delta", "{head:?}");

    let (status, run) = post_cancel(&stack, "erin", run_id).await?;
    assert_eq!(status, 202, "{run}");
    let started = std::time::Instant::now();
    let tail = sse.collect_until_terminal(TIMEOUT).await?;
    let stopped_after = started.elapsed();
    assert!(
        stopped_after < Duration::from_secs(5),
        "stopped after {stopped_after:?}"
    );
    let mut all = head.clone();
    all.extend(tail);
    assert_gap_free(&all, 1);
    assert_eq!(all.last().unwrap().event, "run.cancelled");
    assert_eq!(all.last().unwrap().data["status"], "cancelled");

    let (_, run) = stack.get_json(&format!("/api/erin/runs/{run_id}")).await?;
    assert_eq!(run["status"], "cancelled");
    let conversation_id = accepted["conversation_id"].as_str().unwrap();
    let (_, history) = stack
        .get_json(&format!(
            "/api/erin/conversations/{conversation_id}/messages"
        ))
        .await?;
    let messages = history["data"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    let partial = &messages[1];
    assert_eq!(partial["status"], "cancelled");
    let streamed: String = all
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    let kept = partial["content"].as_str().unwrap();
    assert!(
        !kept.is_empty() && streamed.starts_with(kept) || kept.starts_with(&streamed),
        "kept {kept:?} vs streamed {streamed:?}"
    );
    assert!(
        kept.split_whitespace().count() < 400,
        "the answer was cut short"
    );

    // Cancelling an ended run changes nothing.
    assert_eq!(post_cancel(&stack, "erin", run_id).await?.0, 200);
    Ok(())
}

both_modes!(a_queued_run_is_cancelled_at_once_and_never_starts);
async fn a_queued_run_is_cancelled_at_once_and_never_starts(mode: Mode) -> anyhow::Result<()> {
    // A run stays queued while no worker can take it: with no worker process (distributed), or
    // while the embedded process's only slot holds another conversation's turn that waits for
    // a model that does not answer.
    let mut stack = Stack::start(match mode {
        Mode::Distributed => StackOptions {
            workers: 0,
            ..StackOptions::in_mode(mode)
        },
        Mode::Embedded => StackOptions {
            worker_concurrency: 1,
            ..StackOptions::in_mode(mode)
        },
    })
    .await?;
    let blocker = match mode {
        Mode::Distributed => None,
        Mode::Embedded => {
            let (_, blocker) = stack
                .post_chat("blocker", json!({"message": "wait [[ttft_ms=600000]]"}))
                .await?;
            let blocker = blocker["run_id"].as_str().unwrap().to_owned();
            eventually(TIMEOUT, || async {
                let (_, run) = stack
                    .get_json(&format!("/api/blocker/runs/{blocker}"))
                    .await?;
                Ok((run["status"] == "running").then_some(()))
            })
            .await?;
            Some(blocker)
        }
    };
    let (_, accepted) = stack
        .post_chat("frank", json!({"message": "add never"}))
        .await?;
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let (status, run) = post_cancel(&stack, "frank", &run_id).await?;
    assert_eq!(status, 202);
    assert_eq!(run["status"], "cancelled");
    let events = stack.run_events("frank", &run_id).await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["run.queued", "run.cancelled"]);
    assert_gap_free(&events, 1);
    // A worker that arrives later does not run it (embedded: the slot that frees up takes the
    // cancelled run's job, still in the queue, next).
    match blocker {
        None => stack.add_worker()?,
        Some(blocker) => {
            assert_eq!(post_cancel(&stack, "blocker", &blocker).await?.0, 202);
            let events = stack.run_events("blocker", &blocker).await?;
            assert_eq!(events.last().unwrap().event, "run.cancelled");
        }
    }
    let (_, probe) = stack
        .post_chat("frank", json!({"message": "add probe"}))
        .await?;
    stack
        .run_events("frank", probe["run_id"].as_str().unwrap())
        .await?;
    let db = stack.sql().await?;
    let titles: Vec<String> = db.query("SELECT title FROM tasks").scalars().await?;
    assert_eq!(titles, ["probe"]);
    assert_eq!(
        stack
            .get_json(&format!("/api/frank/runs/{run_id}"))
            .await?
            .1["attempt"],
        0
    );
    Ok(())
}

both_modes!(closing_the_stream_does_not_cancel_the_run);
async fn closing_the_stream_does_not_cancel_the_run(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let mut sse = conveyor_e2e::harness::SseStream::open(
        stack
            .http
            .post(stack.url("/api/gina/chat"))
            .json(&json!({"message": "story [[chunks=30 chunk_delay_ms=20]]"})),
    )
    .await?;
    let head = sse.take(2, TIMEOUT).await?;
    drop(sse);
    let run_id = head[0].data["run_id"].as_str().unwrap();
    let events = stack.run_events("gina", run_id).await?;
    assert_eq!(events.last().unwrap().event, "run.completed");
    Ok(())
}

// Distributed: across two worker processes; embedded: across the process's worker slots.
both_modes!(enqueued_turns_of_a_conversation_run_in_order_across_workers);
async fn enqueued_turns_of_a_conversation_run_in_order_across_workers(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let (_, first) = stack
        .post_chat("hank", json!({"message": "add first [[ttft_ms=300]]"}))
        .await?;
    let conversation_id = first["conversation_id"].as_str().unwrap();
    let mut runs = vec![first["run_id"].as_str().unwrap().to_owned()];
    for title in ["second", "third", "fourth"] {
        let (status, accepted) =
            stack.post_chat("hank", json!({"conversation_id": conversation_id, "message": format!("add {title}"), "multitask": "enqueue"})).await?;
        assert_eq!(status, 202, "{accepted}");
        runs.push(accepted["run_id"].as_str().unwrap().to_owned());
    }
    for run_id in &runs {
        assert_eq!(
            stack
                .run_events("hank", run_id)
                .await?
                .last()
                .unwrap()
                .event,
            "run.completed"
        );
    }
    let mut previous_end = None;
    for run_id in &runs {
        let (_, run) = stack.get_json(&format!("/api/hank/runs/{run_id}")).await?;
        if let Some(end) = previous_end {
            assert!(
                timestamp(&run, "started_at") >= end,
                "{run_id} started before the previous run ended"
            );
        }
        previous_end = Some(timestamp(&run, "finished_at"));
    }
    let db = stack.sql().await?;
    let titles: Vec<String> = db
        .query("SELECT title FROM tasks ORDER BY id")
        .scalars()
        .await?;
    assert_eq!(titles, ["first", "second", "third", "fourth"]);
    Ok(())
}

both_modes!(interrupt_cancels_the_active_run_then_runs_the_new_one);
async fn interrupt_cancels_the_active_run_then_runs_the_new_one(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let (_, slow) = stack
        .post_chat(
            "ivy",
            json!({"message": "long [[chunks=400 chunk_delay_ms=20]]"}),
        )
        .await?;
    let slow_id = slow["run_id"].as_str().unwrap();
    let conversation_id = slow["conversation_id"].as_str().unwrap();
    eventually(TIMEOUT, || async {
        let (_, run) = stack.get_json(&format!("/api/ivy/runs/{slow_id}")).await?;
        Ok((run["status"] == "running").then_some(()))
    })
    .await?;
    let (status, next) =
        stack.post_chat("ivy", json!({"conversation_id": conversation_id, "message": "add instead", "multitask": "interrupt"})).await?;
    assert_eq!(status, 202, "{next}");
    let slow_events = stack.run_events("ivy", slow_id).await?;
    assert_eq!(slow_events.last().unwrap().event, "run.cancelled");
    let next_events = stack
        .run_events("ivy", next["run_id"].as_str().unwrap())
        .await?;
    assert_eq!(next_events.last().unwrap().event, "run.completed");
    Ok(())
}

both_modes!(a_run_whose_process_dies_right_after_a_cancel_ends_cancelled);
/// The process running a run is killed just after a cancel was requested, before its
/// heartbeat saw it (within a second): the run still ends `cancelled`, and the client resuming
/// its stream gets `run.cancelled` after what it had seen, gap-free. Distributed, the worker
/// that takes the dead worker's run over ends it; embedded, the next start does.
async fn a_run_whose_process_dies_right_after_a_cancel_ends_cancelled(
    mode: Mode,
) -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let (_, accepted) = stack
        .post_chat(
            "rae",
            json!({"message": "long story [[chunks=400 chunk_delay_ms=20]]"}),
        )
        .await?;
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let mut sse = stack
        .open_sse(&format!("/api/rae/runs/{run_id}/events"), None)
        .await?;
    let head = sse.take(4, TIMEOUT).await?;
    assert_eq!(head[3].event, "message.delta", "{head:?}");
    let pid = stack.holder_pid(&run_id).await?.expect("a holder");
    assert_eq!(post_cancel(&stack, "rae", &run_id).await?.0, 202);
    match mode {
        Mode::Distributed => assert!(stack.kill_worker_with_pid(pid).await?),
        Mode::Embedded => {
            stack.kill_embedded().await?;
            stack.restart_embedded().await?;
        }
    }
    drop(sse);
    let last = head.last().unwrap().seq();
    let mut resumed = stack
        .open_sse(&format!("/api/rae/runs/{run_id}/events"), Some(last))
        .await?;
    let tail = resumed
        .collect_until_terminal(Duration::from_mins(1))
        .await?;
    let mut all = head;
    all.extend(tail);
    assert_gap_free(&all, 1);
    assert_eq!(all.last().unwrap().event, "run.cancelled", "{all:?}");
    let (_, run) = stack.get_json(&format!("/api/rae/runs/{run_id}")).await?;
    assert_eq!(run["status"], "cancelled");
    Ok(())
}
