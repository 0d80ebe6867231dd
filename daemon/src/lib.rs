//! sandboxd: a host daemon that hands out isolated Linux sandboxes over a
//! streaming gRPC API.

pub mod admission;
pub mod agent_client;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod code;
pub mod connections;
pub mod e2b;
pub mod ids;
pub mod manager;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod server;
pub mod template;
