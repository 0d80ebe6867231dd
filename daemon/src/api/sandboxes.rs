//! `sandbox.v1.Sandboxes`: lifecycle calls.

use std::time::Instant;

use sandbox_proto::api::{
    sandboxes_server::Sandboxes, CreateSandboxRequest, DeleteSandboxRequest, DeleteSandboxResponse,
    GetSandboxRequest, ListSandboxesRequest, ListSandboxesResponse, PauseSandboxRequest,
    ResumeSandboxRequest, Sandbox,
};
use tonic::{Request, Response, Status};

use super::{require_sandbox_id, ApiContext};
use crate::auth;

pub struct SandboxesService(pub ApiContext);

#[tonic::async_trait]
impl Sandboxes for SandboxesService {
    async fn create(&self, request: Request<CreateSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let result = self.0.manager.create(&caller, request.into_inner()).await.map_err(Status::from);
        let id = result.as_ref().map(|sandbox| sandbox.id.clone()).unwrap_or_default();
        self.0.observe(&caller, &id, "Create", started, result).map(Response::new)
    }

    async fn get(&self, request: Request<GetSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let id = request.into_inner().id;
        let result = require_sandbox_id(&id).and_then(|()| Ok(self.0.manager.get(&caller, &id)?));
        self.0.observe(&caller, &id, "Get", started, result).map(Response::new)
    }

    async fn list(&self, request: Request<ListSandboxesRequest>) -> Result<Response<ListSandboxesResponse>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let sandboxes = self.0.manager.list(&caller);
        self.0.observe(&caller, "", "List", started, Ok(ListSandboxesResponse { sandboxes })).map(Response::new)
    }

    async fn delete(&self, request: Request<DeleteSandboxRequest>) -> Result<Response<DeleteSandboxResponse>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let id = request.into_inner().id;
        let result = match require_sandbox_id(&id) {
            Ok(()) => self.0.manager.delete(&caller, &id).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        self.0.observe(&caller, &id, "Delete", started, result.map(|()| DeleteSandboxResponse {})).map(Response::new)
    }

    async fn pause(&self, request: Request<PauseSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let id = request.into_inner().id;
        let result = match require_sandbox_id(&id) {
            Ok(()) => self.0.manager.pause(&caller, &id).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        self.0.observe(&caller, &id, "Pause", started, result).map(Response::new)
    }

    async fn resume(&self, request: Request<ResumeSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let started = Instant::now();
        let caller = auth::caller(&request);
        let id = request.into_inner().id;
        let result = match require_sandbox_id(&id) {
            Ok(()) => self.0.manager.resume(&caller, &id).await.map_err(Status::from),
            Err(status) => Err(status),
        };
        self.0.observe(&caller, &id, "Resume", started, result).map(Response::new)
    }
}
