//! Per-request directives: `[[key=value …]]` blocks inside a user message.
//!
//! They let one test shape one request (latency, a fault, a hostile answer) without
//! restarting the server or touching other tests that share it. The block is removed from the
//! text that the intent grammar and the echo see.

use std::borrow::Cow;

use super::config::FaultKind;

/// Upper bound on `chunks=`, so a typo cannot make the fake allocate gigabytes.
pub(crate) const MAX_CHUNKS: usize = 10_000;

/// What the `[[…]]` blocks of one user message asked for. Unknown keys and unparsable values
/// are ignored (the fake must not be the thing that fails a test).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives<'a> {
    pub ttft_ms: Option<u64>,
    pub chunks: Option<usize>,
    pub chunk_delay_ms: Option<u64>,
    pub fail: Option<FaultKind>,
    pub fail_times: Option<u32>,
    pub user_id: Option<&'a str>,
    pub text: Option<&'a str>,
}

/// Splits `message` into the text without its `[[…]]` blocks and the directives they hold.
/// An unterminated `[[` is plain text.
pub(crate) fn parse(message: &str) -> (Cow<'_, str>, Directives<'_>) {
    let mut directives = Directives::default();
    if !message.contains("[[") {
        return (Cow::Borrowed(message), directives);
    }
    let mut text = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find("[[") {
        let Some(len) = rest[open + 2..].find("]]") else {
            break;
        };
        text.push_str(&rest[..open]);
        parse_block(&rest[open + 2..open + 2 + len], &mut directives);
        rest = &rest[open + 2 + len + 2..];
    }
    text.push_str(rest);
    (Cow::Owned(text), directives)
}

fn parse_block<'a>(block: &'a str, directives: &mut Directives<'a>) {
    let mut rest = block.trim_start();
    while !rest.is_empty() {
        // `text=` swallows the rest of the block, spaces and all, so it can hold any markup.
        if let Some(text) = rest.strip_prefix("text=") {
            directives.text = Some(text.trim_end());
            return;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (token, tail) = rest.split_at(end);
        rest = tail.trim_start();
        let Some((key, value)) = token.split_once('=') else {
            tracing::debug!(token, "fake LLM: ignoring directive without '='");
            continue;
        };
        let known = match key {
            "ttft_ms" => value.parse().map(|v| directives.ttft_ms = Some(v)).is_ok(),
            "chunk_delay_ms" => value
                .parse()
                .map(|v| directives.chunk_delay_ms = Some(v))
                .is_ok(),
            "chunks" => value
                .parse::<usize>()
                .map(|v| directives.chunks = Some(v.min(MAX_CHUNKS)))
                .is_ok(),
            "fail" => value.parse().map(|v| directives.fail = Some(v)).is_ok(),
            "fail_times" => value
                .parse()
                .map(|v| directives.fail_times = Some(v))
                .is_ok(),
            "user_id" => {
                directives.user_id = Some(value);
                true
            }
            _ => false,
        };
        if !known {
            tracing::debug!(token, "fake LLM: ignoring unknown or malformed directive");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_message_has_no_directives() {
        let (text, d) = parse("add buy milk");
        assert!(matches!(text, Cow::Borrowed("add buy milk")));
        assert_eq!(d, Directives::default());
    }

    #[test]
    fn block_is_stripped_and_parsed() {
        let (text, d) = parse(
            "add buy milk [[ttft_ms=0 chunks=5 chunk_delay_ms=10 fail=429 fail_times=2 user_id=mallory]]",
        );
        assert_eq!(text, "add buy milk ");
        assert_eq!(
            d,
            Directives {
                ttft_ms: Some(0),
                chunks: Some(5),
                chunk_delay_ms: Some(10),
                fail: Some(FaultKind::RateLimited),
                fail_times: Some(2),
                user_id: Some("mallory"),
                text: None,
            }
        );
    }

    #[test]
    fn text_takes_the_rest_of_the_block() {
        let (text, d) = parse("hi [[chunks=2 text=<b>x</b> <script>alert(1)</script>]] there");
        assert_eq!(text, "hi  there");
        assert_eq!(d.text, Some("<b>x</b> <script>alert(1)</script>"));
        assert_eq!(d.chunks, Some(2));
    }

    #[test]
    fn bad_values_and_unterminated_blocks_are_ignored() {
        let (text, d) = parse("x [[fail=503 chunks=lots junk]] y [[ttft_ms=5");
        assert_eq!(text, "x  y [[ttft_ms=5");
        assert_eq!(d, Directives::default());
    }
}
