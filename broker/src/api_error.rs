//! Why a client request failed, and the one place that turns it into a gRPC
//! status. Handlers return [`ApiError`]; only [`From<ApiError> for Status`] knows
//! codes and metadata, so every service answers the same failure the same way.
//!
//! Not leader: FAILED_PRECONDITION, message `not leader`, and metadata
//! [`LEADER_METADATA_KEY`] = the leader's advertised endpoint (empty if unknown).

use tonic::Status;
use tonic::metadata::MetadataValue;

/// gRPC metadata key carrying the leader's endpoint on a not-leader answer.
pub const LEADER_METADATA_KEY: &str = "raftmq-leader";

/// A request this node refused or could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Malformed input: bad names, empty body, wrong topic in a batch.
    #[error("{0}")]
    InvalidArgument(String),
    /// A size or count limit.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    NotFound(String),
    /// A write reached a node that does not lead the group.
    #[error("not leader")]
    NotLeader { leader_endpoint: String },
    /// Valid when proposed but refused on apply (e.g. the topic was deleted in
    /// between), or refused by the replicated state (e.g. write permission).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Try again later, perhaps elsewhere: an unconfirmed new leader, a stopped
    /// Raft, or a write whose outcome is unknown.
    #[error("{0}")]
    Unavailable(String),
    /// A storage failure on this node.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn storage(action: &str, e: std::io::Error) -> ApiError {
        ApiError::Internal(format!("{action}: {e}"))
    }

    /// A `spawn_blocking` read that did not finish. Cancelled means the node is
    /// stopping: the client should go elsewhere (UNAVAILABLE), not give up.
    pub fn blocking_task(action: &str, e: tokio::task::JoinError) -> ApiError {
        if e.is_cancelled() {
            ApiError::Unavailable(format!("{action}: this node is shutting down"))
        } else {
            ApiError::Internal(format!("{action}: task failed: {e}"))
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(m) => Status::internal(m),
            ApiError::NotLeader { leader_endpoint } => {
                let mut status = Status::failed_precondition("not leader");
                // An endpoint that is not a valid header value (it came from our own
                // membership, so this means a misconfigured advertise address) is
                // sent as unknown rather than failing the answer.
                let value = MetadataValue::try_from(leader_endpoint.as_str())
                    .unwrap_or_else(|_| MetadataValue::from_static(""));
                status.metadata_mut().insert(LEADER_METADATA_KEY, value);
                status
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_endpoint() {
        let s: Status = ApiError::NotLeader {
            leader_endpoint: "10.0.0.1:9000".into(),
        }
        .into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "not leader");
        assert_eq!(
            s.metadata().get(LEADER_METADATA_KEY).and_then(|v| v.to_str().ok()),
            Some("10.0.0.1:9000")
        );
    }
}
