//! Transport hygiene: request ids, security headers, the CORS allow-list and the request body
//! timeout, in both modes.

use conveyor_e2e::both_modes;
use conveyor_e2e::harness::{Mode, Stack, StackOptions};

const ALLOWED: &str = "https://app.example";

both_modes!(responses_carry_request_ids_security_headers_and_only_allowed_cors);
async fn responses_carry_request_ids_security_headers_and_only_allowed_cors(
    mode: Mode,
) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![("CORS_ALLOWED_ORIGINS".into(), ALLOWED.into())],
        ..StackOptions::in_mode(mode)
    })
    .await?;

    // Readiness names the mode's backends.
    let (status, ready) = stack.get_json("/readyz").await?;
    let expected = match mode {
        Mode::Distributed => {
            serde_json::json!({"status": "ready", "postgres": true, "redis": true})
        }
        Mode::Embedded => serde_json::json!({"status": "ready", "database": true, "events": true}),
    };
    assert_eq!((status, ready), (200, expected));

    // A request id is generated when absent, echoed when given; error answers carry it too.
    let response = stack
        .http
        .get(stack.url("/api/ann/conversations"))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let generated = response.headers()["x-request-id"].to_str()?.to_owned();
    assert!(!generated.is_empty());
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(response.headers()[name], value, "{name}");
    }
    let response = stack
        .http
        .get(stack.url("/api/ann/runs/nope"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");

    // CORS: the allowed origin gets a preflight answer and the header on requests; another
    // origin gets neither.
    let preflight = |origin: &'static str| {
        stack
            .http
            .request(reqwest::Method::OPTIONS, stack.url("/api/ann/chat"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight(ALLOWED).await?;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], ALLOWED);
    let foreign = preflight("https://evil.example").await?;
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    let response = stack
        .http
        .get(stack.url("/api/ann/conversations"))
        .header("origin", ALLOWED)
        .send()
        .await?;
    assert_eq!(response.headers()["access-control-allow-origin"], ALLOWED);
    let response = stack
        .http
        .get(stack.url("/api/ann/conversations"))
        .header("origin", "https://evil.example")
        .send()
        .await?;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    Ok(())
}

both_modes!(without_an_allow_list_no_origin_is_allowed);
async fn without_an_allow_list_no_origin_is_allowed(mode: Mode) -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        workers: 0,
        ..StackOptions::in_mode(mode)
    })
    .await?;
    let response = stack
        .http
        .get(stack.url("/api/ann/conversations"))
        .header("origin", ALLOWED)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    Ok(())
}

both_modes!(a_client_too_slow_to_send_its_body_is_answered_and_nothing_is_written);
async fn a_client_too_slow_to_send_its_body_is_answered_and_nothing_is_written(
    mode: Mode,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stack = Stack::start(StackOptions {
        workers: 0,
        env: vec![("REQUEST_BODY_TIMEOUT_SECS".into(), "1".into())],
        ..StackOptions::in_mode(mode)
    })
    .await?;
    let addr = stack.api_url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    // Headers promise 64 bytes of body; only 10 ever arrive.
    socket
        .write_all(
            b"POST /api/ann/chat HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
              accept: application/json\r\ncontent-length: 64\r\n\r\n{\"message\"",
        )
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        socket.read_to_end(&mut answer),
    )
    .await??;
    let answer = String::from_utf8_lossy(&answer);
    // Without the body timeout the server would wait for the missing bytes forever.
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    assert!(answer.contains("not received within"), "{answer}");
    let db = stack.sql().await?;
    let runs: i64 = db.query("SELECT count(*) FROM runs").scalar().await?;
    assert_eq!(runs, 0);
    Ok(())
}
