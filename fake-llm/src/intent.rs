//! The fake model's "understanding": a tiny, case-insensitive grammar over the user's message
//! that maps to the seed task tools, and the tool-call arguments built from the offered schema.
//!
//! The grammar is small on purpose — tests should read like a user talking
//! (`add buy milk`, `complete 3`) and always get the same tool call back.

use serde_json::{Map, Value};

use super::request::Function;

/// A recognised request for one of the task tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Intent {
    AddTask {
        title: String,
        priority: Option<&'static str>,
    },
    ListTasks {
        status: Option<&'static str>,
    },
    CompleteTask {
        task_id: i64,
    },
    DeleteTask {
        task_id: i64,
    },
    UpdateTask {
        task_id: i64,
        title: String,
    },
    SetPriority {
        task_id: i64,
        priority: &'static str,
    },
}

const PRIORITIES: [&str; 3] = ["low", "medium", "high"];

impl Intent {
    /// The unprefixed tool this intent calls.
    pub fn tool_name(&self) -> &'static str {
        match self {
            Self::AddTask { .. } => "add_task",
            Self::ListTasks { .. } => "list_tasks",
            Self::CompleteTask { .. } => "complete_task",
            Self::DeleteTask { .. } => "delete_task",
            Self::UpdateTask { .. } => "update_task",
            Self::SetPriority { .. } => "set_priority",
        }
    }

    fn arguments(&self) -> Vec<(&'static str, Value)> {
        match self {
            Self::AddTask { title, priority } => {
                let mut args = vec![("title", Value::from(title.as_str()))];
                if let Some(priority) = priority {
                    args.push(("priority", Value::from(*priority)));
                }
                args
            }
            Self::ListTasks { status } => status
                .map(|s| vec![("status", Value::from(s))])
                .unwrap_or_default(),
            Self::CompleteTask { task_id } | Self::DeleteTask { task_id } => {
                vec![("task_id", Value::from(*task_id))]
            }
            Self::UpdateTask { task_id, title } => vec![
                ("task_id", Value::from(*task_id)),
                ("title", Value::from(title.as_str())),
            ],
            Self::SetPriority { task_id, priority } => vec![
                ("task_id", Value::from(*task_id)),
                ("priority", Value::from(*priority)),
            ],
        }
    }

    /// The offered tool this intent calls: exactly its name, or a multi-server name ending in
    /// `__<name>`.
    pub fn find_tool<'f>(
        &self,
        mut functions: impl Iterator<Item = &'f Function>,
    ) -> Option<&'f Function> {
        let wanted = self.tool_name();
        functions.find(|f| {
            f.name.as_deref().is_some_and(|name| {
                name == wanted
                    || name
                        .strip_suffix(wanted)
                        .is_some_and(|prefix| prefix.ends_with("__"))
            })
        })
    }

    /// The JSON arguments for `function`: only properties its schema declares (every argument
    /// when it declares none), integers turned into strings where the schema wants a string,
    /// plus `user_id` when a directive asks for it — to prove the worker overrides it.
    pub fn arguments_json(&self, function: &Function, user_id: Option<&str>) -> String {
        let properties = function
            .parameters
            .get("properties")
            .and_then(Value::as_object);
        let mut args = Map::new();
        for (key, value) in self.arguments() {
            match properties {
                Some(props) => {
                    if let Some(schema) = props.get(key) {
                        args.insert(key.to_owned(), coerce(value, schema));
                    }
                }
                None => {
                    args.insert(key.to_owned(), value);
                }
            }
        }
        if let Some(user_id) = user_id {
            args.insert("user_id".to_owned(), Value::from(user_id));
        }
        Value::Object(args).to_string()
    }
}

fn coerce(value: Value, schema: &Value) -> Value {
    let allows = |ty: &str| match schema.get("type") {
        Some(Value::String(t)) => t == ty,
        Some(Value::Array(types)) => types.iter().any(|t| t == ty),
        _ => false,
    };
    match value {
        Value::Number(n) if allows("string") && !allows("integer") && !allows("number") => {
            Value::String(n.to_string())
        }
        other => other,
    }
}

/// Recognises an intent in `text` (directives already removed). `None` means "just talk".
pub(crate) fn parse(text: &str) -> Option<Intent> {
    let text = text.trim().trim_end_matches(['.', '!', '?']).trim_end();
    if let Some(rest) = after_any(text, &["add task", "add a task", "add", "remember to"]) {
        return parse_add(rest);
    }
    if is_list(text) {
        let status = if contains_word(text, "pending") {
            Some("pending")
        } else if contains_word(text, "completed") {
            Some("completed")
        } else {
            None
        };
        return Some(Intent::ListTasks { status });
    }
    if let Some(rest) = after_any(text, &["complete", "done"]) {
        let (task_id, _) = take_id(rest)?;
        return Some(Intent::CompleteTask { task_id });
    }
    if let Some(rest) = after_any(text, &["delete"]) {
        let (task_id, _) = take_id(rest)?;
        return Some(Intent::DeleteTask { task_id });
    }
    if let Some(rest) = after_any(text, &["update", "rename"]) {
        let (task_id, rest) = take_id(rest)?;
        let title = after_word(rest, "to")?.trim();
        return (!title.is_empty()).then(|| Intent::UpdateTask {
            task_id,
            title: title.to_owned(),
        });
    }
    if let Some(rest) = after_any(
        text,
        &[
            "set the priority of",
            "set priority of",
            "set priority for",
            "set priority",
            "prioritise",
            "prioritize",
        ],
    ) {
        let (task_id, rest) = take_id(rest)?;
        let rest = after_any(rest, &["to", "as"]).unwrap_or(rest);
        let word = rest.split_whitespace().next()?;
        let priority = PRIORITIES
            .into_iter()
            .find(|p| word.eq_ignore_ascii_case(p))?;
        return Some(Intent::SetPriority { task_id, priority });
    }
    None
}

fn parse_add(rest: &str) -> Option<Intent> {
    let rest = rest.trim_start_matches(':').trim();
    let found = PRIORITIES.into_iter().find_map(|level| {
        let phrase = format!("{level} priority");
        find_word(rest, &phrase).map(|pos| (level, pos, pos + phrase.len()))
    });
    let (title, priority) = match found {
        Some((level, start, end)) => {
            let before = rest[..start].trim_end_matches([' ', ',', '-', '(']);
            let before = strip_last_word(before, "with")
                .or_else(|| strip_last_word(before, "as"))
                .unwrap_or(before);
            let after = rest[end..].trim_start_matches([' ', ',', ')']);
            (format!("{before} {after}").trim().to_owned(), Some(level))
        }
        None => (rest.to_owned(), None),
    };
    (!title.is_empty()).then_some(Intent::AddTask { title, priority })
}

fn is_list(text: &str) -> bool {
    after_word(text, "list").is_some()
        || (["show", "what are", "what's"]
            .into_iter()
            .any(|p| after_word(text, p).is_some())
            && find_word(text, "tasks").is_some())
}

/// The text after the first of `prefixes` that `text` starts with (whole words, ASCII case
/// ignored; a `:` right after the prefix is skipped).
fn after_any<'t>(text: &'t str, prefixes: &[&str]) -> Option<&'t str> {
    prefixes.iter().find_map(|p| after_word(text, p))
}

fn after_word<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let bytes = text.as_bytes();
    let n = prefix.len();
    // The first `n` bytes equal an ASCII prefix, so `n` is a char boundary.
    (bytes.len() >= n
        && bytes[..n].eq_ignore_ascii_case(prefix.as_bytes())
        && bytes
            .get(n)
            .is_none_or(|&b| b.is_ascii_whitespace() || b == b':'))
    .then(|| text[n..].trim_start_matches(':').trim_start())
}

/// Byte offset of `word` in `text` as a whole word, ASCII case ignored.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let hay = text.as_bytes();
    let needle = word.as_bytes();
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).find(|&i| {
        hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
            && (i == 0 || !hay[i - 1].is_ascii_alphanumeric())
            && hay
                .get(i + needle.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric())
    })
}

fn contains_word(text: &str, word: &str) -> bool {
    find_word(text, word).is_some()
}

fn strip_last_word<'t>(text: &'t str, word: &str) -> Option<&'t str> {
    let cut = text.len().checked_sub(word.len())?;
    let bytes = text.as_bytes();
    (bytes[cut..].eq_ignore_ascii_case(word.as_bytes())
        && (cut == 0 || bytes[cut - 1].is_ascii_whitespace()))
    .then(|| text[..cut].trim_end())
}

/// A task id (optionally after the word `task`, optionally written `#3`) and the text after it.
fn take_id(text: &str) -> Option<(i64, &str)> {
    let text = after_word(text, "task").unwrap_or(text);
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    let id = text[..end]
        .trim_start_matches('#')
        .trim_end_matches([',', ':'])
        .parse()
        .ok()?;
    Some((id, text[end..].trim_start()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[expect(
        clippy::unnecessary_wraps,
        reason = "compared with what parse() returns"
    )]
    fn add(title: &str, priority: Option<&'static str>) -> Option<Intent> {
        Some(Intent::AddTask {
            title: title.to_owned(),
            priority,
        })
    }

    #[test]
    fn add_forms() {
        assert_eq!(parse("add buy milk"), add("buy milk", None));
        assert_eq!(parse("Add Task: Buy Milk."), add("Buy Milk", None));
        assert_eq!(parse("remember to call mom"), add("call mom", None));
        assert_eq!(
            parse("add buy milk with high priority"),
            add("buy milk", Some("high"))
        );
        assert_eq!(
            parse("ADD pay rent, LOW PRIORITY"),
            add("pay rent", Some("low"))
        );
        assert_eq!(
            parse("add high priority fix the roof"),
            add("fix the roof", Some("high"))
        );
        assert_eq!(parse("add"), None);
        assert_eq!(parse("address book"), None);
    }

    #[test]
    fn list_forms() {
        let all = Some(Intent::ListTasks { status: None });
        assert_eq!(parse("list"), all);
        assert_eq!(parse("List my tasks"), all);
        assert_eq!(parse("show my tasks"), all);
        assert_eq!(parse("What are my tasks?"), all);
        assert_eq!(
            parse("show my pending tasks"),
            Some(Intent::ListTasks {
                status: Some("pending")
            })
        );
        assert_eq!(
            parse("list completed"),
            Some(Intent::ListTasks {
                status: Some("completed")
            })
        );
        assert_eq!(parse("show me the weather"), None);
    }

    #[test]
    fn id_forms() {
        let complete = Some(Intent::CompleteTask { task_id: 3 });
        assert_eq!(parse("complete 3"), complete);
        assert_eq!(parse("Complete task #3"), complete);
        assert_eq!(parse("done 3"), complete);
        assert_eq!(parse("complete the report"), None);
        assert_eq!(
            parse("delete task 12"),
            Some(Intent::DeleteTask { task_id: 12 })
        );
        assert_eq!(
            parse("update 4 to Buy oat milk"),
            Some(Intent::UpdateTask {
                task_id: 4,
                title: "Buy oat milk".to_owned()
            })
        );
        assert_eq!(
            parse("rename task 4 to x"),
            Some(Intent::UpdateTask {
                task_id: 4,
                title: "x".to_owned()
            })
        );
        assert_eq!(parse("update 4"), None);
        let high = Some(Intent::SetPriority {
            task_id: 5,
            priority: "high",
        });
        assert_eq!(parse("prioritise 5 high"), high);
        assert_eq!(parse("Prioritize task 5 HIGH"), high);
        assert_eq!(parse("set priority 5 high"), high);
        assert_eq!(parse("set the priority of task 5 to high"), high);
        assert_eq!(parse("set priority 5 urgent"), None);
    }

    #[test]
    fn arguments_follow_the_schema() {
        let function = Function {
            name: Some("add_task".into()),
            parameters: json!({"type": "object", "properties": {"title": {"type": "string"}}}),
        };
        let intent = parse("add buy milk high priority").unwrap();
        assert_eq!(
            intent.arguments_json(&function, None),
            r#"{"title":"buy milk"}"#
        );
        assert_eq!(
            intent.arguments_json(&function, Some("mallory")),
            r#"{"title":"buy milk","user_id":"mallory"}"#
        );

        let stringly = Function {
            name: Some("complete_task".into()),
            parameters: json!({"properties": {"task_id": {"type": ["string", "null"]}}}),
        };
        assert_eq!(
            parse("complete 7").unwrap().arguments_json(&stringly, None),
            r#"{"task_id":"7"}"#
        );
    }
}
