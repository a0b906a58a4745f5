//! The stores' SQLite statements, run on a fresh file: a chat turn's life (accept, claim,
//! journal, finish, read back) and a batch's, through the same functions the services call.

use conveyor_shared::{
    db::{CommitMode, Db},
    events::{EventKind, StoredEvent},
    ids::{ConversationId, MessageId, RunId, UserId},
    store::{
        batches, conversations, messages,
        messages::NewMessage,
        run_events, run_steps,
        runs::{self, FinishedAttempt, NewTurn},
    },
};
use serde_json::json;

async fn fresh_db() -> anyhow::Result<(Db, std::path::PathBuf)> {
    let path = std::env::temp_dir().join(format!("conveyor-store-{}.db", ulid::Ulid::new()));
    let db = Db::connect(
        &format!("sqlite:{}", path.display()),
        4,
        CommitMode::Synchronous,
    )
    .await?;
    Ok((db, path))
}

fn event(seq: u64, kind: EventKind, data: &serde_json::Value) -> StoredEvent {
    StoredEvent {
        seq,
        kind,
        data: data.to_string().into(),
    }
}

#[tokio::test]
async fn a_turn_is_accepted_claimed_journaled_finished_and_read_back() -> anyhow::Result<()> {
    let (db, path) = fresh_db().await?;
    let user = UserId::parse("alice")?;
    let conversation = ConversationId::new();
    let run = RunId::new();
    let message = MessageId::new();
    let queued = event(1, EventKind::RunQueued, &json!({"status": "queued"}));
    runs::insert_turn(
        &db,
        NewTurn {
            run_id: run.as_str(),
            user_id: user.as_str(),
            conversation_id: conversation.as_str(),
            new_conversation_title: Some("hello"),
            idempotency_key: Some("key-1"),
            request_hash: "h",
            message_id: message.as_str(),
            message: "hello there",
            first_event: &queued,
        },
    )
    .await?;
    let stored = runs::get(&db, &user, run.as_str()).await?.expect("the run");
    assert_eq!(stored.status, "queued");
    assert!(!stored.cancel_requested);
    let by_key = runs::by_idempotency_key(&db, &user, "key-1").await?;
    assert_eq!(by_key.map(|r| r.id), Some(run.to_string()));
    assert!(
        runs::get(&db, &UserId::parse("mallory")?, run.as_str())
            .await?
            .is_none()
    );

    // A second turn with the same key is a unique violation, as on Postgres.
    let again = runs::insert_turn(
        &db,
        NewTurn {
            run_id: RunId::new().as_str(),
            user_id: user.as_str(),
            conversation_id: conversation.as_str(),
            new_conversation_title: None,
            idempotency_key: Some("key-1"),
            request_hash: "h",
            message_id: MessageId::new().as_str(),
            message: "again",
            first_event: &queued,
        },
    )
    .await
    .expect_err("the key is taken");
    assert!(conveyor_shared::store::is_unique_violation(&again));

    let mut tx = db.begin().await?;
    assert_eq!(runs::lock_user_and_count_active(&mut tx, &user).await?, 1);
    assert!(conversations::lock_owned(&mut tx, &user, &conversation).await?);
    assert_eq!(
        runs::active_in_conversation(&mut tx, conversation.as_str()).await?,
        Some(run.to_string())
    );
    tx.commit().await?;

    let claim = runs::claim(&db, run.as_str(), "w1", 10.0)
        .await?
        .expect("the run");
    assert_eq!((claim.status.as_str(), claim.attempt), ("queued", Some(1)));
    assert_eq!(claim.max_seq, 1);
    // Held by a live worker: a second claim does not take it.
    let second = runs::claim(&db, run.as_str(), "w2", 10.0)
        .await?
        .expect("the run");
    assert_eq!((second.status.as_str(), second.attempt), ("running", None));
    assert_eq!(
        runs::heartbeat(&db, run.as_str(), 1, "w1", 7).await?,
        Some(false)
    );
    // Released, the next claim is a takeover that starts above the heartbeat's seq.
    runs::release(&db, run.as_str(), 1, "w1").await?;
    let takeover = runs::claim(&db, run.as_str(), "w2", 10.0)
        .await?
        .expect("the run");
    assert_eq!(
        (takeover.status.as_str(), takeover.attempt),
        ("running", Some(2))
    );
    assert_eq!(takeover.max_seq, 7);

    let step = run_steps::Step {
        step: 0,
        tool_call_id: "call_1".into(),
        name: "add_task".into(),
        arguments: json!({"title": "milk"}),
        ok: true,
        result: json!({"id": 1}),
    };
    run_steps::insert(&db, run.as_str(), &step).await?;
    run_steps::insert(&db, run.as_str(), &step).await?;
    assert_eq!(run_steps::list(&db, run.as_str()).await?, vec![step]);

    let answer = [
        NewMessage {
            id: MessageId::new(),
            role: "assistant",
            content: "",
            tool_calls: json!([{"id": "call_1"}]),
            tool_call_id: None,
            status: None,
        },
        NewMessage {
            id: MessageId::new(),
            role: "tool",
            content: "{\"id\":1}",
            tool_calls: json!([]),
            tool_call_id: Some("call_1"),
            status: None,
        },
        NewMessage {
            id: MessageId::new(),
            role: "assistant",
            content: "Done.",
            tool_calls: json!([]),
            tool_call_id: None,
            status: Some("completed"),
        },
    ];
    let events = [
        event(8, EventKind::MessageCompleted, &json!({"text": "Done."})),
        event(9, EventKind::RunCompleted, &json!({"status": "completed"})),
    ];
    let end = |attempt, worker| FinishedAttempt {
        id: run.as_str(),
        attempt,
        worker,
        status: "completed",
        error: None,
        messages: &answer,
        events: &events,
    };
    // The stale first attempt writes nothing; the current one commits.
    let mut tx = db.begin_durable().await?;
    assert!(!runs::finish_attempt(&mut tx, end(1, "w1")).await?);
    assert!(runs::finish_attempt(&mut tx, end(2, "w2")).await?);
    tx.commit().await?;

    let run_row = runs::get(&db, &user, run.as_str()).await?.expect("the run");
    assert_eq!(run_row.status, "completed");
    assert!(run_row.finished_at.is_some() && run_row.started_at.is_some());
    let history = messages::list(&db, &user, &conversation, 10, None).await?;
    let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(history[2].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(history[1].tool_calls, json!([{"id": "call_1"}]));
    let rest = messages::list(&db, &user, &conversation, 10, history[1].cursor().as_ref()).await?;
    assert_eq!(rest.len(), 2);
    let window = messages::history_for_run(&db, conversation.as_str(), run.as_str(), 2).await?;
    assert_eq!(
        window
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        ["{\"id\":1}", "Done."]
    );
    let seqs: Vec<u64> = run_events::list(&db, run.as_str())
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 8, 9]);
    assert_eq!(run_events::max_seq(&db, run.as_str()).await?, 9);
    assert_eq!(runs::active_counts(&db).await?.queued, 0);

    let listed = conversations::list(&db, &user, 10, None).await?;
    assert_eq!(listed.len(), 1);
    assert!(conversations::delete(&db, &user, &conversation).await?);
    assert!(
        runs::get(&db, &user, run.as_str()).await?.is_none(),
        "cascaded"
    );
    drop(db);
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[tokio::test]
async fn a_batch_is_created_cancelled_and_settled() -> anyhow::Result<()> {
    let (db, path) = fresh_db().await?;
    let user = UserId::parse("bob")?;
    let batch_id = "batch_01";
    let run_ids = ["run_a", "run_b"];
    let conversation_ids = ["conv_a", "conv_b"];
    let mut tx = db.begin().await?;
    assert_eq!(batches::lock_user_and_count_open(&mut tx, &user).await?, 0);
    batches::insert(
        &mut tx,
        batches::NewBatch {
            id: batch_id,
            user_id: user.as_str(),
            metadata: Some(&json!({"k": "v"})),
            completion_window: "24h",
            expires_at: chrono::Utc::now() + chrono::Duration::hours(24),
            total: 2,
        },
    )
    .await?;
    conversations::insert_many(&mut tx, &user, &conversation_ids, &["a", "b"]).await?;
    runs::insert_batch_runs(
        &mut tx,
        runs::NewBatchRuns {
            user_id: user.as_str(),
            batch_id,
            ids: &run_ids,
            conversation_ids: &conversation_ids,
            custom_ids: &["line-1", "line-2"],
        },
    )
    .await?;
    messages::insert_user_many(
        &mut tx,
        messages::NewUserMessages {
            user_id: user.as_str(),
            ids: &["msg_a", "msg_b"],
            conversation_ids: &conversation_ids,
            run_ids: &run_ids,
            contents: &["one", "two"],
        },
    )
    .await?;
    run_events::insert_first_many(
        &mut tx,
        &run_ids,
        EventKind::RunQueued,
        &[json!({}), json!({})],
    )
    .await?;
    tx.commit().await?;
    assert_eq!(
        conversations::owned_among(&db, &user, &["conv_a", "conv_x"]).await?,
        ["conv_a"]
    );

    let batch = batches::get(&db, &user, batch_id)
        .await?
        .expect("the batch");
    assert_eq!(
        (batch.status.as_str(), batch.total, batch.completed),
        ("in_progress", 2, 0)
    );
    assert_eq!(batches::open(&db, 10).await?, [batch_id]);
    assert_eq!(batches::list(&db, &user, 10, None).await?.len(), 1);

    let mut tx = db.begin().await?;
    assert_eq!(
        batches::request_cancel(&mut tx, &user, batch_id)
            .await?
            .as_deref(),
        Some("in_progress")
    );
    assert_eq!(
        batches::cancel_queued_runs(&mut tx, batch_id, None).await?,
        2
    );
    batches::request_cancel_running_runs(&mut tx, batch_id).await?;
    tx.commit().await?;
    assert_eq!(
        batches::settle(&db, batch_id).await?.as_deref(),
        Some("cancelled")
    );
    let batch = batches::get(&db, &user, batch_id)
        .await?
        .expect("the batch");
    assert_eq!((batch.status.as_str(), batch.cancelled), ("cancelled", 2));
    let page = batches::results_page(&db, &user, batch_id, None, 1).await?;
    assert_eq!(page.len(), 1);
    assert_eq!(
        (page[0].custom_id.as_str(), page[0].status.as_str()),
        ("line-1", "cancelled")
    );
    assert_eq!(page[0].tool_calls, json!([]));
    let next = batches::results_page(&db, &user, batch_id, Some("line-1"), 10).await?;
    assert_eq!(
        next.iter()
            .map(|r| r.custom_id.as_str())
            .collect::<Vec<_>>(),
        ["line-2"]
    );
    let seqs: Vec<u64> = run_events::list(&db, "run_a")
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
    drop(db);
    let _ = std::fs::remove_file(path);
    Ok(())
}
