//! `sandbox.v1.Sandboxes`: lifecycle calls.

use std::{sync::Arc, time::Instant};

use sandbox_proto::api::{
    sandboxes_server::Sandboxes, CreateSandboxRequest, DeleteSandboxRequest, DeleteSandboxResponse,
    GetSandboxRequest, ListSandboxesRequest, ListSandboxesResponse, PauseSandboxRequest,
    ResumeSandboxRequest, Sandbox, SetTimeoutRequest,
};
use tonic::{Request, Response, Status};

use super::{check_env, require_sandbox_id, ApiContext};
use crate::{
    auth::{self, Caller},
    manager::{SandboxError, SandboxManager},
};

pub struct SandboxesService(pub ApiContext);

#[tonic::async_trait]
impl Sandboxes for SandboxesService {
    async fn create(&self, request: Request<CreateSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let result = match check_env("env", &request.env) {
            Ok(()) => self.0.manager.create(&caller, request).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        let id = result.as_ref().map(|sandbox| sandbox.id.clone()).unwrap_or_default();
        self.0.observe(&caller, &id, "Sandboxes.Create", started, result).map(Response::new)
    }

    async fn get(&self, request: Request<GetSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request)?;
        let id = request.into_inner().id;
        let result = match require_sandbox_id(&id) {
            Ok(()) => self.0.manager.get(&caller, &id).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        self.0.observe(&caller, &id, "Sandboxes.Get", started, result).map(Response::new)
    }

    async fn list(&self, request: Request<ListSandboxesRequest>) -> Result<Response<ListSandboxesResponse>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request)?;
        let sandboxes = self.0.manager.list(&caller).await;
        self.0.observe(&caller, "", "Sandboxes.List", started, Ok(ListSandboxesResponse { sandboxes })).map(Response::new)
    }

    async fn delete(&self, request: Request<DeleteSandboxRequest>) -> Result<Response<DeleteSandboxResponse>, Status> {
        let caller = auth::caller(&request)?;
        let id = request.into_inner().id;
        self.on_sandbox(caller, id, "Sandboxes.Delete", |manager, caller, id| async move {
            manager.delete(&caller, &id).await.map(|()| DeleteSandboxResponse {})
        })
        .await
    }

    async fn pause(&self, request: Request<PauseSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let caller = auth::caller(&request)?;
        let id = request.into_inner().id;
        self.on_sandbox(caller, id, "Sandboxes.Pause", |manager, caller, id| async move { manager.pause(&caller, &id).await }).await
    }

    async fn resume(&self, request: Request<ResumeSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let caller = auth::caller(&request)?;
        let id = request.into_inner().id;
        self.on_sandbox(caller, id, "Sandboxes.Resume", |manager, caller, id| async move { manager.resume(&caller, &id).await }).await
    }

    async fn set_timeout(&self, request: Request<SetTimeoutRequest>) -> Result<Response<Sandbox>, Status> {
        let caller = auth::caller(&request)?;
        let SetTimeoutRequest { id, timeout_seconds } = request.into_inner();
        let timeout = std::time::Duration::from_secs(timeout_seconds.into());
        self.on_sandbox(caller, id, "Sandboxes.SetTimeout", move |manager, caller, id| async move {
            manager.set_timeout(&caller, &id, timeout).await
        })
        .await
    }
}

impl SandboxesService {
    /// Checks the id, runs one lifecycle call on the manager, and audits it.
    async fn on_sandbox<T, Fut>(
        &self,
        caller: Caller,
        id: String,
        operation: &'static str,
        call: impl FnOnce(Arc<SandboxManager>, Caller, String) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: std::future::Future<Output = Result<T, SandboxError>>,
    {
        let started = Instant::now();
        let result = match require_sandbox_id(&id) {
            Ok(()) => call(Arc::clone(&self.0.manager), caller.clone(), id.clone()).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        self.0.observe(&caller, &id, operation, started, result).map(Response::new)
    }
}
