//! raftmq-broker: a broker node, i.e. one replica of one broker group: the
//! group's Raft transport over gRPC on a peer port of its own, and the
//! client-facing messaging and admin services on the client port, plus
//! NameServer registration ([`registration`]).
//!
//! * [`network`]: openraft's client side. One lazily connected tonic channel per
//!   peer, reused by every RPC; openraft's per-RPC deadlines enforced here; tonic
//!   failures sorted into openraft's Unreachable / Timeout / Network kinds.
//! * [`service`]: the `raftmq.raft.v1.RaftService` server, routed by broker group,
//!   refusing requests not signed by a member ([`peer_auth`]).
//! * [`failover`]: a follower that sees the leader's connections close and finds
//!   it gone campaigns at once instead of waiting out the lease.
//! * [`faults`]: in-process network faults for tests (partitions, pauses,
//!   losses, delays, dropped client replies).
//! * [`wire`]: what crosses the wire. Entries in CommitLog record framing (the
//!   follower checks each crc32c before appending), control data as JSON.
//! * [`node`]: [`RaftNode`] opens the store, starts Raft, serves on a bound
//!   listener until a `CancellationToken` fires, and shuts down in order.
//! * [`consumer_group`]: consumer-group membership, queue assignment and offset
//!   commits on the leader (`raftmq.v1.ConsumerService`); [`pop`]: POP receive,
//!   ack, invisible time, retry and dead-letter moves; [`timers`]: the leader's
//!   loop that fires due timers (delayed messages, retries); [`filter`] and
//!   [`sql92`]: tag and SQL92 subscription filters; [`transactions`]: ending
//!   transactions, producers' check-back streams and the leader's check loop;
//!   [`retention`]: the retention horizon (time, size, disk watermarks), freeing
//!   the disk behind it, and refusing writes when the disk is full.
//! * [`rocketmq`]: RocketMQ 5's gRPC API (`apache.rocketmq.v2`) for the
//!   official SDKs, translated onto the services below and forwarded to the
//!   group's leader from any node.
//! * [`metrics`]: the Prometheus metrics the node serves on its metrics port.
//! * [`trace`]: message traces, recorded off the request paths into each
//!   group's trace topic and read back by message id.
//! * [`membership`]: online membership changes (add, remove, leader transfer)
//!   and what a removed or not-yet-added replica answers.
//! * [`messaging`] (Send, Pull) and [`admin`] (topics, cluster status): the
//!   `raftmq.v1` client API. Input is checked in [`validate`] before anything is
//!   proposed; the write path and leadership handling are in [`group`]; every
//!   failure is an [`ApiError`], turned into a gRPC status in one place
//!   ([`api_error`]); wire/domain conversions and message ids are in [`convert`].
//!
//! Replication is pipelined: each replication session is one bidi gRPC stream
//! feeding `Raft::stream_append` on the follower, so the leader does not wait
//! for one batch's fsync on the follower before sending the next.

pub mod acl_service;
pub mod admin;
pub mod api_error;
pub mod assignment;
pub mod auth;
pub mod config;
pub mod consumer_group;
pub mod convert;
pub mod error;
pub mod failover;
pub mod faults;
pub mod filter;
pub mod group;
pub mod membership;
pub mod messaging;
pub mod metrics;
pub mod network;
pub mod node;
pub mod peer_auth;
pub mod pop;
pub mod registration;
pub mod retention;
pub mod rocketmq;
pub mod service;
pub mod sql92;
pub mod timers;
pub mod trace;
pub mod transactions;
pub mod validate;
pub mod wire;

pub use api_error::{ApiError, LEADER_METADATA_KEY};
pub use config::{MessagingConfig, RaftNodeConfig};
pub use error::Error;
pub use node::{Listeners, RaftNode};
pub use peer_auth::PeerSecret;
