//! API-key authentication. Every call except health checks carries
//! `authorization: Bearer <key>`. The keys come from SANDBOXD_API_KEYS or,
//! without it, from an admin key the daemon generates once into
//! `STATE_DIR/api-key`. The caller is known afterwards only by a key id, an
//! HMAC of the key under a secret kept in `STATE_DIR/key-id-secret`, which
//! is what ownership checks and the audit log use. Failed authentications
//! are audited with the caller's address and the id of the key tried.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll},
};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::{
    body::Body,
    codegen::http,
    transport::server::{TcpConnectInfo, UdsConnectInfo},
    Request, Status,
};

use crate::audit::{AuditLog, Entry};

/// File (in the state directory) of the generated admin key.
pub const API_KEY_FILE: &str = "api-key";
/// File (in the state directory) of the secret that key ids are keyed with.
const KEY_ID_SECRET_FILE: &str = "key-id-secret";
/// Path prefix of the calls that need no key.
const OPEN_PATH: &str = "/grpc.health.v1.Health/";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create {path}: {source}; check that the state directory is writable by the daemon")]
    SecretFile { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a regular file of the expected size: delete it and restart the daemon (a new one is made)")]
    BadSecretFile { path: PathBuf },
}

/// Who made a call: the id of their key and where they called from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub peer: String,
}

/// Where the accepted keys came from, for the start-up log.
#[derive(Debug)]
pub enum KeySource {
    /// SANDBOXD_API_KEYS, with this many keys.
    Environment(usize),
    /// The admin key in this file, generated now.
    Generated(PathBuf),
    /// The admin key in this file, from an earlier run.
    Reused(PathBuf),
}

/// Keys as configured, never printed.
#[derive(Clone)]
pub struct KeyList(Vec<String>);

impl KeyList {
    /// Parses a comma-separated key list (SANDBOXD_API_KEYS), ignoring blanks.
    pub fn parse(list: &str) -> Self {
        Self(list.split(',').map(str::trim).filter(|key| !key.is_empty()).map(str::to_string).collect())
    }
}

impl std::fmt::Debug for KeyList {
    /// Shows how many keys there are, never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyList({} keys)", self.0.len())
    }
}

/// The set of accepted keys, kept only as HMAC tags.
#[derive(Clone)]
pub struct ApiKeys {
    secret: Arc<[u8; 32]>,
    tags: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.tags.len())
    }
}

impl ApiKeys {
    /// The configured keys or, when there are none, the admin key of
    /// `state_dir` (generated on first use), keyed with the state
    /// directory's key-id secret.
    pub fn load(configured: KeyList, state_dir: &Path) -> Result<(Self, KeySource), AuthError> {
        let secret_path = state_dir.join(KEY_ID_SECRET_FILE);
        let (secret, _) = read_or_create(&secret_path, 32, || crate::ids::random_bytes::<32>().to_vec())?;
        let secret: [u8; 32] = secret.try_into().map_err(|_| AuthError::BadSecretFile { path: secret_path })?;
        let (keys, source) = if configured.0.is_empty() {
            let path = state_dir.join(API_KEY_FILE);
            let (text, created) = read_or_create(&path, 65, || format!("{}\n", hex(&crate::ids::random_bytes::<32>())).into_bytes())?;
            let key = String::from_utf8(text).map_err(|_| AuthError::BadSecretFile { path: path.clone() })?;
            let source = if created { KeySource::Generated(path) } else { KeySource::Reused(path) };
            (vec![key.trim().to_string()], source)
        } else {
            let count = configured.0.len();
            (configured.0, KeySource::Environment(count))
        };
        Ok(Self::with_secret(secret, &keys, source))
    }

    fn with_secret(secret: [u8; 32], keys: &[String], source: KeySource) -> (Self, KeySource) {
        let tags = keys.iter().map(|key| tag(&secret, key.as_bytes())).collect();
        (Self { secret: Arc::new(secret), tags: Arc::new(tags) }, source)
    }

    /// Checks the `authorization` header of a request; on failure also says
    /// which key id was tried ("-" when none was sent).
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<String, (Status, String)> {
        let Some(header) = header else {
            let status = Status::unauthenticated("missing credentials: send the metadata `authorization: Bearer <api key>`");
            return Err((status, "-".to_string()));
        };
        let Some(key) = header.strip_prefix(b"Bearer ") else {
            let status = Status::unauthenticated("malformed authorization metadata: use `Bearer <api key>`");
            return Err((status, self.key_id(header)));
        };
        self.authenticate_key(key).map_err(|tried| {
            let status = Status::unauthenticated(
                "unknown API key: use a key of the daemon's SANDBOXD_API_KEYS or, without it, the one in STATE_DIR/api-key",
            );
            (status, tried)
        })
    }

    /// Checks a bare key (as the E2B front door's `X-API-KEY` carries it);
    /// returns its key id, or on failure the id of the key tried.
    pub fn authenticate_key(&self, key: &[u8]) -> Result<String, String> {
        let presented = tag(&self.secret, key.trim_ascii());
        // Every known tag is compared in full, without an early exit.
        let known = self.tags.iter().fold(false, |found, known| found | constant_time_eq(known, &presented));
        if known { Ok(key_id(&presented)) } else { Err(key_id(&presented)) }
    }

    /// A sandbox's access token for `purpose` (such as "envd"): an HMAC of
    /// its owner's key id and the sandbox id under the daemon's secret, so
    /// it needs no storage, survives restarts, and proves the bearer was
    /// handed it by the owner.
    pub fn sandbox_token(&self, purpose: &str, owner_key_id: &str, sandbox_id: &str) -> String {
        let message = format!("sandbox-token\0{purpose}\0{owner_key_id}\0{sandbox_id}");
        hex(&tag(&self.secret, message.as_bytes()))
    }

    /// Whether `presented` is the [`ApiKeys::sandbox_token`] for these
    /// (compared in constant time).
    pub fn check_sandbox_token(&self, presented: &[u8], purpose: &str, owner_key_id: &str, sandbox_id: &str) -> bool {
        let expected = self.sandbox_token(purpose, owner_key_id, sandbox_id);
        presented.len() == expected.len()
            && presented.iter().zip(expected.as_bytes()).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
    }

    /// The id of `key` (as the audit log shows it).
    pub fn key_id(&self, key: &[u8]) -> String {
        key_id(&tag(&self.secret, key))
    }

    /// A tower layer that authenticates every call but health checks,
    /// stores the [`Caller`] in the request's extensions and audits refusals.
    pub fn layer(&self, audit: AuditLog) -> AuthLayer {
        AuthLayer { keys: self.clone(), audit }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn tag(secret: &[u8; 32], key: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts a 32-byte key");
    mac.update(key);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A short, stable id of a key that reveals nothing usable without the secret.
fn key_id(tag: &[u8; 32]) -> String {
    format!("key-{}", hex(&tag[..8]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The contents of the 0600 file at `path`, created with `generate()` if it
/// does not exist (then `true`). An existing file must be a regular file of
/// `len` bytes; looser permissions are narrowed to 0600.
fn read_or_create(path: &Path, len: usize, generate: impl FnOnce() -> Vec<u8>) -> Result<(Vec<u8>, bool), AuthError> {
    let io_error = |source| AuthError::SecretFile { path: path.to_path_buf(), source };
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            let contents = generate();
            file.write_all(&contents).and_then(|()| file.sync_all()).map_err(io_error)?;
            return Ok((contents, true));
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(io_error(error)),
    }
    let mut file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() || metadata.len() != len as u64 {
        return Err(AuthError::BadSecretFile { path: path.to_path_buf() });
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "narrowing the permissions of a secret file to 0600");
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    }
    read_all(&mut file, len).map(|contents| (contents, false)).map_err(io_error)
}

fn read_all(file: &mut File, len: usize) -> std::io::Result<Vec<u8>> {
    let mut contents = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut contents)?;
    Ok(contents)
}

/// Reads the caller that the [`AuthLayer`] stored; a request without one
/// never passed authentication.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("this call was not authenticated: send `authorization: Bearer <api key>`"))
}

/// The caller's address: `ip:port` over TCP, `unix:uid=N` over the unix socket.
fn peer_of<B>(request: &http::Request<B>) -> String {
    let extensions = request.extensions();
    if let Some(addr) = extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr) {
        return addr.to_string();
    }
    match extensions.get::<UdsConnectInfo>().and_then(|info| info.peer_cred) {
        Some(cred) => format!("unix:uid={}", cred.uid()),
        None => "unix".to_string(),
    }
}

/// `/sandbox.v1.Files/List` as `Files.List`.
pub fn operation_name(path: &str) -> String {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let service = service.rsplit('.').next().unwrap_or(service);
    format!("{service}.{method}")
}

/// See [`ApiKeys::layer`].
#[derive(Clone)]
pub struct AuthLayer {
    keys: ApiKeys,
    audit: AuditLog,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated { inner, keys: self.keys.clone(), audit: self.audit.clone() }
    }
}

/// The service [`AuthLayer`] wraps around the API.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    keys: ApiKeys,
    audit: AuditLog,
}

impl<S> tower::Service<http::Request<Body>> for Authenticated<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the service polled ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with(OPEN_PATH) {
            return Box::pin(inner.call(request));
        }
        let peer = peer_of(&request);
        let header = request.headers().get(http::header::AUTHORIZATION).map(|value| value.as_bytes());
        match self.keys.authenticate(header) {
            Ok(key_id) => {
                request.extensions_mut().insert(Caller { key_id, peer });
                Box::pin(inner.call(request))
            }
            Err((status, tried)) => {
                let operation = operation_name(request.uri().path());
                let outcome = format!("{:?}", status.code());
                self.audit.record(Entry { key_id: &tried, peer: &peer, sandbox: "", operation: &operation, outcome: &outcome });
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> ApiKeys {
        let keys: Vec<String> = list.iter().map(|k| k.to_string()).collect();
        ApiKeys::with_secret([7; 32], &keys, KeySource::Environment(keys.len())).0
    }

    #[test]
    fn keys_are_checked_and_fingerprinted() {
        let keys = keys(&["alpha", "beta"]);
        let alpha = keys.authenticate(Some(b"Bearer alpha")).unwrap();
        let beta = keys.authenticate(Some(b"Bearer beta")).unwrap();
        assert_ne!(alpha, beta);
        assert!(alpha.starts_with("key-") && !alpha.contains("alpha"));
        let (missing, tried) = keys.authenticate(None).unwrap_err();
        assert_eq!((missing.code(), tried.as_str()), (tonic::Code::Unauthenticated, "-"));
        assert!(missing.message().contains("Bearer"));
        let (wrong, tried) = keys.authenticate(Some(b"Bearer gamma")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert_eq!(tried, keys.key_id(b"gamma"), "a refused key is named by its id");
        assert!(keys.authenticate(Some(b"alpha")).is_err());
    }

    #[test]
    fn sandbox_tokens_are_bound_to_owner_sandbox_and_purpose() {
        let keys = keys(&["alpha"]);
        let token = keys.sandbox_token("envd", "key-1", "sb-1");
        assert!(keys.check_sandbox_token(token.as_bytes(), "envd", "key-1", "sb-1"));
        assert!(!keys.check_sandbox_token(token.as_bytes(), "traffic", "key-1", "sb-1"));
        assert!(!keys.check_sandbox_token(token.as_bytes(), "envd", "key-2", "sb-1"));
        assert!(!keys.check_sandbox_token(token.as_bytes(), "envd", "key-1", "sb-2"));
        assert!(!keys.check_sandbox_token(b"", "envd", "key-1", "sb-1"));
        assert_eq!(keys.authenticate_key(b"alpha"), keys.authenticate(Some(b"Bearer alpha")).map_err(|(_, tried)| tried));
    }

    #[test]
    fn key_ids_depend_on_the_secret() {
        let other = ApiKeys::with_secret([8; 32], &["alpha".to_string()], KeySource::Environment(1)).0;
        assert_ne!(keys(&["alpha"]).key_id(b"alpha"), other.key_id(b"alpha"));
    }

    #[test]
    fn the_generated_key_is_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("sandboxd-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (first, source) = ApiKeys::load(KeyList::parse(" , "), &dir).unwrap();
        assert!(matches!(source, KeySource::Generated(_)));
        let key = std::fs::read_to_string(dir.join(API_KEY_FILE)).unwrap();
        for file in [API_KEY_FILE, KEY_ID_SECRET_FILE] {
            assert_eq!(std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (again, source) = ApiKeys::load(KeyList::parse(""), &dir).unwrap();
        assert!(matches!(source, KeySource::Reused(_)));
        let header = format!("Bearer {}", key.trim());
        assert_eq!(first.authenticate(Some(header.as_bytes())).unwrap(), again.authenticate(Some(header.as_bytes())).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn operations_name_their_service() {
        assert_eq!(operation_name("/sandbox.v1.Files/List"), "Files.List");
        assert_eq!(operation_name("/sandbox.v1.Sandboxes/List"), "Sandboxes.List");
    }
}
