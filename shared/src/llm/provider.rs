//! Provider table and `LLM_*` variables.

use std::{fmt, str::FromStr};

use crate::config::{ConfigError, Env, Secret};

/// A supported LLM provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Gemini,
    Groq,
    OpenRouter,
    Ollama,
    OpenAiCompatible,
}

impl Provider {
    pub const ALL: [Provider; 6] = [
        Self::OpenAi,
        Self::Gemini,
        Self::Groq,
        Self::OpenRouter,
        Self::Ollama,
        Self::OpenAiCompatible,
    ];

    /// The value of `LLM_PROVIDER` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Gemini => "gemini",
            Self::Groq => "groq",
            Self::OpenRouter => "openrouter",
            Self::Ollama => "ollama",
            Self::OpenAiCompatible => "openai-compatible",
        }
    }

    /// The prefix of its `{PROVIDER}_API_KEY` / `{PROVIDER}_DEFAULT_MODEL` variables.
    fn env_prefix(self) -> &'static str {
        match self {
            Self::OpenAi => "OPENAI",
            Self::Gemini => "GEMINI",
            Self::Groq => "GROQ",
            Self::OpenRouter => "OPENROUTER",
            Self::Ollama => "OLLAMA",
            Self::OpenAiCompatible => "LLM",
        }
    }

    /// The OpenAI-compatible endpoint, unless `LLM_BASE_URL` overrides it.
    fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("https://api.openai.com/v1"),
            Self::Gemini => Some("https://generativelanguage.googleapis.com/v1beta/openai"),
            Self::Groq => Some("https://api.groq.com/openai/v1"),
            Self::OpenRouter => Some("https://openrouter.ai/api/v1"),
            Self::Ollama => Some("http://127.0.0.1:11434/v1"),
            Self::OpenAiCompatible => None,
        }
    }

    fn default_model(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("gpt-4o-mini"),
            Self::Gemini => Some("gemini-2.5-flash"),
            Self::Groq => Some("llama-3.3-70b-versatile"),
            Self::OpenRouter => Some("openai/gpt-oss-20b:free"),
            Self::Ollama => Some("llama3.2"),
            Self::OpenAiCompatible => None,
        }
    }

    /// A local Ollama needs no key.
    fn needs_key(self) -> bool {
        !matches!(self, Self::Ollama)
    }

    fn valid_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or(())
    }
}

/// The resolved LLM settings of a worker.
#[derive(Clone)]
pub struct LlmSettings {
    pub provider: Provider,
    pub base_url: String,
    pub model: String,
    /// Empty for a local Ollama.
    pub api_key: Secret,
}

impl fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSettings")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .finish()
    }
}

impl LlmSettings {
    /// Resolves `LLM_PROVIDER` (default `openai`), `LLM_BASE_URL`, `LLM_MODEL`, `LLM_API_KEY`
    /// and the provider's own `{PROVIDER}_API_KEY` / `{PROVIDER}_DEFAULT_MODEL`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let provider = match env.get("LLM_PROVIDER") {
            None => Provider::OpenAi,
            Some(value) => value.parse().map_err(|()| ConfigError::Invalid {
                var: "LLM_PROVIDER".into(),
                value,
                expected: format!("one of {}", Provider::valid_names()),
            })?,
        };
        let prefix = provider.env_prefix();

        let base_url = env
            .get("LLM_BASE_URL")
            .or_else(|| provider.default_base_url().map(str::to_owned))
            .ok_or_else(|| ConfigError::Missing {
                var: "LLM_BASE_URL".into(),
                hint: format!(" when LLM_PROVIDER={provider}"),
            })?;
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                var: "LLM_BASE_URL".into(),
                value: base_url,
                expected: "an http:// or https:// URL".into(),
            });
        }

        let model_var = format!("{prefix}_DEFAULT_MODEL");
        let model = env
            .get("LLM_MODEL")
            .or_else(|| env.get(&model_var))
            .or_else(|| provider.default_model().map(str::to_owned))
            .ok_or_else(|| ConfigError::Missing {
                var: "LLM_MODEL".into(),
                hint: format!(" when LLM_PROVIDER={provider}"),
            })?;

        let key_var = format!("{prefix}_API_KEY");
        let api_key = env.get("LLM_API_KEY").or_else(|| env.get(&key_var));
        let api_key = match api_key {
            Some(key) => key,
            None if provider.needs_key() => {
                return Err(ConfigError::Missing {
                    var: key_var,
                    hint: format!(" when LLM_PROVIDER={provider} (or set LLM_API_KEY)"),
                });
            }
            None => String::new(),
        };

        Ok(Self {
            provider,
            base_url: base_url.trim_end_matches('/').to_owned(),
            model,
            api_key: Secret::new(api_key),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(pairs: &[(&'static str, &'static str)]) -> Result<LlmSettings, ConfigError> {
        let env: HashMap<&str, &str> = pairs.iter().copied().collect();
        LlmSettings::from_env(&env)
    }

    #[test]
    fn every_hosted_provider_resolves_its_endpoint_key_and_default_model() {
        let cases = [
            (
                "openai",
                "OPENAI_API_KEY",
                "https://api.openai.com/v1",
                "gpt-4o-mini",
            ),
            (
                "gemini",
                "GEMINI_API_KEY",
                "https://generativelanguage.googleapis.com/v1beta/openai",
                "gemini-2.5-flash",
            ),
            (
                "groq",
                "GROQ_API_KEY",
                "https://api.groq.com/openai/v1",
                "llama-3.3-70b-versatile",
            ),
            (
                "openrouter",
                "OPENROUTER_API_KEY",
                "https://openrouter.ai/api/v1",
                "openai/gpt-oss-20b:free",
            ),
        ];
        for (name, key_var, url, model) in cases {
            let s = settings(&[("LLM_PROVIDER", name), (key_var, "k-123")]).unwrap();
            assert_eq!(s.provider.name(), name);
            assert_eq!(s.base_url, url, "{name}");
            assert_eq!(s.model, model, "{name}");
            assert_eq!(s.api_key.expose(), "k-123", "{name}");
        }
    }

    #[test]
    fn missing_key_names_the_providers_variable() {
        for (name, key_var) in [
            ("openai", "OPENAI_API_KEY"),
            ("gemini", "GEMINI_API_KEY"),
            ("groq", "GROQ_API_KEY"),
            ("openrouter", "OPENROUTER_API_KEY"),
        ] {
            let err = settings(&[("LLM_PROVIDER", name)]).unwrap_err();
            assert!(err.to_string().contains(key_var), "{name}: {err}");
        }
    }

    #[test]
    fn provider_defaults_to_openai() {
        let s = settings(&[("OPENAI_API_KEY", "k")]).unwrap();
        assert_eq!(s.provider, Provider::OpenAi);
    }

    #[test]
    fn ollama_needs_no_key_and_runs_locally() {
        let s = settings(&[("LLM_PROVIDER", "ollama")]).unwrap();
        assert_eq!(s.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(s.model, "llama3.2");
        assert_eq!(s.api_key.expose(), "");
        let s = settings(&[
            ("LLM_PROVIDER", "ollama"),
            ("OLLAMA_DEFAULT_MODEL", "qwen3"),
        ])
        .unwrap();
        assert_eq!(s.model, "qwen3");
    }

    #[test]
    fn openai_compatible_needs_base_url_model_and_key() {
        let err = settings(&[("LLM_PROVIDER", "openai-compatible")]).unwrap_err();
        assert!(err.to_string().contains("LLM_BASE_URL"), "{err}");
        let err = settings(&[
            ("LLM_PROVIDER", "openai-compatible"),
            ("LLM_BASE_URL", "http://127.0.0.1:9/v1"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("LLM_MODEL"), "{err}");
        let err = settings(&[
            ("LLM_PROVIDER", "openai-compatible"),
            ("LLM_BASE_URL", "http://127.0.0.1:9/v1"),
            ("LLM_MODEL", "m"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("LLM_API_KEY"), "{err}");
        let s = settings(&[
            ("LLM_PROVIDER", "openai-compatible"),
            ("LLM_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("LLM_MODEL", "m"),
            ("LLM_API_KEY", "k"),
        ])
        .unwrap();
        assert_eq!(s.base_url, "http://127.0.0.1:9/v1");
    }

    #[test]
    fn overrides_win_over_provider_defaults() {
        let s = settings(&[
            ("LLM_PROVIDER", "groq"),
            ("GROQ_API_KEY", "provider-key"),
            ("LLM_API_KEY", "override-key"),
            ("GROQ_DEFAULT_MODEL", "provider-model"),
            ("LLM_MODEL", "override-model"),
            ("LLM_BASE_URL", "http://127.0.0.1:1234/v1"),
        ])
        .unwrap();
        assert_eq!(s.api_key.expose(), "override-key");
        assert_eq!(s.model, "override-model");
        assert_eq!(s.base_url, "http://127.0.0.1:1234/v1");
        let s = settings(&[
            ("LLM_PROVIDER", "groq"),
            ("GROQ_API_KEY", "k"),
            ("GROQ_DEFAULT_MODEL", "provider-model"),
        ])
        .unwrap();
        assert_eq!(s.model, "provider-model");
    }

    #[test]
    fn unknown_provider_lists_the_valid_ones() {
        let err = settings(&[("LLM_PROVIDER", "anthropic")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("LLM_PROVIDER"), "{err}");
        for p in Provider::ALL {
            assert!(err.contains(p.name()), "{err}");
        }
    }

    #[test]
    fn bad_base_url_is_refused() {
        let err = settings(&[
            ("LLM_PROVIDER", "ollama"),
            ("LLM_BASE_URL", "localhost:11434"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("LLM_BASE_URL"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_key() {
        let s = settings(&[("OPENAI_API_KEY", "sk-very-secret")]).unwrap();
        assert!(!format!("{s:?}").contains("sk-very-secret"));
    }
}
