//! `GET /`: the web chat page, shipped inside the binary.

use axum::{
    http::{HeaderValue, header},
    response::{Html, IntoResponse},
};

const PAGE: &str = include_str!("../../assets/index.html");

/// The page. Its script is inline, so the policy allows inline code but nothing from elsewhere.
pub async fn index() -> impl IntoResponse {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
            ),
        )],
        Html(PAGE),
    )
}
