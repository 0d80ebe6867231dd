//! envd's `/files`: `GET` streams a file out of the sandbox, `POST`
//! writes files into it, from `multipart/form-data` (parts named `file`,
//! each part's filename its path unless the `path` query names it) or a
//! raw `application/octet-stream` body (gzip-encoded or not). Both go
//! through the agent's Download and Upload, a chunk at a time.

use std::{io::Write, sync::Arc, time::Instant};

use axum::{
    body::{Body, Bytes},
    extract::{FromRequest, Multipart, Query, State},
    http::{header, HeaderMap, Request},
    response::{IntoResponse, Response},
    Extension, Json,
};
use futures_util::{Stream, StreamExt};
use sandbox_proto::api::{upload_request::Part, DownloadRequest, FileInfo, UploadHeader, UploadRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{envd::Call, E2bError, Peer, Shared, Target};
use crate::api::MAX_CHUNK_BYTES;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

/// `GET /files?path=`: the file's bytes.
pub async fn download(
    State(shared): State<Arc<Shared>>,
    Extension(target): Extension<Target>,
    Extension(peer): Extension<Peer>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let call = match Call::begin(&shared, &target, peer, &headers, query.username.as_deref(), "envd.Files.Download").await {
        Ok(call) => call,
        Err(error) => return error.into_response(),
    };
    let path = call.resolve(query.path.as_deref().unwrap_or_default());
    let name = path.rsplit('/').next().unwrap_or_default().replace(['"', '\\', '\r', '\n'], "_");
    let result = call.agent().download(DownloadRequest { sandbox_id: call.sandbox.clone(), path }).await;
    call.record("envd.Files.Download", started, if result.is_ok() { "ok" } else { "error" });
    match result {
        Ok(chunks) => {
            let body = chunks.into_inner().map(|chunk| chunk.map(|chunk| chunk.data));
            (
                [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\""))],
                Body::from_stream(body),
            )
                .into_response()
        }
        Err(status) => E2bError::Agent(status).into_response(),
    }
}

/// `POST /files`: writes each file; answers with what was written.
pub async fn upload(
    State(shared): State<Arc<Shared>>,
    Extension(target): Extension<Target>,
    Extension(peer): Extension<Peer>,
    Query(query): Query<FileQuery>,
    request: Request<Body>,
) -> Response {
    let started = Instant::now();
    let headers = request.headers().clone();
    let call = match Call::begin(&shared, &target, peer, &headers, query.username.as_deref(), "envd.Files.Upload").await {
        Ok(call) => call,
        Err(error) => {
            super::drain(request.into_body()).await;
            return error.into_response();
        }
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
    let result = if content_type.starts_with("multipart/form-data") {
        upload_multipart(&call, query.path.as_deref(), request).await
    } else {
        upload_raw(&call, query.path.as_deref(), &headers, request.into_body()).await
    };
    call.record("envd.Files.Upload", started, if result.is_ok() { "ok" } else { "error" });
    match result {
        Ok(written) => Json(Value::Array(written)).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn upload_multipart(call: &Call, path: Option<&str>, request: Request<Body>) -> Result<Vec<Value>, E2bError> {
    let mut form = Multipart::from_request(request, &()).await.map_err(|e| E2bError::BadRequest(format!("bad multipart body: {e}")))?;
    let mut written = Vec::new();
    while let Some(field) = form.next_field().await.map_err(|e| E2bError::BadRequest(format!("bad multipart body: {e}")))? {
        if field.name() != Some("file") {
            continue;
        }
        let named = match path.filter(|_| written.is_empty()) {
            Some(path) => path.to_string(),
            None => field.file_name().map(str::to_string).ok_or_else(|| {
                E2bError::BadRequest("a `file` part has no filename: set it to the file's path, or pass ?path=".into())
            })?,
        };
        let destination = call.resolve(&named);
        if written.iter().any(|entry: &Value| entry["path"] == destination) {
            return Err(E2bError::BadRequest(format!("{destination} is written twice in one upload: send each path once")));
        }
        let chunks = field.map(|chunk| chunk.map_err(|e| E2bError::BadRequest(format!("the upload broke: {e}"))));
        let info = upload_one(call, destination, chunks).await?;
        written.push(written_entry(&info));
    }
    if written.is_empty() {
        return Err(E2bError::BadRequest("the multipart body has no part named `file`".into()));
    }
    Ok(written)
}

async fn upload_raw(call: &Call, path: Option<&str>, headers: &HeaderMap, body: Body) -> Result<Vec<Value>, E2bError> {
    let path = path.ok_or_else(|| E2bError::BadRequest("an octet-stream upload needs ?path= naming the file".into()))?;
    let destination = call.resolve(path);
    let gzip = match headers.get(header::CONTENT_ENCODING).and_then(|value| value.to_str().ok()) {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => return Err(E2bError::BadRequest(format!("Content-Encoding {other:?} is not supported: use gzip or none"))),
    };
    let raw = body.into_data_stream().map(|chunk| chunk.map_err(|e| E2bError::BadRequest(format!("the upload broke: {e}"))));
    let info = if gzip { upload_one(call, destination, gunzip(raw)).await? } else { upload_one(call, destination, raw).await? };
    Ok(vec![written_entry(&info)])
}

/// Decompresses a gzip stream as it arrives.
fn gunzip(raw: impl Stream<Item = Result<Bytes, E2bError>> + Send + 'static) -> impl Stream<Item = Result<Bytes, E2bError>> + Send {
    type Decoder = flate2::write::GzDecoder<Vec<u8>>;
    fn corrupt(error: std::io::Error) -> E2bError {
        E2bError::BadRequest(format!("the gzip body is corrupt: {error}"))
    }
    let start: (_, Option<Decoder>) = (Box::pin(raw), Some(flate2::write::GzDecoder::new(Vec::new())));
    futures_util::stream::unfold(start, |(mut raw, decoder)| async move {
        let mut decoder = decoder?;
        let fed = match raw.next().await {
            Some(Ok(chunk)) => decoder.write_all(&chunk).map_err(corrupt),
            Some(Err(error)) => Err(error),
            None => {
                let finished = decoder.try_finish().map_err(corrupt);
                let rest = Bytes::from(std::mem::take(decoder.get_mut()));
                return Some((finished.map(|()| rest), (raw, None)));
            }
        };
        match fed {
            Ok(()) => {
                let out = Bytes::from(std::mem::take(decoder.get_mut()));
                Some((Ok(out), (raw, Some(decoder))))
            }
            Err(error) => Some((Err(error), (raw, None))),
        }
    })
}

/// Streams one file to the agent. A broken client stream cancels the
/// agent call, so the half-written file is never committed.
async fn upload_one(call: &Call, path: String, chunks: impl Stream<Item = Result<Bytes, E2bError>>) -> Result<FileInfo, E2bError> {
    let (sender, receiver) = mpsc::channel(8);
    let header = UploadHeader { sandbox_id: call.sandbox.clone(), path, mode: 0 };
    sender.send(UploadRequest { part: Some(Part::Header(header)) }).await.map_err(|_| E2bError::Internal("the upload could not start".into()))?;
    let mut agent = call.agent();
    let upload = agent.upload(ReceiverStream::new(receiver));
    let feed = async move {
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            for piece in chunk?.chunks(MAX_CHUNK_BYTES) {
                let part = UploadRequest { part: Some(Part::Data(Bytes::copy_from_slice(piece))) };
                if sender.send(part).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<(), E2bError>(())
    };
    let mut upload = std::pin::pin!(upload);
    tokio::select! {
        fed = feed => {
            fed?;
            Ok(upload.await.map_err(E2bError::Agent)?.into_inner())
        }
        early = &mut upload => Ok(early.map_err(E2bError::Agent)?.into_inner()),
    }
}

fn written_entry(info: &FileInfo) -> Value {
    json!({ "path": info.path, "name": info.name, "type": "file" })
}
