//! Reading a batch upload: JSONL, one `{custom_id, message, conversation_id?}` a line.
//!
//! The body is checked line by line as it arrives, so a bad upload is refused with the number of
//! every offending line before anything is stored, and only the parsed lines are kept, never
//! the raw body. Blank lines are skipped but counted, so line numbers are those of the
//! client's file.

use std::collections::HashMap;

use conveyor_shared::ids::ConversationId;
use serde::Deserialize;

use crate::error::ApiError;

/// Line numbers listed in a refusal, at most.
const MAX_LISTED_LINES: usize = 1_000;
/// Per-line explanations in a refusal, at most.
const MAX_EXPLAINED_LINES: usize = 100;
/// The longest `custom_id`, in characters.
pub const MAX_CUSTOM_ID_CHARS: usize = 256;

/// What an upload may hold.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_lines: usize,
    pub max_bytes: usize,
    pub max_message_chars: usize,
}

/// One line of the upload, as the client wrote it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    custom_id: String,
    message: String,
    #[serde(default)]
    conversation_id: Option<String>,
}

/// A valid line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based, counting blank lines.
    pub number: usize,
    pub custom_id: String,
    pub message: String,
    pub conversation_id: Option<ConversationId>,
}

/// An upload being read.
#[derive(Debug)]
pub struct UploadReader {
    limits: UploadLimits,
    /// The current line's bytes so far.
    partial: Vec<u8>,
    /// Lines read so far, blank ones included.
    line_count: usize,
    /// Non-blank lines read so far.
    prompt_count: usize,
    bytes: usize,
    lines: Vec<Line>,
    errors: Vec<(usize, String)>,
    /// First line of each `custom_id`.
    seen: HashMap<String, usize>,
    too_large_at: Option<usize>,
    /// The first non-blank line past `max_lines`.
    over_limit_line: Option<usize>,
}

impl UploadReader {
    pub fn new(limits: UploadLimits) -> Self {
        Self {
            limits,
            partial: Vec::new(),
            line_count: 0,
            prompt_count: 0,
            bytes: 0,
            lines: Vec::new(),
            errors: Vec::new(),
            seen: HashMap::new(),
            too_large_at: None,
            over_limit_line: None,
        }
    }

    /// Reads the next piece of the body. Returns `false` once the upload is over the size
    /// limit: the rest need not be read.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.too_large_at.is_some() {
            return false;
        }
        let room = self.limits.max_bytes - self.bytes;
        let (within, over) = chunk.split_at(chunk.len().min(room));
        self.bytes += within.len();
        let mut rest = within;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.partial);
            self.read_line(&line);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        if over.is_empty() {
            return true;
        }
        // The limit falls inside the current line.
        self.too_large_at = Some(self.line_count + 1);
        self.partial = Vec::new();
        false
    }

    /// The valid lines, or the refusal naming every bad one.
    pub fn finish(mut self) -> Result<Vec<Line>, ApiError> {
        if self.too_large_at.is_none() && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.read_line(&line);
        }
        if let Some(line) = self.too_large_at {
            self.errors.push((
                line,
                format!(
                    "the upload is larger than {} bytes; the limit falls on this line",
                    self.limits.max_bytes
                ),
            ));
        }
        if self.prompt_count > self.limits.max_lines {
            // Every line past the limit is one too many; the first of them is named.
            let first_over = self.over_limit_line.unwrap_or(self.line_count.max(1));
            self.errors.push((
                first_over,
                format!(
                    "the upload has {} lines; at most {} are accepted",
                    self.prompt_count, self.limits.max_lines
                ),
            ));
        }
        if !self.errors.is_empty() {
            return Err(rejection(self.errors));
        }
        if self.lines.is_empty() {
            return Err(ApiError::BadUpload {
                message: "the upload has no lines".to_owned(),
                lines: Vec::new(),
                errors: Vec::new(),
            });
        }
        Ok(self.lines)
    }

    fn read_line(&mut self, raw: &[u8]) {
        self.line_count += 1;
        let number = self.line_count;
        if raw.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.prompt_count += 1;
        if self.prompt_count > self.limits.max_lines {
            if self.over_limit_line.is_none() {
                self.over_limit_line = Some(number);
            }
            return;
        }
        match self.parse(raw) {
            Ok(line) => {
                if let Some(first) = self.seen.get(&line.custom_id) {
                    self.errors.push((
                        number,
                        format!(
                            "custom_id {:?} is already used on line {first}",
                            line.custom_id
                        ),
                    ));
                } else {
                    self.seen.insert(line.custom_id.clone(), number);
                    self.lines.push(line);
                }
            }
            Err(message) => self.errors.push((number, message)),
        }
    }

    fn parse(&self, raw: &[u8]) -> Result<Line, String> {
        // serde would also take `["id", "message"]` for the struct.
        if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("each line must be a JSON object".to_owned());
        }
        let mut deserializer = serde_json::Deserializer::from_slice(raw);
        let body: BatchLine =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
                let path = error.path().to_string();
                let inner = error.into_inner();
                let text = inner.to_string();
                let text = text.split(" at line ").next().unwrap_or(&text);
                match inner.classify() {
                    serde_json::error::Category::Data if path != "." => format!("{path}: {text}"),
                    serde_json::error::Category::Data => text.to_owned(),
                    _ => format!("not valid JSON: {text}"),
                }
            })?;
        deserializer.end().map_err(|error| {
            let text = error.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text);
            format!("not valid JSON: {text}")
        })?;
        if body.custom_id.trim().is_empty() {
            return Err("custom_id must not be empty".to_owned());
        }
        if body.custom_id.chars().count() > MAX_CUSTOM_ID_CHARS {
            return Err(format!(
                "custom_id must be at most {MAX_CUSTOM_ID_CHARS} characters"
            ));
        }
        super::super::turns::validate_message(&body.message, self.limits.max_message_chars)
            .map_err(|e| e.to_string())?;
        let conversation_id = body
            .conversation_id
            .map(|id| ConversationId::parse(&id).map_err(|e| format!("conversation_id: {e}")))
            .transpose()?;
        Ok(Line {
            number: self.line_count,
            custom_id: body.custom_id,
            message: body.message,
            conversation_id,
        })
    }
}

/// The refusal of an upload whose lines `errors` are bad: `400` listing them in order.
pub fn rejection(mut errors: Vec<(usize, String)>) -> ApiError {
    errors.sort_by_key(|(line, _)| *line);
    let count = errors.len();
    let message = match errors.as_slice() {
        [(line, message)] => format!("line {line}: {message}; nothing was created"),
        _ => format!("{count} lines of the upload are invalid; nothing was created"),
    };
    let lines = errors
        .iter()
        .map(|(line, _)| *line)
        .take(MAX_LISTED_LINES)
        .collect();
    errors.truncate(MAX_EXPLAINED_LINES);
    ApiError::BadUpload {
        message,
        lines,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: UploadLimits = UploadLimits {
        max_lines: 3,
        max_bytes: 1_000,
        max_message_chars: 20,
    };

    fn read(chunks: &[&str], limits: UploadLimits) -> Result<Vec<Line>, (Vec<usize>, String)> {
        let mut reader = UploadReader::new(limits);
        for chunk in chunks {
            if !reader.feed(chunk.as_bytes()) {
                break;
            }
        }
        reader.finish().map_err(|e| match e {
            ApiError::BadUpload { lines, message, .. } => (lines, message),
            other => (Vec::new(), other.to_string()),
        })
    }

    #[test]
    fn lines_split_across_chunks_are_read_whole() {
        let lines = read(
            &[
                "{\"custom_id\": \"a\", \"mess",
                "age\": \"hi\"}\n\n{\"custom_id\": \"b\", \"message\": \"ho\", ",
                "\"conversation_id\": null}",
            ],
            LIMITS,
        )
        .unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].number, lines[0].custom_id.as_str()), (1, "a"));
        assert_eq!((lines[1].number, lines[1].message.as_str()), (3, "ho"));
    }

    #[test]
    fn every_bad_line_is_named() {
        let body = [
            r#"{"custom_id": "a", "message": "fine"}"#,
            r#"{"custom_id": "b", "message": "#,
            r#"{"custom_id": "c"}"#,
            r#"{"custom_id": "a", "message": "again"}"#,
        ]
        .join("\n");
        let (lines, message) = read(&[&body], LIMITS).unwrap_err();
        assert_eq!(lines, [2, 3, 4], "{message}");
    }

    #[test]
    fn fields_are_checked() {
        for (line, why) in [
            (r#"{"custom_id": "a", "message": "x", "extra": 1}"#, "extra"),
            (r#"{"custom_id": "", "message": "x"}"#, "custom_id"),
            (r#"{"custom_id": "a", "message": "   "}"#, "message"),
            (
                r#"{"custom_id": "a", "message": "much too long a message here"}"#,
                "message",
            ),
            (
                r#"{"custom_id": "a", "message": "x", "conversation_id": "run_1"}"#,
                "conversation_id",
            ),
            (r#"{"custom_id": 5, "message": "x"}"#, "custom_id"),
            ("[1, 2]", "object"),
            (r#"{"custom_id": "a", "message": "x"} {}"#, "JSON"),
        ] {
            let (lines, message) = read(&[line], LIMITS).unwrap_err();
            assert_eq!(lines, [1], "{line}");
            assert!(message.contains(why), "{line}: {message}");
        }
    }

    #[test]
    fn too_many_lines_names_the_first_one_over() {
        let line = |i: usize| format!("{{\"custom_id\": \"{i}\", \"message\": \"x\"}}\n");
        let body = (0..5).map(line).collect::<Vec<_>>().concat();
        let (lines, _) = read(&[&body], LIMITS).unwrap_err();
        assert_eq!(lines, [4]);
    }

    #[test]
    fn too_large_names_the_line_the_limit_falls_on() {
        let line = |id: &str| format!("{{\"custom_id\": \"{id}\", \"message\": \"x\"}}\n"); // 36 bytes
        let limits = UploadLimits {
            max_bytes: 80,
            max_lines: 10,
            ..LIMITS
        };
        let (lines, message) = read(&[&line("a"), &line("b"), &line("c")], limits).unwrap_err();
        assert_eq!(lines, [3], "{message}");
        assert!(message.contains("80 bytes"), "{message}");
    }

    #[test]
    fn an_empty_upload_is_refused() {
        let (lines, message) = read(&["\n \n"], LIMITS).unwrap_err();
        assert!(lines.is_empty());
        assert!(message.contains("no lines"), "{message}");
    }
}
