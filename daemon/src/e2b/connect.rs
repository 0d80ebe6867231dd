//! The Connect protocol (v1) with its JSON codec, as E2B's SDKs speak it
//! to envd: unary calls are a bare JSON body answered with JSON; streams
//! are enveloped messages (one flag byte, a 4-byte big-endian length, the
//! JSON) ended by an end-stream envelope that carries the error, if any.
//! Errors name a Connect code, whose HTTP status unary calls answer with.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use http_body_util::BodyExt;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The content type of streams: exactly this (the Python SDK refuses a
/// `charset` parameter).
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
/// Largest request message taken.
pub const MAX_MESSAGE: usize = 8 * 1024 * 1024;
/// Envelope flags.
const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END_STREAM: u8 = 0x02;
/// Keepalive interval when the client names none (envd's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);
/// Messages queued towards a streaming client.
const STREAM_QUEUE: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: tonic::Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(tonic::Code::InvalidArgument, message)
    }

    /// Connect's name of the code.
    fn code_name(&self) -> &'static str {
        use tonic::Code::*;
        match self.code {
            Ok => "unknown",
            Cancelled => "canceled",
            Unknown => "unknown",
            InvalidArgument => "invalid_argument",
            DeadlineExceeded => "deadline_exceeded",
            NotFound => "not_found",
            AlreadyExists => "already_exists",
            PermissionDenied => "permission_denied",
            ResourceExhausted => "resource_exhausted",
            FailedPrecondition => "failed_precondition",
            Aborted => "aborted",
            OutOfRange => "out_of_range",
            Unimplemented => "unimplemented",
            Internal => "internal",
            Unavailable => "unavailable",
            DataLoss => "data_loss",
            Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary call that failed so.
    fn http_status(&self) -> StatusCode {
        use tonic::Code::*;
        match self.code {
            InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            PermissionDenied => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            AlreadyExists | Aborted => StatusCode::CONFLICT,
            ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Ok | Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn to_json(&self) -> Value {
        json!({ "code": self.code_name(), "message": self.message })
    }
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        Self::new(status.code(), status.message())
    }
}

impl From<crate::manager::SandboxError> for RpcError {
    fn from(error: crate::manager::SandboxError) -> Self {
        tonic::Status::from(error).into()
    }
}

/// The answer to a unary call.
pub fn unary<T: Serialize>(result: Result<T, RpcError>) -> Response {
    match result.and_then(|value| serde_json::to_vec(&value).map_err(|e| RpcError::new(tonic::Code::Internal, e.to_string()))) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => unary_error(&error),
    }
}

pub fn unary_error(error: &RpcError) -> Response {
    (error.http_status(), [(header::CONTENT_TYPE, "application/json")], error.to_json().to_string()).into_response()
}

/// The request message of a unary call (a bare JSON body).
pub fn unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| RpcError::invalid(format!("the request is not the JSON message this method takes: {e}")))
}

/// Reads a whole request body, up to [`MAX_MESSAGE`] bytes.
pub async fn read_body(body: Body) -> Result<Bytes, RpcError> {
    let limited = http_body_util::Limited::new(body, MAX_MESSAGE + 5);
    limited.collect().await.map(|collected| collected.to_bytes()).map_err(|e| {
        RpcError::new(tonic::Code::ResourceExhausted, format!("cannot read the request (at most {MAX_MESSAGE} bytes): {e}"))
    })
}

/// Splits enveloped messages off the front of `buffer`: `Some(json)` per
/// complete message, `None` once an end-stream envelope (or nothing
/// complete) is there.
pub fn next_envelope(buffer: &mut bytes::BytesMut) -> Result<Option<Bytes>, RpcError> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let flags = buffer[0];
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if length > MAX_MESSAGE {
        return Err(RpcError::new(tonic::Code::ResourceExhausted, format!("a message of {length} bytes is over the limit of {MAX_MESSAGE}")));
    }
    if flags & FLAG_COMPRESSED != 0 {
        return Err(RpcError::new(tonic::Code::Unimplemented, "compressed messages are not supported: send them with identity encoding"));
    }
    if buffer.len() < 5 + length {
        return Ok(None);
    }
    let frame = buffer.split_to(5 + length).freeze();
    if flags & FLAG_END_STREAM != 0 {
        return Ok(None);
    }
    Ok(Some(frame.slice(5..)))
}

/// The single request message of a server-streaming call.
pub async fn stream_request<T: DeserializeOwned>(body: Body) -> Result<T, RpcError> {
    let mut buffer = bytes::BytesMut::from(read_body(body).await?.as_ref());
    let message = next_envelope(&mut buffer)?
        .ok_or_else(|| RpcError::invalid("the request holds no enveloped message: send one Connect envelope"))?;
    unary_request(&message)
}

fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + json.len());
    frame.push(flags);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(json);
    Bytes::from(frame)
}

/// Sends the messages of one streaming response; dropping it (or
/// [`StreamWriter::finish`]) ends the stream.
pub struct StreamWriter {
    frames: mpsc::Sender<Result<Bytes, Infallible>>,
}

impl StreamWriter {
    /// Sends one message; false once the client has gone.
    pub async fn send(&self, message: &Value) -> bool {
        self.frames.send(Ok(envelope(0, message.to_string().as_bytes()))).await.is_ok()
    }

    /// Ends the stream, with `error` if it failed.
    pub async fn finish(self, error: Option<RpcError>) {
        let end = match error {
            Some(error) => json!({ "error": error.to_json() }),
            None => json!({}),
        };
        let _ = self.frames.send(Ok(envelope(FLAG_END_STREAM, end.to_string().as_bytes()))).await;
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.frames.closed().await
    }
}

/// A streaming response and the writer that feeds it.
pub fn stream_response() -> (StreamWriter, Response) {
    let (frames, body) = mpsc::channel(STREAM_QUEUE);
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(body)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_CONTENT_TYPE));
    (StreamWriter { frames }, response)
}

/// A streaming response that is only an error.
pub fn stream_error(error: RpcError) -> Response {
    let end = json!({ "error": error.to_json() });
    let mut response = Response::new(Body::from(envelope(FLAG_END_STREAM, end.to_string().as_bytes())));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_CONTENT_TYPE));
    response
}

/// `Connect-Timeout-Ms`, when the client set one.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("connect-timeout-ms")?.to_str().ok()?;
    value.trim().parse().ok().filter(|ms| *ms > 0).map(Duration::from_millis)
}

/// How often an idle stream sends a keepalive (`Keepalive-Ping-Interval`
/// in seconds, at least 1).
pub fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(DEFAULT_KEEPALIVE, |seconds| Duration::from_secs(seconds.max(1)))
}

/// Whether a request is a streaming call by its content type.
pub fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/connect+"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_end() {
        let mut buffer = bytes::BytesMut::new();
        buffer.extend_from_slice(&envelope(0, b"{\"a\":1}"));
        buffer.extend_from_slice(&envelope(0, b"{}")[..3]);
        assert_eq!(next_envelope(&mut buffer).unwrap().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(next_envelope(&mut buffer).unwrap(), None, "an incomplete envelope waits");
        let mut ended = bytes::BytesMut::from(&envelope(FLAG_END_STREAM, b"{}")[..]);
        assert_eq!(next_envelope(&mut ended).unwrap(), None);
        let mut compressed = bytes::BytesMut::from(&envelope(FLAG_COMPRESSED, b"x")[..]);
        assert_eq!(next_envelope(&mut compressed).unwrap_err().code, tonic::Code::Unimplemented);
    }

    #[test]
    fn errors_carry_connect_codes_and_statuses() {
        let error = RpcError::new(tonic::Code::NotFound, "gone");
        assert_eq!(error.to_json(), json!({"code": "not_found", "message": "gone"}));
        assert_eq!(error.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(RpcError::new(tonic::Code::DeadlineExceeded, "").code_name(), "deadline_exceeded");
    }
}
