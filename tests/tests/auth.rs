//! Authentication on every endpoint: a bearer token whose `sub` is the path's user.

use conveyor_e2e::harness::{Stack, StackOptions};
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

#[tokio::test]
async fn every_endpoint_needs_a_token_for_the_paths_user() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![("JWT_SECRET".into(), SECRET.into())],
        ..StackOptions::default()
    })
    .await?;
    let valid = token(SECRET, &json!({"sub": "alice", "exp": now() + 300}));
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

    let endpoints: Vec<(&str, String)> = vec![
        ("POST", "/api/alice/chat".into()),
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
                &json!({"sub": "alice", "exp": now() + 300}),
            )),
            401,
        ),
        (
            "expired",
            Some(token(SECRET, &json!({"sub": "alice", "exp": now() - 600}))),
            401,
        ),
        (
            "not yet valid",
            Some(token(
                SECRET,
                &json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}),
            )),
            401,
        ),
        (
            "another user",
            Some(token(SECRET, &json!({"sub": "bob", "exp": now() + 300}))),
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
    // Nothing was written by the refused requests: still one run, one conversation.
    let db = stack.db.pool().await?;
    let counts: (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM conversations)")
            .fetch_one(&db)
            .await?;
    assert_eq!(counts, (1, 1));

    // The valid token passes on every endpoint (DELETE last).
    for (method, path) in &endpoints {
        let response = stack
            .http
            .request(method.parse()?, stack.url(path))
            .bearer_auth(&valid)
            .json(&json!({"message": "again", "conversation_id": null}))
            .send()
            .await?;
        let status = response.status().as_u16();
        assert!((200..300).contains(&status), "{method} {path}: {status}");
    }
    // Health endpoints need no token.
    assert_eq!(stack.get_json("/healthz").await?.0, 200);
    assert_eq!(stack.get_json("/readyz").await?.0, 200);
    Ok(())
}
