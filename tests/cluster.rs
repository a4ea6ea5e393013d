//! Whole-cluster tests, in one test binary: three-replica broker groups in one
//! process, each replica on its own Tokio runtime and an ephemeral port, talking
//! Raft over real gRPC; and the `raftmq` binary run as users run it.
//!
//! A replica is "killed" by dropping its runtime: every task (Raft core, state
//! machine worker, gRPC server) is cancelled wherever it stands, with no
//! `raft.shutdown()`, the closest an in-process test gets to a crash. Waits poll
//! with `fixtures::eventually` against deadlines; nothing sleeps a fixed time
//! hoping for progress.
//!
//! One binary rather than one per module: every module shares the fixtures, and
//! each extra binary links RocksDB again. The modules live under `tests/cluster/`:
//!
//! - `fixtures`: replicas, clusters, a NameServer and a client, the test topic,
//!   convergence checks, and `eventually`.
//! - `failover`: leader loss, followers returning, snapshots, leader transfer.
//! - `faults`: in-process network faults (partitions, pauses, losses, a reply
//!   lost after commit) and forged Raft RPCs at the peer port.
//! - `groups`: several broker groups under one NameServer: topics spread over
//!   them, a group down (unkeyed sends move, keyed ones fail naming it).
//! - `raft_rpc`: the Raft RPC service refusing bad peers' requests.
//! - `membership`: replicas added, removed and replaced online, leader transfer.
//! - `messaging`: the MessagingService and AdminService gRPC API.
//! - `metrics`: the broker's and the NameServer's metrics endpoints under a
//!   workload, parsed as OpenMetrics; bad metrics addresses refused.
//! - `client`: the Rust client's producer and pull consumer.
//! - `consumers`: consumer groups with push consumers.
//! - `lifecycle`: POP, FIFO POP, retries and dead letters, timers, SQL92
//!   filters, and all of it across a leader kill.
//! - `transactions`: transactional messages, check-backs, and a leader kill
//!   between a half message and its end.
//! - `rocketmq`: RocketMQ 5's gRPC API as the official SDKs speak it, through a
//!   follower, across a leader kill.
//! - `retention`: retention by size and time, a leader kill and a snapshot
//!   catch-up after it, disk watermarks.
//! - `processes`: the `raftmq` binary as separate processes.
//! - `console`: `raftmq console`'s JSON API against a cluster: changes seen by
//!   the admin API, lookups, bad input refused with 4xx naming the field.
//! - `tls`: TLS on every port, mutual TLS between Raft peers; the wrong CA,
//!   plaintext and foreign peer certificates refused.
//! - `trace`: message traces from send to ack and through retries to the DLQ
//!   (POP and push), across a leader kill, and none for an untraced topic.

#[path = "cluster/fixtures.rs"]
mod fixtures;

#[path = "cluster/acl.rs"]
mod acl;
#[path = "cluster/client.rs"]
mod client;
#[path = "cluster/console.rs"]
mod console;
#[path = "cluster/consumers.rs"]
mod consumers;
#[path = "cluster/failover.rs"]
mod failover;
#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/groups.rs"]
mod groups;
#[path = "cluster/lifecycle.rs"]
mod lifecycle;
#[path = "cluster/membership.rs"]
mod membership;
#[path = "cluster/messaging.rs"]
mod messaging;
#[path = "cluster/metrics.rs"]
mod metrics;
#[path = "cluster/processes.rs"]
mod processes;
#[path = "cluster/raft_rpc.rs"]
mod raft_rpc;
#[path = "cluster/retention.rs"]
mod retention;
#[path = "cluster/rocketmq.rs"]
mod rocketmq;
#[path = "cluster/tls.rs"]
mod tls;
#[path = "cluster/trace.rs"]
mod trace;
#[path = "cluster/transactions.rs"]
mod transactions;
