//! `sandbox.v1.Files`: file transfer and file-system calls, forwarded to
//! the sandbox's agent. Uploads are checked chunk by chunk on the way
//! through; a malformed upload is aborted so the agent never commits it.

use std::time::Instant;

use sandbox_proto::api::{
    files_server::Files, upload_request::Part, DownloadRequest, FileChunk, FileInfo, ListRequest,
    ListResponse, MakeDirRequest, MoveRequest, RemoveRequest, RemoveResponse, StatRequest, UploadRequest,
    WatchEvent, WatchRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{agent_status, forwarded_stream, require_sandbox_id, require_size, ApiContext, ReplyStream, MAX_CHUNK_BYTES};
use crate::auth;

pub struct FilesService(pub ApiContext);

fn no_change<T>(_: &crate::manager::AgentHandle, _: &mut T) -> Result<(), Status> {
    Ok(())
}

#[tonic::async_trait]
impl Files for FilesService {
    type DownloadStream = ReplyStream<FileChunk>;
    type WatchStream = ReplyStream<WatchEvent>;

    async fn upload(&self, request: Request<Streaming<UploadRequest>>) -> Result<Response<FileInfo>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request)?;
        let mut inbound = request.into_inner();
        let header = match inbound.message().await?.and_then(|m| m.part) {
            Some(Part::Header(header)) => header,
            _ => {
                let status = Status::invalid_argument(
                    "the first Upload message must be `header` (sandbox_id, path, mode); send data chunks after it",
                );
                return self.0.observe(&caller, "", "Files.Upload", started, Err(status));
            }
        };
        let id = header.sandbox_id.clone();
        let result = async {
            require_sandbox_id(&id)?;
            let mut agent = self.0.manager.agent(&caller, &id).await?.agent;
            let (chunks, aborted) = relay_upload(UploadRequest { part: Some(Part::Header(header)) }, inbound);
            tokio::select! {
                reply = agent.upload(chunks) => reply.map_err(|status| agent_status(&id, status)),
                Ok(status) = aborted => Err(status),
            }
        }
        .await;
        self.0.observe(&caller, &id, "Files.Upload", started, result.map(Response::into_inner)).map(Response::new)
    }

    async fn download(&self, request: Request<DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        let reply = self
            .0
            .forward(request, "Files.Download", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.download(r).await })
            .await?;
        Ok(Response::new(forwarded_stream(id, reply.into_inner())))
    }

    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<FileInfo>, Status> {
        self.0.forward(request, "Files.Stat", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.stat(r).await }).await
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.0.forward(request, "Files.List", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.list(r).await }).await
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        self.0.forward(request, "Files.Remove", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.remove(r).await }).await
    }

    async fn make_dir(&self, request: Request<MakeDirRequest>) -> Result<Response<FileInfo>, Status> {
        self.0.forward(request, "Files.MakeDir", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.make_dir(r).await }).await
    }

    async fn r#move(&self, request: Request<MoveRequest>) -> Result<Response<FileInfo>, Status> {
        self.0.forward(request, "Files.Move", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.r#move(r).await }).await
    }

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        let reply = self
            .0
            .forward(request, "Files.Watch", |r| &r.sandbox_id, no_change, |mut agent, r| async move { agent.watch(r).await })
            .await?;
        Ok(Response::new(forwarded_stream(id, reply.into_inner())))
    }
}

/// Relays an upload to the agent, checking each message. On a bad message
/// or a client error, the returned receiver yields the status and the
/// relayed stream is held open (never ended), so the agent cannot mistake
/// it for a complete upload; dropping the agent call then cancels it.
fn relay_upload(
    header: UploadRequest,
    mut inbound: Streaming<UploadRequest>,
) -> (ReceiverStream<UploadRequest>, oneshot::Receiver<Status>) {
    let (chunks, relayed) = mpsc::channel(8);
    let (abort, aborted) = oneshot::channel();
    tokio::spawn(async move {
        if chunks.send(header).await.is_err() {
            return;
        }
        let failure = loop {
            let message = match inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(status) => break status,
            };
            if let Err(status) = check_upload_part(&message) {
                break status;
            }
            if chunks.send(message).await.is_err() {
                return;
            }
        };
        let _ = abort.send(failure);
        chunks.closed().await;
    });
    (ReceiverStream::new(relayed), aborted)
}

fn check_upload_part(message: &UploadRequest) -> Result<(), Status> {
    match &message.part {
        Some(Part::Data(data)) => require_size("an upload data chunk", data.len(), MAX_CHUNK_BYTES, "split the file into chunks of at most 1 MiB"),
        Some(Part::Header(_)) => Err(Status::invalid_argument(
            "an Upload stream takes exactly one `header`, first: send the remaining messages as `data` chunks",
        )),
        None => Err(Status::invalid_argument("an Upload message has neither `header` nor `data`: set one of them")),
    }
}
