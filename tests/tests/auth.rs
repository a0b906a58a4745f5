//! Authentication on every endpoint: a bearer token whose `sub` is the path's user, and no
//! secret in the logs, in both modes.

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, Stack, StackOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "e2e-secret";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .cast_signed()
}

fn token(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

both_modes!(every_endpoint_needs_a_token_for_the_paths_user);
async fn every_endpoint_needs_a_token_for_the_paths_user(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(
        StackOptions {
            env: vec![
                ("JWT_SECRET".into(), SECRET.into()),
                ("JWT_AUDIENCE".into(), "conveyor".into()),
            ],
            ..StackOptions::in_mode(mode)
        }
        .with_unfinished_runs(),
    )
    .await?;
    let valid = token(
        SECRET,
        &json!({"aud": "conveyor", "sub": "alice", "exp": now() + 300}),
    );
    // A real run and conversation to aim at.
    let response = stack
        .http
        .post(stack.url("/api/alice/chat"))
        .bearer_auth(&valid)
        .header("accept", "application/json")
        .json(&json!({"message": "hello"}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await?;
    let run = accepted["run_id"].as_str().unwrap();
    let conv = accepted["conversation_id"].as_str().unwrap();
    // And a batch of one line.
    let response = stack
        .http
        .post(stack.url("/api/alice/batches"))
        .bearer_auth(&valid)
        .body("{\"custom_id\": \"a\", \"message\": \"hi\"}\n")
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let batch: Value = response.json().await?;
    let batch = batch["id"].as_str().unwrap();

    let endpoints: Vec<(&str, String)> = vec![
        ("POST", "/api/alice/chat".into()),
        ("POST", "/api/alice/batches".into()),
        ("GET", "/api/alice/batches".into()),
        ("GET", format!("/api/alice/batches/{batch}")),
        ("GET", format!("/api/alice/batches/{batch}/results")),
        ("POST", format!("/api/alice/batches/{batch}/cancel")),
        ("GET", format!("/api/alice/runs/{run}")),
        ("GET", format!("/api/alice/runs/{run}/events?after=1")),
        ("POST", format!("/api/alice/runs/{run}/cancel")),
        ("GET", "/api/alice/conversations".into()),
        ("GET", format!("/api/alice/conversations/{conv}/messages")),
        (
            "GET",
            format!("/api/alice/conversations/{conv}/stream?after=1"),
        ),
        ("DELETE", format!("/api/alice/conversations/{conv}")),
    ];
    let tokens = [
        ("no token", None, 401),
        ("malformed", Some("garbage".to_owned()), 401),
        (
            "wrong signature",
            Some(token(
                "not-the-secret",
                &json!({"aud": "conveyor", "sub": "alice", "exp": now() + 300}),
            )),
            401,
        ),
        (
            "expired",
            Some(token(
                SECRET,
                &json!({"aud": "conveyor", "sub": "alice", "exp": now() - 600}),
            )),
            401,
        ),
        (
            "not yet valid",
            Some(token(
                SECRET,
                &json!({"aud": "conveyor", "sub": "alice", "exp": now() + 600, "nbf": now() + 300}),
            )),
            401,
        ),
        (
            "wrong audience",
            Some(token(
                SECRET,
                &json!({"aud": "someone-else", "sub": "alice", "exp": now() + 300}),
            )),
            401,
        ),
        (
            "no audience",
            Some(token(SECRET, &json!({"sub": "alice", "exp": now() + 300}))),
            401,
        ),
        (
            "another user",
            Some(token(
                SECRET,
                &json!({"aud": "conveyor", "sub": "bob", "exp": now() + 300}),
            )),
            403,
        ),
    ];
    for (method, path) in &endpoints {
        for (name, bearer, expected) in &tokens {
            let mut request = stack
                .http
                .request(method.parse()?, stack.url(path))
                .json(&json!({"message": "x"}));
            if let Some(bearer) = bearer {
                request = request.bearer_auth(bearer);
            }
            let response = request.send().await?;
            let status = response.status().as_u16();
            let www = response.headers().get("www-authenticate").cloned();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, *expected, "{method} {path} with {name}: {body}");
            assert_eq!(
                body["error"]["code"],
                if *expected == 401 {
                    "unauthorized"
                } else {
                    "forbidden"
                }
            );
            if *expected == 401 {
                assert_eq!(
                    www.as_ref().and_then(|v| v.to_str().ok()),
                    Some("Bearer"),
                    "{method} {path}"
                );
            }
        }
    }
    // Nothing was written by the refused requests: still the chat turn's and the batch line's
    // run and conversation, and the batch still running.
    let db = stack.sql().await?;
    let counts: (i64, i64, String) = db
        .query(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM conversations),
                (SELECT status FROM batches)",
        )
        .row()
        .await?;
    assert_eq!(counts, (2, 2, "in_progress".to_owned()));

    // The valid token passes on every endpoint (DELETE last).
    for (method, path) in &endpoints {
        let request = stack
            .http
            .request(method.parse()?, stack.url(path))
            .bearer_auth(&valid);
        let request = if path.ends_with("/batches") {
            request.body("{\"custom_id\": \"b\", \"message\": \"again\"}\n")
        } else {
            request.json(&json!({"message": "again", "conversation_id": null}))
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        assert!((200..300).contains(&status), "{method} {path}: {status}");
    }
    // Health endpoints need no token.
    assert_eq!(stack.get_json("/healthz").await?.0, 200);
    assert_eq!(stack.get_json("/readyz").await?.0, 200);
    Ok(())
}

both_modes!(secrets_tokens_and_message_bodies_stay_out_of_the_logs);
async fn secrets_tokens_and_message_bodies_stay_out_of_the_logs(mode: Mode) -> anyhow::Result<()> {
    let log = std::env::temp_dir().join(format!("conveyor-e2e-{}.log", ulid::Ulid::new()));
    let stack = Stack::start(StackOptions {
        env: vec![
            ("JWT_SECRET".into(), SECRET.into()),
            ("RUST_LOG".into(), "info".into()),
        ],
        log_file: Some(log.clone()),
        ..StackOptions::in_mode(mode)
    })
    .await?;
    let valid = token(SECRET, &json!({"sub": "lena", "exp": now() + 300}));
    let marker = "zebra-4417-quokka";
    // A tool-call turn whose message, tool arguments, tool result and answer all carry the
    // marker, followed to its end.
    let mut sse = conveyor_e2e::harness::SseStream::open(
        stack
            .http
            .post(stack.url("/api/lena/chat"))
            .bearer_auth(&valid)
            .json(&json!({ "message": format!("add {marker}") })),
    )
    .await?;
    let events = sse
        .collect_until_terminal(std::time::Duration::from_mins(1))
        .await?;
    assert_eq!(events.last().unwrap().event, "run.completed", "{events:?}");
    // Refused requests: a wrong token, and a body that fails validation.
    let forged = token(
        "not-the-secret",
        &json!({"sub": "lena", "exp": now() + 300}),
    );
    let refused = stack
        .http
        .get(stack.url("/api/lena/conversations"))
        .bearer_auth(&forged)
        .send()
        .await?;
    assert_eq!(refused.status(), 401);
    let refused = stack
        .http
        .post(stack.url("/api/lena/chat"))
        .bearer_auth(&valid)
        .json(&json!({ "message": marker, "extra": marker }))
        .send()
        .await?;
    assert_eq!(refused.status(), 422);
    // The worker logs the run's end just after publishing it: wait for the line before the
    // processes are stopped.
    conveyor_e2e::harness::eventually(std::time::Duration::from_secs(10), || async {
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(logs.contains("run finished").then_some(()))
    })
    .await?;
    drop(stack);

    let logs = std::fs::read_to_string(&log)?;
    std::fs::remove_file(&log)?;
    // The capture works: both services logged this turn at info.
    assert!(logs.contains("turn accepted"), "{logs}");
    assert!(logs.contains("run finished"), "{logs}");
    for (what, secret) in [
        ("the message text", marker),
        ("the JWT secret", SECRET),
        ("a bearer token", valid.as_str()),
        ("a forged token", forged.as_str()),
        ("the LLM API key", "test-key"),
    ] {
        assert!(!logs.contains(secret), "{what} was logged:\n{logs}");
    }
    Ok(())
}
