//! The durable chat pipeline end to end: API → queue → worker agent loop → resumable SSE,
//! with the real binaries and the fake LLM, in both modes: the API and two workers on the
//! machine's Postgres and Redis, and `conveyor dev` on a SQLite file.

use std::time::Duration;

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, SseEvent, Stack, StackOptions, assert_gap_free, eventually};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

fn kinds(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// Kinds with consecutive deltas folded into one, for readable comparisons.
fn shape(events: &[SseEvent]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for kind in kinds(events) {
        if kind == "message.delta" && out.last() == Some(&"message.delta") {
            continue;
        }
        out.push(kind);
    }
    out
}

both_modes!(add_buy_milk_streams_a_tool_call_and_an_answer_and_stores_the_history);
async fn add_buy_milk_streams_a_tool_call_and_an_answer_and_stores_the_history(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let response = stack
        .http
        .post(stack.url("/api/alice/chat"))
        .json(&json!({"message": "add buy milk"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut sse = conveyor_e2e::harness::SseStream::open(
        stack
            .http
            .post(stack.url("/api/alice/chat"))
            .json(&json!({"message": "add buy milk"})),
    )
    .await?;
    assert_eq!(sse.status, 200);
    let events = sse.collect_until_terminal(TIMEOUT).await?;
    assert_eq!(
        sse.retry_ms,
        Some(1000),
        "each SSE response starts with retry: 1000"
    );
    assert_gap_free(&events, 1);
    assert_eq!(
        shape(&events),
        [
            "run.queued",
            "run.started",
            "tool.call",
            "tool.result",
            "message.delta",
            "message.completed",
            "run.completed"
        ]
    );
    let run_id = events[0].data["run_id"].as_str().unwrap().to_owned();
    let conversation_id = events[0].data["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for event in &events {
        assert_eq!(event.data["run_id"], run_id.as_str());
        assert_eq!(event.data["seq"], event.seq());
    }
    let call = &events[2].data;
    assert_eq!(call["name"], "add_task");
    assert_eq!(
        call["arguments"],
        json!({"title": "buy milk"}),
        "user_id is never shown to or taken from the model"
    );
    let result = &events[3].data;
    assert_eq!(result["ok"], true);
    assert_eq!(result["call_id"], call["call_id"]);
    assert_eq!(result["result"]["task"]["title"], "buy milk");

    // The text deltas add up to the completed message.
    let streamed: String = events
        .iter()
        .filter(|e| e.event == "message.delta")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    let completed = events
        .iter()
        .find(|e| e.event == "message.completed")
        .unwrap();
    assert_eq!(completed.data["text"], streamed.as_str());
    let done = events.last().unwrap();
    assert_eq!(done.data["status"], "completed");
    assert_eq!(done.data["message_id"], completed.data["message_id"]);

    // Exactly one task for alice per turn (two turns were sent), none for anyone else.
    let db = stack.sql().await?;
    let titles: Vec<(String, String)> = db
        .query("SELECT user_id, title FROM tasks ORDER BY id")
        .rows()
        .await?;
    assert_eq!(
        titles,
        [
            ("alice".to_owned(), "buy milk".to_owned()),
            ("alice".to_owned(), "buy milk".to_owned())
        ]
    );

    // The run is completed; the history holds user, assistant(tool call), tool, assistant.
    let (status, run) = stack.get_json(&format!("/api/alice/runs/{run_id}")).await?;
    assert_eq!(status, 200);
    assert_eq!(run["status"], "completed");
    assert_eq!(run["attempt"], 1);
    let (status, history) = stack
        .get_json(&format!(
            "/api/alice/conversations/{conversation_id}/messages"
        ))
        .await?;
    assert_eq!(status, 200);
    let messages = history["data"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(messages[0]["content"], "add buy milk");
    assert_eq!(messages[0]["run_id"], run_id.as_str());
    assert_eq!(messages[1]["tool_calls"][0]["id"], call["call_id"]);
    assert_eq!(messages[1]["tool_calls"][0]["name"], "add_task");
    assert_eq!(messages[1]["tool_calls"][0]["arguments"], call["arguments"]);
    assert_eq!(messages[2]["tool_call_id"], call["call_id"]);
    assert_eq!(messages[3]["id"], completed.data["message_id"]);
    assert_eq!(messages[3]["content"], completed.data["text"]);
    assert_eq!(messages[3]["status"], "completed");

    // The first (unread) response also completed: the conversation list has both.
    let (_, list) = stack.get_json("/api/alice/conversations").await?;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    drop(response);
    Ok(())
}

both_modes!(a_stream_resumes_after_a_disconnect_a_reload_and_after_the_run_ended);
async fn a_stream_resumes_after_a_disconnect_a_reload_and_after_the_run_ended(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        env: vec![("EVENT_STREAM_TTL_SECS".into(), "2".into())],
        ..StackOptions::in_mode(mode)
    })
    .await?;
    // A slow answer: 30 chunks, 30 ms apart.
    let (status, accepted) = stack
        .post_chat(
            "bob",
            json!({"message": "tell me a story [[chunks=30 chunk_delay_ms=30]]"}),
        )
        .await?;
    assert_eq!(status, 202, "{accepted}");
    let run_id = accepted["run_id"].as_str().unwrap().to_owned();
    let conversation_id = accepted["conversation_id"].as_str().unwrap().to_owned();
    assert_eq!(
        accepted["stream_url"],
        format!("/api/bob/runs/{run_id}/events")
    );

    // Read a few events, then drop the connection mid-stream.
    let mut first = stack
        .open_sse(accepted["stream_url"].as_str().unwrap(), None)
        .await?;
    let head = first.take(4, TIMEOUT).await?;
    drop(first);
    assert_gap_free(&head, 1);

    // A "page reload": attach through the conversation, from the start.
    let mut reload = stack
        .open_sse(
            &format!("/api/bob/conversations/{conversation_id}/stream"),
            None,
        )
        .await?;
    assert_eq!(reload.status, 200);
    let reloaded = reload.collect_until_terminal(TIMEOUT).await?;
    assert_gap_free(&reloaded, 1);

    // Resume after the last event seen: exactly the missing events.
    let last = head.last().unwrap().seq();
    let mut resumed = stack
        .open_sse(&format!("/api/bob/runs/{run_id}/events"), Some(last))
        .await?;
    let tail = resumed.collect_until_terminal(TIMEOUT).await?;
    assert_gap_free(&tail, last + 1);
    let mut whole = head.clone();
    whole.extend(tail.iter().cloned());
    assert_eq!(whole, reloaded, "head + resumed tail = the whole stream");
    assert!(whole.iter().filter(|e| e.event == "message.delta").count() > 1);

    // After the end: a cursor at the terminal event answers 204; from the start, the full
    // stream again; the query cursor works like the header, and the larger one wins.
    let terminal = whole.last().unwrap().seq();
    assert_eq!(
        stack
            .open_sse(&format!("/api/bob/runs/{run_id}/events"), Some(terminal))
            .await?
            .status,
        204
    );
    assert_eq!(
        stack
            .open_sse(
                &format!("/api/bob/runs/{run_id}/events?after={terminal}"),
                None
            )
            .await?
            .status,
        204
    );
    let mut again = stack
        .open_sse(&format!("/api/bob/runs/{run_id}/events?after=2"), Some(1))
        .await?;
    assert_eq!(
        again.collect_until_terminal(TIMEOUT).await?,
        whole[2..].to_vec()
    );
    assert_eq!(
        stack
            .open_sse(
                &format!("/api/bob/conversations/{conversation_id}/stream"),
                None
            )
            .await?
            .status,
        204,
        "no active run"
    );

    // After the replay buffer expired: rebuilt from the database without the deltas, at the
    // original seqs and with the original data.
    match mode {
        Mode::Distributed => {
            let stream_key = format!("{}:run:{run_id}:events", stack.redis_prefix);
            let redis = redis::Client::open(conveyor_e2e::harness::redis_url())?;
            eventually(Duration::from_secs(10), || {
                let redis = redis.clone();
                let key = stream_key.clone();
                async move {
                    let mut conn = redis.get_multiplexed_async_connection().await?;
                    let exists: bool = redis::AsyncCommands::exists(&mut conn, &key).await?;
                    Ok((!exists).then_some(()))
                }
            })
            .await?;
        }
        Mode::Embedded => {
            // The buffer is the file's `event_buffer` table, whose expired rows the bus deletes
            // after a terminal event at most once a minute: once this run's rows have expired,
            // the test deletes them as that sweep would.
            let db = stack.sql().await?;
            eventually(Duration::from_secs(10), || async {
                let live: i64 = db
                    .query(
                        "SELECT count(*) FROM event_buffer WHERE run_id = $1 \
                         AND (expires_at IS NULL \
                              OR expires_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                    )
                    .bind(&run_id)
                    .scalar()
                    .await?;
                Ok((live == 0).then_some(()))
            })
            .await?;
            let deleted = db
                .query("DELETE FROM event_buffer WHERE run_id = $1")
                .bind(&run_id)
                .execute()
                .await?;
            assert_eq!(
                deleted,
                u64::try_from(whole.len())?,
                "the run's buffered events"
            );
        }
    }
    let rebuilt = stack.run_events("bob", &run_id).await?;
    let durable: Vec<SseEvent> = whole
        .iter()
        .filter(|e| e.event != "message.delta")
        .cloned()
        .collect();
    assert_eq!(rebuilt, durable);
    assert_eq!(
        shape(&rebuilt),
        [
            "run.queued",
            "run.started",
            "message.completed",
            "run.completed"
        ]
    );
    Ok(())
}

both_modes!(an_idempotency_key_gives_one_run_and_a_busy_conversation_answers_409);
async fn an_idempotency_key_gives_one_run_and_a_busy_conversation_answers_409(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let send = |key: &'static str, body: Value| {
        let request = stack
            .http
            .post(stack.url("/api/carol/chat"))
            .header("accept", "application/json")
            .header("idempotency-key", key)
            .json(&body);
        async move {
            let response = request.send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.json::<Value>().await?))
        }
    };
    let body = json!({"message": "slow one [[chunks=20 chunk_delay_ms=50]]"});
    let (s1, first) = send("key-1", body.clone()).await?;
    let (s2, second) = send("key-1", body.clone()).await?;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first, second, "the same key answers the same run");
    let (s3, reused) = send("key-1", json!({"message": "something else"})).await?;
    assert_eq!(s3, 422);
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");

    // While that run is active, another turn on the same conversation is refused.
    let conversation_id = first["conversation_id"].as_str().unwrap();
    let run_id = first["run_id"].as_str().unwrap();
    let (status, busy) = stack
        .post_chat(
            "carol",
            json!({"conversation_id": conversation_id, "message": "and another"}),
        )
        .await?;
    assert_eq!(status, 409, "{busy}");
    assert_eq!(busy["error"]["code"], "conflict");
    assert_eq!(busy["error"]["active_run_id"], run_id);

    let events = stack.run_events("carol", run_id).await?;
    assert_eq!(events.last().unwrap().event, "run.completed");
    let db = stack.sql().await?;
    let runs: i64 = db.query("SELECT count(*) FROM runs").scalar().await?;
    assert_eq!(runs, 1, "one run for the key, none for the refused turn");
    let user_messages: i64 = db
        .query("SELECT count(*) FROM messages WHERE role = 'user'")
        .scalar()
        .await?;
    assert_eq!(user_messages, 1);

    // Once it finished, the conversation takes the next turn.
    let (status, next) = stack
        .post_chat(
            "carol",
            json!({"conversation_id": conversation_id, "message": "and another"}),
        )
        .await?;
    assert_eq!(status, 202, "{next}");
    assert_eq!(
        stack
            .run_events("carol", next["run_id"].as_str().unwrap())
            .await?
            .last()
            .unwrap()
            .event,
        "run.completed"
    );
    Ok(())
}

both_modes!(fifty_concurrent_conversations_from_ten_users_all_complete_in_isolation);
async fn fifty_concurrent_conversations_from_ten_users_all_complete_in_isolation(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let turns = (0..50).map(|i| {
        let user = format!("user{}", i % 10);
        let stack = &stack;
        async move {
            let message = format!("add errand {i} of {user}");
            let (status, accepted) = stack
                .post_chat(&user, json!({ "message": message }))
                .await?;
            anyhow::ensure!(status == 202, "{accepted}");
            let run_id = accepted["run_id"].as_str().unwrap().to_owned();
            let events = stack.run_events(&user, &run_id).await?;
            Ok::<_, anyhow::Error>((
                user,
                run_id,
                accepted["conversation_id"].as_str().unwrap().to_owned(),
                events,
            ))
        }
    });
    let results = futures::future::try_join_all(turns).await?;
    let db = stack.sql().await?;
    for (user, run_id, conversation_id, events) in &results {
        assert_gap_free(events, 1);
        assert_eq!(
            events.last().unwrap().event,
            "run.completed",
            "{user} {run_id}"
        );
        let call = events
            .iter()
            .find(|e| e.event == "tool.call")
            .expect("a tool call");
        assert_eq!(call.data["name"], "add_task");
        let (status, history) = stack
            .get_json(&format!(
                "/api/{user}/conversations/{conversation_id}/messages"
            ))
            .await?;
        assert_eq!(status, 200);
        let roles: Vec<&str> = history["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        // Another user sees none of it.
        let other = if user == "user0" { "user1" } else { "user0" };
        assert_eq!(
            stack
                .get_json(&format!("/api/{other}/runs/{run_id}"))
                .await?
                .0,
            404
        );
        assert_eq!(
            stack
                .open_sse(&format!("/api/{other}/runs/{run_id}/events"), None)
                .await?
                .status,
            404
        );
        assert_eq!(
            stack
                .get_json(&format!(
                    "/api/{other}/conversations/{conversation_id}/messages"
                ))
                .await?
                .0,
            404
        );
    }
    for u in 0..10 {
        let user = format!("user{u}");
        let mut titles: Vec<String> = db
            .query("SELECT title FROM tasks WHERE user_id = $1")
            .bind(&user)
            .scalars()
            .await?;
        titles.sort();
        let mut expected: Vec<String> = (0..50)
            .filter(|i| i % 10 == u)
            .map(|i| format!("errand {i} of {user}"))
            .collect();
        expected.sort();
        assert_eq!(titles, expected, "{user} has exactly their own tasks");
    }
    Ok(())
}

both_modes!(bad_requests_get_json_errors_naming_the_field);
async fn bad_requests_get_json_errors_naming_the_field(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        ..StackOptions::in_mode(mode)
    })
    .await?;
    let post = |path: &str, body: &'static str| {
        let request = stack
            .http
            .post(stack.url(path))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await?;
            Ok::<_, anyhow::Error>((response.status().as_u16(), response.json::<Value>().await?))
        }
    };
    let (status, body) = post("/api/dave/chat", "{not json").await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, body) = post("/api/dave/chat", r#"{"message": "   "}"#).await?;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("message"))
    );
    let (status, body) = post("/api/dave/chat", r#"{"message": 5}"#).await?;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("message"))
    );
    let (status, body) = post(
        "/api/dave/chat",
        r#"{"message": "hi", "conversation_id": "nope"}"#,
    )
    .await?;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("conversation_id"))
    );
    let (status, _) = post(
        "/api/dave/chat",
        r#"{"message": "hi", "conversation_id": "conv_01M89FAW1C2WYD64V1X4P00EMT"}"#,
    )
    .await?;
    assert_eq!(status, 404);
    let (status, body) = post("/api/da%20ve/chat", r#"{"message": "hi"}"#).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, body) = stack.get_json("/api/dave/runs/run_nope").await?;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("run_id"))
    );
    let (status, body) = stack.get_json("/api/dave/conversations?limit=101").await?;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("limit"))
    );
    let (status, _) = stack
        .get_json("/api/dave/runs/run_01M89FAW1C85R5Q06J7QT8DGE7")
        .await?;
    assert_eq!(status, 404);
    let response = stack
        .http
        .get(stack.url("/api/dave/runs/run_01M89FAW1C85R5Q06J7QT8DGE7/events"))
        .header("last-event-id", "abc")
        .send()
        .await?;
    assert_eq!(response.status(), 422);
    // Nothing was written for any of them.
    let db = stack.sql().await?;
    let rows: i64 = db.query("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM messages) + (SELECT count(*) FROM conversations)").scalar()
        .await?;
    assert_eq!(rows, 0);
    Ok(())
}

both_modes!(a_user_id_from_the_model_is_overridden_by_the_runs_user);
async fn a_user_id_from_the_model_is_overridden_by_the_runs_user(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::in_mode(mode)).await?;
    let (_, accepted) = stack
        .post_chat("judy", json!({"message": "add steal [[user_id=mallory]]"}))
        .await?;
    let events = stack
        .run_events("judy", accepted["run_id"].as_str().unwrap())
        .await?;
    let call = events
        .iter()
        .find(|e| e.event == "tool.call")
        .expect("a tool call");
    assert_eq!(
        call.data["arguments"]["user_id"], "mallory",
        "the model did try"
    );
    assert_eq!(events.last().unwrap().event, "run.completed");
    let db = stack.sql().await?;
    let owners: Vec<(String, String)> = db.query("SELECT user_id, title FROM tasks").rows().await?;
    assert_eq!(owners, [("judy".to_owned(), "steal".to_owned())]);
    Ok(())
}
