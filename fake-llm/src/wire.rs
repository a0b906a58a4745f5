//! Encoding an [`Answer`] the way OpenAI does: one `chat.completion` JSON, or a
//! `text/event-stream` of `chat.completion.chunk`s ending in `data: [DONE]`.
//!
//! The stream is written into one buffer up front and handed out as zero-copy slices, one per
//! simulated model step; steps without a delay are merged, so a zero-latency answer is one
//! write. Sleeps happen inside the body, after the headers went out, so a client sees the
//! time to first token where a real provider would show it.

use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::answer::{Answer, word_chunks};
use super::stats::InFlight;

/// Fields shared by every chunk of one response.
pub(crate) struct Meta<'a> {
    pub id: u64,
    pub created: u64,
    pub model: &'a str,
    pub include_usage: bool,
    pub prompt_tokens: u64,
}

/// Simulated model time for one response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub ttft: Duration,
    pub chunk_delay: Duration,
}

/// How a tool call's arguments are split (the spec promises at least two pieces).
const ARGUMENT_PIECES: usize = 2;

impl Answer {
    /// The number of model steps (chunks after the first token) — the basis of the
    /// non-streaming delay and of `completion_tokens`.
    pub fn steps(&self) -> usize {
        match self {
            Answer::Text(text) => word_chunks(text).count(),
            Answer::ToolCall(_) => ARGUMENT_PIECES,
        }
    }

    /// How many chunk delays a streamed answer contains (the time to first token aside).
    pub fn delayed_steps(&self) -> usize {
        match self {
            Answer::Text(text) => word_chunks(text).count().saturating_sub(1),
            Answer::ToolCall(_) => ARGUMENT_PIECES,
        }
    }

    fn finish_reason(&self) -> &'static str {
        match self {
            Answer::Text(_) => "stop",
            Answer::ToolCall(_) => "tool_calls",
        }
    }
}

/// The whole body of a non-streaming response.
pub(crate) fn completion_json(answer: &Answer, meta: &Meta<'_>) -> Vec<u8> {
    let message = match answer {
        Answer::Text(text) => json!({"role": "assistant", "content": text, "refusal": null}),
        Answer::ToolCall(call) => json!({
            "role": "assistant",
            "content": null,
            "refusal": null,
            "tool_calls": [{
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }],
        }),
    };
    let body = json!({
        "id": format!("chatcmpl-{}", meta.id),
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": answer.finish_reason(),
        }],
        "usage": usage(meta, answer),
    });
    serde_json::to_vec(&body).expect("a JSON value always serialises")
}

fn usage(meta: &Meta<'_>, answer: &Answer) -> Value {
    let completion = answer.steps() as u64;
    json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": meta.prompt_tokens + completion,
    })
}

/// The SSE frames of a streaming response, each with the delay before it. With `cut`, the
/// stream stops about halfway through the content, before the finish chunk and `[DONE]`.
pub(crate) fn stream_frames(
    answer: &Answer,
    meta: &Meta<'_>,
    timing: Timing,
    cut: bool,
) -> Vec<(Duration, Bytes)> {
    let mut w = SseWriter::new(meta);
    match answer {
        Answer::Text(text) => {
            w.begin_step(timing.ttft);
            w.chunk(
                |b| b.extend_from_slice(br#"{"role":"assistant","content":""}"#),
                None,
            );
            let total = word_chunks(text).count();
            let sent = if cut { total.div_ceil(2) } else { total };
            for (i, piece) in word_chunks(text).take(sent).enumerate() {
                w.begin_step(if i == 0 {
                    Duration::ZERO
                } else {
                    timing.chunk_delay
                });
                w.chunk(
                    |b| {
                        b.extend_from_slice(br#"{"content":"#);
                        push_json(b, piece);
                        b.push(b'}');
                    },
                    None,
                );
            }
        }
        Answer::ToolCall(call) => {
            w.begin_step(timing.ttft);
            w.chunk(
                |b| {
                    b.extend_from_slice(
                        br#"{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"#,
                    );
                    push_json(b, &call.id);
                    b.extend_from_slice(br#","type":"function","function":{"name":"#);
                    push_json(b, &call.name);
                    b.extend_from_slice(br#","arguments":""}}]}"#);
                },
                None,
            );
            let (first, second) = split_half(&call.arguments);
            let pieces = [first, second];
            let sent = if cut { 1 } else { pieces.len() };
            for piece in &pieces[..sent] {
                w.begin_step(timing.chunk_delay);
                w.chunk(
                    |b| {
                        b.extend_from_slice(
                            br#"{"tool_calls":[{"index":0,"function":{"arguments":"#,
                        );
                        push_json(b, piece);
                        b.extend_from_slice(b"}}]}");
                    },
                    None,
                );
            }
        }
    }
    if !cut {
        w.chunk(|b| b.extend_from_slice(b"{}"), Some(answer.finish_reason()));
        if meta.include_usage {
            w.usage(&usage(meta, answer));
        }
        w.buf.extend_from_slice(b"data: [DONE]\n\n");
    }
    w.into_frames()
}

/// Splits at a char boundary near the middle; both halves are non-empty when `s` has ≥ 2
/// chars (arguments are a JSON object, so at least `{}`).
fn split_half(s: &str) -> (&str, &str) {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid += 1;
    }
    s.split_at(mid)
}

fn push_json(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(buf, s).expect("writing JSON into a Vec cannot fail");
}

struct SseWriter {
    buf: Vec<u8>,
    /// `data: {"id":…,"model":…,` — everything before `"choices"`.
    head: Vec<u8>,
    /// Start offset and preceding delay of each frame.
    frames: Vec<(usize, Duration)>,
}

impl SseWriter {
    fn new(meta: &Meta<'_>) -> Self {
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"data: {\"id\":\"chatcmpl-");
        head.extend_from_slice(meta.id.to_string().as_bytes());
        head.extend_from_slice(b"\",\"object\":\"chat.completion.chunk\",\"created\":");
        head.extend_from_slice(meta.created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        push_json(&mut head, meta.model);
        head.push(b',');
        Self {
            buf: Vec::with_capacity(2048),
            head,
            frames: Vec::new(),
        }
    }

    /// Starts a new frame after `delay`; a zero delay continues the current frame.
    fn begin_step(&mut self, delay: Duration) {
        if self.frames.is_empty() || !delay.is_zero() {
            self.frames.push((self.buf.len(), delay));
        }
    }

    fn chunk(&mut self, delta: impl FnOnce(&mut Vec<u8>), finish_reason: Option<&str>) {
        self.buf.extend_from_slice(&self.head);
        self.buf
            .extend_from_slice(br#""choices":[{"index":0,"delta":"#);
        delta(&mut self.buf);
        self.buf
            .extend_from_slice(br#","logprobs":null,"finish_reason":"#);
        match finish_reason {
            Some(reason) => push_json(&mut self.buf, reason),
            None => self.buf.extend_from_slice(b"null"),
        }
        self.buf.extend_from_slice(b"}]}\n\n");
    }

    fn usage(&mut self, usage: &Value) {
        self.buf.extend_from_slice(&self.head);
        self.buf.extend_from_slice(br#""choices":[],"usage":"#);
        serde_json::to_writer(&mut self.buf, usage).expect("writing JSON into a Vec cannot fail");
        self.buf.extend_from_slice(b"}\n\n");
    }

    fn into_frames(self) -> Vec<(Duration, Bytes)> {
        let all = Bytes::from(self.buf);
        let mut frames = Vec::with_capacity(self.frames.len());
        let mut iter = self.frames.iter().peekable();
        while let Some(&(start, delay)) = iter.next() {
            let end = iter.peek().map_or(all.len(), |&&(next, _)| next);
            frames.push((delay, all.slice(start..end)));
        }
        frames
    }
}

/// A response body that plays `frames` with their delays, then — with `cut` — fails so the
/// server drops the connection mid-body. `shutdown` cuts a long stream short.
pub(crate) fn body(
    frames: Vec<(Duration, Bytes)>,
    cut: bool,
    shutdown: CancellationToken,
    in_flight: InFlight,
) -> Body {
    if !cut && frames.iter().all(|(delay, _)| delay.is_zero()) {
        drop(in_flight);
        // Zero-delay steps are merged when written, so this is at most one frame.
        return frames
            .into_iter()
            .next()
            .map_or_else(Body::empty, |(_, bytes)| Body::from(bytes));
    }
    let state = Playback {
        frames: frames.into_iter(),
        cut,
        shutdown,
        in_flight: Some(in_flight),
    };
    Body::from_stream(futures::stream::unfold(state, Playback::next))
}

struct Playback {
    frames: std::vec::IntoIter<(Duration, Bytes)>,
    cut: bool,
    shutdown: CancellationToken,
    in_flight: Option<InFlight>,
}

impl Playback {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Self)> {
        if let Some((delay, bytes)) = self.frames.next() {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.shutdown.cancelled() => {
                        self.frames = Vec::new().into_iter();
                        self.cut = false;
                        return Some((Err(io::Error::other("fake LLM shutting down")), self));
                    }
                }
            }
            if self.frames.as_slice().is_empty() && !self.cut {
                // The client may act on this frame before the stream is polled again.
                self.in_flight = None;
            }
            return Some((Ok(bytes), self));
        }
        self.in_flight = None;
        if std::mem::take(&mut self.cut) {
            // Let hyper flush what was sent so far: an error drops the connection at once,
            // and whatever is still in its write buffer would be lost with it.
            tokio::task::yield_now().await;
            let err = io::Error::new(io::ErrorKind::ConnectionAborted, "injected cut");
            return Some((Err(err), self));
        }
        None
    }
}
