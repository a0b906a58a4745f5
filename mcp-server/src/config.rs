//! Start-up configuration, read once from the command line and the environment.
//!
//! | variable | meaning |
//! | --- | --- |
//! | `DATABASE_URL` | required: a Postgres URL (`postgres://…`) or `sqlite:PATH`, a SQLite file created if missing (the embedded mode) |
//! | `MCP_DB_POOL_SIZE` | maximum pooled connections (default 4; one stdio client rarely needs more) |
//!
//! The URL's scheme is checked when the server connects ([`conveyor_shared::db::Db::connect`]),
//! still at start-up: any other scheme stops the process with an error naming `DATABASE_URL`.
//! | `RUST_LOG` | log filter for stderr (default `info`) |

use std::net::SocketAddr;

use clap::Parser;

/// Pool size when `MCP_DB_POOL_SIZE` is not set.
pub const DEFAULT_POOL_SIZE: u32 = 4;

/// Command-line arguments of `conveyor-mcp`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "conveyor-mcp",
    version,
    about = "Conveyor's task MCP server (stdio by default).",
    after_help = "Environment: DATABASE_URL (required: postgres://… or sqlite:PATH, a SQLite file created if missing), \
MCP_DB_POOL_SIZE (default 4), RUST_LOG (default info). Logs go to stderr; on stdio, stdout carries only the protocol."
)]
pub struct Cli {
    /// Serve MCP over streamable HTTP at http://ADDR/mcp instead of stdio (port 0 picks a free
    /// port; the bound address is logged as "listening on ADDR").
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
}

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stdio,
    Http(SocketAddr),
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub pool_size: u32,
    pub transport: Transport,
}

/// A missing or unusable setting, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "DATABASE_URL is not set: point it at Conveyor's Postgres database, e.g. postgres://postgres@127.0.0.1:5432/conveyor, or at a SQLite file, e.g. sqlite:/var/lib/conveyor/tasks.db"
    )]
    MissingDatabaseUrl,
    #[error("MCP_DB_POOL_SIZE must be a whole number from 1 to 1000 (got {0:?})")]
    BadPoolSize(String),
}

impl Config {
    /// Builds the configuration from parsed arguments and the process environment.
    pub fn from_env(cli: &Cli) -> Result<Self, ConfigError> {
        Self::from_lookup(cli, |name| std::env::var(name).ok())
    }

    /// As [`Config::from_env`], with the environment supplied by `var` (for tests).
    pub fn from_lookup(
        cli: &Cli,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let database_url = var("DATABASE_URL")
            .filter(|url| !url.trim().is_empty())
            .ok_or(ConfigError::MissingDatabaseUrl)?;
        let pool_size = match var("MCP_DB_POOL_SIZE") {
            None => DEFAULT_POOL_SIZE,
            Some(raw) => raw
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or(ConfigError::BadPoolSize(raw))?,
        };
        let transport = cli.http.map_or(Transport::Stdio, Transport::Http);
        Ok(Self {
            database_url,
            pool_size,
            transport,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("conveyor-mcp").chain(args.iter().copied()))
    }

    #[test]
    fn missing_database_url_is_named() {
        let error = Config::from_lookup(&cli(&[]), |_| None).unwrap_err();
        assert!(error.to_string().contains("DATABASE_URL"), "{error}");
    }

    #[test]
    fn defaults_to_stdio_and_a_small_pool() {
        let config = Config::from_lookup(&cli(&[]), |name| {
            (name == "DATABASE_URL").then(|| "postgres://x/y".to_owned())
        })
        .unwrap();
        assert_eq!(config.transport, Transport::Stdio);
        assert_eq!(config.pool_size, DEFAULT_POOL_SIZE);
    }

    #[test]
    fn http_flag_and_pool_size_are_read() {
        let config = Config::from_lookup(&cli(&["--http", "127.0.0.1:0"]), |name| match name {
            "DATABASE_URL" => Some("postgres://x/y".to_owned()),
            "MCP_DB_POOL_SIZE" => Some("8".to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            config.transport,
            Transport::Http("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(config.pool_size, 8);
        let error = Config::from_lookup(&cli(&[]), |name| match name {
            "DATABASE_URL" => Some("postgres://x/y".to_owned()),
            _ => Some("lots".to_owned()),
        })
        .unwrap_err();
        assert!(error.to_string().contains("MCP_DB_POOL_SIZE"), "{error}");
    }
}
