//! Signatures of client requests (the ACL's authentication, #20): how raftmq's
//! own clients sign a call, the RocketMQ 5 SDKs' `MQv2-HMAC-SHA1` header that
//! brokers also accept, and the tower wrapper that signs every call made
//! through a channel. Checking *who may do what* is the broker's (`auth.rs`);
//! this module only says what a signature is.
//!
//! raftmq's scheme, in the `authorization` header:
//! `RAFTMQ-HMAC-SHA256 Credential=<access key>, Date=<unix ms>, Nonce=<hex>, Signature=<hex>`
//! with the signature HMAC-SHA256(secret, "raftmq-request-v1\n" ‖ date ‖ "\n" ‖
//! nonce ‖ "\n" ‖ method path). The date bounds a replay to a window and the
//! nonce makes every signature unique, so a broker that remembers the
//! signatures it saw inside the window refuses a replay outright.
//!
//! The SDKs' scheme signs only `x-mq-date-time`, a string with no reliable
//! clock (Python writes local time labelled Z): like Apache's server, brokers
//! check the MAC and nothing about time. Anyone who sees one such header can
//! replay it, which is why production runs it over TLS.

use std::sync::Arc;
use std::task::{Context, Poll};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// The header both schemes use.
pub const AUTHORIZATION: &str = "authorization";
/// The header the SDKs sign (`MQv2-HMAC-SHA1`).
pub const MQ_DATE_TIME: &str = "x-mq-date-time";
pub const RAFTMQ_SCHEME: &str = "RAFTMQ-HMAC-SHA256";
pub const MQV2_SCHEME: &str = "MQv2-HMAC-SHA1";
/// Longest access key accepted, so a header cannot make a broker hash or hold much.
pub const MAX_ACCESS_KEY_BYTES: usize = 128;
/// Shortest secret `raftmq admin user create` accepts: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;
type HmacSha1 = Hmac<Sha1>;

/// An access key and its secret. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn raftmq_mac(secret: &[u8], unix_ms: u64, nonce: &str, method: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"raftmq-request-v1\n");
    mac.update(unix_ms.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(method.as_bytes());
    mac
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// A fresh 128-bit nonce in hex. Uniqueness, not secrecy, is what it is for:
/// the time, a process-wide counter and the address of a stack slot, hashed.
fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let mut h = Sha256::default();
    sha2::Digest::update(&mut h, n.to_le_bytes());
    sha2::Digest::update(&mut h, t.to_le_bytes());
    sha2::Digest::update(&mut h, std::process::id().to_le_bytes());
    sha2::Digest::update(&mut h, (&local as *const u8 as usize).to_le_bytes());
    to_hex(&sha2::Digest::finalize(h)[..16])
}

/// The `authorization` value for one call of `method` (the gRPC path,
/// `/raftmq.v1.MessagingService/Send`) at `unix_ms` with `nonce`.
pub fn sign_with(cred: &Credentials, method: &str, unix_ms: u64, nonce: &str) -> String {
    let tag = raftmq_mac(cred.secret.as_bytes(), unix_ms, nonce, method)
        .finalize()
        .into_bytes();
    format!(
        "{RAFTMQ_SCHEME} Credential={}, Date={unix_ms}, Nonce={nonce}, Signature={}",
        cred.access_key,
        to_hex(&tag)
    )
}

/// [`sign_with`] now, with a fresh nonce.
pub fn sign(cred: &Credentials, method: &str) -> String {
    sign_with(cred, method, crate::registration_auth::unix_ms(), &nonce())
}

/// The SDKs' `authorization` value for a call whose `x-mq-date-time` is `date_time`.
pub fn sign_mqv2(cred: &Credentials, date_time: &str) -> String {
    let mut mac =
        HmacSha1::new_from_slice(cred.secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(date_time.as_bytes());
    format!(
        "{MQV2_SCHEME} Credential={}, SignedHeaders={MQ_DATE_TIME}, Signature={}",
        cred.access_key,
        to_hex(&mac.finalize().into_bytes())
    )
}

/// What an `authorization` header claims, parsed but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    Raftmq {
        access_key: String,
        unix_ms: u64,
        nonce: String,
        signature: Vec<u8>,
    },
    MqV2 {
        access_key: String,
        /// The `x-mq-date-time` value, verbatim: what was signed.
        date_time: String,
        signature: Vec<u8>,
    },
}

impl Presented {
    pub fn access_key(&self) -> &str {
        match self {
            Presented::Raftmq { access_key, .. } | Presented::MqV2 { access_key, .. } => access_key,
        }
    }

    /// Whether the signature is the one `secret` makes for `method` (the
    /// SDKs' scheme does not cover the method). Constant-time in the MAC.
    pub fn verify(&self, secret: &str, method: &str) -> bool {
        match self {
            Presented::Raftmq {
                unix_ms,
                nonce,
                signature,
                ..
            } => raftmq_mac(secret.as_bytes(), *unix_ms, nonce, method)
                .verify_slice(signature)
                .is_ok(),
            Presented::MqV2 {
                date_time, signature, ..
            } => {
                let Ok(mut mac) = HmacSha1::new_from_slice(secret.as_bytes()) else {
                    return false;
                };
                mac.update(date_time.as_bytes());
                mac.verify_slice(signature).is_ok()
            }
        }
    }
}

/// Splits `Scheme k=v, k=v` into the scheme and its fields (trimmed).
fn fields(value: &str) -> (&str, Vec<(&str, &str)>) {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let kv = rest
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    (scheme, kv)
}

/// Parses a request's `authorization` (and, for the SDKs' scheme,
/// `x-mq-date-time`). `Ok(None)`: no credentials presented (no header, or the
/// Python SDK's `Credential=,` of a client without any). The error says what
/// was malformed, never a secret.
pub fn parse(authorization: Option<&str>, mq_date_time: Option<&str>) -> Result<Option<Presented>, String> {
    let Some(value) = authorization.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let (scheme, kv) = fields(value);
    let get = |k: &str| kv.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| *v);
    let access_key = get("Credential").unwrap_or_default();
    // Apache's server takes the user name up to the first '/' (AWS-style scopes).
    let access_key = access_key.split('/').next().unwrap_or_default();
    if access_key.is_empty() {
        return Ok(None);
    }
    if access_key.len() > MAX_ACCESS_KEY_BYTES {
        return Err(format!(
            "the access key is {} bytes, longer than {MAX_ACCESS_KEY_BYTES}",
            access_key.len()
        ));
    }
    let signature = get("Signature")
        .ok_or_else(|| format!("the {scheme} authorization has no Signature"))
        .and_then(|s| from_hex(s).ok_or_else(|| format!("the {scheme} Signature is not hex")))?;
    match scheme {
        RAFTMQ_SCHEME => {
            let unix_ms = get("Date")
                .ok_or_else(|| format!("the {RAFTMQ_SCHEME} authorization has no Date"))?
                .parse()
                .map_err(|_| format!("the {RAFTMQ_SCHEME} Date is not a number of milliseconds"))?;
            let nonce = get("Nonce").unwrap_or_default();
            if nonce.is_empty() || nonce.len() > 64 || from_hex(nonce).is_none() {
                return Err(format!("the {RAFTMQ_SCHEME} Nonce must be 1 to 64 hex digits"));
            }
            Ok(Some(Presented::Raftmq {
                access_key: access_key.to_owned(),
                unix_ms,
                nonce: nonce.to_owned(),
                signature,
            }))
        }
        MQV2_SCHEME => {
            let signed = get("SignedHeaders").unwrap_or_default();
            if !signed.eq_ignore_ascii_case(MQ_DATE_TIME) {
                return Err(format!(
                    "{MQV2_SCHEME} SignedHeaders is {signed:?}; only {MQ_DATE_TIME} is supported"
                ));
            }
            let date_time =
                mq_date_time.ok_or_else(|| format!("{MQV2_SCHEME} signs {MQ_DATE_TIME}, and the request has none"))?;
            Ok(Some(Presented::MqV2 {
                access_key: access_key.to_owned(),
                date_time: date_time.to_owned(),
                signature,
            }))
        }
        other => Err(format!(
            "unknown authorization scheme {:?} (expected {RAFTMQ_SCHEME} or {MQV2_SCHEME})",
            other.chars().take(40).collect::<String>()
        )),
    }
}

/// A gRPC channel (or any HTTP service) that signs every call with
/// `credentials`, each with the call's own method path and a fresh nonce.
/// Without credentials it passes calls through unchanged.
#[derive(Clone)]
pub struct SignedChannel<S = tonic::transport::Channel> {
    inner: S,
    credentials: Option<Arc<Credentials>>,
}

impl<S> SignedChannel<S> {
    pub fn new(inner: S, credentials: Option<Arc<Credentials>>) -> Self {
        SignedChannel { inner, credentials }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for SignedChannel<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(cred) = &self.credentials {
            let value = sign(cred, req.uri().path());
            // Access keys are checked for header-safe bytes where credentials are made.
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                req.headers_mut().insert(AUTHORIZATION, v);
            }
        }
        self.inner.call(req)
    }
}

/// Whether `access_key` can go into a header and a key: printable ASCII
/// without spaces, commas or `=`, 1 to [`MAX_ACCESS_KEY_BYTES`] bytes.
pub fn check_access_key(access_key: &str) -> Result<(), String> {
    if access_key.is_empty() || access_key.len() > MAX_ACCESS_KEY_BYTES {
        return Err(format!(
            "an access key must be 1 to {MAX_ACCESS_KEY_BYTES} bytes, not {}",
            access_key.len()
        ));
    }
    if let Some(c) = access_key
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, ',' | '=' | '/'))
    {
        return Err(format!(
            "access key {access_key:?} holds {c:?}: use letters, digits and punctuation other than , = /"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred() -> Credentials {
        Credentials {
            access_key: "app-1".into(),
            secret: "0123456789abcdef-secret".into(),
        }
    }

    #[test]
    fn raftmq_signature_covers_secret_method_time_and_nonce() {
        let c = cred();
        let h = sign_with(&c, "/raftmq.v1.MessagingService/Send", 1_800_000_000_000, "00ff");
        let p = parse(Some(&h), None).unwrap().unwrap();
        assert_eq!(p.access_key(), "app-1");
        assert!(p.verify(&c.secret, "/raftmq.v1.MessagingService/Send"));
        assert!(!p.verify("another-secret-0123456", "/raftmq.v1.MessagingService/Send"));
        assert!(!p.verify(&c.secret, "/raftmq.v1.AdminService/DeleteTopic"));
        for (from, to) in [
            ("Date=1800000000000", "Date=1800000000001"),
            ("Nonce=00ff", "Nonce=00fe"),
        ] {
            let moved = parse(Some(&h.replace(from, to)), None).unwrap().unwrap();
            assert!(!moved.verify(&c.secret, "/raftmq.v1.MessagingService/Send"), "{to}");
        }
        assert_ne!(sign(&c, "/m"), sign(&c, "/m"), "two signatures share a nonce");
    }

    #[test]
    fn mqv2_signature_is_hmac_sha1_of_the_date_header_in_any_hex_case() {
        let c = cred();
        let h = sign_mqv2(&c, "20261129T185936Z");
        // Java and Python write lowercase hex; Apache's server takes either case.
        let (head, hex) = h.split_once("Signature=").unwrap();
        let upper = format!("{head}Signature={}", hex.to_uppercase());
        let p = parse(Some(&upper), Some("20261129T185936Z")).unwrap().unwrap();
        assert!(p.verify(&c.secret, "/apache.rocketmq.v2.MessagingService/SendMessage"));
        let other_time = parse(Some(&h), Some("20261129T185937Z")).unwrap().unwrap();
        assert!(!other_time.verify(&c.secret, ""));
        // The Python SDK without credentials: anonymous, not an error.
        assert_eq!(
            parse(
                Some("MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, Signature=ab"),
                Some("x")
            ),
            Ok(None)
        );
        assert!(parse(Some(&h), None).unwrap_err().contains("has none"));
    }

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        assert!(
            parse(Some("Basic Credential=a, Signature=00"), None)
                .unwrap_err()
                .contains("unknown authorization scheme")
        );
        assert!(
            parse(Some("RAFTMQ-HMAC-SHA256 Credential=a, Date=1, Nonce=00"), None)
                .unwrap_err()
                .contains("no Signature")
        );
        assert!(
            parse(
                Some("RAFTMQ-HMAC-SHA256 Credential=a, Date=x, Nonce=00, Signature=00"),
                None
            )
            .unwrap_err()
            .contains("Date")
        );
        assert!(
            parse(
                Some("RAFTMQ-HMAC-SHA256 Credential=a, Date=1, Nonce=zz, Signature=00"),
                None
            )
            .unwrap_err()
            .contains("Nonce")
        );
        assert!(
            parse(
                Some("RAFTMQ-HMAC-SHA256 Credential=a, Date=1, Nonce=00, Signature=0g"),
                None
            )
            .unwrap_err()
            .contains("not hex")
        );
        assert_eq!(parse(None, None), Ok(None));
        assert!(check_access_key("ok-key_1.x").is_ok());
        assert!(check_access_key("bad key").is_err());
        assert!(check_access_key("a,b").is_err());
        assert!(check_access_key("").is_err());
    }
}
