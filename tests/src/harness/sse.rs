//! A minimal SSE client: enough of the format to check ids, event names and data.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::Value;

/// One received event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: Value,
}

impl SseEvent {
    pub fn seq(&self) -> u64 {
        self.id.unwrap_or_default()
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.event.as_str(),
            "run.completed" | "run.failed" | "run.cancelled"
        )
    }
}

/// An open SSE response.
pub struct SseStream {
    pub status: u16,
    pub retry_ms: Option<u64>,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    buffer: String,
}

impl SseStream {
    pub async fn open(request: reqwest::RequestBuilder) -> anyhow::Result<Self> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = (status == 200).then(|| response.bytes_stream().boxed());
        Ok(Self {
            status,
            retry_ms: None,
            body,
            buffer: String::new(),
        })
    }

    /// The next event, or `None` at the end of the stream.
    pub async fn next_event(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse_block(&block)? {
                    return Ok(Some(event));
                }
                continue;
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            match body.next().await {
                Some(chunk) => self
                    .buffer
                    .push_str(std::str::from_utf8(&chunk?).context("SSE is UTF-8")?),
                None => return Ok(None),
            }
        }
    }

    fn parse_block(&mut self, block: &str) -> anyhow::Result<Option<SseEvent>> {
        let (mut id, mut event, mut data) = (None, None, String::new());
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.parse::<u64>().context("numeric id")?),
                "event" => event = Some(value.to_owned()),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                "retry" => self.retry_ms = value.parse().ok(),
                _ => {}
            }
        }
        let Some(event) = event else { return Ok(None) };
        Ok(Some(SseEvent {
            id,
            event,
            data: serde_json::from_str(&data)
                .with_context(|| format!("event data is JSON: {data}"))?,
        }))
    }

    /// Reads events until a terminal one (included), failing after `timeout`.
    pub async fn collect_until_terminal(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<SseEvent>> {
        let mut events = Vec::new();
        let read = async {
            while let Some(event) = self.next_event().await? {
                let end = event.is_terminal();
                events.push(event);
                if end {
                    return Ok::<_, anyhow::Error>(true);
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(true)) => Ok(events),
            Ok(Ok(false)) => bail!("stream ended before a terminal event"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no terminal event within {timeout:?}"),
        }
    }

    /// Reads `n` events.
    pub async fn take(&mut self, n: usize, timeout: Duration) -> anyhow::Result<Vec<SseEvent>> {
        let mut events = Vec::with_capacity(n);
        tokio::time::timeout(timeout, async {
            while events.len() < n {
                match self.next_event().await? {
                    Some(event) => events.push(event),
                    None => bail!("stream ended after {} events", events.len()),
                }
            }
            Ok(())
        })
        .await
        .context("timed out reading events")??;
        Ok(events)
    }
}

/// Asserts seqs are 1..=n (or start..) with no gap and no duplicate.
pub fn assert_gap_free(events: &[SseEvent], first: u64) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event.seq(),
            first + i as u64,
            "events must be gap-free and in order: {events:#?}"
        );
    }
}
