//! The client's one error type. Server answers keep their gRPC code, message and
//! the endpoint that gave them, so a caller can tell "fix your input" apart from
//! "the cluster is busy" without parsing strings.

use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid client setting {key} = {value}: {reason}")]
    Config { key: String, value: String, reason: String },
    /// A server answered with a gRPC status (or the transport failed, which tonic
    /// also reports as a status, usually UNAVAILABLE).
    #[error("{endpoint} answered {code:?}: {message}")]
    Rpc {
        endpoint: String,
        code: tonic::Code,
        message: String,
        /// The `raftmq-leader` metadata of a not-leader answer (empty if the
        /// node did not know the leader); `None` for every other answer.
        leader: Option<String>,
    },
    /// No answer within `request_timeout`. The request may still have been
    /// executed: for a send the outcome is unknown.
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    /// No NameServer knows a live group serving the topic, or none answered.
    #[error("no route to topic {topic:?}: {reason}")]
    NoRoute { topic: String, reason: String },
    /// A broadcasting consumer could not read or write its local offset file.
    #[error("offset file {path}: {reason}")]
    OffsetStore { path: String, reason: String },
    #[error("broker group {group:?} is not in the route of topic {topic:?}")]
    UnknownGroup { topic: String, group: String },
    /// A call kept failing with retriable errors until its deadline
    /// (`send_deadline`; for a pull plus its long-poll wait). `topic` is empty
    /// for admin calls.
    #[error("gave up on topic {topic:?} after {attempts} attempt(s) in {elapsed:?}; last error: {last}")]
    DeadlineExceeded {
        topic: String,
        attempts: u32,
        elapsed: Duration,
        #[source]
        last: Box<Error>,
    },
    /// A send bound to one queue (by sharding key, or chosen by the caller) whose
    /// broker group found no reachable leader within the send's deadline. Unlike
    /// unkeyed sends it is not moved to another group: the key's messages must stay
    /// in one queue to keep their order. `last` is why the deadline passed.
    #[error(
        "{}queue {queue_id} of topic {topic:?} is on broker group {group:?}, which has no reachable leader; \
         the send was not moved to another group, since that would break the order of the queue: {last}",
        key.as_ref().map(|k| format!("sharding key {k:?} maps to ")).unwrap_or_default()
    )]
    GroupUnavailable {
        topic: String,
        group: String,
        queue_id: u32,
        /// The sharding key, for a keyed send.
        key: Option<String>,
        #[source]
        last: Box<Error>,
    },
    /// A well-formed answer that breaks the API's promises.
    #[error("{endpoint} answered something unusable: {reason}")]
    Protocol { endpoint: String, reason: String },
}

impl Error {
    pub(crate) fn from_status(endpoint: &str, status: &tonic::Status) -> Error {
        Error::Rpc {
            endpoint: endpoint.to_owned(),
            code: status.code(),
            message: with_causes(status),
            leader: status
                .metadata()
                .get(crate::route::LEADER_METADATA_KEY)
                .map(|v| v.to_str().unwrap_or_default().to_owned()),
        }
    }

    /// The gRPC code of a server answer, if this is one (looking through a
    /// deadline to the last error).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            Error::DeadlineExceeded { last, .. } | Error::GroupUnavailable { last, .. } => last.code(),
            _ => None,
        }
    }

    /// The leader a not-leader answer pointed at, if it named one.
    pub(crate) fn redirect(&self) -> Option<&str> {
        match self {
            Error::Rpc {
                code: tonic::Code::FailedPrecondition,
                leader: Some(l),
                ..
            } if !l.is_empty() => Some(l),
            _ => None,
        }
    }

    /// A not-leader answer from a node that does not know the leader (mid-election).
    pub(crate) fn leaderless(&self) -> bool {
        matches!(self, Error::Rpc { code: tonic::Code::FailedPrecondition, leader: Some(l), .. } if l.is_empty())
    }

    /// Worth retrying after a route refresh: the node is unreachable, overloaded,
    /// electing, or the connection broke. For a send these are also the cases where
    /// the message may or may not have been stored.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Rpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Aborted
            ),
            Error::NoRoute { .. } => true,
            // The group may have a leader again by the time the caller retries.
            Error::GroupUnavailable { .. } => true,
            _ => false,
        }
    }

    /// A send failed this way may nevertheless have been stored (the request may
    /// have reached the leader before the answer was lost).
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            Error::DeadlineExceeded { last, .. } | Error::GroupUnavailable { last, .. } => last.is_outcome_unknown(),
            Error::Timeout { .. } => true,
            Error::Rpc { code, .. } => matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Aborted
            ),
            _ => false,
        }
    }
}

/// A status's message followed by its causes that the message does not already
/// say: a transport failure's message is only "transport error", while the
/// reason (a refused TLS certificate, a connection reset) is in its sources.
fn with_causes(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}
