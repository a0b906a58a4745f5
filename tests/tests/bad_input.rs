//! A corpus of bad input over every endpoint — hand-written cases plus generated ones from a
//! seeded generator — must each get a 4xx JSON error (never a 5xx or a panic), leave nothing
//! written, and leave the service healthy, in both modes.

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};

const RUN: &str = "run_01M89FAW1C85R5Q06J7QT8DGE7";
const CONV: &str = "conv_01M89FAW1C2WYD64V1X4P00EMT";
const BATCH: &str = "batch_01M89FAW1C2WYD64V1X4P00EMT";

/// One request of the corpus.
struct Case {
    class: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

fn case(class: &'static str, method: Method, path: impl Into<String>) -> Case {
    Case {
        class,
        method,
        path: path.into(),
        headers: Vec::new(),
        body: None,
    }
}

fn chat(class: &'static str, body: impl Into<Vec<u8>>) -> Case {
    Case {
        body: Some(body.into()),
        ..case(class, Method::POST, "/api/alice/chat")
    }
}

fn random_word(rng: &mut fastrand::Rng) -> String {
    (0..rng.usize(1..12)).map(|_| rng.alphanumeric()).collect()
}

/// Bodies that are invalid by construction: a valid body with exactly one thing broken.
fn generated_chat_bodies(rng: &mut fastrand::Rng, n: usize) -> Vec<Case> {
    let bad_values = [
        json!(null),
        json!(42),
        json!(true),
        json!([]),
        json!({}),
        json!(""),
        json!("   \t\n"),
        json!("a\u{0}b"),
    ];
    (0..n)
        .map(|_| {
            let mut body =
                json!({"message": "hello", "conversation_id": CONV, "multitask": "reject"});
            // Sometimes without a conversation (the broken field is set after, so it stays).
            if rng.bool() {
                body.as_object_mut().unwrap().remove("conversation_id");
            }
            match rng.usize(0..7) {
                0 => body["message"] = bad_values[rng.usize(0..bad_values.len())].clone(),
                1 => body["message"] = json!("x".repeat(32_001 + rng.usize(0..500))),
                2 => body["conversation_id"] = json!(format!("conv_{}", random_word(rng))),
                3 => body["multitask"] = json!(random_word(rng)),
                4 => body[format!("unknown_{}", random_word(rng))] = json!(rng.u32(..)),
                5 => {
                    let text = body.to_string();
                    let cut = rng.usize(1..text.len() - 1);
                    return chat("generated: truncated JSON", text.as_bytes()[..cut].to_vec());
                }
                _ => {
                    let mut bytes = body.to_string().into_bytes();
                    let at = rng.usize(12..bytes.len() - 2);
                    bytes[at] = 0xff;
                    return chat("generated: invalid UTF-8", bytes);
                }
            }
            chat("generated: one bad field", body.to_string().into_bytes())
        })
        .collect()
}

fn generated_paths(rng: &mut fastrand::Rng, n: usize) -> Vec<Case> {
    (0..n)
        .map(|_| {
            let junk = random_word(rng);
            match rng.usize(0..5) {
                0 => case(
                    "generated: bad run id",
                    Method::GET,
                    format!("/api/alice/runs/run_{junk}"),
                ),
                1 => case(
                    "generated: bad run id",
                    Method::GET,
                    format!("/api/alice/runs/{junk}/events"),
                ),
                2 => case(
                    "generated: bad conversation id",
                    Method::GET,
                    format!("/api/alice/conversations/conv_{junk}/messages"),
                ),
                3 => case(
                    "generated: bad conversation id",
                    Method::DELETE,
                    format!("/api/alice/conversations/{junk}"),
                ),
                _ => case(
                    "generated: bad user id",
                    Method::GET,
                    format!("/api/{junk}%20{junk}/conversations"),
                ),
            }
        })
        .collect()
}

fn hand_written() -> Vec<Case> {
    let mut cases = vec![
        chat("malformed JSON", "{"),
        chat("malformed JSON", ""),
        chat("malformed JSON", "null"),
        chat("malformed JSON", "[]"),
        chat("malformed JSON", "\"just a string\""),
        chat("malformed JSON", "{\"message\": \"hi\",}"),
        chat("missing field", "{}"),
        chat("wrong type", r#"{"message": ["a"]}"#),
        chat("wrong type", r#"{"message": "hi", "conversation_id": 5}"#),
        chat("wrong type", r#"{"message": "hi", "multitask": 1}"#),
        chat("empty message", r#"{"message": ""}"#),
        chat("blank message", r#"{"message": " \n\t "}"#),
        chat("NUL in message", "{\"message\": \"a\\u0000b\"}"),
        chat("unknown field", r#"{"message": "hi", "model": "gpt-5"}"#),
        chat(
            "bad conversation id",
            r#"{"message": "hi", "conversation_id": "run_01M89FAW1C85R5Q06J7QT8DGE7"}"#,
        ),
        chat("too large", vec![b' '; 300 * 1024]),
    ];
    for (name, value) in [
        ("Idempotency-Key", "x".repeat(300)),
        ("Idempotency-Key", "has space".to_owned()),
    ] {
        let mut c = chat("bad header", r#"{"message": "hi"}"#);
        c.headers.push((name, value));
        cases.push(c);
    }
    let mut stream = chat("bad query", r#"{"message": "hi"}"#);
    stream.path = "/api/alice/chat?stream=maybe".into();
    cases.push(stream);
    for query in [
        "limit=0",
        "limit=101",
        "limit=-5",
        "limit=ten",
        "cursor=garbage",
        "cursor=12.conv_x",
        "limit=1e3",
    ] {
        cases.push(case(
            "bad pagination",
            Method::GET,
            format!("/api/alice/conversations?{query}"),
        ));
        cases.push(case(
            "bad pagination",
            Method::GET,
            format!("/api/alice/conversations/{CONV}/messages?{query}"),
        ));
    }
    for query in [
        "after=-1",
        "after=abc",
        "starting_after=1.5",
        "after=99999999999999999999999",
    ] {
        cases.push(case(
            "bad cursor",
            Method::GET,
            format!("/api/alice/runs/{RUN}/events?{query}"),
        ));
    }
    for value in ["abc", "-3", "1 2"] {
        let mut c = case(
            "bad Last-Event-ID",
            Method::GET,
            format!("/api/alice/runs/{RUN}/events"),
        );
        c.headers.push(("last-event-id", value.to_owned()));
        cases.push(c);
    }
    for path in [
        format!("/api/alice/runs/{RUN}"),
        format!("/api/alice/runs/{RUN}/events"),
        format!("/api/alice/conversations/{CONV}/messages"),
        format!("/api/alice/conversations/{CONV}/stream"),
    ] {
        cases.push(case("unknown id", Method::GET, path));
    }
    cases.push(case(
        "unknown id",
        Method::DELETE,
        format!("/api/alice/conversations/{CONV}"),
    ));
    cases.push(case(
        "unknown id",
        Method::POST,
        format!("/api/alice/runs/{RUN}/cancel"),
    ));
    for path in [
        format!("/api/alice/batches/{BATCH}"),
        format!("/api/alice/batches/{BATCH}/results"),
    ] {
        cases.push(case("unknown id", Method::GET, path));
    }
    cases.push(case(
        "unknown id",
        Method::POST,
        format!("/api/alice/batches/{BATCH}/cancel"),
    ));
    for path in [
        "/api/alice/batches/batch_nope",
        "/api/alice/batches/run_01M89FAW1C85R5Q06J7QT8DGE7/results",
    ] {
        cases.push(case("malformed id", Method::GET, path));
    }
    for query in ["limit=0", "limit=x", "cursor=%00"] {
        cases.push(case(
            "bad pagination",
            Method::GET,
            format!("/api/alice/batches?{query}"),
        ));
    }
    for (class, body) in [
        ("batch: not JSON", "not json\n"),
        ("batch: missing field", "{\"custom_id\": \"a\"}\n"),
        (
            "batch: unknown field",
            "{\"custom_id\": \"a\", \"message\": \"hi\", \"x\": 1}\n",
        ),
        (
            "batch: duplicate custom_id",
            "{\"custom_id\": \"a\", \"message\": \"hi\"}\n{\"custom_id\": \"a\", \"message\": \"ho\"}\n",
        ),
        (
            "batch: blank message",
            "{\"custom_id\": \"a\", \"message\": \"  \"}\n",
        ),
        ("batch: empty body", ""),
    ] {
        cases.push(Case {
            body: Some(body.as_bytes().to_vec()),
            ..case(class, Method::POST, "/api/alice/batches")
        });
    }
    cases.push(Case {
        body: Some(b"{\"custom_id\": \"a\", \"message\": \"hi\"}\n".to_vec()),
        ..case(
            "batch: bad option",
            Method::POST,
            "/api/alice/batches?completion_window=forever",
        )
    });
    cases.push(case(
        "unknown route",
        Method::GET,
        "/api/alice/nothing-here",
    ));
    cases.push(case("wrong method", Method::PUT, "/api/alice/chat"));
    cases.push(case(
        "bad user id",
        Method::GET,
        format!("/api/{}/conversations", "u".repeat(129)),
    ));
    cases
}

both_modes!(every_bad_request_gets_a_json_4xx_and_writes_nothing);
async fn every_bad_request_gets_a_json_4xx_and_writes_nothing(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![("RATE_LIMIT_PER_MINUTE".into(), "0".into())],
        ..StackOptions::in_mode(mode)
    })
    .await?;
    let mut rng = fastrand::Rng::with_seed(0x00c0_ffee);
    let mut cases = hand_written();
    cases.extend(generated_chat_bodies(&mut rng, 150));
    cases.extend(generated_paths(&mut rng, 60));
    assert!(cases.len() >= 200, "{} cases", cases.len());

    let mut by_class: std::collections::BTreeMap<&str, (usize, std::collections::BTreeSet<u16>)> =
        std::collections::BTreeMap::new();
    for c in &cases {
        let mut request = stack
            .http
            .request(c.method.clone(), stack.url(&c.path))
            .header("content-type", "application/json");
        for (name, value) in &c.headers {
            request = request.header(*name, value);
        }
        if let Some(body) = &c.body {
            request = request.body(body.clone());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = tokio::time::timeout(std::time::Duration::from_secs(10), response.text())
            .await
            .map_err(|_| {
                let body = c
                    .body
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                anyhow::anyhow!(
                    "{} {} ({}): no complete answer; status {status}; body {body:.300}",
                    c.method,
                    c.path,
                    c.class
                )
            })??;
        assert!(
            (400..500).contains(&status),
            "{} {} ({}): {status} {text}",
            c.method,
            c.path,
            c.class
        );
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{} {}: not JSON: {text}", c.method, c.path));
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{} {}: {body}",
            c.method,
            c.path
        );
        if status == 422 {
            assert!(
                body["error"]["field"].is_string()
                    || body["error"]["code"] == "idempotency_key_reused",
                "422 names the field: {body}"
            );
        }
        let entry = by_class.entry(c.class).or_default();
        entry.0 += 1;
        entry.1.insert(status);
    }
    println!("BAD-INPUT | {} cases", cases.len());
    for (class, (count, statuses)) in &by_class {
        println!("BAD-INPUT | {class} | {count} | {statuses:?}");
    }

    let db = stack.sql().await?;
    let written: i64 = db.query("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM messages) + (SELECT count(*) FROM conversations) + (SELECT count(*) FROM batches)").scalar()
        .await?;
    assert_eq!(written, 0, "refused requests write nothing");
    assert_eq!(stack.get_json("/readyz").await?.0, 200, "still healthy");
    assert_eq!(
        stack
            .post_chat("alice", json!({"message": "still works"}))
            .await?
            .0,
        202
    );
    Ok(())
}
