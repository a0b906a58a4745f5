//! Behaviour of the fake LLM over real HTTP, as the worker's OpenAI client would see it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::*;

async fn fake() -> FakeLlm {
    start(FakeLlmConfig::default()).await.unwrap()
}

thread_local! {
    // One client per test (each test has its own thread and runtime): building a client
    // loads the TLS roots, which costs tens of milliseconds in a debug build.
    static CLIENT: reqwest::Client = reqwest::Client::new();
}

fn client() -> reqwest::Client {
    CLIENT.with(reqwest::Client::clone)
}

async fn post(llm: &FakeLlm, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", llm.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The seed tools as the worker offers them (no `user_id`: the worker strips it).
fn task_tools(prefix: &str) -> Value {
    let tool = |name: &str, properties: Value| {
        json!({"type": "function", "function": {
            "name": format!("{prefix}{name}"),
            "description": format!("{name} tool"),
            "parameters": {"type": "object", "properties": properties},
        }})
    };
    json!([
        tool(
            "add_task",
            json!({"title": {"type": "string"}, "description": {"type": "string"},
                                "priority": {"type": "string", "enum": ["low", "medium", "high"]}})
        ),
        tool("list_tasks", json!({"status": {"type": "string"}})),
        tool("complete_task", json!({"task_id": {"type": "integer"}})),
        tool("delete_task", json!({"task_id": {"type": "integer"}})),
        tool(
            "update_task",
            json!({"task_id": {"type": "integer"}, "title": {"type": "string"},
                                   "description": {"type": "string"}})
        ),
        tool(
            "set_priority",
            json!({"task_id": {"type": "integer"}, "priority": {"type": "string"}})
        ),
    ])
}

fn user(text: &str, stream: bool) -> Value {
    json!({
        "model": "fake-model",
        "messages": [{"role": "system", "content": "be helpful"}, {"role": "user", "content": text}],
        "tools": task_tools(""),
        "stream": stream,
        "stream_options": {"include_usage": true},
        "parallel_tool_calls": false,
    })
}

/// A streamed response read to its end: the parsed `data:` objects, whether `[DONE]` came, and
/// whether the body ended in a transport error (a cut).
struct Sse {
    chunks: Vec<Value>,
    done: bool,
    broken: bool,
}

impl Sse {
    async fn read(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut raw = Vec::new();
        let mut broken = false;
        let mut body = response.bytes_stream();
        while let Some(item) = body.next().await {
            let Ok(bytes) = item else {
                broken = true;
                break;
            };
            raw.extend_from_slice(&bytes);
        }
        let text = String::from_utf8(raw).unwrap();
        let mut chunks = Vec::new();
        let mut done = false;
        for event in text.split_terminator("\n\n") {
            let data = event
                .strip_prefix("data: ")
                .expect("every event is one data line");
            assert!(!done, "nothing may follow [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).unwrap());
            }
        }
        Self {
            chunks,
            done,
            broken,
        }
    }

    fn content(&self) -> String {
        self.deltas()
            .filter_map(|d| d["content"].as_str())
            .collect()
    }

    fn content_chunks(&self) -> usize {
        self.deltas()
            .filter(|d| d["content"].as_str().is_some_and(|c| !c.is_empty()))
            .count()
    }

    fn deltas(&self) -> impl Iterator<Item = &Value> {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
    }

    fn finish_reason(&self) -> Option<&str> {
        self.chunks
            .iter()
            .find_map(|c| c["choices"].get(0)?["finish_reason"].as_str())
    }

    /// The tool calls reassembled by index, the way a client accumulates deltas.
    fn tool_calls(&self) -> Vec<(String, String, String)> {
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for delta in self.deltas() {
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
                if index == calls.len() {
                    calls.push(Default::default());
                }
                let entry = &mut calls[index];
                if let Some(id) = call["id"].as_str() {
                    entry.0 = id.to_owned();
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    entry.1 = name.to_owned();
                }
                if let Some(args) = call["function"]["arguments"].as_str() {
                    entry.2.push_str(args);
                }
            }
        }
        calls
    }
}

const HELLO_ANSWER: &str = "You said: hello there. This is a deterministic";

#[tokio::test]
async fn non_streaming_text_answer() {
    let llm = fake().await;
    let response = post(&llm, &user("Hello   there", false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "fake-model");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "You said: Hello there. This is a deterministic"
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn streamed_text_reassembles_to_the_exact_answer_and_ends_with_done() {
    let llm = fake().await;
    let sse = Sse::read(post(&llm, &user("hello there", true)).await).await;
    assert!(sse.done && !sse.broken);
    assert_eq!(sse.chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(sse.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(sse.content(), HELLO_ANSWER);
    assert_eq!(sse.content_chunks(), 8);
    assert_eq!(sse.finish_reason(), Some("stop"));
    let usage = sse.chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);

    // The same input gives the same answer, streamed or not.
    let again: Value = post(&llm, &user("hello there", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], HELLO_ANSWER);
}

#[tokio::test]
async fn without_include_usage_there_is_no_usage_chunk() {
    let llm = fake().await;
    let mut body = user("hi", true);
    body.as_object_mut().unwrap().remove("stream_options");
    let sse = Sse::read(post(&llm, &body).await).await;
    assert!(sse.done);
    assert!(sse.chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn each_intent_calls_its_tool_with_schema_arguments() {
    let llm = fake().await;
    let cases = [
        ("add buy milk", "add_task", json!({"title": "buy milk"})),
        (
            "Add task pay rent with high priority",
            "add_task",
            json!({"title": "pay rent", "priority": "high"}),
        ),
        (
            "remember to call mom",
            "add_task",
            json!({"title": "call mom"}),
        ),
        ("list", "list_tasks", json!({})),
        ("show my tasks", "list_tasks", json!({})),
        (
            "what are my pending tasks?",
            "list_tasks",
            json!({"status": "pending"}),
        ),
        ("complete 3", "complete_task", json!({"task_id": 3})),
        ("done 4", "complete_task", json!({"task_id": 4})),
        ("delete task 5", "delete_task", json!({"task_id": 5})),
        (
            "update 6 to buy oat milk",
            "update_task",
            json!({"task_id": 6, "title": "buy oat milk"}),
        ),
        (
            "rename 6 to x",
            "update_task",
            json!({"task_id": 6, "title": "x"}),
        ),
        (
            "prioritize 7 low",
            "set_priority",
            json!({"task_id": 7, "priority": "low"}),
        ),
        (
            "set priority 7 high",
            "set_priority",
            json!({"task_id": 7, "priority": "high"}),
        ),
    ];
    for (message, tool, args) in cases {
        let body: Value = post(&llm, &user(message, false))
            .await
            .json()
            .await
            .unwrap();
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{message}");
        assert_eq!(choice["message"]["content"], Value::Null);
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{message}");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], tool, "{message}");
        let sent: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(sent, args, "{message}");
    }
    assert_eq!(llm.stats().tool_calls, 13);
}

#[tokio::test]
async fn arguments_keep_only_schema_properties_and_no_tool_means_text() {
    let llm = fake().await;
    let mut body = user("add buy milk high priority", false);
    body["tools"] = json!([{"type": "function", "function": {"name": "add_task",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}}}]);
    let answer: Value = post(&llm, &body).await.json().await.unwrap();
    let args = &answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"];
    assert_eq!(args, r#"{"title":"buy milk"}"#);

    // The intent is there, but its tool is not offered: talk instead.
    body["tools"] = json!([]);
    let answer: Value = post(&llm, &body).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("You said: add buy milk high priority.")
    );
    body.as_object_mut().unwrap().remove("tools");
    let answer: Value = post(&llm, &body).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn prefixed_tool_names_are_matched_and_streamed_in_pieces() {
    let llm = fake().await;
    let mut body = user("complete task 9", true);
    body["tools"] = task_tools("tasks__");
    let sse = Sse::read(post(&llm, &body).await).await;
    assert!(sse.done);
    let first = &sse.chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(
        first["tool_calls"][0]["function"]["name"],
        "tasks__complete_task"
    );
    assert!(
        first["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_")
    );
    let argument_deltas = sse
        .deltas()
        .filter(|d| {
            d["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .is_some_and(|a| !a.is_empty())
        })
        .count();
    assert!(argument_deltas >= 2);
    let calls = sse.tool_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, "tasks__complete_task");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"task_id": 9})
    );
    assert_eq!(sse.finish_reason(), Some("tool_calls"));

    // `mytasks__complete_task` is prefixed; `xcomplete_task` is not.
    body["tools"] = json!([{"type": "function", "function": {"name": "xcomplete_task"}}]);
    let sse = Sse::read(post(&llm, &body).await).await;
    assert_eq!(sse.finish_reason(), Some("stop"));
}

#[tokio::test]
async fn a_tool_result_gets_a_summary() {
    let llm = fake().await;
    let conversation = |result: &str| {
        json!({"model": "m", "stream": true, "tools": task_tools(""), "messages": [
            {"role": "user", "content": "add buy milk"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "add_task", "arguments": "{\"title\":\"buy milk\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ]})
    };
    let ok = Sse::read(post(&llm, &conversation(r#"{"id": 1, "title": "buy milk"}"#)).await).await;
    assert!(ok.done);
    assert_eq!(ok.content(), r#"Done. {"id": 1, "title": "buy milk"}"#);
    assert_eq!(ok.finish_reason(), Some("stop"));

    let long = "x".repeat(300);
    let truncated = Sse::read(post(&llm, &conversation(&long)).await).await;
    assert_eq!(truncated.content(), format!("Done. {}", &long[..200]));

    let failed = Sse::read(post(&llm, &conversation("Error: task 7 not found")).await).await;
    assert_eq!(
        failed.content(),
        "The tool reported an error: Error: task 7 not found"
    );
}

#[tokio::test]
async fn directive_429_has_retry_headers() {
    let llm = start(FakeLlmConfig {
        retry_after_ms: 1500,
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let response = post(&llm, &user("add buy milk [[fail=429]]", true)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "2");
    assert_eq!(response.headers()["retry-after-ms"], "1500");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn directives_500_400_401_return_openai_errors() {
    let llm = fake().await;
    for (fail, status) in [("500", 500), ("400", 400), ("401", 401)] {
        let response = post(&llm, &user(&format!("hi [[fail={fail}]]"), false)).await;
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["message"].is_string());
    }
}

#[tokio::test]
async fn directive_cut_drops_the_stream_before_done() {
    let llm = fake().await;
    let sse = Sse::read(
        post(
            &llm,
            &user("hello there [[fail=cut chunk_delay_ms=1]]", true),
        )
        .await,
    )
    .await;
    assert!(sse.broken, "the connection is dropped");
    assert!(!sse.done);
    assert_eq!(sse.finish_reason(), None);
    assert_eq!(sse.content(), "You said: hello there. ");

    // Without delays the partial content still reaches the client before the cut.
    let sse = Sse::read(post(&llm, &user("add x [[fail=cut]]", true)).await).await;
    assert!(sse.broken && !sse.done);
    assert_eq!(sse.tool_calls()[0].1, "add_task");

    let response = post(&llm, &user("hello [[fail=cut]]", false)).await;
    assert_eq!(response.status(), 200);
    assert!(response.json::<Value>().await.is_err());
    assert_eq!(llm.stats().faults.cut, 3);
}

#[tokio::test]
async fn fail_times_lets_retries_succeed() {
    let llm = fake().await;
    let message = user("add buy bread [[fail=500 fail_times=2]]", false);
    assert_eq!(post(&llm, &message).await.status(), 500);
    assert_eq!(post(&llm, &message).await.status(), 500);
    let response = post(&llm, &message).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        r#"{"title":"buy bread"}"#
    );
    // Another message has its own count.
    let other = user("add buy jam [[fail=500 fail_times=2]]", false);
    assert_eq!(post(&llm, &other).await.status(), 500);
}

#[tokio::test]
async fn user_id_directive_is_added_to_the_arguments() {
    let llm = fake().await;
    let body: Value = post(&llm, &user("delete 2 [[user_id=mallory]]", false))
        .await
        .json()
        .await
        .unwrap();
    let args = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"task_id": 2, "user_id": "mallory"})
    );
}

#[tokio::test]
async fn text_and_chunks_directives_shape_the_answer() {
    let llm = fake().await;
    let sse = Sse::read(
        post(
            &llm,
            &user(
                "hi [[chunks=3 text=<script>alert(1)</script> & <b>bold</b>]]",
                true,
            ),
        )
        .await,
    )
    .await;
    assert_eq!(sse.content(), "<script>alert(1)</script> & <b>bold</b>");
    let sse = Sse::read(post(&llm, &user("hi [[chunks=20]]", true)).await).await;
    assert_eq!(sse.content_chunks(), 20);
}

#[tokio::test]
async fn time_to_first_token_and_chunk_delays_are_simulated() {
    let llm = fake().await;
    let sent = Instant::now();
    let response = post(
        &llm,
        &user("hello there [[ttft_ms=150 chunk_delay_ms=10]]", true),
    )
    .await;
    let headers_at = sent.elapsed();
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first_at = sent.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    while body.next().await.is_some() {}
    let total = sent.elapsed();
    assert!(headers_at < first_at, "headers come before the first token");
    assert!(first_at >= Duration::from_millis(150), "{first_at:?}");
    assert!(total >= Duration::from_millis(150 + 7 * 10), "{total:?}");

    let sent = Instant::now();
    let response = post(&llm, &user("hello [[ttft_ms=50 chunk_delay_ms=10]]", false)).await;
    response.bytes().await.unwrap();
    assert!(sent.elapsed() >= Duration::from_millis(50 + 7 * 10));
}

#[tokio::test]
async fn random_faults_follow_the_seed() {
    async fn statuses(seed: u64) -> (Vec<u16>, FakeLlmStats) {
        let llm = start(FakeLlmConfig {
            fault_rate: 0.5,
            faults: vec![FaultKind::RateLimited, FaultKind::ServerError],
            seed,
            ..FakeLlmConfig::default()
        })
        .await
        .unwrap();
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(post(&llm, &user("hi", false)).await.status().as_u16());
        }
        (out, llm.stats())
    }
    let (a, stats) = statuses(7).await;
    let (b, _) = statuses(7).await;
    let (c, _) = statuses(8).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let faults = stats.faults.rate_limited + stats.faults.server_error;
    assert!((8..=32).contains(&faults), "{faults} of 40 at rate 0.5");
    assert_eq!(a.iter().filter(|&&s| s != 200).count() as u64, faults);
}

#[tokio::test]
async fn stats_count_requests_streams_and_faults() {
    let llm = fake().await;
    post(&llm, &user("a", false)).await.bytes().await.unwrap();
    Sse::read(post(&llm, &user("b", true)).await).await;
    post(&llm, &user("c [[fail=429]]", true)).await;
    post(&llm, &user("d [[fail=500]]", false)).await;
    let response = client()
        .post(format!("{}/chat/completions", llm.base_url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let expected = FakeLlmStats {
        requests: 5,
        streamed: 2,
        tool_calls: 0,
        faults: FaultStats {
            rate_limited: 1,
            server_error: 1,
            ..FaultStats::default()
        },
        in_flight: 0,
        max_in_flight: 1,
    };
    assert_eq!(llm.stats(), expected);
    let served: Value = client()
        .get(format!("http://{}/stats", llm.addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        served,
        json!({"requests": 5, "streamed": 2, "tool_calls": 0, "in_flight": 0, "max_in_flight": 1,
               "faults": {"429": 1, "500": 1, "cut": 0, "400": 0, "401": 0}})
    );
}

#[tokio::test]
async fn models_health_and_unknown_paths() {
    let llm = start(FakeLlmConfig {
        models: vec!["a".into(), "b".into()],
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let models: Value = client()
        .get(format!("{}/models", llm.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!("a"), json!("b")]);
    let health = client()
        .get(format!("http://{}/healthz", llm.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let missing = client()
        .get(format!("http://{}/nope", llm.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A request without a model is answered with the first configured one.
    let mut body = user("hi", false);
    body.as_object_mut().unwrap().remove("model");
    let answer: Value = post(&llm, &body).await.json().await.unwrap();
    assert_eq!(answer["model"], "a");
}

#[tokio::test]
async fn requests_are_recorded_when_asked() {
    let llm = start(FakeLlmConfig {
        record_requests: true,
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    post(&llm, &user("hi", false)).await.bytes().await.unwrap();
    let recorded = llm.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["parallel_tool_calls"], false);
}

#[tokio::test]
async fn shutdown_cuts_slow_streams_and_stops_listening() {
    let llm = fake().await;
    let addr = llm.addr();
    let response = post(&llm, &user("hi [[ttft_ms=60000]]", true)).await;
    let reader = tokio::spawn(Sse::read(response));
    tokio::time::timeout(Duration::from_secs(10), llm.shutdown())
        .await
        .expect("shutdown does not wait for the slow stream")
        .unwrap();
    let sse = reader.await.unwrap();
    assert!(sse.broken && !sse.done);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn start_on_serves_the_callers_listener_until_the_callers_token_is_cancelled() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let llm = start_on(listener, FakeLlmConfig::default(), &token).unwrap();
    assert_eq!(llm.base_url(), format!("http://{addr}/v1"));
    let answer: Value = post(&llm, &user("hi", false)).await.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");

    let response = post(&llm, &user("hi [[ttft_ms=60000]]", true)).await;
    let reader = tokio::spawn(Sse::read(response));
    token.cancel();
    let sse = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("cancelling the caller's token cuts the slow stream")
        .unwrap();
    assert!(sse.broken && !sse.done);
    llm.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    // Stopping the server leaves the caller's token alone: it may stop other parts too.
    let other = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    drop(start_on(listener, FakeLlmConfig::default(), &other).unwrap());
    assert!(!other.is_cancelled());
}
