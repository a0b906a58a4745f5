//! What the fake model says: a pure function of the request, the directives and the config.
//!
//! Keeping this free of I/O and timing makes the answer for a given input the same in every
//! test, benchmark and demo, whatever the transport (streaming or not) does with it.

use std::hash::{DefaultHasher, Hash, Hasher};

use super::directives::{Directives, MAX_CHUNKS};
use super::intent;
use super::request::{ChatRequest, Message};

/// How many characters of a tool result the summary quotes.
const TOOL_SNIPPET_CHARS: usize = 200;

/// Words appended (cyclically) to an echo answer until it has the configured chunk count.
const FILLER: [&str; 9] = [
    "This",
    "is",
    "a",
    "deterministic",
    "answer",
    "from",
    "the",
    "fake",
    "model.",
];

/// The assistant's reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Text(String),
    ToolCall(ToolCall),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string, as OpenAI sends them.
    pub arguments: String,
}

/// Decides the reply. `raw_user` is the latest user message, `user_text` the same without
/// its directives.
pub(crate) fn decide(
    request: &ChatRequest,
    raw_user: &str,
    user_text: &str,
    directives: &Directives<'_>,
    default_chunks: usize,
) -> Answer {
    let messages = request.messages();
    match messages.last() {
        Some(last) if matches!(last.role(), "tool" | "function") => Answer::Text(
            directives
                .text
                .map_or_else(|| summarise_tool(last), str::to_owned),
        ),
        Some(last) if last.role() == "user" => {
            if let Some(call) = tool_call(request, raw_user, user_text, directives) {
                return Answer::ToolCall(call);
            }
            Answer::Text(text_answer(user_text, directives, default_chunks))
        }
        _ => Answer::Text(text_answer(user_text, directives, default_chunks)),
    }
}

fn tool_call(
    request: &ChatRequest,
    raw_user: &str,
    user_text: &str,
    directives: &Directives<'_>,
) -> Option<ToolCall> {
    let intent = intent::parse(user_text)?;
    let function = intent.find_tool(request.functions())?;
    let name = function.name.clone().unwrap_or_default();
    // Same input → same id; the message count keeps ids distinct within one conversation.
    let mut hasher = DefaultHasher::new();
    (request.messages().len(), raw_user, &name).hash(&mut hasher);
    Some(ToolCall {
        id: format!("call_{:016x}", hasher.finish()),
        arguments: intent.arguments_json(function, directives.user_id),
        name,
    })
}

fn summarise_tool(message: &Message) -> String {
    let content = message.text();
    let snippet = match content.char_indices().nth(TOOL_SNIPPET_CHARS) {
        Some((end, _)) => &content[..end],
        None => &content,
    };
    if looks_like_error(&content) {
        format!("The tool reported an error: {snippet}")
    } else {
        format!("Done. {snippet}")
    }
}

fn looks_like_error(content: &str) -> bool {
    let compact: String = content
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    compact.starts_with("error")
        || compact.contains("\"iserror\":true")
        || compact.contains("\"is_error\":true")
        || (compact.contains("\"error\":") && !compact.contains("\"error\":null"))
}

/// `You said: <message>.` plus filler words up to `chunks` words, or the `text=` directive.
fn text_answer(user_text: &str, directives: &Directives<'_>, default_chunks: usize) -> String {
    if let Some(text) = directives.text {
        return text.to_owned();
    }
    let chunks = directives.chunks.unwrap_or(default_chunks).min(MAX_CHUNKS);
    let mut text = String::with_capacity(user_text.len() + 16 + chunks * 8);
    text.push_str("You said:");
    let mut words = 2;
    for word in user_text.split_whitespace() {
        text.push(' ');
        text.push_str(word);
        words += 1;
    }
    if words == 2 {
        text.push(' ');
        words += 1;
    }
    text.push('.');
    for word in FILLER.iter().cycle().take(chunks.saturating_sub(words)) {
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// The streaming chunks of a text: each word with the whitespace that follows it, so the
/// chunks concatenate to exactly the text.
pub(crate) fn word_chunks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let word_start = rest.len() - rest.trim_start().len();
        let word_end = rest[word_start..]
            .find(char::is_whitespace)
            .map_or(rest.len(), |i| word_start + i);
        let end = rest.len() - rest[word_end..].trim_start().len();
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_padded_to_the_chunk_count() {
        let d = Directives::default();
        let text = text_answer("  hello \n world ", &d, 8);
        assert_eq!(text, "You said: hello world. This is a deterministic");
        assert_eq!(word_chunks(&text).count(), 8);
        assert_eq!(text_answer("", &d, 0), "You said: .");
        let long = text_answer("one two three four five six seven", &d, 3);
        assert_eq!(long, "You said: one two three four five six seven.");
    }

    #[test]
    fn word_chunks_reassemble_exactly() {
        for text in ["a b  c\n", "  lead", "", "x", "Done. {\"a\": 1}\n\nok "] {
            let chunks: Vec<_> = word_chunks(text).collect();
            assert_eq!(chunks.concat(), text);
            assert!(chunks.iter().all(|c| !c.is_empty()));
        }
        assert_eq!(
            word_chunks("You said: hi.").collect::<Vec<_>>(),
            ["You ", "said: ", "hi."]
        );
    }

    #[test]
    fn errors_are_recognised() {
        assert!(looks_like_error(r#"{"isError": true, "content": []}"#));
        assert!(looks_like_error("Error: task 7 not found"));
        assert!(looks_like_error(r#"{"error": "task 7 not found"}"#));
        assert!(!looks_like_error(r#"{"id": 1, "error": null}"#));
        assert!(!looks_like_error(r#"{"id": 1, "title": "buy milk"}"#));
    }
}
