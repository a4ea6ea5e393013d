//! Authentication of Raft RPCs between the replicas of one broker group. Every
//! request carries `x-raftmq-peer-auth: v1:<node id>:<unix ms>:<hex HMAC-SHA256>`,
//! keyed by the group's peer secret over the group, the sender's node id, the RPC
//! and the time. The receiver accepts it only if the MAC matches, the time is
//! inside the window, and the sender is a member of its group's membership (or
//! the receiver has none yet, i.e. is waiting to be initialized).
//!
//! What it does not do: encrypt, or stop a replay inside the window by someone
//! who can read the peer network. Mutual TLS on the peer port (issue #13) closes
//! that; this closes the hole that anyone reaching a node could speak Raft to it
//! (a forged TransferLeader moved leadership; a forged AppendEntries from a
//! higher term could truncate a follower's log).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use raftmq_raft_store::NodeId;
use sha2::Sha256;

/// gRPC metadata key of the signature.
pub const PEER_AUTH_KEY: &str = "x-raftmq-peer-auth";
/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The secret shared by a broker group's replicas. Never printed. The default is
/// empty, which `RaftNodeConfig::validate` refuses.
#[derive(Clone, Default)]
pub struct PeerSecret(Arc<[u8]>);

impl PeerSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        PeerSecret(bytes.into().into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(&self, group: &str, node: NodeId, rpc: &str, unix_ms: u64) -> HmacSha256 {
        // Any key length is valid for HMAC; `new_from_slice` cannot fail here.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        // Length-free fields joined by a byte no group name or RPC name contains.
        for part in [
            group.as_bytes(),
            &node.to_be_bytes(),
            rpc.as_bytes(),
            &unix_ms.to_be_bytes(),
        ] {
            mac.update(part);
            mac.update(&[0]);
        }
        mac
    }

    /// The header value for one request from `node` of `group`.
    pub fn sign(&self, group: &str, node: NodeId, rpc: &str, unix_ms: u64) -> String {
        let tag = self.mac(group, node, rpc, unix_ms).finalize().into_bytes();
        format!("v1:{node}:{unix_ms}:{}", hex::encode(tag))
    }

    /// Checks a header value; returns the authenticated sender.
    pub fn verify(
        &self,
        group: &str,
        rpc: &str,
        header: &str,
        now_ms: u64,
        window: Duration,
    ) -> Result<NodeId, AuthError> {
        let mut parts = header.splitn(4, ':');
        let (Some("v1"), Some(node), Some(at), Some(tag)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let node: NodeId = node.parse().map_err(|_| AuthError::Malformed)?;
        let at: u64 = at.parse().map_err(|_| AuthError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| AuthError::Malformed)?;
        // The MAC first, so the time check never tells a forger anything.
        self.mac(group, node, rpc, at)
            .verify_slice(&tag)
            .map_err(|_| AuthError::BadSignature { node })?;
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if at.abs_diff(now_ms) > window_ms {
            return Err(AuthError::Expired {
                node,
                skew_ms: at.abs_diff(now_ms),
                window_ms,
            });
        }
        Ok(node)
    }
}

impl fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why a peer request was refused; the receiver answers UNAUTHENTICATED with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {PEER_AUTH_KEY} metadata: Raft RPCs must be signed with the group's peer secret")]
    Missing,
    #[error("malformed {PEER_AUTH_KEY} metadata: expected v1:<node id>:<unix ms>:<hex hmac>")]
    Malformed,
    #[error("bad peer signature claiming node {node}: not signed with this group's peer secret")]
    BadSignature { node: NodeId },
    #[error(
        "peer signature of node {node} is {skew_ms} ms off this node's clock (window {window_ms} ms): stale, replayed or clocks apart"
    )]
    Expired { node: NodeId, skew_ms: u64, window_ms: u64 },
    #[error("node {node} is not a member of broker group {group}")]
    NotMember { node: NodeId, group: String },
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(30);

    #[test]
    fn a_signature_verifies_only_for_its_group_rpc_and_secret() {
        let s = PeerSecret::new(b"0123456789abcdef0123".to_vec());
        let h = s.sign("broker-a", 2, "vote", 1_000_000);
        assert_eq!(s.verify("broker-a", "vote", &h, 1_000_500, W), Ok(2));
        assert_eq!(
            s.verify("broker-b", "vote", &h, 1_000_500, W),
            Err(AuthError::BadSignature { node: 2 })
        );
        assert_eq!(
            s.verify("broker-a", "transfer_leader", &h, 1_000_500, W),
            Err(AuthError::BadSignature { node: 2 })
        );
        let other = PeerSecret::new(b"another-secret-of-20".to_vec());
        assert_eq!(
            other.verify("broker-a", "vote", &h, 1_000_500, W),
            Err(AuthError::BadSignature { node: 2 })
        );
    }

    #[test]
    fn a_claimed_node_or_time_cannot_be_changed_and_old_signatures_expire() {
        let s = PeerSecret::new(b"0123456789abcdef".to_vec());
        let h = s.sign("g", 2, "vote", 1_000_000);
        let forged_node = h.replacen("v1:2:", "v1:1:", 1);
        assert_eq!(
            s.verify("g", "vote", &forged_node, 1_000_000, W),
            Err(AuthError::BadSignature { node: 1 })
        );
        let forged_time = h.replacen(":1000000:", ":1000001:", 1);
        assert!(matches!(
            s.verify("g", "vote", &forged_time, 1_000_000, W),
            Err(AuthError::BadSignature { .. })
        ));
        assert!(matches!(
            s.verify("g", "vote", &h, 1_000_000 + 31_000, W),
            Err(AuthError::Expired { node: 2, .. })
        ));
        for junk in ["", "v1", "v2:1:2:ab", "v1:x:1:ab", "v1:1:1:zz"] {
            assert_eq!(s.verify("g", "vote", junk, 0, W), Err(AuthError::Malformed), "{junk:?}");
        }
    }

    #[test]
    fn the_secret_is_never_printed() {
        let s = PeerSecret::new(b"super-secret-value".to_vec());
        assert!(!format!("{s:?}").contains("super"));
    }
}
