//! Request extractors that turn raw input into domain types, answering bad input with the
//! API's JSON errors (never axum's plain-text rejections).

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    http::{HeaderMap, StatusCode, request::Parts},
};
use conveyor_shared::ids::{BatchId, ConversationId, RunId, Seq, UserId};
use serde::de::DeserializeOwned;

use crate::{error::ApiError, state::AppState};

/// A JSON body: malformed JSON → 400, a well-formed body with a bad field → 422 naming it,
/// a body over the limit → 413.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: crate::BODY_LIMIT,
                }
            } else {
                ApiError::bad_request(format!("cannot read the request body: {rejection}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses JSON with the path of the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                let field = if path == "." {
                    backticked(&message).unwrap_or("body").to_owned()
                } else {
                    path
                };
                let message = message
                    .split(" at line ")
                    .next()
                    .unwrap_or(&message)
                    .to_owned();
                ApiError::validation(field, message)
            }
            _ => ApiError::bad_request(format!("the body is not valid JSON: {inner}")),
        }
    })
}

/// The first `name` in a serde message like "missing field `message`".
fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn path_param<'a>(params: &'a RawPathParams, name: &str) -> Result<&'a str, ApiError> {
    params
        .iter()
        .find_map(|(key, value)| (key == name).then_some(value))
        .ok_or_else(|| ApiError::Internal(format!("route has no {name} parameter")))
}

async fn raw_params<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<RawPathParams, ApiError> {
    RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::bad_request(format!("malformed path: {e}")))
}

fn parse_user(params: &RawPathParams) -> Result<UserId, ApiError> {
    UserId::parse(path_param(params, "user_id")?).map_err(|e| ApiError::BadRequest {
        message: format!("malformed user_id: {e}"),
        field: Some("user_id".into()),
    })
}

/// The path's user, once the request's token is shown to be theirs.
async fn authorized_user(
    params: &RawPathParams,
    parts: &Parts,
    state: &AppState,
) -> Result<UserId, ApiError> {
    let user = parse_user(params)?;
    state.auth.authorize(&parts.headers, &user).await?;
    state.limits.check_rate(&user).await?;
    Ok(user)
}

fn parse_path_id<T>(
    params: &RawPathParams,
    name: &str,
    parse: impl Fn(&str) -> Result<T, conveyor_shared::ids::IdError>,
) -> Result<T, ApiError> {
    parse(path_param(params, name)?).map_err(|e| ApiError::BadRequest {
        message: format!("malformed {name}: {e}"),
        field: Some(name.to_owned()),
    })
}

/// `/api/{user_id}/…`
#[derive(Debug)]
pub struct UserPath(pub UserId);

impl FromRequestParts<AppState> for UserPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(Self(authorized_user(&params, parts, state).await?))
    }
}

/// `/api/{user_id}/runs/{run_id}…`
#[derive(Debug)]
pub struct RunPath {
    pub user: UserId,
    pub run_id: RunId,
}

impl FromRequestParts<AppState> for RunPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(Self {
            user: authorized_user(&params, parts, state).await?,
            run_id: parse_path_id(&params, "run_id", RunId::parse)?,
        })
    }
}

/// `/api/{user_id}/batches/{batch_id}…`
#[derive(Debug)]
pub struct BatchPath {
    pub user: UserId,
    pub batch_id: BatchId,
}

impl FromRequestParts<AppState> for BatchPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(Self {
            user: authorized_user(&params, parts, state).await?,
            batch_id: parse_path_id(&params, "batch_id", BatchId::parse)?,
        })
    }
}

/// `/api/{user_id}/conversations/{conversation_id}…`
#[derive(Debug)]
pub struct ConversationPath {
    pub user: UserId,
    pub conversation_id: ConversationId,
}

impl FromRequestParts<AppState> for ConversationPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(Self {
            user: authorized_user(&params, parts, state).await?,
            conversation_id: parse_path_id(&params, "conversation_id", ConversationId::parse)?,
        })
    }
}

/// The resume cursor: the larger of `Last-Event-ID` and `?after=` / `?starting_after=`
/// (exclusive; 0 = from the start).
pub fn resume_cursor(
    headers: &HeaderMap,
    after: Option<&str>,
    starting_after: Option<&str>,
) -> Result<Seq, ApiError> {
    let parse = |value: &str, field: &str| {
        value.trim().parse::<Seq>().map_err(|_| {
            ApiError::validation(
                field,
                format!("{field} must be a non-negative integer event id"),
            )
        })
    };
    let mut cursor = 0;
    if let Some(header) = headers.get("last-event-id") {
        let value = header.to_str().map_err(|_| {
            ApiError::validation(
                "Last-Event-ID",
                "Last-Event-ID must be a non-negative integer event id",
            )
        })?;
        if !value.trim().is_empty() {
            cursor = cursor.max(parse(value, "Last-Event-ID")?);
        }
    }
    if let Some(value) = after {
        cursor = cursor.max(parse(value, "after")?);
    }
    if let Some(value) = starting_after {
        cursor = cursor.max(parse(value, "starting_after")?);
    }
    Ok(cursor)
}

/// `?limit=` (default 20, 1–100).
pub fn page_limit(limit: Option<&str>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(20),
        Some(value) => match value.trim().parse::<i64>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(ApiError::validation(
                "limit",
                "limit must be an integer from 1 to 100",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialized")]
    struct Body {
        message: String,
        count: Option<u32>,
    }

    fn field_of(json: &str) -> (u16, Option<String>) {
        match parse_json::<Body>(json.as_bytes()) {
            Ok(_) => (200, None),
            Err(ApiError::Validation { field, .. }) => (422, Some(field)),
            Err(e) => (e.status_code().as_u16(), None),
        }
    }

    #[test]
    fn bad_json_is_400_and_bad_fields_are_422_with_the_field() {
        assert_eq!(field_of("{"), (400, None));
        assert_eq!(field_of(""), (400, None));
        assert_eq!(field_of("{}"), (422, Some("message".into())));
        assert_eq!(field_of(r#"{"message": 5}"#), (422, Some("message".into())));
        assert_eq!(
            field_of(r#"{"message": "x", "count": -1}"#),
            (422, Some("count".into()))
        );
        assert_eq!(
            field_of(r#"{"message": "x", "bogus": 1}"#),
            (422, Some("bogus".into()))
        );
        assert_eq!(field_of(r#"{"message": "x"}"#), (200, None));
    }

    #[test]
    fn the_larger_cursor_wins() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", "7".parse().unwrap());
        assert_eq!(resume_cursor(&headers, Some("3"), None).unwrap(), 7);
        assert_eq!(resume_cursor(&headers, Some("9"), None).unwrap(), 9);
        assert_eq!(
            resume_cursor(&HeaderMap::new(), None, Some("4")).unwrap(),
            4
        );
        assert!(resume_cursor(&HeaderMap::new(), Some("x"), None).is_err());
        headers.insert("last-event-id", "-1".parse().unwrap());
        assert!(resume_cursor(&headers, None, None).is_err());
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(page_limit(None).unwrap(), 20);
        assert_eq!(page_limit(Some("100")).unwrap(), 100);
        assert!(page_limit(Some("101")).is_err());
        assert!(page_limit(Some("0")).is_err());
        assert!(page_limit(Some("x")).is_err());
    }
}
