//! Outages: the API and the workers ride out a Redis restart and a Postgres restart without
//! being restarted themselves. Turns caught mid-answer finish (or retry and finish), nothing a
//! user sent is lost, no side effect happens twice, `/readyz` says "not ready" while a backend
//! is away, and clients that follow or resume a run's events get every event once, in order.
//!
//! Faults are injected only into backends the test owns: a private `redis-server` it kills and
//! starts again on the same port, and a proxy between the services and Postgres that closes
//! every connection and refuses new ones for a while. Each test prints one `FAULT-MATRIX` line
//! (run with `--no-capture`) for the fault matrix in the docs.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use conveyor_e2e::harness::{
    Backends, PgProxy, RedisMode, SseEvent, SseStream, Stack, StackOptions, eventually,
};
use serde_json::{Value, json};

const USER: &str = "olga";
/// Turns in flight when the fault hits: half add a task (a side effect that must happen once),
/// half only stream text.
const TURNS: usize = 6;
/// Words of an answer; at 50 ms a word a long answer takes about 3 s, so the fault lands inside
/// it, and a short one ends while the backend is still away (its commit meets the fault).
const LONG: usize = 60;
const SHORT: usize = 20;
/// How long the backend stays away.
const OUTAGE: Duration = Duration::from_secs(2);

/// The fault a test injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Kill the private `redis-server` (SIGKILL) and start it again on the same port.
    RedisRestart,
    /// Close every connection to Postgres and refuse new ones, then accept again.
    PostgresCut,
}

impl Fault {
    async fn begin(self, stack: &mut Stack) -> anyhow::Result<()> {
        match self {
            Self::RedisRestart => {
                stack
                    .redis_server
                    .as_mut()
                    .context("a private Redis")?
                    .kill()
                    .await
            }
            Self::PostgresCut => {
                stack
                    .postgres_proxy
                    .as_ref()
                    .context("a Postgres proxy")?
                    .cut()
                    .await;
                Ok(())
            }
        }
    }

    async fn end(self, stack: &mut Stack) -> anyhow::Result<()> {
        match self {
            Self::RedisRestart => {
                stack
                    .redis_server
                    .as_mut()
                    .context("a private Redis")?
                    .restart()
                    .await
            }
            Self::PostgresCut => {
                stack
                    .postgres_proxy
                    .as_ref()
                    .context("a Postgres proxy")?
                    .resume()
                    .await;
                Ok(())
            }
        }
    }
}

/// What a scenario expects of the event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streams {
    /// The replay buffer survives: every client gets every event once, gap-free, and a resume
    /// from before the fault replays exactly what the live client saw.
    Complete,
    /// Redis lost its data: live streams may break or end early; only the run's outcome (in
    /// Postgres) and a terminal event for the client are required.
    MayBreak,
}

/// One fault-matrix row.
struct Scenario {
    label: &'static str,
    tag: &'static str,
    backends: Backends,
    fault: Fault,
    streams: Streams,
    /// How long the runs may take to end after the fault is over.
    deadline: Duration,
}

/// A turn started before the fault, with its SSE client.
struct Turn {
    run_id: String,
    conversation_id: String,
    message: String,
    /// The title of the task the turn adds, for turns with a tool call.
    task: Option<String>,
    /// The live SSE connection, while open.
    stream: Option<SseStream>,
    /// Events received so far, in order, without duplicates.
    events: Vec<SseEvent>,
    /// The last seq received before the fault.
    before_fault: u64,
    /// Times the client had to reconnect (the stream ended or failed before a terminal event).
    reconnects: usize,
    /// Events received again (a seq at or below one already received).
    duplicates: usize,
}

impl Turn {
    fn last_seq(&self) -> u64 {
        self.events.last().map_or(0, SseEvent::seq)
    }
}

fn words(n: usize) -> String {
    (0..n)
        .map(|w| format!("word{w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Even turns add a task and then answer slowly; odd ones answer slowly without a tool. Every
/// third answer is short.
fn message_for(tag: &str, index: usize) -> (String, Option<String>) {
    let n = if index % 3 == 2 { SHORT } else { LONG };
    if index.is_multiple_of(2) {
        let title = format!("{tag} task {index}");
        (
            format!("add {title} [[chunk_delay_ms=50 text={}]]", words(n)),
            Some(title),
        )
    } else {
        (
            format!("tell me about {tag} {index} [[chunks={n} chunk_delay_ms=50]]"),
            None,
        )
    }
}

/// Starts a turn and follows its events until its answer streams.
async fn start_turn(stack: &Stack, tag: &str, index: usize) -> anyhow::Result<Turn> {
    let (message, task) = message_for(tag, index);
    let (status, accepted) = stack.post_chat(USER, json!({ "message": message })).await?;
    ensure!(status == 202, "POST /chat answered {status}: {accepted}");
    let run_id = accepted["run_id"].as_str().context("run_id")?.to_owned();
    let conversation_id = accepted["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_owned();
    let mut stream = stack
        .open_sse(&format!("/api/{USER}/runs/{run_id}/events"), None)
        .await?;
    ensure!(stream.status == 200, "events answered {}", stream.status);
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.next_event().await? {
            let delta = event.event == "message.delta";
            events.push(event);
            if delta {
                return Ok(());
            }
        }
        bail!("the stream ended before any text")
    })
    .await
    .context("no text within 30 s")??;
    Ok(Turn {
        run_id,
        conversation_id,
        message,
        task,
        stream: Some(stream),
        before_fault: 0,
        events,
        reconnects: 0,
        duplicates: 0,
    })
}

/// Reads the turn's events to its terminal event, reconnecting with `Last-Event-ID` whenever
/// the stream ends or fails early, as a browser's `EventSource` does.
async fn follow_to_end(stack: &Stack, turn: &mut Turn, deadline: Instant) -> anyhow::Result<()> {
    let path = format!("/api/{USER}/runs/{}/events", turn.run_id);
    let mut retry = Duration::from_secs(1);
    loop {
        ensure!(
            Instant::now() < deadline,
            "run {}: no terminal event before the deadline (last seq {})",
            turn.run_id,
            turn.last_seq()
        );
        let Some(stream) = turn.stream.as_mut() else {
            match stack.open_sse(&path, Some(turn.last_seq())).await {
                Ok(stream) if stream.status == 200 => {
                    if let Some(ms) = stream.retry_ms {
                        retry = Duration::from_millis(ms);
                    }
                    turn.stream = Some(stream);
                }
                Ok(stream) if stream.status == 204 => bail!(
                    "run {}: resume after {} answered 204 though no terminal event was received",
                    turn.run_id,
                    turn.last_seq()
                ),
                // The API cannot attach right now (a backend is away): retry like EventSource.
                Ok(_) | Err(_) => tokio::time::sleep(retry).await,
            }
            continue;
        };
        match tokio::time::timeout_at(deadline.into(), stream.next_event()).await {
            // The deadline passed: the check at the top of the loop reports it.
            Err(_) => {}
            Ok(Ok(Some(event))) => {
                if event.seq() <= turn.last_seq() {
                    turn.duplicates += 1;
                    continue;
                }
                let end = event.is_terminal();
                turn.events.push(event);
                if end {
                    turn.stream = None;
                    return Ok(());
                }
            }
            Ok(Ok(None) | Err(_)) => {
                turn.stream = None;
                turn.reconnects += 1;
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Polls `/readyz` until it answers 503; `None` if it never did within `within`.
async fn wait_not_ready(stack: &Stack, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        let answer = stack
            .http
            .get(stack.url("/readyz"))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().as_u16() == 503) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn readyz(stack: &Stack) -> Option<u16> {
    stack
        .http
        .get(stack.url("/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until every run in `run_ids` is terminal in Postgres; returns when the last one
/// finished, as Postgres recorded it.
async fn wait_all_terminal(
    db: &sqlx::PgPool,
    run_ids: &[String],
    deadline: Instant,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    loop {
        let (done, last): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
            "SELECT count(*), max(finished_at) FROM runs
             WHERE id = ANY($1) AND status IN ('completed', 'failed', 'cancelled')",
        )
        .bind(run_ids)
        .fetch_one(db)
        .await?;
        if usize::try_from(done)? == run_ids.len() {
            return last.context("finished_at");
        }
        if Instant::now() > deadline {
            bail!(
                "only {done} of {} runs ended before the deadline",
                run_ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the user sees of the turns after the fault.
#[derive(Default)]
struct Tally {
    completed: usize,
    failed: usize,
    lost: usize,
    duplicated: usize,
    problems: Vec<String>,
    /// Stream irregularities a scenario allows (Redis lost the replay buffer), reported only.
    notes: Vec<String>,
}

impl Tally {
    fn problem(&mut self, turn: &Turn, what: impl std::fmt::Display) {
        self.problems.push(format!("run {}: {what}", turn.run_id));
    }
}

/// Checks one turn's outcome: status, history, side effects, durable events, the live client's
/// events and a resume from before the fault.
async fn inspect(
    stack: &Stack,
    db: &sqlx::PgPool,
    turn: &Turn,
    streams: Streams,
    tally: &mut Tally,
) {
    if let Err(error) = inspect_turn(stack, db, turn, streams, tally).await {
        tally.problem(turn, format!("cannot inspect: {error:#}"));
    }
}

async fn inspect_turn(
    stack: &Stack,
    db: &sqlx::PgPool,
    turn: &Turn,
    streams: Streams,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let (_, run) = stack
        .get_json(&format!("/api/{USER}/runs/{}", turn.run_id))
        .await?;
    match run["status"].as_str() {
        Some("completed") => tally.completed += 1,
        Some("failed") => {
            tally.failed += 1;
            tally.problem(turn, format!("failed: {}", run["error"]));
        }
        other => {
            tally.lost += 1;
            tally.problem(turn, format!("not finished: {other:?}"));
        }
    }

    // History: the user's message once, then exactly one answer (after the tool round trip).
    let (_, history) = stack
        .get_json(&format!(
            "/api/{USER}/conversations/{}/messages?limit=100",
            turn.conversation_id
        ))
        .await?;
    let messages = history["data"].as_array().context("history")?;
    let user_messages = messages
        .iter()
        .filter(|m| m["role"] == "user" && m["content"] == turn.message.as_str())
        .count();
    if user_messages == 0 {
        tally.lost += 1;
        tally.problem(turn, "the user's message is gone");
    }
    tally.duplicated += user_messages.saturating_sub(1);
    let answers: Vec<&Value> = messages
        .iter()
        .filter(|m| {
            m["role"] == "assistant" && m["tool_calls"].as_array().is_none_or(Vec::is_empty)
        })
        .collect();
    tally.duplicated += answers.len().saturating_sub(1);
    let roles: Vec<&str> = messages.iter().filter_map(|m| m["role"].as_str()).collect();
    let expected: &[&str] = if turn.task.is_some() {
        &["user", "assistant", "tool", "assistant"]
    } else {
        &["user", "assistant"]
    };
    if roles != expected {
        tally.problem(
            turn,
            format!("history roles {roles:?}, expected {expected:?}"),
        );
    }

    // The side effect happened exactly once.
    if let Some(title) = &turn.task {
        let tasks: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE user_id = $1 AND title = $2")
                .bind(USER)
                .bind(title)
                .fetch_one(db)
                .await?;
        let tasks = usize::try_from(tasks)?;
        if tasks == 0 {
            tally.problem(turn, format!("task {title:?} was never created"));
        }
        tally.duplicated += tasks.saturating_sub(1);
    }

    // Exactly one terminal event, in Postgres and for the client, and it is the last one.
    let terminal_rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE run_id = $1
         AND kind IN ('run.completed', 'run.failed', 'run.cancelled')",
    )
    .bind(&turn.run_id)
    .fetch_one(db)
    .await?;
    if terminal_rows != 1 {
        tally.problem(
            turn,
            format!("{terminal_rows} terminal events in run_events"),
        );
    }
    let terminals = turn.events.iter().filter(|e| e.is_terminal()).count();
    if terminals != 1 || !turn.events.last().is_some_and(SseEvent::is_terminal) {
        tally.problem(
            turn,
            format!("the client got {terminals} terminal events, not one at the end"),
        );
    }
    let completed_text = turn
        .events
        .iter()
        .rfind(|e| e.event == "message.completed")
        .and_then(|e| e.data["text"].as_str());
    let answer_text = answers.last().and_then(|m| m["content"].as_str());
    if completed_text != answer_text {
        tally.problem(
            turn,
            format!("message.completed {completed_text:?} but history {answer_text:?}"),
        );
    }
    // Below: what a client sees of the event stream. With `Streams::MayBreak` these are only
    // reported (`Tally::notes`).
    let stream_issue = |tally: &mut Tally, what: String| match streams {
        Streams::Complete => tally.problem(turn, what),
        Streams::MayBreak => tally.notes.push(format!("run {}: {what}", turn.run_id)),
    };

    // The live client: every event once, in order; its final attempt's text is the answer.
    if turn.duplicates > 0 {
        stream_issue(tally, format!("{} duplicated events", turn.duplicates));
    }
    if let Some((i, event)) = turn
        .events
        .iter()
        .enumerate()
        .find(|(i, e)| e.seq() != *i as u64 + 1)
    {
        stream_issue(
            tally,
            format!("gap: event #{i} has seq {} ({})", event.seq(), event.event),
        );
    }
    let final_attempt = turn
        .events
        .iter()
        .rposition(|e| e.event == "run.started")
        .unwrap_or(0);
    let streamed: String = turn.events[final_attempt..]
        .iter()
        .filter(|e| e.event == "message.delta")
        .filter_map(|e| e.data["text"].as_str())
        .collect();
    if completed_text.is_some_and(|text| text != streamed) {
        stream_issue(
            tally,
            format!("the final attempt's deltas do not add up to message.completed: {streamed:?}"),
        );
    }

    // A client that lost its connection at the fault resumes after its last seen event and
    // gets exactly the rest: what the live client saw after that point.
    let resumed = async {
        stack
            .open_sse(
                &format!("/api/{USER}/runs/{}/events", turn.run_id),
                Some(turn.before_fault),
            )
            .await?
            .collect_until_terminal(Duration::from_secs(30))
            .await
    };
    let tail = match resumed.await {
        Ok(tail) => tail,
        Err(error) => {
            stream_issue(
                tally,
                format!("resume after {} failed: {error:#}", turn.before_fault),
            );
            return Ok(());
        }
    };
    let live_tail: Vec<(u64, &str)> = turn
        .events
        .iter()
        .filter(|e| e.seq() > turn.before_fault)
        .map(|e| (e.seq(), e.event.as_str()))
        .collect();
    let resumed_tail: Vec<(u64, &str)> = tail.iter().map(|e| (e.seq(), e.event.as_str())).collect();
    if resumed_tail != live_tail {
        stream_issue(
            tally,
            format!(
                "resume after {} got {resumed_tail:?}, the live client {live_tail:?}",
                turn.before_fault
            ),
        );
    }
    Ok(())
}

/// A turn started after the fault completes: the API pushes, a worker fetches, events flow.
async fn new_turn_completes(stack: &Stack, tag: &str) -> anyhow::Result<()> {
    let (status, accepted) = stack
        .post_chat(
            USER,
            json!({ "message": format!("add {tag} after the outage") }),
        )
        .await?;
    ensure!(
        status == 202,
        "POST /chat after the outage answered {status}: {accepted}"
    );
    let run_id = accepted["run_id"].as_str().context("run_id")?;
    let events = stack.run_events(USER, run_id).await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    ensure!(
        kinds.last() == Some(&"run.completed"),
        "a turn after the outage ended {kinds:?}"
    );
    conveyor_e2e::harness::assert_gap_free(&events, 1);
    Ok(())
}

async fn survive(scenario: Scenario) -> anyhow::Result<()> {
    let mut stack = Stack::start_with(StackOptions::default(), scenario.backends).await?;
    let db = stack.db.pool().await?;

    let mut turns =
        futures::future::try_join_all((0..TURNS).map(|i| start_turn(&stack, scenario.tag, i)))
            .await?;
    for turn in &mut turns {
        turn.before_fault = turn.last_seq();
    }

    // The fault. The live clients stay connected through it.
    let fault_started = Instant::now();
    scenario.fault.begin(&mut stack).await?;
    let not_ready_after = wait_not_ready(&stack, OUTAGE).await;
    tokio::time::sleep(OUTAGE.saturating_sub(fault_started.elapsed())).await;
    scenario.fault.end(&mut stack).await?;
    let fault_over = Instant::now();
    let connections_before = stack.postgres_proxy.as_ref().map(PgProxy::accepted);
    let fault_over_at = chrono::Utc::now();

    let deadline = fault_over + scenario.deadline;
    let run_ids: Vec<String> = turns.iter().map(|t| t.run_id.clone()).collect();
    let (ended, followed) = tokio::join!(
        wait_all_terminal(&db, &run_ids, deadline),
        futures::future::join_all(turns.iter_mut().map(|turn| follow_to_end(
            &stack,
            turn,
            deadline + Duration::from_secs(10)
        ))),
    );
    let recovery = match &ended {
        Ok(last) => (*last - fault_over_at).to_std().unwrap_or_default(),
        Err(_) => fault_over.elapsed(),
    };

    let mut tally = Tally::default();
    for (turn, followed) in turns.iter().zip(&followed) {
        if let Err(error) = followed {
            tally.problem(turn, format!("client: {error:#}"));
        }
        inspect(&stack, &db, turn, scenario.streams, &mut tally).await;
    }
    println!(
        "FAULT-MATRIX | {} | runs={} completed={} failed={} lost={} duplicated_side_effects={} | recovery={:.1}s",
        scenario.label,
        turns.len(),
        tally.completed,
        tally.failed,
        tally.lost,
        tally.duplicated,
        recovery.as_secs_f64(),
    );
    let reconnects: usize = turns.iter().map(|t| t.reconnects).sum();
    for note in &tally.notes {
        eprintln!("{}: tolerated after data loss: {note}", scenario.label);
    }
    eprintln!(
        "{}: /readyz 503 after {not_ready_after:?}; clients reconnected {reconnects} times",
        scenario.label
    );

    let mut report = String::new();
    for problem in &tally.problems {
        let _ = writeln!(report, "  {problem}");
    }
    ended?;
    assert!(
        tally.problems.is_empty() && tally.lost == 0 && tally.duplicated == 0,
        "{}: {} completed, {} failed, {} lost, {} duplicated:\n{report}",
        scenario.label,
        tally.completed,
        tally.failed,
        tally.lost,
        tally.duplicated,
    );
    assert_eq!(tally.completed, TURNS);
    assert!(
        not_ready_after.is_some(),
        "/readyz never answered 503 during the outage"
    );

    // Back to normal without restarting anything.
    eventually(Duration::from_secs(30), || async {
        Ok((readyz(&stack).await == Some(200)).then_some(()))
    })
    .await
    .context("/readyz did not come back to 200")?;
    new_turn_completes(&stack, scenario.tag).await?;
    if let (Some(proxy), Some(before)) = (&stack.postgres_proxy, connections_before) {
        assert!(
            proxy.accepted() > before,
            "the services opened no new Postgres connection after the cut"
        );
    }
    Ok(())
}

#[tokio::test]
async fn runs_survive_a_redis_restart_mid_run() -> anyhow::Result<()> {
    survive(Scenario {
        label: "redis restart (AOF)",
        tag: "redis",
        backends: Backends {
            redis: RedisMode::Private { appendonly: true },
            postgres_proxy: false,
        },
        fault: Fault::RedisRestart,
        streams: Streams::Complete,
        deadline: Duration::from_mins(1),
    })
    .await
}

#[tokio::test]
async fn runs_survive_postgres_connections_being_cut() -> anyhow::Result<()> {
    survive(Scenario {
        label: "postgres restart (connections cut)",
        tag: "postgres",
        backends: Backends {
            redis: RedisMode::Shared,
            postgres_proxy: true,
        },
        fault: Fault::PostgresCut,
        streams: Streams::Complete,
        deadline: Duration::from_mins(1),
    })
    .await
}

#[tokio::test]
async fn runs_end_after_a_redis_restart_that_lost_its_data() -> anyhow::Result<()> {
    survive(Scenario {
        label: "redis restart (no persistence, data lost)",
        tag: "amnesia",
        backends: Backends {
            redis: RedisMode::Private { appendonly: false },
            postgres_proxy: false,
        },
        fault: Fault::RedisRestart,
        streams: Streams::MayBreak,
        // The sweeper re-enqueues runs left queued for 30 s or running without a heartbeat
        // for 15 s, every 5 s.
        deadline: Duration::from_secs(90),
    })
    .await
}
