//! Settings of one broker node: identity, addresses, storage, the Raft timing and
//! the messaging limits, with documented defaults and a `validate()` that names the
//! bad key. These structs are the one source of truth: the binary fills them from
//! the TOML file, `RAFTMQ_*` environment variables and flags (in that precedence)
//! by their serde names, and `raftmq broker --print-config` prints them back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use raftmq_raft_store::{NodeId, StoreConfig};

use crate::error::Error;
use crate::failover::FastFailover;
use crate::faults::Faults;
use crate::peer_auth::{MIN_SECRET_BYTES, PeerSecret};

/// One replica of one broker group. Serde names are the setting keys (TOML keys;
/// `RAFTMQ_<KEY>` in the environment, `RAFTMQ_<TABLE>__<KEY>` for a table's key).
/// Durations are written as `"100ms"`, `"30s"`, `"72h"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftNodeConfig {
    /// This replica's id in its group's Raft membership. Required.
    pub node_id: NodeId,
    /// The broker group (Raft group) this replica belongs to, e.g. `broker-a`. Required.
    #[serde(rename = "group", alias = "broker_group")]
    pub broker_group: String,
    /// Holds `log/` (the CommitLog), `sm/` (the state machine) and
    /// `snapshot-incoming/`. Required.
    pub data_dir: PathBuf,
    /// Address the client port (messaging, admin, RocketMQ 5 gRPC) listens on.
    /// Required by `raftmq broker`, which binds it; tests bind their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Address the Raft peer port listens on. Default: `listen`'s port + 30000
    /// (DLedger's convention: 10911 -> 40911). Only the group's replicas use it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_listen: Option<SocketAddr>,
    /// `host:port` clients dial; recorded in the Raft membership and named in
    /// NOT_LEADER redirects. Differs from the listen address behind NAT or in
    /// containers. Default: `listen`.
    #[serde(rename = "advertise", alias = "advertise_addr")]
    pub advertise_addr: String,
    /// `host:port` of this node's Raft peer port as its peers dial it; recorded in
    /// the membership. Raft is served apart from the client port so that clients
    /// never reach it (and, with #13, so that only it needs node certificates).
    /// Default: `advertise`'s host with `raft_listen`'s port.
    #[serde(rename = "raft_advertise", alias = "raft_advertise_addr")]
    pub raft_advertise_addr: String,
    /// Address the Prometheus metrics endpoint (HTTP, `GET /metrics`) listens
    /// on, apart from the gRPC ports; empty: no endpoint, and nothing is
    /// recorded. `raftmq broker` defaults it to `listen`'s host with the port +
    /// 20000 (10911 -> 30911) and binds it; tests and embedders bind their own
    /// ([`crate::Listeners::metrics`]).
    pub metrics_listen: String,
    /// The group's initial members, `id=host:port` (the client address; Raft is
    /// then on port 30000 higher) or `id=host:port/raft_host:raft_port`; the
    /// lowest id forms the group on its first start. Empty: join an existing
    /// group when added to it (`raftmq admin replica add`).
    pub peers: Vec<String>,
    /// File holding the group's peer secret (read once at start; the environment
    /// variable `RAFTMQ_PEER_SECRET` may give the secret itself instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_secret_file: Option<PathBuf>,
    /// The secret shared by the group's replicas; every Raft RPC is signed with
    /// it. Required, at least 16 bytes. Never logged, never a setting key: it
    /// comes from `peer_secret_file` or `RAFTMQ_PEER_SECRET`.
    #[serde(skip)]
    pub peer_secret: PeerSecret,
    /// File holding the cluster secret (at least 16 bytes, trimmed; read once at
    /// start): every registration at a NameServer is signed with it, as a
    /// NameServer with the same `cluster_secret_file` requires. Unset: unsigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<PathBuf>,
    /// How far a peer signature's time may be from this node's clock. Default
    /// 30 s: well above clock skew between hosts kept by NTP.
    #[serde(with = "humantime_serde")]
    pub peer_auth_window: Duration,
    /// Async worker threads of the broker process. Default 0: one per core.
    /// Replicas sharing a machine do better with the cores split among them
    /// (`raftmq dev` does that).
    pub worker_threads: usize,
    /// Campaigning at once when the leader's connections close and it no longer
    /// answers, instead of after the lease and an election timeout.
    pub fast_failover: FastFailover,
    /// Tests only: in-process network faults on this node's Raft transport and
    /// client API. `None` in production.
    #[serde(skip)]
    pub faults: Option<Faults>,
    pub store: StoreConfig,
    /// Leader heartbeat period. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Election timeout range. openraft's followers honour the leader's lease
    /// (the max) and campaign only after the lease plus a random pick in
    /// `[min, max)` without hearing from the leader, so an unplanned failover
    /// takes about `max + [min, max)` plus one vote round. Defaults 200 ms and
    /// 400 ms: 0.6–0.8 s, inside the sub-second failover target, while a
    /// follower still tolerates at least 600 ms (six heartbeats) of silence
    /// before it campaigns, so a busy machine does not cause elections.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Idle limit while streaming a snapshot (per chunk, and for the receiver's
    /// install after the last chunk). Default 10 s: a snapshot carries the
    /// retained messages and is installed with fsyncs.
    #[serde(with = "humantime_serde")]
    pub install_snapshot_timeout: Duration,
    /// Ask peers whether they would vote before bumping the term, so a node that
    /// was cut off cannot depose a healthy leader when it returns. Default on: the
    /// leader lease alone makes peers refuse the returning node's votes, but the
    /// node still raises its term with each try, and when the leader finally
    /// reaches it, the higher term makes the leader step down (seen with docker
    /// kill/start and network disconnect of a follower: terms rose by 2-4 and
    /// leadership moved). The cost is one round trip per real failover.
    pub enable_pre_vote: bool,
    /// TCP connect limit toward a peer. Default 1 s. Each RPC is also bounded by
    /// openraft's own per-RPC deadline, whichever is shorter.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest gRPC message a node sends or accepts on the Raft service. Default
    /// 256 MiB: an AppendEntries carries up to `max_payload_entries` entries, each
    /// up to the record limit, and tonic's 4 MiB default would stall replication
    /// of large batches.
    pub max_rpc_message_bytes: usize,
    /// How long shutdown lets in-flight RPCs finish before dropping them. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Limits and behaviour of the client-facing messaging and admin services.
    pub messaging: MessagingConfig,
    /// Retention by time and size, and the disk watermarks (the `[retention]` table).
    pub retention: crate::retention::RetentionConfig,
    /// Cluster name reported to NameServers. Default `DefaultCluster` (RocketMQ's).
    pub cluster: String,
    /// NameServer `host:port`s to register with; empty = register with none.
    #[serde(rename = "namesrv", alias = "nameservers")]
    pub nameservers: Vec<String>,
    /// Period of NameServer registrations (changes of term, leader or membership
    /// are sent at once as well). Default 2 s, the NameServer's default heartbeat.
    #[serde(with = "humantime_serde")]
    pub registration_interval: Duration,
    /// TLS on both ports and on every connection this node makes (the `[tls]`
    /// table): its certificate on the client port, mutual TLS on the Raft peer
    /// port (a peer must present a certificate from `tls.ca_file`), and the CA
    /// checked when dialing peers, other replicas and NameServers. Default off.
    pub tls: raftmq_tls::TlsConfig,
    /// Signed requests and the ACL on the client port (the `[auth]` table).
    /// Default off.
    pub auth: crate::auth::AuthConfig,
}

/// Limits and behaviour of `MessagingService` / `AdminService`. Every limit is
/// checked at the edge, before anything is proposed to Raft. The `[messaging]`
/// table of the settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MessagingConfig {
    /// Create an unknown topic on first send instead of answering NOT_FOUND.
    /// Default off, as in RocketMQ production configs; `raftmq dev` turns it on.
    pub auto_create_topics: bool,
    /// Queue count of an auto-created topic. Default 4.
    pub default_queues: u32,
    /// Largest message body. Default 4 MiB (RocketMQ's `maxMessageSize`).
    pub max_body_bytes: usize,
    /// Largest sum of one message's property names and values, tag and keys.
    /// Default 32 KiB: properties are metadata, not a second body.
    pub max_properties_bytes: usize,
    /// Most messages in one Send. Default 1024.
    pub max_batch_messages: usize,
    /// Largest sum of bodies in one Send, i.e. in one Raft entry. Default 4 MiB,
    /// so one batch never dominates a replication round.
    pub max_batch_bytes: usize,
    /// Most messages one Pull returns; larger requests are capped. Default 1024.
    pub max_pull_messages: u32,
    /// Bodies one Pull returns at most, unless a single message is larger (it is
    /// then returned alone). Default 2 MiB, so a response stays under the 4 MiB
    /// a gRPC client decodes by default; a client reading messages near
    /// `max_body_bytes` must raise its own limit.
    pub max_pull_bytes: usize,
    /// Longest long-poll wait; larger requests are capped. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub max_pull_wait: Duration,
    /// How long a write retries while this node has just been elected and its
    /// leadership is not yet confirmed by a quorum (openraft's `LeaseExpired`)
    /// before answering UNAVAILABLE. Default 1 s: a new leader confirms its lease
    /// within one heartbeat round.
    #[serde(with = "humantime_serde")]
    pub unconfirmed_leader_retry: Duration,
    /// How often consumer-group members heartbeat (the leader tells them).
    /// Default 1 s: a joining member gets queues within about two of these.
    #[serde(with = "humantime_serde")]
    pub consumer_heartbeat_interval: Duration,
    /// A member silent this long is presumed dead and its queues move on; a
    /// member that could not heartbeat this long stops consuming by itself.
    /// Default 5 s. Must exceed two heartbeat intervals.
    #[serde(with = "humantime_serde")]
    pub consumer_session_timeout: Duration,
    /// Latest delivery time a delayed message may ask for, from now. Default 3
    /// days (RocketMQ 5's `timerMaxDelaySec`).
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Most messages one POP consumer group may hold in flight on this broker
    /// group; a receive past it is RESOURCE_EXHAUSTED. Default 100,000. Bounds
    /// the POP state every replica keeps in memory.
    pub max_inflight_per_group: usize,
    /// Most POP consumer groups one broker group tracks; a receive for a new
    /// group past it is RESOURCE_EXHAUSTED. Default 10,000.
    pub max_pop_groups: usize,
    /// When the leader first asks a producer about a transaction nobody ended,
    /// after its half message was stored. Default 6 s (RocketMQ's `transactionTimeOut`).
    #[serde(with = "humantime_serde")]
    pub transaction_first_check: Duration,
    /// Between later checks of the same transaction. Default 30 s (RocketMQ 5's).
    #[serde(with = "humantime_serde")]
    pub transaction_check_interval: Duration,
    /// Checks before an unresolved transaction is rolled back, logged and
    /// counted. Default 15 (RocketMQ's `transactionCheckMax`).
    pub transaction_max_checks: u32,
    /// Most pending half messages per broker group; a transactional send past it
    /// is RESOURCE_EXHAUSTED. Default 100,000: bounds the transaction state every
    /// replica keeps in memory.
    pub max_pending_transactions: usize,
    /// Most TransactionChecks streams one replica holds open. Default 10,000.
    pub max_transaction_checkers: usize,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            auto_create_topics: false,
            default_queues: 4,
            max_body_bytes: 4 * 1024 * 1024,
            max_properties_bytes: 32 * 1024,
            max_batch_messages: 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_pull_messages: 1024,
            max_pull_bytes: 2 * 1024 * 1024,
            max_pull_wait: Duration::from_secs(30),
            unconfirmed_leader_retry: Duration::from_secs(1),
            consumer_heartbeat_interval: Duration::from_secs(1),
            consumer_session_timeout: Duration::from_secs(5),
            max_delay: Duration::from_secs(3 * 24 * 3600),
            max_inflight_per_group: 100_000,
            max_pop_groups: 10_000,
            transaction_first_check: Duration::from_secs(6),
            transaction_check_interval: Duration::from_secs(30),
            transaction_max_checks: 15,
            max_pending_transactions: 100_000,
            max_transaction_checkers: 10_000,
        }
    }
}

impl MessagingConfig {
    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self, max_rpc_message_bytes: usize) -> Result<(), Error> {
        let bad = |key: &'static str, value: String, reason: &str| Error::Config {
            key,
            value,
            reason: reason.to_owned(),
        };
        if !(1..=crate::validate::MAX_QUEUES).contains(&self.default_queues) {
            return Err(bad(
                "messaging.default_queues",
                self.default_queues.to_string(),
                "must be between 1 and 1024",
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > self.max_batch_bytes {
            return Err(bad(
                "messaging.max_body_bytes",
                self.max_body_bytes.to_string(),
                "must be positive and at most messaging.max_batch_bytes",
            ));
        }
        // A batch travels in one Send and one AppendEntries; leave room for framing.
        if self.max_batch_bytes > max_rpc_message_bytes / 2 {
            return Err(bad(
                "messaging.max_batch_bytes",
                self.max_batch_bytes.to_string(),
                "must be at most half of max_rpc_message_bytes",
            ));
        }
        if self.max_batch_messages == 0 {
            return Err(bad("messaging.max_batch_messages", "0".into(), "must be positive"));
        }
        if self.max_pull_bytes == 0 {
            return Err(bad("messaging.max_pull_bytes", "0".into(), "must be positive"));
        }
        if self.max_pull_messages == 0 {
            return Err(bad("messaging.max_pull_messages", "0".into(), "must be positive"));
        }
        if self.consumer_heartbeat_interval.is_zero()
            || self.consumer_session_timeout < self.consumer_heartbeat_interval * 2
            || self.consumer_session_timeout.as_millis() > u128::from(u32::MAX)
        {
            return Err(bad(
                "messaging.consumer_session_timeout",
                format!("{:?}", self.consumer_session_timeout),
                "must be at least two (non-zero) consumer heartbeat intervals and under 49 days",
            ));
        }
        if self.transaction_check_interval < Duration::from_millis(100) {
            return Err(bad(
                "messaging.transaction_check_interval",
                format!("{:?}", self.transaction_check_interval),
                "must be at least 100 ms",
            ));
        }
        if self.transaction_max_checks == 0 {
            return Err(bad("messaging.transaction_max_checks", "0".into(), "must be positive"));
        }
        if self.max_pending_transactions == 0 || self.max_transaction_checkers == 0 {
            return Err(bad(
                "messaging.max_pending_transactions",
                format!(
                    "{} (checkers {})",
                    self.max_pending_transactions, self.max_transaction_checkers
                ),
                "max_pending_transactions and max_transaction_checkers must be positive",
            ));
        }
        Ok(())
    }
}

impl Default for RaftNodeConfig {
    /// Every documented default, with no identity (id 0, no group, no data dir,
    /// no addresses): what the settings file, environment and flags start from.
    fn default() -> Self {
        RaftNodeConfig::new(0, "", "", "")
    }
}

impl RaftNodeConfig {
    /// A config with the documented defaults.
    pub fn new(
        node_id: NodeId,
        broker_group: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        advertise_addr: impl Into<String>,
    ) -> Self {
        RaftNodeConfig {
            node_id,
            broker_group: broker_group.into(),
            data_dir: data_dir.into(),
            listen: None,
            raft_listen: None,
            advertise_addr: advertise_addr.into(),
            raft_advertise_addr: String::new(),
            metrics_listen: String::new(),
            peers: Vec::new(),
            peer_secret_file: None,
            cluster_secret_file: None,
            peer_secret: PeerSecret::new(Vec::new()),
            peer_auth_window: Duration::from_secs(30),
            worker_threads: 0,
            fast_failover: FastFailover::default(),
            faults: None,
            store: StoreConfig::default(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(400),
            install_snapshot_timeout: Duration::from_secs(10),
            enable_pre_vote: true,
            connect_timeout: Duration::from_secs(1),
            max_rpc_message_bytes: 256 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            messaging: MessagingConfig::default(),
            retention: crate::retention::RetentionConfig::default(),
            cluster: "DefaultCluster".to_owned(),
            nameservers: Vec::new(),
            registration_interval: Duration::from_secs(2),
            tls: raftmq_tls::TlsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
        }
    }

    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &'static str, value: String, reason: &str| Error::Config {
            key,
            value,
            reason: reason.to_owned(),
        };
        if self.broker_group.is_empty() || self.broker_group.len() > 127 {
            return Err(bad("group", self.broker_group.clone(), "must be 1 to 127 characters"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", String::new(), "is required"));
        }
        if self.advertise_addr.is_empty() || !self.advertise_addr.contains(':') {
            return Err(bad("advertise", self.advertise_addr.clone(), "must be host:port"));
        }
        if !self.raft_advertise_addr.contains(':') {
            return Err(bad(
                "raft_advertise",
                self.raft_advertise_addr.clone(),
                "must be host:port (the Raft peer port, apart from the client port)",
            ));
        }
        if self.raft_advertise_addr == self.advertise_addr {
            return Err(bad(
                "raft_advertise",
                self.raft_advertise_addr.clone(),
                "must differ from advertise: clients must not reach the Raft service",
            ));
        }
        if !self.metrics_listen.is_empty() {
            let addr: SocketAddr = self.metrics_listen.parse().map_err(|e| {
                bad(
                    "metrics_listen",
                    self.metrics_listen.clone(),
                    &format!("must be ip:port, or empty for no metrics endpoint ({e})"),
                )
            })?;
            if addr.port() != 0 && (Some(addr) == self.listen || Some(addr) == self.raft_listen) {
                return Err(bad(
                    "metrics_listen",
                    self.metrics_listen.clone(),
                    "must differ from listen and raft_listen (the gRPC ports)",
                ));
            }
        }
        if self.peer_secret.len() < MIN_SECRET_BYTES {
            return Err(bad(
                "peer_secret",
                format!("<{} bytes>", self.peer_secret.len()),
                "must be at least 16 bytes, the same on every replica of the group (Raft peers authenticate with it)",
            ));
        }
        if self.peer_auth_window.is_zero() {
            return Err(bad("peer_auth_window", "0".into(), "must be positive"));
        }
        if self.fast_failover.probe_timeout.is_zero() || self.fast_failover.probe_timeout >= self.election_timeout_min {
            return Err(bad(
                "fast_failover.probe_timeout",
                format!("{:?}", self.fast_failover.probe_timeout),
                "must be positive and below election_timeout_min",
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(bad("heartbeat_interval", "0".into(), "must be positive"));
        }
        if self.election_timeout_min <= self.heartbeat_interval {
            return Err(bad(
                "election_timeout_min",
                format!("{:?}", self.election_timeout_min),
                "must exceed heartbeat_interval",
            ));
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return Err(bad(
                "election_timeout_max",
                format!("{:?}", self.election_timeout_max),
                "must exceed election_timeout_min",
            ));
        }
        if self.install_snapshot_timeout.is_zero() {
            return Err(bad("install_snapshot_timeout", "0".into(), "must be positive"));
        }
        if self.max_rpc_message_bytes < 4 * 1024 * 1024 {
            return Err(bad(
                "max_rpc_message_bytes",
                self.max_rpc_message_bytes.to_string(),
                "must be at least 4 MiB",
            ));
        }
        self.auth.validate()?;
        if let Some(bad_addr) = self.nameservers.iter().find(|a| !a.contains(':')) {
            return Err(bad("namesrv", bad_addr.clone(), "each must be host:port"));
        }
        if self.worker_threads > 1024 {
            return Err(bad(
                "worker_threads",
                self.worker_threads.to_string(),
                "must be at most 1024 (0: one per core)",
            ));
        }
        if self.registration_interval.is_zero() {
            return Err(bad("registration_interval", "0".into(), "must be positive"));
        }
        self.tls.validate(raftmq_tls::Role::Node).map_err(|e| Error::Config {
            key: e.key,
            value: e.value,
            reason: e.reason,
        })?;
        self.messaging.validate(self.max_rpc_message_bytes)?;
        self.retention.validate()?;
        self.store.validate().map_err(|e| match e {
            raftmq_raft_store::Error::Config { key, value, reason } => Error::Config {
                key: match key {
                    "segment_bytes" => "store.segment_bytes",
                    other => other,
                },
                value,
                reason,
            },
            other => Error::Config {
                key: "store",
                value: format!("{:?}", self.store),
                reason: other.to_string(),
            },
        })
    }

    /// openraft's config: raft-store's storage requirements plus this node's timing.
    pub fn raft_config(&self) -> Result<openraft::Config, Error> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.install_snapshot_timeout),
            enable_pre_vote: Some(self.enable_pre_vote),
            ..raftmq_raft_store::recommended_raft_config(&self.broker_group)
        };
        config.validate().map_err(|source| Error::RaftConfig {
            node_id: self.node_id,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RaftNodeConfig {
        let mut c = RaftNodeConfig::new(1, "broker-a", "/tmp/x", "127.0.0.1:1");
        c.raft_advertise_addr = "127.0.0.1:2".into();
        c.peer_secret = PeerSecret::new(b"0123456789abcdef".to_vec());
        c
    }

    #[test]
    fn defaults_are_valid_and_reach_openraft() {
        let c = config();
        c.validate().unwrap();
        let r = c.raft_config().unwrap();
        assert_eq!(
            (r.heartbeat_interval, r.election_timeout_min, r.election_timeout_max),
            (100, 200, 400)
        );
        assert_eq!(
            r.snapshot_policy,
            openraft::SnapshotPolicy::Never,
            "the log is the data"
        );
    }

    #[test]
    fn bad_timing_names_the_key() {
        let mut c = config();
        c.election_timeout_max = c.election_timeout_min;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("election_timeout_max"), "{err}");
    }

    #[test]
    fn a_bad_metrics_address_names_the_key() {
        let mut c = config();
        c.metrics_listen = "localhost".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("metrics_listen") && err.contains("localhost"), "{err}");
        c.listen = Some("127.0.0.1:10911".parse().unwrap());
        c.metrics_listen = "127.0.0.1:10911".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("metrics_listen"), "{err}");
        c.metrics_listen = "127.0.0.1:30911".into();
        c.validate().unwrap();
        c.metrics_listen.clear();
        c.validate().unwrap();
    }

    #[test]
    fn raft_needs_its_own_port_and_a_secret() {
        let mut c = config();
        c.raft_advertise_addr = c.advertise_addr.clone();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("raft_advertise"), "{err}");
        let mut c = config();
        c.peer_secret = PeerSecret::new(b"short".to_vec());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("peer_secret") && !err.contains("short"), "{err}");
    }

    #[test]
    fn tls_names_the_key_and_the_missing_file() {
        let mut c = config();
        c.tls.enabled = true;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tls.cert_file") && err.contains("required"), "{err}");
        let missing = std::path::Path::new("/nonexistent/raftmq/node.pem");
        c.tls.cert_file = Some(missing.to_owned());
        c.tls.key_file = Some(missing.to_owned());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("tls.cert_file") && err.contains("/nonexistent/raftmq/node.pem"),
            "{err}"
        );
    }
}
