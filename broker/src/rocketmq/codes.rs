//! The `apache.rocketmq.v2.Status` of every gateway answer: RocketMQ 5 SDKs read
//! the outcome from the body's status code, never from the gRPC status, and fail
//! a response without one.
//!
//! Only codes that every official SDK knows are sent: the Rust SDK 5.0.0 panics
//! on a code missing from its enum (40019, 40020, 40021, 40404, 41302, 42901,
//! 42902), so those are never used here ([`NEVER_SENT`], checked by a test).

use raftmq_proto::rocketmq::v2;
use v2::Code;

/// Codes the Rust SDK 5.0.0's `Code` enum lacks.
pub const NEVER_SENT: [i32; 7] = [40019, 40020, 40021, 40404, 41302, 42901, 42902];

pub fn ok() -> Option<v2::Status> {
    status(Code::Ok, "OK")
}

pub fn status(code: Code, message: impl Into<String>) -> Option<v2::Status> {
    Some(v2::Status {
        code: code as i32,
        message: message.into(),
    })
}

/// What an RPC was doing when it failed: the same gRPC code means different
/// things to an SDK depending on it (a stale receipt handle is a failed
/// precondition to raftmq, INVALID_RECEIPT_HANDLE to RocketMQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Route,
    Send,
    Receive,
    /// Ack, change of invisible time, forward to the dead-letter queue.
    Handle,
    Transaction,
    Other,
}

/// A failure from raftmq's own services (in-process or forwarded) as an SDK
/// status, with raftmq's message kept so the user sees what was wrong.
pub fn from_status(op: Op, s: &tonic::Status) -> Option<v2::Status> {
    use tonic::Code as G;
    let msg = s.message();
    // Still not leader when the retry budget ran out (an election outlasting
    // the client's deadline): the master is unavailable, not a refusal.
    if s.metadata().get(crate::api_error::LEADER_METADATA_KEY).is_some() {
        return status(
            Code::HaNotAvailable,
            format!("broker group has no reachable leader yet: {msg}"),
        );
    }
    let code = match s.code() {
        G::InvalidArgument | G::FailedPrecondition if op == Op::Handle && msg.contains("receipt handle") => {
            Code::InvalidReceiptHandle
        }
        G::InvalidArgument if op == Op::Transaction => Code::InvalidTransactionId,
        G::InvalidArgument if msg.contains("filter") || msg.contains("SQL") || msg.contains("tag expression") => {
            Code::IllegalFilterExpression
        }
        G::InvalidArgument if msg.contains("invisible") => Code::IllegalInvisibleTime,
        G::InvalidArgument if msg.contains("deliver") || msg.contains("delay") => Code::IllegalDeliveryTime,
        G::InvalidArgument if msg.starts_with("topic") => Code::IllegalTopic,
        G::InvalidArgument if msg.starts_with("consumer group") || msg.starts_with("consumer_group") => {
            Code::IllegalConsumerGroup
        }
        G::InvalidArgument | G::OutOfRange => Code::BadRequest,
        G::NotFound if op == Op::Transaction => Code::InvalidTransactionId,
        G::NotFound if msg.starts_with("topic") || op == Op::Route => Code::TopicNotFound,
        G::NotFound => Code::NotFound,
        G::FailedPrecondition if op == Op::Transaction => Code::InvalidTransactionId,
        G::FailedPrecondition | G::PermissionDenied => Code::Forbidden,
        // Python's producer stops retrying on TOO_MANY_REQUESTS only: a full
        // broker should not be hammered three times per message.
        G::ResourceExhausted if msg.contains("body") => Code::MessageBodyTooLarge,
        G::ResourceExhausted => Code::TooManyRequests,
        G::Unauthenticated => Code::Unauthorized,
        // No leader, a quorum lost, a stopped node: the master is not available.
        G::Unavailable => Code::HaNotAvailable,
        G::DeadlineExceeded | G::Cancelled => Code::ProxyTimeout,
        G::Unimplemented => Code::NotImplemented,
        _ => Code::InternalServerError,
    };
    status(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_answer_uses_a_code_the_rust_sdk_lacks() {
        use tonic::Code as G;
        let messages = [
            "receipt handle x",
            "filter",
            "invisible",
            "deliver",
            "topic x",
            "consumer group",
            "body",
            "",
        ];
        let ops = [Op::Route, Op::Send, Op::Receive, Op::Handle, Op::Transaction, Op::Other];
        for code in 0..=16 {
            for m in messages {
                for op in ops {
                    let s = from_status(op, &tonic::Status::new(G::from(code), m)).expect("status");
                    assert!(!NEVER_SENT.contains(&s.code), "{op:?} {code} {m:?} -> {}", s.code);
                    assert!(v2::Code::try_from(s.code).is_ok());
                    assert_ne!(s.code, v2::Code::Ok as i32, "a failure must not read as OK");
                }
            }
        }
    }

    #[test]
    fn stale_handles_and_missing_topics_get_their_rocketmq_codes() {
        let s = from_status(
            Op::Handle,
            &tonic::Status::failed_precondition("stale receipt handle: the message was acked"),
        );
        assert_eq!(s.map(|s| s.code), Some(Code::InvalidReceiptHandle as i32));
        let s = from_status(Op::Send, &tonic::Status::not_found("topic \"t\" does not exist"));
        assert_eq!(s.map(|s| s.code), Some(Code::TopicNotFound as i32));
        let s = from_status(Op::Send, &tonic::Status::resource_exhausted("pending half messages"));
        assert_eq!(s.map(|s| s.code), Some(Code::TooManyRequests as i32));
    }
}
