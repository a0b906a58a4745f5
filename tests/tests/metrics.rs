//! Prometheus metrics of the API and the workers move as work flows through the real binaries.

use std::time::Duration;

use conveyor_e2e::harness::{Scrape, Stack, StackOptions, eventually};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A series summed over every worker.
fn total(scrapes: &[Scrape], series: &str) -> u64 {
    scrapes.iter().map(|s| s.count(series)).sum()
}

async fn run_status(stack: &Stack, user: &str, run_id: &str) -> anyhow::Result<String> {
    let (_, run) = stack
        .get_json(&format!("/api/{user}/runs/{run_id}"))
        .await?;
    Ok(run["status"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn metrics_follow_queued_running_and_finished_turns() -> anyhow::Result<()> {
    // No worker yet, so the first turn waits in the queue where the API's metrics can see it.
    let mut stack = Stack::start(StackOptions {
        workers: 0,
        ..StackOptions::default()
    })
    .await?;
    let before = stack.scrape(None).await?;
    assert!(
        before.has("conveyor_queue_depth{queue=\"chat\"}"),
        "{before:?}"
    );
    assert_eq!(before.count("conveyor_sse_streams_active"), 0);

    // A turn with a tool call; the model takes a while to answer so the run is seen running.
    let (status, created) = stack
        .post_chat("mia", json!({"message": "add buy milk [[ttft_ms=1000]]"}))
        .await?;
    assert_eq!(status, 202, "{created}");
    let run_id = created["run_id"].as_str().unwrap().to_owned();
    eventually(TIMEOUT, || async {
        let api = stack.scrape(None).await?;
        Ok((api.count("conveyor_queue_depth{queue=\"chat\"}") >= 1
            && api.count("conveyor_runs{status=\"queued\"}") >= 1)
            .then_some(()))
    })
    .await?;

    stack.add_worker()?;
    stack.add_worker()?;
    let mut events = stack
        .open_sse(&format!("/api/mia/runs/{run_id}/events"), None)
        .await?;
    let first = events.next_event().await?.expect("run.queued");
    assert_eq!(first.event, "run.queued");
    // While the client listens and a worker runs the turn:
    eventually(TIMEOUT, || async {
        let api = stack.scrape(None).await?;
        Ok((api.count("conveyor_sse_streams_active") >= 1
            && api.count("conveyor_runs{status=\"running\"}") >= 1
            && api.count("conveyor_queue_depth{queue=\"chat\"}") < 1)
            .then_some(()))
    })
    .await?;
    let rest = events.collect_until_terminal(TIMEOUT).await?;
    assert_eq!(rest.last().unwrap().event, "run.completed");
    drop(events);

    // A turn whose first LLM request is refused with a 429, then retried.
    let (status, created) = stack
        .post_chat(
            "mia",
            json!({"message": "tell me about metrics [[fail=429 fail_times=1]]"}),
        )
        .await?;
    assert_eq!(status, 202, "{created}");
    let retried_run = created["run_id"].as_str().unwrap().to_owned();
    let events = stack.run_events("mia", &retried_run).await?;
    assert_eq!(events.last().unwrap().event, "run.completed");

    // The API: no stream open, nothing queued or running any more.
    eventually(TIMEOUT, || async {
        let api = stack.scrape(None).await?;
        Ok((api.count("conveyor_sse_streams_active") == 0
            && api.count("conveyor_runs{status=\"running\"}") == 0
            && api.count("conveyor_runs{status=\"queued\"}") == 0
            && api.count("conveyor_queue_depth{queue=\"chat\"}") == 0)
            .then_some(()))
    })
    .await?;

    // The workers (fresh processes, so their counters started at zero): two completed turns,
    // three successful LLM requests (tool call, answer, answer) plus the refused one, its retry
    // by reason, one MCP call, and the tokens the fake reported.
    let workers = eventually(TIMEOUT, || async {
        let Ok(workers) = stack.scrape_workers().await else {
            return Ok(None);
        };
        let done = total(
            &workers,
            "conveyor_turn_duration_seconds_count{outcome=\"completed\"}",
        );
        Ok((done >= 2).then_some(workers))
    })
    .await?;
    let value = |series: &str| total(&workers, series);
    assert_eq!(
        value("conveyor_turn_duration_seconds_count{outcome=\"completed\"}"),
        2
    );
    assert_eq!(value("conveyor_llm_requests_total"), 4);
    assert_eq!(
        value("conveyor_llm_errors_total{reason=\"rate_limited\"}"),
        1
    );
    assert_eq!(
        value("conveyor_llm_retries_total{reason=\"rate_limited\"}"),
        1
    );
    assert_eq!(value("conveyor_llm_time_to_first_token_seconds_count"), 3);
    assert_eq!(value("conveyor_llm_request_duration_seconds_count"), 3);
    assert_eq!(
        value("conveyor_mcp_call_duration_seconds_count{server=\"tasks\"}"),
        1
    );
    assert_eq!(
        value("conveyor_mcp_call_errors_total{server=\"tasks\",reason=\"tool_error\"}"),
        0
    );
    assert_eq!(value("conveyor_mcp_server_up{server=\"tasks\"}"), 2);
    assert!(value("conveyor_llm_tokens_total{kind=\"completion\"}") > 0);
    assert!(value("conveyor_llm_tokens_total{kind=\"prompt\"}") > 0);
    assert_eq!(
        value("conveyor_worker_jobs_total{outcome=\"succeeded\"}"),
        2
    );
    // Two workers of eight slots each.
    assert_eq!(value("conveyor_worker_slots{queue=\"chat\"}"), 16);
    assert_eq!(value("conveyor_worker_busy_slots{queue=\"chat\"}"), 0);
    Ok(())
}

#[tokio::test]
async fn worker_metrics_server_answers_health_checks() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 1,
        ..StackOptions::default()
    })
    .await?;
    let url = format!("{}/healthz", stack.worker_metrics_urls[0]);
    let status = eventually(TIMEOUT, || async {
        Ok(stack
            .http
            .get(&url)
            .send()
            .await
            .ok()
            .map(|response| response.status().as_u16()))
    })
    .await?;
    assert_eq!(status, 200);
    let scrape = stack.scrape(Some(0)).await?;
    assert!(scrape.has("conveyor_llm_requests_total"), "{scrape:?}");
    assert!(scrape.has("conveyor_worker_busy_slots{queue=\"batch\"}"));
    Ok(())
}

/// Starts turns (of different users) that each make one LLM request: an echo answer.
async fn run_echo_turns(stack: &Stack, count: usize, tag: &str) -> anyhow::Result<Vec<String>> {
    let mut runs = Vec::with_capacity(count);
    for i in 0..count {
        let (status, created) = stack
            .post_chat(
                &format!("user{i}"),
                json!({"message": format!("{tag} {i}")}),
            )
            .await?;
        assert_eq!(status, 202, "{created}");
        runs.push(created["run_id"].as_str().unwrap().to_owned());
    }
    Ok(runs)
}

#[tokio::test]
async fn workers_together_never_exceed_the_llm_concurrency_limit() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 2,
        worker_concurrency: 8,
        fake_llm_args: vec!["--ttft-ms".into(), "100".into()],
        env: vec![("LLM_MAX_CONCURRENT".into(), "2".into())],
        ..StackOptions::default()
    })
    .await?;
    let runs = run_echo_turns(&stack, 12, "hello concurrency").await?;
    for (i, run_id) in runs.iter().enumerate() {
        let user = format!("user{i}");
        let status = eventually(TIMEOUT, || async {
            let status = run_status(&stack, &user, run_id).await?;
            Ok((status == "completed" || status == "failed").then_some(status))
        })
        .await?;
        assert_eq!(status, "completed", "{run_id}");
    }
    let llm = stack.llm_stats().await?;
    assert_eq!(llm.requests, 12);
    // Sixteen worker slots wanted up to twelve requests at once; the shared limit let two.
    assert_eq!(llm.max_in_flight, 2, "{llm:?}");
    let workers = stack.scrape_workers().await?;
    assert_eq!(
        total(&workers, "conveyor_llm_rate_limit_wait_seconds_count"),
        12
    );
    assert_eq!(
        total(&workers, "conveyor_llm_rate_limit_fail_open_total"),
        0
    );
    Ok(())
}

#[tokio::test]
async fn workers_together_keep_the_requests_per_minute_limit() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 2,
        worker_concurrency: 4,
        env: vec![("LLM_RATE_LIMIT_RPM".into(), "3".into())],
        ..StackOptions::default()
    })
    .await?;
    let runs = run_echo_turns(&stack, 5, "hello rate").await?;
    // Three requests go out; the other two runs wait for the minute's window to reopen.
    eventually(TIMEOUT, || async {
        let Ok(workers) = stack.scrape_workers().await else {
            return Ok(None);
        };
        let waiting = total(&workers, "conveyor_llm_rate_limit_waiting");
        let completed = total(
            &workers,
            "conveyor_turn_duration_seconds_count{outcome=\"completed\"}",
        );
        Ok((waiting >= 2 && completed >= 3).then_some(()))
    })
    .await?;
    assert_eq!(stack.llm_stats().await?.requests, 3);

    // A wait for the limit is cancellable: cancel every run; the waiting ones end cancelled
    // without ever reaching the model.
    let mut statuses = Vec::new();
    for (i, run_id) in runs.iter().enumerate() {
        let user = format!("user{i}");
        stack
            .http
            .post(stack.url(&format!("/api/{user}/runs/{run_id}/cancel")))
            .send()
            .await?;
        let status = eventually(TIMEOUT, || async {
            let status = run_status(&stack, &user, run_id).await?;
            Ok((status != "queued" && status != "running").then_some(status))
        })
        .await?;
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "cancelled",
            "cancelled",
            "completed",
            "completed",
            "completed"
        ]
    );
    assert_eq!(stack.llm_stats().await?.requests, 3);
    Ok(())
}
