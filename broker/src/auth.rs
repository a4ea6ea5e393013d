//! Who is calling and whether they may (#20): the `[auth]` settings, the tower
//! layer on the client port that authenticates every request (raftmq's
//! HMAC-SHA256 signature with a replay window, or the RocketMQ 5 SDKs'
//! `MQv2-HMAC-SHA1`; see `raftmq_proto::request_auth`), and the checks each
//! handler makes before it acts: PUB or SUB on a topic or consumer group, ADMIN
//! on a topic, group or the cluster, decided by the group's replicated ACL
//! (`raftmq_raft_store::acl`).
//!
//! Authentication happens once, in the layer, and leaves a [`Principal`] in
//! the request's extensions; authorization needs the decoded request (which
//! topic, which group), so it is the handlers'. A request without a principal
//! is refused: only this layer and [`internal`] (the gateway's in-process calls,
//! after it checked the SDK's own request) put one there.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use raftmq_proto::request_auth::{self, Credentials, Presented};
use raftmq_raft_store::{Permission, ResourceKind, StoreReader};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::error::Error;

/// The `[auth]` table of a broker's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// Require a signed request from a known user on the client port, and
    /// check the ACL on every call. Default off (as RocketMQ's
    /// `authenticationEnabled`); `deploy/broker.prod.toml` turns it on.
    pub enabled: bool,
    /// The bootstrap admin's access key: an admin on every broker from the
    /// start, so the first users and rules can be created. Also the identity
    /// this broker uses when it forwards a request it already checked.
    pub admin_access_key: String,
    /// File holding the bootstrap admin's secret (at least 16 bytes, trimmed;
    /// read once at start, never from a remote call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_secret_file: Option<PathBuf>,
    /// How far the time in a raftmq signature may be from this broker's clock.
    /// Default 5 min. Signatures seen inside it are remembered, so a replay is
    /// refused even inside it.
    #[serde(with = "humantime_serde")]
    pub signature_window: Duration,
    /// Most signatures remembered for replay detection (about 40 bytes each).
    /// When full, new requests are refused (RESOURCE_EXHAUSTED) until older
    /// ones leave the window: never a replay let through. Default 1,000,000.
    pub max_remembered_signatures: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            admin_access_key: String::new(),
            admin_secret_file: None,
            signature_window: Duration::from_secs(300),
            max_remembered_signatures: 1_000_000,
        }
    }
}

impl AuthConfig {
    /// Checks the settings; the error names the bad key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &'static str, value: String, reason: &str| Error::Config {
            key,
            value,
            reason: reason.to_owned(),
        };
        if self.signature_window.is_zero() {
            return Err(bad("auth.signature_window", "0".into(), "must be positive"));
        }
        if self.max_remembered_signatures < 1_000 {
            return Err(bad(
                "auth.max_remembered_signatures",
                self.max_remembered_signatures.to_string(),
                "must be at least 1000",
            ));
        }
        if !self.enabled {
            return Ok(());
        }
        request_auth::check_access_key(&self.admin_access_key).map_err(|reason| {
            bad(
                "auth.admin_access_key",
                self.admin_access_key.clone(),
                &format!("{reason} (required when auth.enabled: the bootstrap admin)"),
            )
        })?;
        let Some(path) = &self.admin_secret_file else {
            return Err(bad(
                "auth.admin_secret_file",
                String::new(),
                "is required when auth.enabled (the bootstrap admin's secret)",
            ));
        };
        // Read here too (like TLS files), so a bad file fails the settings check.
        read_secret(path).map_err(|reason| bad("auth.admin_secret_file", path.display().to_string(), &reason))?;
        Ok(())
    }

    /// The bootstrap admin's credentials, read from `admin_secret_file`;
    /// `None` when auth is off. The error names the key and path, never the secret.
    pub fn load(&self) -> Result<Option<Credentials>, Error> {
        if !self.enabled {
            return Ok(None);
        }
        self.validate()?;
        let path = self.admin_secret_file.as_ref().ok_or_else(|| Error::Config {
            key: "auth.admin_secret_file",
            value: String::new(),
            reason: "is required when auth.enabled".into(),
        })?;
        let secret = read_secret(path).map_err(|reason| Error::Config {
            key: "auth.admin_secret_file",
            value: path.display().to_string(),
            reason,
        })?;
        Ok(Some(Credentials {
            access_key: self.admin_access_key.clone(),
            secret,
        }))
    }
}

/// A secret file's contents, trimmed, of at least 16 bytes.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim().to_owned();
    if secret.len() < request_auth::MIN_SECRET_BYTES {
        return Err(format!(
            "{} holds {} bytes; a secret needs at least {}",
            path.display(),
            secret.len(),
            request_auth::MIN_SECRET_BYTES
        ));
    }
    Ok(secret)
}

/// Who made a request, as the auth layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user of the ACL, or the bootstrap admin (`admin`).
    User { access_key: Arc<str>, admin: bool },
    /// This broker itself, calling its own services for a request it already checked.
    Internal,
}

/// `req` as an in-process call of this broker: for the RocketMQ gateway, which
/// checks the SDK's request before it calls raftmq's services with it.
pub fn internal<T>(req: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.extensions_mut().insert(Principal::Internal);
    r
}

/// Why requests were refused, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Refusals {
    pub unauthenticated: AtomicU64,
    pub permission_denied: AtomicU64,
}

/// Signatures seen inside the window, so each is accepted once.
#[derive(Default)]
struct Replay {
    seen: HashMap<[u8; 16], u64>,
    /// (signature, time it leaves the window), in arrival order.
    order: VecDeque<([u8; 16], u64)>,
}

impl Replay {
    /// Remembers `sig` until `until_ms`; `Err` if it was seen, or memory is full.
    fn admit(&mut self, sig: [u8; 16], until_ms: u64, now_ms: u64, max: usize) -> Result<(), Status> {
        while let Some(&(old, until)) = self.order.front() {
            if until >= now_ms {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&old) == Some(&until) {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(&sig) {
            return Err(Status::unauthenticated(
                "replayed request: this signature was already used (each raftmq signature is accepted once)",
            ));
        }
        if self.seen.len() >= max {
            return Err(Status::resource_exhausted(format!(
                "{max} signatures are inside the replay window (auth.max_remembered_signatures); retry shortly"
            )));
        }
        self.seen.insert(sig, until_ms);
        self.order.push_back((sig, until_ms));
        Ok(())
    }
}

/// The broker's authenticator and authorizer; cheap to clone. Off (every
/// check passes) unless `[auth] enabled`.
#[derive(Clone, Default)]
pub struct Auth {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    admin: Credentials,
    store: StoreReader,
    window_ms: u64,
    max_remembered: usize,
    replay: Mutex<Replay>,
    refusals: Arc<Refusals>,
}

impl Auth {
    /// Off: nothing is checked.
    pub fn off() -> Auth {
        Auth { inner: None }
    }

    /// On, with the bootstrap `admin` and the group's replicated users and rules.
    pub fn new(admin: Credentials, config: &AuthConfig, store: StoreReader, refusals: Arc<Refusals>) -> Auth {
        Auth {
            inner: Some(Arc::new(Inner {
                admin,
                store,
                window_ms: config.signature_window.as_millis() as u64,
                max_remembered: config.max_remembered_signatures,
                replay: Mutex::new(Replay::default()),
                refusals,
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The credentials this broker signs forwarded requests with (the
    /// bootstrap admin's), when auth is on.
    pub fn forwarding_credentials(&self) -> Option<Arc<Credentials>> {
        self.inner.as_ref().map(|i| Arc::new(i.admin.clone()))
    }

    /// Who signed a request to `method`, from its headers.
    fn authenticate(&self, inner: &Inner, headers: &http::HeaderMap, method: &str) -> Result<Principal, Status> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let presented = request_auth::parse(header(request_auth::AUTHORIZATION), header(request_auth::MQ_DATE_TIME))
            .map_err(|e| Status::unauthenticated(format!("malformed authorization header: {e}")))?
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no credentials: this broker requires signed requests (an access key and secret; \
                     raftmq clients take --access-key and --secret-file)",
                )
            })?;
        let ak = presented.access_key();
        let (secret, admin) = if ak == inner.admin.access_key {
            (inner.admin.secret.clone(), true)
        } else {
            inner
                .store
                .with_acl(|acl| acl.user(ak).map(|u| (u.secret.clone(), u.admin)))
                .ok_or_else(|| Status::unauthenticated(format!("unknown access key {ak:?}")))?
        };
        let now = raftmq_proto::registration_auth::unix_ms();
        if let Presented::Raftmq { unix_ms, .. } = &presented {
            let off = unix_ms.abs_diff(now);
            if off > inner.window_ms {
                return Err(Status::unauthenticated(format!(
                    "the request was signed {} s {} this broker's clock, outside the {} s signature window \
                     (an expired or replayed request, or a clock off)",
                    off / 1000,
                    if *unix_ms < now { "before" } else { "after" },
                    inner.window_ms / 1000
                )));
            }
        }
        if !presented.verify(&secret, method) {
            return Err(Status::unauthenticated(format!(
                "the signature does not match for access key {ak:?} (a wrong secret, or the request was altered)"
            )));
        }
        // Only after the MAC holds: forged signatures must not fill the memory.
        if let Presented::Raftmq { unix_ms, signature, .. } = &presented {
            let mut key = [0u8; 16];
            key.copy_from_slice(&signature[..16.min(signature.len())]);
            inner.replay.lock().unwrap_or_else(|p| p.into_inner()).admit(
                key,
                unix_ms + inner.window_ms,
                now,
                inner.max_remembered,
            )?;
        }
        Ok(Principal::User {
            access_key: Arc::from(ak),
            admin,
        })
    }

    /// Whether the caller of `req` may use `perm` on `kind` `name`:
    /// PERMISSION_DENIED naming both when not, UNAUTHENTICATED when the
    /// request carries no principal.
    pub fn check<T>(
        &self,
        req: &tonic::Request<T>,
        perm: Permission,
        kind: ResourceKind,
        name: &str,
    ) -> Result<(), Status> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let refused = |s: Status| {
            let counter = if s.code() == tonic::Code::PermissionDenied {
                &inner.refusals.permission_denied
            } else {
                &inner.refusals.unauthenticated
            };
            counter.fetch_add(1, Ordering::Relaxed);
            s
        };
        match req.extensions().get::<Principal>() {
            Some(Principal::Internal) | Some(Principal::User { admin: true, .. }) => Ok(()),
            Some(Principal::User { access_key, .. }) => {
                if inner.store.with_acl(|acl| acl.allows(access_key, perm, kind, name)) {
                    Ok(())
                } else {
                    let what = match kind {
                        ResourceKind::Cluster => "the cluster".to_owned(),
                        _ => format!("{kind} {name:?}"),
                    };
                    Err(refused(Status::permission_denied(format!(
                        "access key {access_key:?} lacks {perm} on {what} (no ACL rule allows it)"
                    ))))
                }
            }
            None => Err(refused(Status::unauthenticated(
                "the request carries no authenticated principal",
            ))),
        }
    }

    /// PUB on the topic.
    pub fn publish<T>(&self, req: &tonic::Request<T>, topic: &str) -> Result<(), Status> {
        self.check(req, Permission::Pub, ResourceKind::Topic, topic)
    }

    /// SUB on the topic (when the request names one) and on the consumer group.
    pub fn subscribe<T>(&self, req: &tonic::Request<T>, topic: &str, group: &str) -> Result<(), Status> {
        if !topic.is_empty() {
            self.check(req, Permission::Sub, ResourceKind::Topic, topic)?;
        }
        self.check(req, Permission::Sub, ResourceKind::Group, group)
    }

    /// ADMIN on the cluster.
    pub fn admin<T>(&self, req: &tonic::Request<T>) -> Result<(), Status> {
        self.check(req, Permission::Admin, ResourceKind::Cluster, "")
    }

    /// Any authenticated caller (views every client needs, like the cluster's groups).
    pub fn authenticated<T>(&self, req: &tonic::Request<T>) -> Result<(), Status> {
        match (&self.inner, req.extensions().get::<Principal>()) {
            (None, _) | (_, Some(_)) => Ok(()),
            (Some(inner), None) => {
                inner.refusals.unauthenticated.fetch_add(1, Ordering::Relaxed);
                Err(Status::unauthenticated(
                    "the request carries no authenticated principal",
                ))
            }
        }
    }
}

/// The client port's authentication: every request is signed by a known user
/// or refused UNAUTHENTICATED before any service sees it.
#[derive(Clone)]
pub struct AuthLayer {
    pub auth: Auth,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Auth,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, futures::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(inner) = &self.auth.inner else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        let span = tracing::debug_span!("authenticate", method = %req.uri().path());
        let _entered = span.enter();
        match self.auth.authenticate(inner, req.headers(), req.uri().path()) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                futures::future::Either::Left(self.inner.call(req))
            }
            Err(status) => {
                // The reason, never the header: it holds a signature.
                tracing::debug!(error = %status.message(), "request refused");
                if status.code() == tonic::Code::Unauthenticated {
                    inner.refusals.unauthenticated.fetch_add(1, Ordering::Relaxed);
                }
                futures::future::Either::Right(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_admitted_once_and_forgotten_after_its_window() {
        let mut r = Replay::default();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        assert!(r.admit(a, 1_000, 0, 10).is_ok());
        let again = r.admit(a, 1_000, 500, 10).unwrap_err();
        assert_eq!(again.code(), tonic::Code::Unauthenticated);
        assert!(again.message().contains("replayed"));
        // Past its window it is forgotten (the window check refuses it then).
        assert!(r.admit(b, 3_000, 1_001, 10).is_ok());
        assert!(!r.seen.contains_key(&a));
        // Full: refused, never admitted unremembered.
        let mut small = Replay::default();
        for i in 0..3u8 {
            assert!(small.admit([i; 16], 10_000, 0, 3).is_ok());
        }
        assert_eq!(
            small.admit([9; 16], 10_000, 0, 3).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn enabling_auth_requires_a_bootstrap_admin() {
        let mut c = AuthConfig {
            enabled: true,
            ..AuthConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(Error::Config {
                key: "auth.admin_access_key",
                ..
            })
        ));
        c.admin_access_key = "root".into();
        assert!(matches!(
            c.validate(),
            Err(Error::Config {
                key: "auth.admin_secret_file",
                ..
            })
        ));
        c.admin_secret_file = Some("/nonexistent/secret".into());
        assert!(matches!(
            c.validate(),
            Err(Error::Config {
                key: "auth.admin_secret_file",
                ..
            })
        ));
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too-short\n").unwrap();
        c.admin_secret_file = Some(short);
        assert!(
            matches!(c.validate(), Err(Error::Config { key: "auth.admin_secret_file", reason, .. }) if reason.contains("at least 16"))
        );
        let good = dir.path().join("good");
        std::fs::write(&good, "  0123456789abcdef-root \n").unwrap();
        c.admin_secret_file = Some(good);
        let admin = c.load().unwrap().unwrap();
        assert_eq!(
            (admin.access_key.as_str(), admin.secret.as_str()),
            ("root", "0123456789abcdef-root")
        );
        assert!(AuthConfig::default().load().unwrap().is_none());
    }
}
