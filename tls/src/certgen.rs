//! Throwaway certificates for `raftmq dev --tls` and `raftmq tls gen`: a fresh CA
//! and one node certificate it signs, valid for the given hosts (IP addresses and
//! DNS names as subject alternative names) for both serverAuth and clientAuth, so
//! every broker and NameServer of a local or compose cluster can share it. The CA's
//! key is not written: nothing else can be issued from it, which is the point of
//! a throwaway CA (make a new set to add a host).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The file names [`write`] uses inside its directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "node.pem";
pub const KEY_FILE: &str = "node.key";

/// A generated set, in PEM.
pub struct Generated {
    pub ca_pem: String,
    pub cert_pem: String,
    /// The node key; never log it.
    pub key_pem: String,
}

/// Where [`write`] put the files.
#[derive(Debug, Clone)]
pub struct Files {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("no hosts given: the node certificate needs at least one IP address or DNS name")]
    NoHosts,
    #[error("making the certificates (hosts {hosts:?}): {source}")]
    Rcgen {
        hosts: Vec<String>,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A new CA and a node certificate for `hosts`.
pub fn generate(hosts: &[String]) -> Result<Generated, GenError> {
    if hosts.is_empty() {
        return Err(GenError::NoHosts);
    }
    let wrap = |source| GenError::Rcgen {
        hosts: hosts.to_vec(),
        source,
    };
    let ca_key = KeyPair::generate().map_err(wrap)?;
    // A name of its own per CA: verifiers look issuers up by name, and two CAs
    // with one name make a certificate from the other one fail as a bad
    // signature rather than as the unknown issuer it is.
    let tail = ca_key.public_key_raw();
    let id: String = tail[tail.len().saturating_sub(6)..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // From January 1st of this year to January 1st two years on: rcgen's default
    // (1975 to 4096) would make a forgotten throwaway key good forever.
    let year = this_year();
    let (not_before, not_after) = (rcgen::date_time_ymd(year, 1, 1), rcgen::date_time_ymd(year + 2, 1, 1));
    let mut ca_params = CertificateParams::default();
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("raftmq throwaway CA {id}"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(wrap)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(wrap)?;
    params.not_before = not_before;
    params.not_after = not_after;
    params.distinguished_name.push(DnType::CommonName, "raftmq node");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate serves a broker's ports and its dials to its peers.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(wrap)?;
    let cert = params.signed_by(&key, &ca).map_err(wrap)?;
    Ok(Generated {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The current year (UTC). A day's error at New Year is harmless: certificates
/// start on January 1st either way.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

/// Generates a set and writes it into `dir` (created if absent) as `ca.pem`,
/// `node.pem` and `node.key` (mode 0600 on Unix), replacing any earlier set.
pub fn write(dir: &Path, hosts: &[String]) -> Result<Files, GenError> {
    let set = generate(hosts)?;
    std::fs::create_dir_all(dir).map_err(|source| GenError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = Files {
        ca_file: dir.join(CA_FILE),
        cert_file: dir.join(CERT_FILE),
        key_file: dir.join(KEY_FILE),
    };
    write_file(&files.ca_file, set.ca_pem.as_bytes(), false)?;
    write_file(&files.cert_file, set.cert_pem.as_bytes(), false)?;
    write_file(&files.key_file, set.key_pem.as_bytes(), true)?;
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), GenError> {
    use std::io::Write;
    let fail = |source| GenError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(fail)?;
    // `mode` applies only to a new file; an earlier key file keeps its own.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)
}
