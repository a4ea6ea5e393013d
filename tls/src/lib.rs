//! raftmq-tls: the `[tls]` settings every raftmq server reads (certificate, key and
//! CA files), their checks, the rustls setups tonic is given (a server, a server
//! that requires a client certificate from the cluster CA, a client that trusts the
//! CA, a client that also presents the node certificate), and the one rule for
//! dialing: `https://` with TLS when it is on, `http://` otherwise. With the `certgen`
//! feature, [`certgen`] makes a throwaway CA and node certificate (rcgen).
//!
//! Keys are read from files only, at start, and never logged: [`Tls`]'s `Debug`
//! shows which parts are loaded, not their bytes.

#[cfg(feature = "certgen")]
pub mod certgen;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a server waits for a connection's TLS handshake. tonic runs each
/// handshake in a task of its own, so a slow or silent client holds one task, not
/// the accept loop; the limit bounds how long it holds it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[tls]` table of a server's settings (`RAFTMQ_TLS__<KEY>` in the
/// environment, `--set tls.<key>=...` as a flag). Paths are read once, at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// Serve every port over TLS and dial every peer and NameServer over TLS.
    /// Default off (plaintext); the production config turns it on.
    pub enabled: bool,
    /// PEM certificate chain this server presents (a broker presents it on its
    /// client port, on its Raft peer port and as its client certificate toward
    /// its peers, so it needs both the serverAuth and clientAuth usages).
    /// Required when `enabled`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`. Required when
    /// `enabled`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM certificate(s) of the cluster CA: what a broker checks its Raft peers'
    /// client certificates against (mutual TLS) and what it trusts when dialing
    /// peers, other replicas and NameServers. Required by a broker when
    /// `enabled`; a NameServer, which dials nobody and asks clients for no
    /// certificate, does not read it. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// A refused TLS setting: the key, the value (a path) and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key} = {value}: {reason}")]
pub struct Error {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

/// What a server's TLS needs besides its own certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves clients only (a NameServer): certificate and key.
    Server,
    /// Also dials peers and requires their client certificates (a broker):
    /// certificate, key and the cluster CA.
    Node,
}

/// Certificates and key loaded from a [`TlsConfig`], checked, ready for tonic.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    ca: Option<Certificate>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes.
        f.debug_struct("Tls")
            .field("identity", &"<loaded>")
            .field("ca", &self.ca.as_ref().map(|_| "<loaded>"))
            .finish()
    }
}

impl TlsConfig {
    /// Checks the settings and the files they name (present, readable, PEM of
    /// the right kind); the error names the key and the path.
    pub fn validate(&self, role: Role) -> Result<(), Error> {
        self.load(role).map(|_| ())
    }

    /// The loaded certificates, or `None` when TLS is off.
    pub fn load(&self, role: Role) -> Result<Option<Tls>, Error> {
        if !self.enabled {
            return Ok(None);
        }
        let cert_path = required("tls.cert_file", self.cert_file.as_deref())?;
        let key_path = required("tls.key_file", self.key_file.as_deref())?;
        let cert = read("tls.cert_file", cert_path)?;
        check_certs("tls.cert_file", cert_path, &cert)?;
        let key = read("tls.key_file", key_path)?;
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(Error {
                key: "tls.key_file",
                value: key_path.display().to_string(),
                reason: "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
            });
        }
        let ca = match (role, self.ca_file.as_deref()) {
            (Role::Server, None) => None,
            (_, path) => {
                let path = required("tls.ca_file", path)?;
                Some(load_ca("tls.ca_file", path)?)
            }
        };
        Ok(Some(Tls {
            identity: Identity::from_pem(cert, key),
            ca,
        }))
    }
}

impl Tls {
    /// A server that asks clients for no certificate (client ports, NameServers).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// A server that refuses the handshake of any client without a certificate
    /// issued by the cluster CA (the Raft peer port). Without a CA (a
    /// [`Role::Server`] load) it is [`Tls::server`].
    pub fn mutual_server(&self) -> ServerTlsConfig {
        match &self.ca {
            Some(ca) => self.server().client_ca_root(ca.clone()).client_auth_optional(false),
            None => self.server(),
        }
    }

    /// A client that trusts only the cluster CA (a broker dialing NameServers or
    /// another replica's client port).
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
        match &self.ca {
            Some(ca) => config.ca_certificate(ca.clone()),
            None => config,
        }
    }

    /// A client that also presents this node's certificate (Raft peers).
    pub fn mutual_client(&self) -> ClientTlsConfig {
        self.client().identity(self.identity.clone())
    }
}

/// A client's TLS: the CA it trusts, read from a file. What the client library,
/// the CLI and a broker's outgoing client connections use.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    ca_file: PathBuf,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("ca_file", &self.ca_file).finish()
    }
}

impl ClientTls {
    /// Reads and checks a PEM CA file; `key` names the setting or flag in errors.
    pub fn from_ca_file(key: &'static str, path: &Path) -> Result<ClientTls, Error> {
        let ca_pem = read(key, path)?;
        check_certs(key, path, &ca_pem)?;
        Ok(ClientTls {
            ca_pem,
            ca_file: path.to_owned(),
        })
    }

    /// The CA file this was read from.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .timeout(HANDSHAKE_TIMEOUT)
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
    }
}

/// The endpoint for `addr` (`host:port`, or a URI): `https://` with `tls`
/// applied when given, `http://` otherwise. An explicit `http://` with `tls` is
/// refused rather than silently sent in the clear, and `https://` without
/// `tls` has no CA to check the server against.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, EndpointError> {
    let bare = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr);
    let explicit = (addr.len() != bare.len()).then(|| &addr[..addr.len() - bare.len()]);
    match (explicit, tls) {
        (Some("http://"), Some(_)) => return Err(EndpointError::PlaintextWithTls(addr.to_owned())),
        (Some("https://"), None) => return Err(EndpointError::TlsWithoutCa(addr.to_owned())),
        _ => {}
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{bare}")).map_err(|source| EndpointError::Uri {
        addr: addr.to_owned(),
        source,
    })?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|source| EndpointError::Uri {
            addr: addr.to_owned(),
            source,
        }),
        None => Ok(endpoint),
    }
}

/// Why an address cannot be dialed as asked.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{addr} is not a usable endpoint: {source}")]
    Uri {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0} asks for plaintext while TLS is on (drop the http:// prefix)")]
    PlaintextWithTls(String),
    #[error("{0} asks for TLS, but no CA file was given to check the server against (--tls-ca-file)")]
    TlsWithoutCa(String),
}

fn required<'a>(key: &'static str, path: Option<&'a Path>) -> Result<&'a Path, Error> {
    match path {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        _ => Err(Error {
            key,
            value: String::new(),
            reason: "is required when tls.enabled is true".into(),
        }),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error {
        key,
        value: path.display().to_string(),
        reason: format!("cannot be read: {e}"),
    })
}

fn check_certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<(), Error> {
    let bad = |reason: String| Error {
        key,
        value: path.display().to_string(),
        reason,
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| bad(format!("is not valid PEM: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(())
}

fn load_ca(key: &'static str, path: &Path) -> Result<Certificate, Error> {
    let pem = read(key, path)?;
    check_certs(key, path, &pem)?;
    Ok(Certificate::from_pem(pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_needs_nothing() {
        assert!(TlsConfig::default().load(Role::Node).unwrap().is_none());
    }

    #[test]
    fn missing_keys_and_files_are_named() {
        let mut c = TlsConfig {
            enabled: true,
            ..TlsConfig::default()
        };
        let err = c.validate(Role::Server).unwrap_err();
        assert_eq!(err.key, "tls.cert_file");
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("node.pem");
        std::fs::write(&cert, "not pem").unwrap();
        c.cert_file = Some(cert.clone());
        c.key_file = Some(dir.path().join("absent.key"));
        let err = c.validate(Role::Server).unwrap_err().to_string();
        assert!(err.contains("tls.cert_file") && err.contains("node.pem"), "{err}");
        #[cfg(feature = "certgen")]
        {
            let files = crate::certgen::write(dir.path(), &["127.0.0.1".to_owned()]).unwrap();
            c.cert_file = Some(files.cert_file.clone());
            let err = c.validate(Role::Server).unwrap_err().to_string();
            assert!(err.contains("tls.key_file") && err.contains("absent.key"), "{err}");
            c.key_file = Some(files.key_file.clone());
            c.validate(Role::Server).unwrap();
            let err = c.validate(Role::Node).unwrap_err().to_string();
            assert!(err.contains("tls.ca_file") && err.contains("required"), "{err}");
            c.ca_file = Some(files.ca_file);
            c.validate(Role::Node).unwrap();
        }
    }

    #[test]
    fn endpoint_scheme_follows_tls() {
        let tls = ClientTlsConfig::new();
        assert_eq!(endpoint("h:1", None).unwrap().uri().scheme_str(), Some("http"));
        assert_eq!(endpoint("h:1", Some(&tls)).unwrap().uri().scheme_str(), Some("https"));
        assert_eq!(
            endpoint("https://h:1", Some(&tls)).unwrap().uri().to_string(),
            "https://h:1/"
        );
        assert!(matches!(
            endpoint("http://h:1", Some(&tls)),
            Err(EndpointError::PlaintextWithTls(_))
        ));
        assert!(matches!(
            endpoint("https://h:1", None),
            Err(EndpointError::TlsWithoutCa(_))
        ));
    }
}
