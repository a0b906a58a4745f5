//! The Batches API end to end: uploads through the real API, runs through real workers and
//! the fake LLM, results read back as a client would. Every test checks what a user sees (the
//! batch's status and counts, its JSONL results) and what Postgres holds (one answer per line,
//! each task once, nothing stored for a refused upload).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use conveyor_e2e::harness::{Stack, StackOptions, eventually};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

/// How long a whole test batch may take, worker recovery included.
const BATCH_DEADLINE: Duration = Duration::from_mins(3);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A JSONL body from one JSON value per line.
fn jsonl(lines: &[Value]) -> String {
    lines.iter().fold(String::new(), |mut body, l| {
        let _ = writeln!(body, "{l}");
        body
    })
}

/// `POST /api/{user}/batches{query}` with `body`.
async fn post_batch(
    stack: &Stack,
    user: &str,
    query: &str,
    body: String,
) -> anyhow::Result<(u16, Value)> {
    let response = stack
        .http
        .post(stack.url(&format!("/api/{user}/batches{query}")))
        .header("content-type", "application/jsonl")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// Creates a batch and returns its id.
async fn create_batch(stack: &Stack, user: &str, lines: &[Value]) -> anyhow::Result<String> {
    let (status, body) = post_batch(stack, user, "", jsonl(lines)).await?;
    ensure!(status == 201, "create answered {status}: {body}");
    Ok(body["id"].as_str().context("id")?.to_owned())
}

async fn get_batch(stack: &Stack, user: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = stack.get_json(&format!("/api/{user}/batches/{id}")).await?;
    ensure!(status == 200, "GET batch answered {status}: {body}");
    Ok(body)
}

/// Polls the batch (a few times a second, as a client would) until `done` holds for it.
async fn wait_batch(
    stack: &Stack,
    user: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + BATCH_DEADLINE;
    loop {
        let batch = get_batch(stack, user, id).await?;
        if done(&batch) {
            return Ok(batch);
        }
        ensure!(
            Instant::now() < deadline,
            "batch {id} {what}: not within {BATCH_DEADLINE:?}; last seen {batch}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stack for batch runs: the tests poll the batch's status for up to minutes, more often than
/// the per-user request limit allows, so it is off.
fn batch_stack(workers: usize, worker_concurrency: usize) -> StackOptions {
    StackOptions {
        workers,
        worker_concurrency,
        env: env(&[("RATE_LIMIT_PER_MINUTE", "0")]),
        ..StackOptions::default()
    }
}

fn status_is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |batch| batch["status"] == status
}

/// The batch's results, one JSON object per line, keyed by `custom_id` (a repeated key fails).
async fn results(stack: &Stack, user: &str, id: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let response = stack
        .http
        .get(stack.url(&format!("/api/{user}/batches/{id}/results")))
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "results answered {}",
        response.status()
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(content_type == "application/x-ndjson", "{content_type}");
    let text = response.text().await?;
    let mut lines = BTreeMap::new();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line).with_context(|| line.to_owned())?;
        let key = value["custom_id"].as_str().context("custom_id")?.to_owned();
        ensure!(
            lines.insert(key.clone(), value).is_none(),
            "{key} appears twice in the results"
        );
    }
    Ok(lines)
}

fn counts(batch: &Value) -> (i64, i64, i64, i64) {
    let c = &batch["counts"];
    let n = |k: &str| c[k].as_i64().unwrap_or(-1);
    (n("total"), n("completed"), n("failed"), n("cancelled"))
}

/// The fake model's answer to a plain message: an echo padded to 8 words.
fn echo(message: &str) -> String {
    const FILLER: [&str; 9] = [
        "This",
        "is",
        "a",
        "deterministic",
        "answer",
        "from",
        "the",
        "fake",
        "model.",
    ];
    let words: Vec<&str> = message.split_whitespace().collect();
    let mut text = format!("You said: {}.", words.join(" "));
    for word in FILLER.iter().take(8_usize.saturating_sub(2 + words.len())) {
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// Runs whose final answer was stored more than once.
async fn duplicated_answers(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        r"SELECT count(*) FROM (
              SELECT run_id FROM messages
              WHERE role = 'assistant' AND tool_calls = '[]'::jsonb
              GROUP BY run_id HAVING count(*) > 1) d",
    )
    .fetch_one(db)
    .await?)
}

/// How often each task title exists.
async fn task_counts(db: &sqlx::PgPool) -> anyhow::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT title, count(*) FROM tasks GROUP BY title")
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Line `i` of the big batches: every tenth adds a task, the rest just talk.
fn line(i: usize, directives: &str) -> (String, String) {
    let message = if i.is_multiple_of(10) {
        format!("add batch task {i}")
    } else {
        format!("hello number {i}")
    };
    (format!("line-{i:05}"), format!("{message}{directives}"))
}

/// Checks one completed result line against what the fake model answers for line `i`.
fn check_result(i: usize, result: &Value) -> anyhow::Result<()> {
    ensure!(result["status"] == "completed", "line {i}: {result}");
    ensure!(result["error"].is_null(), "line {i}: {result}");
    ensure!(
        result["run_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("run_"))
    );
    let calls = result["response"]["tool_calls"]
        .as_array()
        .context("tool_calls")?;
    if i.is_multiple_of(10) {
        ensure!(calls.len() == 1, "line {i}: {result}");
        ensure!(calls[0]["name"] == "add_task", "line {i}: {result}");
        ensure!(
            calls[0]["arguments"]["title"] == format!("batch task {i}").as_str(),
            "line {i}: {result}"
        );
        ensure!(calls[0]["ok"] == true, "line {i}: {result}");
        let text = result["response"]["text"].as_str().context("text")?;
        ensure!(text.starts_with("Done."), "line {i}: {text}");
    } else {
        ensure!(calls.is_empty(), "line {i}: {result}");
        ensure!(
            result["response"]["text"] == echo(&format!("hello number {i}")).as_str(),
            "line {i}: {result}"
        );
    }
    Ok(())
}

/// 1,000 lines through two workers: every line answered exactly once with the fake model's
/// answer, each "add" line's task created once, and the batch ends `completed` with counts that
/// add up.
#[tokio::test]
async fn a_thousand_line_batch_through_two_workers_answers_every_line_once() -> anyhow::Result<()> {
    const LINES: usize = 1_000;
    let stack = Stack::start(batch_stack(2, 8)).await?;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            let (custom_id, message) = line(i, "");
            json!({"custom_id": custom_id, "message": message})
        })
        .collect();
    let (status, created) = post_batch(
        &stack,
        "alice",
        "?completion_window=2h&metadata.project=e2e",
        jsonl(&lines),
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("id")?.to_owned();
    assert!(id.starts_with("batch_"), "{created}");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(counts(&created).0, 1_000);
    assert_eq!(created["metadata"], json!({"project": "e2e"}));
    assert_eq!(created["completion_window"], "2h");

    let done = wait_batch(&stack, "alice", &id, "completes", status_is("completed")).await?;
    assert_eq!(counts(&done), (1_000, 1_000, 0, 0), "{done}");
    assert!(done["finished_at"].is_string(), "{done}");

    let results = results(&stack, "alice", &id).await?;
    assert_eq!(results.len(), LINES);
    for i in 0..LINES {
        let (custom_id, _) = line(i, "");
        let result = results
            .get(&custom_id)
            .with_context(|| format!("{custom_id} missing"))?;
        check_result(i, result)?;
    }

    let db = stack.db.pool().await?;
    assert_eq!(duplicated_answers(&db).await?, 0);
    let tasks = task_counts(&db).await?;
    assert_eq!(tasks.len(), LINES / 10, "{tasks:?}");
    assert!(tasks.values().all(|&n| n == 1), "{tasks:?}");

    // The list shows it, with the same counts.
    let (status, list) = stack.get_json("/api/alice/batches").await?;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["data"][0]["status"], "completed");
    assert_eq!(list["next_cursor"], Value::Null);
    Ok(())
}

/// Cancelling mid-batch: lines not started never start (they end `cancelled` without an
/// answer or a model call), running ones stop, the batch ends `cancelled`, every line has a
/// result and the counts add up.
#[tokio::test]
async fn cancelling_mid_batch_stops_the_lines_not_started() -> anyhow::Result<()> {
    const LINES: usize = 300;
    let stack = Stack::start(batch_stack(2, 8)).await?;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            let (custom_id, message) = line(i, " [[ttft_ms=150]]");
            json!({"custom_id": custom_id, "message": message})
        })
        .collect();
    let id = create_batch(&stack, "alice", &lines).await?;
    wait_batch(&stack, "alice", &id, "some lines complete", |b| {
        counts(b).1 >= 10
    })
    .await?;

    let response = stack
        .http
        .post(stack.url(&format!("/api/alice/batches/{id}/cancel")))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let cancelling: Value = response.json().await?;
    assert!(
        cancelling["status"] == "cancelling" || cancelling["status"] == "cancelled",
        "{cancelling}"
    );
    let done = wait_batch(&stack, "alice", &id, "is cancelled", status_is("cancelled")).await?;
    let (total, completed, failed, cancelled) = counts(&done);
    assert_eq!(total, 300);
    assert_eq!(completed + failed + cancelled, total, "{done}");
    assert!(completed >= 10 && cancelled > 0 && failed == 0, "{done}");
    // A second cancel changes nothing.
    let again = stack
        .http
        .post(stack.url(&format!("/api/alice/batches/{id}/cancel")))
        .send()
        .await?;
    assert_eq!(again.status(), 200);

    let results = results(&stack, "alice", &id).await?;
    assert_eq!(
        results.len(),
        LINES,
        "cancelled lines are in the results too"
    );
    let by_status = |s: &str| results.values().filter(|r| r["status"] == s).count();
    assert_eq!(i64::try_from(by_status("completed"))?, completed);
    assert_eq!(i64::try_from(by_status("cancelled"))?, cancelled);

    let db = stack.db.pool().await?;
    let (never_started, started_anyway): (i64, i64) = sqlx::query_as(
        r"SELECT count(*) FILTER (WHERE started_at IS NULL),
                 count(*) FILTER (WHERE started_at IS NULL AND EXISTS (
                     SELECT 1 FROM messages m WHERE m.run_id = runs.id AND m.role = 'assistant'))
          FROM runs WHERE batch_id = $1 AND status = 'cancelled'",
    )
    .bind(&id)
    .fetch_one(&db)
    .await?;
    assert!(never_started > 0, "most cancelled lines had not started");
    assert_eq!(started_anyway, 0);
    // The model was asked once per started "hello" line and twice per started "add" line:
    // nothing was sent for lines that never started.
    let started: Vec<(String,)> =
        sqlx::query_as("SELECT custom_id FROM runs WHERE batch_id = $1 AND started_at IS NOT NULL")
            .bind(&id)
            .fetch_all(&db)
            .await?;
    let stats: Value = stack
        .http
        .get(stack.llm_url.replace("/v1", "/stats"))
        .send()
        .await?
        .json()
        .await?;
    let requests = stats["requests"].as_u64().context("requests")?;
    let started = u64::try_from(started.len())?;
    assert!(
        requests >= started && requests <= 2 * started,
        "{requests} model requests for {started} started lines"
    );
    assert_eq!(duplicated_answers(&db).await?, 0);
    Ok(())
}

/// A worker killed with SIGKILL mid-batch: the other one takes over its runs; every line is
/// answered exactly once and every task created once.
#[tokio::test]
async fn a_worker_killed_mid_batch_loses_nothing() -> anyhow::Result<()> {
    const LINES: usize = 300;
    let mut stack = Stack::start(batch_stack(2, 8)).await?;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            // Slow enough that the batch is still under way when the kill comes: at 50 ms a
            // line, 300 lines finished in ~3 s, before the test could find a running one.
            let (custom_id, message) = line(i, " [[ttft_ms=200]]");
            json!({"custom_id": custom_id, "message": message})
        })
        .collect();
    let id = create_batch(&stack, "alice", &lines).await?;
    let db = stack.db.pool().await?;
    // Kill the worker that holds a running line, once a fair share has completed.
    wait_batch(&stack, "alice", &id, "some lines complete", |b| {
        counts(b).1 >= 30
    })
    .await?;
    let victim = eventually(Duration::from_secs(30), || async {
        let running: Option<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE batch_id = $1 AND status = 'running' LIMIT 1",
        )
        .bind(&id)
        .fetch_optional(&db)
        .await?;
        Ok(match running {
            Some(run) => stack.holder_pid(&run).await?,
            None => None,
        })
    })
    .await?;
    assert!(stack.kill_worker_with_pid(victim).await?);

    let done = wait_batch(&stack, "alice", &id, "completes", status_is("completed")).await?;
    assert_eq!(counts(&done), (300, 300, 0, 0), "{done}");
    let results = results(&stack, "alice", &id).await?;
    assert_eq!(results.len(), LINES);
    for i in 0..LINES {
        let (custom_id, _) = line(i, "");
        check_result(i, &results[&custom_id])?;
    }
    assert_eq!(duplicated_answers(&db).await?, 0);
    let tasks = task_counts(&db).await?;
    assert_eq!(tasks.len(), LINES / 10, "{tasks:?}");
    assert!(tasks.values().all(|&n| n == 1), "{tasks:?}");
    Ok(())
}

/// A batch at the default line limit (50,000) is accepted in one request, cancelled in one
/// request (every line at once), and its 50,000 results stream back page after page.
#[tokio::test]
async fn a_full_size_batch_is_accepted_cancelled_and_read_back_whole() -> anyhow::Result<()> {
    const LINES: usize = 50_000;
    let stack = Stack::start(batch_stack(0, 1)).await?;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| json!({"custom_id": format!("{i:05}"), "message": format!("prompt {i}")}))
        .collect();
    let started = Instant::now();
    let id = create_batch(&stack, "alice", &lines).await?;
    eprintln!("50,000 lines accepted in {:?}", started.elapsed());
    let created = get_batch(&stack, "alice", &id).await?;
    assert_eq!(counts(&created), (50_000, 0, 0, 0), "{created}");

    let started = Instant::now();
    let response = stack
        .http
        .post(stack.url(&format!("/api/alice/batches/{id}/cancel")))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let cancelled: Value = response.json().await?;
    eprintln!("50,000 lines cancelled in {:?}", started.elapsed());
    // No line had started, so the batch is cancelled at once.
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(counts(&cancelled), (50_000, 0, 0, 50_000), "{cancelled}");

    let started = Instant::now();
    let results = results(&stack, "alice", &id).await?;
    eprintln!("50,000 results read in {:?}", started.elapsed());
    assert_eq!(results.len(), LINES);
    assert!(results.values().all(|r| r["status"] == "cancelled"
        && r["response"]["text"].is_null()
        && r["error"].is_null()));
    let db = stack.db.pool().await?;
    let stored: (i64, i64, i64) = sqlx::query_as(
        r"SELECT (SELECT count(*) FROM runs WHERE batch_id = $1),
                 (SELECT count(*) FROM messages WHERE role = 'user'),
                 (SELECT count(*) FROM run_events WHERE kind = 'run.cancelled')",
    )
    .bind(&id)
    .fetch_one(&db)
    .await?;
    assert_eq!(stored, (50_000, 50_000, 50_000));
    Ok(())
}

/// A chat turn sent while a long batch runs is answered before the batch ends: batch work
/// never holds up interactive turns.
#[tokio::test]
async fn chat_stays_responsive_while_a_batch_runs() -> anyhow::Result<()> {
    const LINES: usize = 400;
    let stack = Stack::start(batch_stack(1, 4)).await?;
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            json!({"custom_id": format!("l{i}"), "message": format!("slow line {i} [[ttft_ms=100]]")})
        })
        .collect();
    let id = create_batch(&stack, "alice", &lines).await?;
    wait_batch(&stack, "alice", &id, "is under way", |b| counts(b).1 >= 4).await?;

    let (status, turn) = stack
        .post_chat("bob", json!({"message": "are you there"}))
        .await?;
    assert_eq!(status, 202, "{turn}");
    let run_id = turn["run_id"].as_str().context("run_id")?;
    let events = stack.run_events("bob", run_id).await?;
    let last = events.last().context("no events")?;
    assert_eq!(last.event, "run.completed");

    let batch = get_batch(&stack, "alice", &id).await?;
    assert_eq!(batch["status"], "in_progress", "{batch}");
    assert!(counts(&batch).1 < 400, "{batch}");
    Ok(())
}

/// Every kind of bad upload is refused with `400` naming exactly the offending lines, and
/// nothing of it is stored.
#[tokio::test]
async fn bad_uploads_are_refused_with_their_line_numbers_and_create_nothing() -> anyhow::Result<()>
{
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: env(&[("MAX_BATCH_LINES", "5"), ("MAX_BATCH_BYTES", "4096")]),
        ..StackOptions::default()
    })
    .await?;
    // Bob's conversation, which Alice may not continue.
    let (status, bobs) = stack.post_chat("bob", json!({"message": "mine"})).await?;
    assert_eq!(status, 202);
    let bobs_conversation = bobs["conversation_id"].as_str().context("conversation")?;
    let unknown_conversation = format!("conv_{}", ulid::Ulid::new());

    let ok = |id: &str| json!({"custom_id": id, "message": "hi"}).to_string();
    let long = "x".repeat(1_500);
    let cases: Vec<(&str, Vec<String>, Vec<usize>)> = vec![
        (
            "bad JSON",
            vec![ok("a"), r#"{"custom_id": "b", "#.into()],
            vec![2],
        ),
        (
            "missing field",
            vec![ok("a"), ok("b"), r#"{"custom_id": "c"}"#.into()],
            vec![3],
        ),
        (
            "unknown field",
            vec![json!({"custom_id": "a", "message": "x", "model": "gpt"}).to_string()],
            vec![1],
        ),
        (
            "duplicate custom_id",
            vec![ok("a"), ok("b"), ok("c"), ok("a")],
            vec![4],
        ),
        (
            "empty message",
            vec![
                ok("a"),
                json!({"custom_id": "b", "message": "  "}).to_string(),
            ],
            vec![2],
        ),
        (
            "malformed conversation id",
            vec![json!({"custom_id": "a", "message": "x", "conversation_id": "nope"}).to_string()],
            vec![1],
        ),
        (
            "foreign and unknown conversations",
            vec![
                ok("a"),
                json!({"custom_id": "b", "message": "x", "conversation_id": bobs_conversation})
                    .to_string(),
                ok("c"),
                json!({"custom_id": "d", "message": "x", "conversation_id": unknown_conversation})
                    .to_string(),
            ],
            vec![2, 4],
        ),
        (
            "too many lines",
            (0..7).map(|i| ok(&format!("l{i}"))).collect(),
            vec![6],
        ),
        (
            "too large",
            (0..4)
                .map(|i| json!({"custom_id": format!("l{i}"), "message": long}).to_string())
                .collect(),
            vec![3],
        ),
        (
            "several at once, blank lines counted",
            vec![
                ok("a"),
                String::new(),
                "not json".into(),
                ok("b"),
                json!({"custom_id": "", "message": "x"}).to_string(),
            ],
            vec![3, 5],
        ),
    ];
    for (name, lines, expected) in cases {
        let body = lines.iter().fold(String::new(), |mut body, l| {
            let _ = writeln!(body, "{l}");
            body
        });
        let (status, body) = post_batch(&stack, "alice", "", body).await?;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{name}: {body}");
        assert_eq!(body["error"]["lines"], json!(expected), "{name}: {body}");
        assert_eq!(
            body["error"]["errors"][0]["line"],
            json!(expected[0]),
            "{name}: {body}"
        );
    }
    let (status, body) = post_batch(&stack, "alice", "", "\n\n".into()).await?;
    assert_eq!(
        (status, body["error"]["lines"].clone()),
        (400, json!([])),
        "{body}"
    );
    // Bad options are field errors.
    for query in ["?completion_window=forever", "?colour=blue", "?metadata.=x"] {
        let (status, body) = post_batch(&stack, "alice", query, format!("{}\n", ok("a"))).await?;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"]["code"], "validation_failed", "{query}");
    }

    let db = stack.db.pool().await?;
    let stored: (i64, i64, i64, i64) = sqlx::query_as(
        r"SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM runs),
                 (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages)",
    )
    .fetch_one(&db)
    .await?;
    assert_eq!(stored, (0, 1, 1, 1), "only Bob's chat turn is stored");
    Ok(())
}

/// Another user's batch is not found; a malformed id is a bad request; the list is per user.
/// A batch whose completion window ends before its lines start ends `expired`, its lines
/// cancelled with `batch_expired`.
#[tokio::test]
async fn batches_are_private_and_expire_after_their_window() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: env(&[("SWEEP_INTERVAL_SECS", "1")]),
        ..StackOptions::default()
    })
    .await?;
    let lines: Vec<Value> = (0..3)
        .map(|i| json!({"custom_id": format!("c{i}"), "message": "hi"}))
        .collect();
    let (status, created) =
        post_batch(&stack, "alice", "?completion_window=2s", jsonl(&lines)).await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("id")?;

    for (method, path) in [
        ("GET", format!("/api/bob/batches/{id}")),
        ("GET", format!("/api/bob/batches/{id}/results")),
        ("POST", format!("/api/bob/batches/{id}/cancel")),
    ] {
        let response = stack
            .http
            .request(method.parse()?, stack.url(&path))
            .send()
            .await?;
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await?;
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (status, body) = stack.get_json("/api/alice/batches/batch_nope").await?;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (400, json!("batch_id"))
    );
    let (_, bobs) = stack.get_json("/api/bob/batches").await?;
    assert_eq!(bobs["data"], json!([]));

    let expired = wait_batch(&stack, "alice", id, "expires", status_is("expired")).await?;
    assert_eq!(counts(&expired), (3, 0, 0, 3), "{expired}");
    let results = results(&stack, "alice", id).await?;
    assert_eq!(results.len(), 3);
    for result in results.values() {
        assert_eq!(result["status"], "cancelled", "{result}");
        assert_eq!(result["error"]["code"], "batch_expired", "{result}");
    }
    Ok(())
}

fn token(sub: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 300;
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(b"batch-secret"),
    )?)
}

/// With auth on, every batch endpoint needs a token for the path's user.
#[tokio::test]
async fn batch_endpoints_need_the_paths_users_token() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: env(&[("JWT_SECRET", "batch-secret")]),
        ..StackOptions::default()
    })
    .await?;
    let alice = token("alice")?;
    let response = stack
        .http
        .post(stack.url("/api/alice/batches"))
        .bearer_auth(&alice)
        .body(jsonl(&[json!({"custom_id": "a", "message": "hi"})]))
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    let bob = token("bob")?;
    for (method, path) in [
        ("POST", "/api/alice/batches".to_owned()),
        ("GET", "/api/alice/batches".to_owned()),
        ("GET", format!("/api/alice/batches/{id}")),
        ("GET", format!("/api/alice/batches/{id}/results")),
        ("POST", format!("/api/alice/batches/{id}/cancel")),
    ] {
        for (bearer, expected) in [(None, 401), (Some(&bob), 403)] {
            let mut request = stack
                .http
                .request(method.parse()?, stack.url(&path))
                .body(jsonl(&[json!({"custom_id": "b", "message": "x"})]));
            if let Some(bearer) = bearer {
                request = request.bearer_auth(bearer);
            }
            let status = request.send().await?.status();
            assert_eq!(status, expected, "{method} {path}");
        }
        let status = stack
            .http
            .request(method.parse()?, stack.url(&path))
            .bearer_auth(&alice)
            .body(jsonl(&[json!({"custom_id": "c", "message": "x"})]))
            .send()
            .await?
            .status();
        assert!(status.is_success(), "{method} {path}: {status}");
    }
    Ok(())
}
