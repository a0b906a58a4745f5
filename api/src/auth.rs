//! Bearer-token authentication: the token's `sub` must be the `{user_id}` of the path.
//!
//! HS256 with `JWT_SECRET`, or RS256/ES256 with keys from a JWKS (URL, cached and refreshed
//! when a token names a key id we do not know, at most every 30 s; or a file). `exp` is required
//! and `nbf` checked, both with a small leeway; `iss`/`aud` when configured. With no keys the
//! API is open — configuration only allows that on a loopback address or when explicitly asked.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use conveyor_shared::{
    config::{AuthConfig, AuthKeys},
    ids::UserId,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;
use tokio::sync::RwLock;

use crate::error::ApiError;

/// How long a fetched key set is trusted before it is fetched again.
const JWKS_TTL: Duration = Duration::from_mins(5);
/// The least time between two fetches triggered by unknown key ids.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// A start-up failure of the authenticator.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("JWT_JWKS_FILE {path}: {message}")]
    JwksFile { path: String, message: String },
}

enum Keys {
    Open,
    Secret(DecodingKey),
    Jwks(JwksSource),
}

struct JwksSource {
    url: Option<String>,
    http: reqwest::Client,
    cache: RwLock<(Arc<JwkSet>, Option<Instant>)>,
}

/// Verifies requests. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<Keys>,
    config: Arc<AuthConfig>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let keys = match &config.keys {
            AuthKeys::None => Keys::Open,
            AuthKeys::Secret(secret) => {
                Keys::Secret(DecodingKey::from_secret(secret.expose().as_bytes()))
            }
            AuthKeys::JwksUrl(url) => Keys::Jwks(JwksSource {
                url: Some(url.clone()),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
                cache: RwLock::new((Arc::new(JwkSet { keys: Vec::new() }), None)),
            }),
            AuthKeys::JwksFile(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| AuthSetupError::JwksFile {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
                let set: JwkSet =
                    serde_json::from_str(&text).map_err(|e| AuthSetupError::JwksFile {
                        path: shown,
                        message: format!("not a JWK set: {e}"),
                    })?;
                Keys::Jwks(JwksSource {
                    url: None,
                    http: reqwest::Client::new(),
                    cache: RwLock::new((Arc::new(set), None)),
                })
            }
        };
        Ok(Self {
            keys: Arc::new(keys),
            config: Arc::new(config.clone()),
        })
    }

    pub fn is_enabled(&self) -> bool {
        !matches!(*self.keys, Keys::Open)
    }

    /// Checks that the request carries a valid token for `user`.
    pub async fn authorize(&self, headers: &HeaderMap, user: &UserId) -> Result<(), ApiError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let token = bearer(headers)?;
        let sub = self.verify(token).await?;
        if sub != user.as_str() {
            return Err(ApiError::Forbidden("the token is for another user".into()));
        }
        Ok(())
    }

    /// Verifies a token and returns its `sub`.
    pub async fn verify(&self, token: &str) -> Result<String, ApiError> {
        let invalid = |why: &str| ApiError::Unauthorized(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
        let (key, algorithm) = match &*self.keys {
            Keys::Open => return Err(invalid("authentication is off")),
            Keys::Secret(key) => (key.clone(), Algorithm::HS256),
            Keys::Jwks(source) => {
                if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
                    return Err(invalid("the algorithm must be RS256 or ES256"));
                }
                (
                    source.key_for(header.kid.as_deref(), header.alg).await?,
                    header.alg,
                )
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        // A configured audience or issuer must be present, not only match when present:
        // jsonwebtoken checks `aud`/`iss` only in tokens that carry them.
        let mut required = vec!["exp", "sub"];
        match &self.config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => invalid("expired"),
                ErrorKind::ImmatureSignature => invalid("not valid yet"),
                ErrorKind::InvalidAudience => invalid("wrong audience"),
                ErrorKind::InvalidIssuer => invalid("wrong issuer"),
                ErrorKind::InvalidSignature => invalid("bad signature"),
                ErrorKind::MissingRequiredClaim(claim) => invalid(&format!("missing {claim}")),
                _ => invalid("rejected"),
            }
        })?;
        Ok(data.claims.sub)
    }
}

impl JwksSource {
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, ApiError> {
        let unknown = || ApiError::Unauthorized("invalid token: unknown signing key".into());
        let (set, fetched) = {
            let cache = self.cache.read().await;
            (cache.0.clone(), cache.1)
        };
        let stale = fetched.is_none_or(|at| at.elapsed() > JWKS_TTL);
        let found = find(&set, kid, alg);
        let set = match (found.is_some() && !stale, &self.url) {
            (true, _) | (false, None) => set,
            (false, Some(url)) => {
                let may_refresh = fetched.is_none_or(|at| at.elapsed() > JWKS_MIN_REFRESH) || stale;
                if may_refresh {
                    self.refresh(url).await.unwrap_or(set)
                } else {
                    set
                }
            }
        };
        let jwk = find(&set, kid, alg).ok_or_else(unknown)?;
        DecodingKey::from_jwk(jwk).map_err(|_| unknown())
    }

    async fn refresh(&self, url: &str) -> Option<Arc<JwkSet>> {
        let fetched = async {
            self.http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        }
        .await;
        match fetched {
            Ok(set) => {
                let set = Arc::new(set);
                *self.cache.write().await = (set.clone(), Some(Instant::now()));
                Some(set)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot fetch JWT_JWKS_URL");
                // Do not hammer a failing endpoint: count the failure as a fetch.
                self.cache.write().await.1 = Some(Instant::now());
                None
            }
        }
    }
}

/// The key a token names, or without a key id the first key declared for its algorithm.
fn find<'a>(
    set: &'a JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Option<&'a jsonwebtoken::jwk::Jwk> {
    match kid {
        Some(kid) => set.find(kid),
        // `KeyAlgorithm` and `Algorithm` share their variant names.
        None => set.keys.iter().find(|k| {
            k.common
                .key_algorithm
                .is_some_and(|a| format!("{a:?}") == format!("{alg:?}"))
        }),
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("a bearer token is required".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::Unauthorized("expected `Authorization: Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized(
            "expected `Authorization: Bearer <token>`".into(),
        ));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use conveyor_shared::config::Secret;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    /// A P-256 key made for these tests only; its public half is in [`JWKS`].
    const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg9K1XOJNiWNT4xOYg
ieQeGoinVPS1RbcyWAQCN3d37MShRANCAARBcDgiGiCJcB3hfGRTgDCQ1JsrGcde
b2StTG9Jue9pj1dROr2vo4C2OhCx4IRA8rf1cqRGnDk43l2j8MjwhqHE
-----END PRIVATE KEY-----";
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"k1","use":"sig",
        "x":"QXA4IhogiXAd4XxkU4AwkNSbKxnHXm9krUxvSbnvaY8","y":"V1E6va-jgLY6ELHghEDyt_VypEacOTjeXaPwyPCGocQ"}]}"#;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .cast_signed()
    }

    fn hs_token(secret: &str, claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn headers(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn config(keys: AuthKeys) -> AuthConfig {
        AuthConfig {
            keys,
            issuer: Some("conveyor-tests".into()),
            audience: Some("conveyor".into()),
            leeway_secs: 5,
        }
    }

    fn status(result: Result<(), ApiError>) -> u16 {
        result.map_or_else(|e| e.status_code().as_u16(), |()| 200)
    }

    #[tokio::test]
    async fn hs256_tokens_are_checked_claim_by_claim() {
        let auth = Authenticator::new(&config(AuthKeys::Secret(Secret::new("s3cret")))).unwrap();
        let alice = UserId::parse("alice").unwrap();
        let good =
            json!({"sub": "alice", "exp": now() + 60, "iss": "conveyor-tests", "aud": "conveyor"});
        let with = |patch: serde_json::Value| {
            let mut claims = good.clone();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    claims.as_object_mut().unwrap().remove(k);
                } else {
                    claims[k] = v.clone();
                }
            }
            hs_token("s3cret", &claims)
        };
        let cases = [
            ("valid", with(json!({})), 200),
            ("wrong signature", hs_token("other", &good), 401),
            ("expired", with(json!({"exp": now() - 120})), 401),
            ("no exp", with(json!({"exp": null})), 401),
            ("not yet valid", with(json!({"nbf": now() + 120})), 401),
            ("wrong audience", with(json!({"aud": "someone-else"})), 401),
            ("wrong issuer", with(json!({"iss": "someone-else"})), 401),
            ("no audience", with(json!({"aud": null})), 401),
            ("no issuer", with(json!({"iss": null})), 401),
            ("no sub", with(json!({"sub": null})), 401),
            ("another user", with(json!({"sub": "bob"})), 403),
            ("malformed", "not.a.jwt".to_owned(), 401),
        ];
        for (name, token, expected) in cases {
            assert_eq!(
                status(auth.authorize(&headers(&token), &alice).await),
                expected,
                "{name}"
            );
        }
        assert_eq!(
            status(auth.authorize(&HeaderMap::new(), &alice).await),
            401,
            "no token"
        );
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic YWxpY2U6eA==".parse().unwrap());
        assert_eq!(
            status(auth.authorize(&basic, &alice).await),
            401,
            "not a bearer token"
        );
    }

    #[tokio::test]
    async fn es256_tokens_verify_against_a_jwks_file() {
        let path: PathBuf =
            std::env::temp_dir().join(format!("conveyor-jwks-{}.json", std::process::id()));
        std::fs::write(&path, JWKS).unwrap();
        let auth = Authenticator::new(&config(AuthKeys::JwksFile(path.clone()))).unwrap();
        let _ = std::fs::remove_file(&path);
        let key = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
        let claims =
            json!({"sub": "alice", "exp": now() + 60, "iss": "conveyor-tests", "aud": "conveyor"});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let token = encode(&header, &claims, &key).unwrap();
        let alice = UserId::parse("alice").unwrap();
        assert_eq!(status(auth.authorize(&headers(&token), &alice).await), 200);
        header.kid = Some("unknown".into());
        let token = encode(&header, &claims, &key).unwrap();
        assert_eq!(
            status(auth.authorize(&headers(&token), &alice).await),
            401,
            "unknown key id"
        );
        // An HS256 token signed with the public key's bytes must not pass (algorithm confusion).
        let forged = hs_token(JWKS, &claims);
        assert_eq!(status(auth.authorize(&headers(&forged), &alice).await), 401);
    }

    #[tokio::test]
    async fn without_keys_everything_is_allowed() {
        let auth = Authenticator::new(&config(AuthKeys::None)).unwrap();
        assert!(!auth.is_enabled());
        assert_eq!(
            status(
                auth.authorize(&HeaderMap::new(), &UserId::parse("x").unwrap())
                    .await
            ),
            200
        );
    }
}
