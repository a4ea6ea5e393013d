//! raftmq-broker: a broker node, i.e. one replica of one broker group. This first
//! slice holds the group's Raft transport over gRPC and the node that runs it;
//! the messaging services (Send, Pull, topic admin) and NameServer registration
//! come next and will share the same gRPC server.
//!
//! * [`network`]: openraft's client side. One lazily connected tonic channel per
//!   peer, reused by every RPC; openraft's per-RPC deadlines enforced here; tonic
//!   failures sorted into openraft's Unreachable / Timeout / Network kinds.
//! * [`service`]: the `raftmq.raft.v1.RaftService` server, routed by broker group.
//! * [`wire`]: what crosses the wire. Entries in CommitLog record framing (the
//!   follower checks each crc32c before appending), control data as JSON.
//! * [`node`]: [`RaftNode`] opens the store, starts Raft, serves on a bound
//!   listener until a `CancellationToken` fires, and shuts down in order.
//!
//! Replication is pipelined: each replication session is one bidi gRPC stream
//! feeding `Raft::stream_append` on the follower, so the leader does not wait
//! for one batch's fsync on the follower before sending the next.

pub mod config;
pub mod error;
pub mod network;
pub mod node;
pub mod service;
pub mod wire;

pub use config::RaftNodeConfig;
pub use error::Error;
pub use node::RaftNode;
