//! Signatures of broker registrations at the NameServers: without one, anyone
//! reaching a NameServer could register a fake broker, or overwrite a group's
//! leader endpoint, and send every producer of its topics there. A broker signs
//! each `RegisterBroker` with the cluster secret: HMAC-SHA256 over the request's
//! protobuf encoding and the time, in `x-raftmq-registration-auth:
//! v1:<unix ms>:<hex MAC>`. The NameServer re-encodes the request it decoded (so
//! fields it does not know are not covered, and cannot matter to it), and
//! accepts it only inside a time window.
//!
//! What it does not do: stop a replay inside the window by someone who can read
//! the traffic (TLS does), and a replay only re-asserts what the broker itself
//! said then.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// gRPC metadata key of the signature.
pub const REGISTRATION_AUTH_KEY: &str = "x-raftmq-registration-auth";
/// Shortest cluster secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;
/// How far a signature's time may be from the NameServer's clock.
pub const WINDOW_MS: u64 = 60_000;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], body: &[u8], unix_ms: u64) -> HmacSha256 {
    // Any key length is valid for HMAC.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"raftmq-registration-v1\0");
    mac.update(&unix_ms.to_be_bytes());
    mac.update(body);
    mac
}

/// The header value for a registration whose encoding is `body`.
pub fn sign(secret: &[u8], body: &[u8], unix_ms: u64) -> String {
    let tag = mac(secret, body, unix_ms).finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("v1:{unix_ms}:{hex}")
}

/// Checks a registration's header; the error says what was wrong, never the secret.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8], now_ms: u64) -> Result<(), String> {
    let header = header
        .ok_or_else(|| format!("no {REGISTRATION_AUTH_KEY} signature (the NameServer requires a cluster secret)"))?;
    let mut parts = header.splitn(3, ':');
    let (Some("v1"), Some(ms), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{REGISTRATION_AUTH_KEY} is not v1:<unix ms>:<hex MAC>"));
    };
    let unix_ms: u64 = ms
        .parse()
        .map_err(|_| format!("{REGISTRATION_AUTH_KEY} time {ms:?} is not a number"))?;
    if unix_ms.abs_diff(now_ms) > WINDOW_MS {
        return Err(format!(
            "signature time is {} s from the NameServer's clock, outside the {} s window",
            unix_ms.abs_diff(now_ms) / 1000,
            WINDOW_MS / 1000
        ));
    }
    let tag = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| format!("{REGISTRATION_AUTH_KEY} MAC is not hex"))?;
    mac(secret, body, unix_ms)
        .verify_slice(&tag)
        .map_err(|_| "signature does not match (wrong cluster secret, or the request was altered)".to_owned())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads a cluster secret file: its contents, trimmed, of at least
/// [`MIN_SECRET_BYTES`]. The error names the path, never the contents.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = bytes.trim_ascii().to_vec();
    if trimmed.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{} holds {} bytes; a cluster secret needs at least {MIN_SECRET_BYTES}",
            path.display(),
            trimmed.len()
        ));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123";

    #[test]
    fn a_signature_holds_only_for_its_secret_body_and_time() {
        let now = 1_800_000_000_000;
        let h = sign(SECRET, b"body", now);
        assert_eq!(verify(SECRET, Some(&h), b"body", now + 1000), Ok(()));
        let wrong_secret = verify(b"another-secret-of-16", Some(&h), b"body", now).unwrap_err();
        assert!(wrong_secret.contains("does not match"), "{wrong_secret}");
        let altered = verify(SECRET, Some(&h), b"bodY", now).unwrap_err();
        assert!(altered.contains("does not match"), "{altered}");
        let old = verify(SECRET, Some(&h), b"body", now + WINDOW_MS + 1).unwrap_err();
        assert!(old.contains("window"), "{old}");
        let missing = verify(SECRET, None, b"body", now).unwrap_err();
        assert!(missing.contains("no x-raftmq-registration-auth"), "{missing}");
        let garbage = verify(SECRET, Some("v1:x:zz"), b"body", now).unwrap_err();
        assert!(garbage.contains("not a number"), "{garbage}");
        // The time is covered too: moving it forward breaks the MAC.
        let moved = h.replacen(&now.to_string(), &(now + 1).to_string(), 1);
        assert!(verify(SECRET, Some(&moved), b"body", now).is_err());
    }
}
