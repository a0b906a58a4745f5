//! The standard `mcpServers` JSON file (`{"mcpServers": {"name": {"command", "args", "env"}}}`),
//! the format most MCP clients read, so an operator can reuse an existing one.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;

/// How to start one MCP server over stdio.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerSpec {
    #[serde(skip)]
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per-call timeout in seconds (Conveyor's extension; default `MCP_CALL_TIMEOUT_SECS`).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Tool input properties the worker fills from the run instead of the model
    /// (Conveyor's extension; default `["user_id"]`).
    #[serde(default = "default_hidden")]
    pub injected_arguments: Vec<String>,
}

impl ServerSpec {
    pub fn timeout(&self, default: Duration) -> Duration {
        self.timeout_secs.map_or(default, Duration::from_secs)
    }
}

fn default_hidden() -> Vec<String> {
    vec!["user_id".to_owned()]
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServersFile {
    mcp_servers: BTreeMap<String, ServerSpec>,
}

/// A servers file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServersFileError {
    #[error("cannot read MCP_SERVERS_FILE {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("MCP_SERVERS_FILE {path} is not a valid mcpServers file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("MCP_SERVERS_FILE {path}: server name {name:?} must be letters, digits, `-` or `_`")]
    BadName { path: String, name: String },
}

/// Reads the servers file, or — without one — the bundled `conveyor-mcp` next to this binary
/// (or on `PATH`).
pub fn load_servers(file: Option<&Path>) -> Result<Vec<ServerSpec>, ServersFileError> {
    let Some(path) = file else {
        return Ok(vec![bundled_server()]);
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ServersFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_servers(&text, &shown)
}

fn parse_servers(text: &str, shown: &str) -> Result<Vec<ServerSpec>, ServersFileError> {
    let file: ServersFile =
        serde_json::from_str(text).map_err(|source| ServersFileError::Parse {
            path: shown.to_owned(),
            source,
        })?;
    file.mcp_servers
        .into_iter()
        .map(|(name, mut spec)| {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ServersFileError::BadName {
                    path: shown.to_owned(),
                    name,
                });
            }
            spec.name = name;
            Ok(spec)
        })
        .collect()
}

fn bundled_server() -> ServerSpec {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("conveyor-mcp")))
        .filter(|path| path.exists());
    ServerSpec::bundled(
        sibling.map_or_else(|| "conveyor-mcp".to_owned(), |p| p.display().to_string()),
        Vec::new(),
        BTreeMap::new(),
    )
}

impl ServerSpec {
    /// The bundled task server (`tasks`), started as `command args…` with `env` added.
    pub fn bundled(command: String, args: Vec<String>, env: BTreeMap<String, String>) -> Self {
        Self {
            name: "tasks".to_owned(),
            command,
            args,
            env,
            timeout_secs: None,
            injected_arguments: default_hidden(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_format() {
        let servers = parse_servers(
            r#"{"mcpServers": {"tasks": {"command": "conveyor-mcp", "args": ["-v"], "env": {"A": "b"}},
                "files": {"command": "fs-mcp", "timeoutSecs": 5}}}"#,
            "f.json",
        )
        .unwrap();
        assert_eq!(servers.len(), 2);
        let files = servers.iter().find(|s| s.name == "files").unwrap();
        assert_eq!(
            files.timeout(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        let tasks = servers.iter().find(|s| s.name == "tasks").unwrap();
        assert_eq!(tasks.args, ["-v"]);
        assert_eq!(tasks.injected_arguments, ["user_id"]);
    }

    #[test]
    fn bad_files_name_the_variable() {
        let err = parse_servers("{}", "f.json").unwrap_err();
        assert!(err.to_string().contains("MCP_SERVERS_FILE"), "{err}");
        let err =
            parse_servers(r#"{"mcpServers": {"a b": {"command": "x"}}}"#, "f.json").unwrap_err();
        assert!(err.to_string().contains("a b"), "{err}");
    }
}
