//! Turning a run's event stream into an SSE response.

use std::{convert::Infallible, time::Duration};

use axum::response::{
    IntoResponse, Response,
    sse::{Event, KeepAlive, Sse},
};
use conveyor_shared::{events::StoredEvent, ids::RunId};

use crate::limits::StreamGuard;
use futures::{Stream, StreamExt, stream};

/// An SSE response: `retry: 1000` first, then each event with `id:` = seq, `event:` = kind and
/// the JSON data; keep-alive comments while idle.
pub fn response(
    guard: StreamGuard,
    run_id: RunId,
    events: impl Stream<Item = StoredEvent> + Send + 'static,
    keep_alive: Duration,
) -> Response {
    let first =
        stream::once(async { Ok::<_, Infallible>(Event::default().retry(Duration::from_secs(1))) });
    let events = events.map(move |event| {
        // The stream holds its place in the user's count until the client goes away.
        let _held = &guard;
        Ok(Event::default()
            .id(event.seq.to_string())
            .event(event.kind.as_str())
            .data(event.sse_data(&run_id)))
    });
    Sse::new(first.chain(events))
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}
