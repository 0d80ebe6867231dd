//! API-key authentication. With keys configured, every call carries
//! `authorization: Bearer <key>`; the caller is known afterwards only by a
//! key id (a fingerprint), which is what ownership checks and logs use.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// Who made a call: the key id, or `None` when the daemon runs without keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_id: Option<String>,
}

impl Caller {
    /// The key id as written to audit logs.
    pub fn label(&self) -> &str {
        self.key_id.as_deref().unwrap_or("anonymous")
    }
}

/// The set of accepted keys, kept only as SHA-256 digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    /// Shows how many keys there are, never the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// Parses a comma-separated key list, ignoring blanks.
    pub fn from_list(list: &str) -> Self {
        let digests = list
            .split(',')
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .map(|key| Sha256::digest(key.as_bytes()).into())
            .collect();
        Self { digests: Arc::new(digests) }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks the `authorization` header of a request.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, Status> {
        if self.is_empty() {
            return Ok(Caller { key_id: None });
        }
        let header = header.ok_or_else(|| {
            Status::unauthenticated(
                "missing credentials: send the metadata `authorization: Bearer <api key>`",
            )
        })?;
        let key = header.strip_prefix("Bearer ").ok_or_else(|| {
            Status::unauthenticated("malformed authorization metadata: use `Bearer <api key>`")
        })?;
        let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        // Comparing digests keeps the comparison independent of the key's bytes.
        if self.digests.iter().any(|known| known == &digest) {
            Ok(Caller { key_id: Some(key_id(&digest)) })
        } else {
            Err(Status::unauthenticated(
                "unknown API key: use one of the keys in the daemon's SANDBOXD_API_KEYS",
            ))
        }
    }

    /// A tonic interceptor that stores the [`Caller`] in the request's extensions.
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        let keys = self.clone();
        move |mut request: Request<()>| {
            let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
            let caller = keys.authenticate(header)?;
            request.extensions_mut().insert(caller);
            Ok(request)
        }
    }
}

/// A short, stable fingerprint of a key that reveals nothing usable.
fn key_id(digest: &[u8; 32]) -> String {
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// Reads the caller that the interceptor stored.
pub fn caller<T>(request: &Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or(Caller { key_id: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keys_means_anonymous() {
        let keys = ApiKeys::from_list(" , ");
        assert!(keys.is_empty());
        assert_eq!(keys.authenticate(None).unwrap(), Caller { key_id: None });
    }

    #[test]
    fn keys_are_checked_and_fingerprinted() {
        let keys = ApiKeys::from_list("alpha,beta");
        let alpha = keys.authenticate(Some("Bearer alpha")).unwrap();
        let beta = keys.authenticate(Some("Bearer beta")).unwrap();
        assert_ne!(alpha, beta);
        assert!(!alpha.label().contains("alpha"));
        let missing = keys.authenticate(None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("Bearer"));
        let wrong = keys.authenticate(Some("Bearer gamma")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(keys.authenticate(Some("alpha")).is_err());
    }
}
