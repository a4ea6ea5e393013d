//! raft-store: a broker group's CommitLog as openraft's log storage, and the RocksDB
//! state machine (ConsumeQueues, key index, topics, consumer offsets) applied from it.
//!
//! # The CommitLog is the Raft log
//!
//! Every message of every topic is written once, as (part of) a Raft entry, into
//! segment files under `<data>/log/segments/`. A record is framed
//! `len | crc32c | term | index | payload` (see [`record`]); segments roll at a
//! configurable size and are named by their first Raft index.
//!
//! * **Group commit.** `append` writes records into the page cache and hands the
//!   openraft callback to a flusher thread. The flusher drains every queued append,
//!   issues one `fdatasync` per touched file, then fires the callbacks in order; so
//!   concurrent appends share one fsync and openraft 0.10's asynchronous append can
//!   keep writing while a sync is in flight. With [`FlushMode::Async`] the callback
//!   fires right after the write, before the fsync: faster, but a majority crashing
//!   together can lose acknowledged messages.
//! * **Reads do not scan.** An in-memory table maps Raft index to (segment, byte
//!   offset). Start-up loads each sealed segment's `.idx` file (written and fsynced
//!   when the segment is sealed) and scans only the last segment, so opening costs
//!   O(index files) + O(one segment), not O(log). See [`segment`].
//! * **Recovery.** The last segment's tail is scanned: a record cut short, or a bad
//!   checksum with nothing valid after it, is a torn write and is truncated away. A
//!   bad record followed by a valid one, or any bad record in a sealed segment, is
//!   damage: opening (or reading that entry) fails with an error naming the file
//!   and byte offset; nothing is skipped silently.
//! * **Vote, committed id, purge point** are small JSON files replaced atomically and
//!   durably (write temp, fsync, rename, fsync directory). The vote is durable before
//!   `save_vote` returns. The committed id is persisted by the flusher at most every
//!   100 ms: the state machine persists its own applied id, so a stale committed id
//!   only means fewer entries re-applied at start-up, never wrong ones.
//! * **Truncation** of a conflicting suffix cuts segment files at the record
//!   boundary (deleting later segments); **physical purge** deletes whole segments.
//!
//! # The log is the data: purge and snapshots
//!
//! openraft's `purge` is *logical* here: it records the purge point (so openraft
//! replicates from a snapshot below it) but deletes nothing. Segments are deleted only
//! by retention ([`CommitLog::apply_retention`]), never merely because a snapshot
//! exists, and never above the purge point. openraft is configured never to purge on
//! its own (see [`recommended_raft_config`]).
//!
//! A snapshot (see [`snapshot`]) carries the state machine's rows *and every retained
//! message record* up to its last log id. On disk it is a directory under
//! `sm/snapshots/`: a RocksDB checkpoint (hard links of the SST files) and hard links
//! of the segment files holding the retained records, with a manifest naming the
//! records and bytes of each. Building one therefore costs a memtable flush and a
//! link per file, not a copy of the retained log, and retention deleting a segment
//! leaves the snapshot's link (and data) in place until a newer snapshot replaces it.
//! On the wire it is one stream (`RMQSNAP1`: meta, rows, records, checksum) generated
//! from that directory as it is sent. A replica that installs one, being new or
//! behind the purge point, stores those records in its state machine's `archive/`
//! (same segment format) and reads messages from there below the snapshot index and
//! from the CommitLog above it. So it ends up with every retained message even though
//! openraft then purges its own log up to the snapshot; its own snapshot of the
//! installed state links that archive, so it can serve the snapshot on.
//!
//! # State machine
//!
//! Applying a batch of committed entries writes one RocksDB `WriteBatch`: ConsumeQueue
//! rows (queue offset -> Raft index, position in the entry, size, tag hash, store
//! time), key-index rows, topic configs, consumer offsets, and the applied log id and
//! membership. A crash therefore never leaves an entry half-applied; on restart
//! openraft re-applies whatever the last durable batch did not cover.
//!
//! The message lifecycle is state-machine state too, in column families of the
//! same RocksDB (so snapshots carry it): [`timers`] (delayed messages and retries
//! ordered by due time), [`pop`] (POP in-flight messages, hand-out cursors,
//! consumer-group configs), [`transactions`] (pending half messages, check
//! counts, outcomes). A moved message (a due timer, a retry, a dead letter)
//! gets a ConsumeQueue row pointing at its original record. Module map:
//! [`layout`] (keys and rows), [`state_machine`] (apply), [`reader`] (reads),
//! [`snapshot`] (build and install).
//!
//! # Retention
//!
//! The broker leader decides a horizon from whole segments (by age, total size
//! or disk pressure) and proposes [`Command::Retain`]. Applying it, every
//! replica drops the ConsumeQueue prefix written at or below it (recording each
//! queue's new minimum), pending timers and half messages whose record is gone,
//! and POP deliveries of dropped rows; reads skip anything at or below the
//! horizon at once, and key-index rows are dropped by a compaction filter. Then,
//! off the apply path, the replica snapshots at or past the horizon (snapshots
//! carry only records above it), purges the Raft log up to it and deletes whole
//! segments of the log and the archive ([`StoreReader::free_through`]). Deleting
//! removes the log's name for a segment only: an older snapshot still being
//! streamed keeps its own hard link, so the data goes when that snapshot does.

pub mod acl;
pub mod command;
pub mod commitlog;
pub(crate) mod cq;
pub mod dedup;
pub mod disk;
pub mod durable;
pub mod entry_codec;
pub mod layout;
pub mod pop;
pub mod reader;
pub mod record;
pub mod segment;
pub mod snapshot;
pub mod state_machine;
pub mod stats;
pub mod timers;
pub mod transactions;

use std::io;
use std::path::PathBuf;

pub use acl::{AclRule, AclState, Permission, ResourceKind, User};
pub use command::{
    AppendBatch, Command, ConsumerGroupConfig, HalfSpec, Message, MessageRef, PopPick, ProducerSeq, QueueOffset,
    Response, TimerKey, TopicConfig, TopicMessageType, TxnEndOutcome, TxnEndSource, TxnId,
};
pub use commitlog::{CommitLog, CommitLogReader, FlushStats};
pub use layout::{DLQ_TOPIC_PREFIX, RETRY_TOPIC_PREFIX};
pub use pop::{InFlight, PopGroup, PopQueue, PopState};
pub use reader::{Origin, StoreReader, StoredMessage, StoredSegment};
pub use segment::SegmentInfo;
pub use snapshot::{LocalSnapshot, SnapshotData};
pub use state_machine::StateMachine;
pub use transactions::{PendingTxn, TxnState, TxnTotals};

/// A broker node's identity in its Raft group.
pub type NodeId = u64;

/// What the Raft membership records about a node: where clients and peers reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct BrokerNode {
    /// Advertised address of the node's client-facing gRPC server (messaging,
    /// admin, consumer groups): what NOT_LEADER redirects and routes name.
    pub addr: String,
    /// Advertised address of the node's Raft peer port. Raft is served apart from
    /// the client port so that clients never reach it. Empty in memberships
    /// written before the split (one port served both): see [`BrokerNode::raft_endpoint`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub raft_addr: String,
}

/// The Raft port's default offset from the client port (DLedger's: a broker on
/// 10911 takes Raft on 40911).
pub const RAFT_PORT_OFFSET: u16 = 30000;

impl BrokerNode {
    pub fn new(addr: impl Into<String>, raft_addr: impl Into<String>) -> Self {
        BrokerNode {
            addr: addr.into(),
            raft_addr: raft_addr.into(),
        }
    }

    /// Where peers send Raft RPCs to this node. A membership written before Raft
    /// had its own port names only the client address; such a node, restarted on
    /// this version with the default Raft port, is found at the client port +
    /// [`RAFT_PORT_OFFSET`].
    pub fn raft_endpoint(&self) -> std::borrow::Cow<'_, str> {
        if !self.raft_addr.is_empty() {
            return std::borrow::Cow::Borrowed(&self.raft_addr);
        }
        match self.addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
            Some((host, Ok(port))) if port.checked_add(RAFT_PORT_OFFSET).is_some() => {
                std::borrow::Cow::Owned(format!("{host}:{}", port + RAFT_PORT_OFFSET))
            }
            _ => std::borrow::Cow::Borrowed(&self.addr),
        }
    }
}

#[cfg(test)]
mod broker_node_tests {
    use super::*;

    #[test]
    fn a_membership_from_before_the_raft_port_finds_raft_at_the_default_offset() {
        let old: BrokerNode = serde_json::from_str(r#"{"addr":"10.0.0.1:10911"}"#).unwrap();
        assert_eq!(old.raft_endpoint(), "10.0.0.1:40911");
        let new = BrokerNode::new("10.0.0.1:10911", "10.0.0.1:5000");
        assert_eq!(new.raft_endpoint(), "10.0.0.1:5000");
        let round_trip: BrokerNode = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(round_trip, new);
    }
}

impl std::fmt::Display for BrokerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (raft {})", self.addr, self.raft_endpoint())
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for a broker group. Standard (one leader per
    /// term) leader ids, so a log id is exactly the record header's (term, index).
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = BrokerNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Builds a log id from the record header's (term, index).
pub fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId::new(openraft::alias::CommittedLeaderIdOf::<TypeConfig>::new(term), index)
}

/// The term of a log id (std mode: the committed leader id is the term).
pub fn term_of(id: &LogId) -> u64 {
    *id.leader_id
}

/// When `append` reports entries flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// After `fdatasync` of every record in the batch (the default): an acknowledged
    /// message is on a majority's disk.
    #[default]
    Sync,
    /// Right after the write reaches the page cache; the fsync follows in the
    /// background. Survives process crashes, not power loss of a majority.
    Async,
}

/// Storage settings of one replica (the `[store]` table of a broker's settings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// Segment files roll when the next record would exceed this many bytes.
    pub segment_bytes: u64,
    pub flush: FlushMode,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes: 128 * 1024 * 1024,
            flush: FlushMode::Sync,
        }
    }
}

impl StoreConfig {
    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self) -> Result<(), Error> {
        const MIN: u64 = 64 * 1024;
        const MAX: u64 = 1 << 30;
        if !(MIN..=MAX).contains(&self.segment_bytes) {
            return Err(Error::Config {
                key: "segment_bytes",
                value: self.segment_bytes.to_string(),
                reason: format!("must be between {MIN} and {MAX} bytes"),
            });
        }
        Ok(())
    }
}

/// openraft settings that the storage design depends on: openraft must never build
/// snapshots or purge the log on its own, because the log is the data.
pub fn recommended_raft_config(cluster_name: &str) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        ..Default::default()
    }
}

/// raft-store's error type for opening stores and reading data outside openraft's
/// traits (which speak `io::Error`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("RocksDB {action} in {path}: {source}")]
    Rocks {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("invalid storage setting {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { action, path, source }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io { source, action, path } => {
                io::Error::new(source.kind(), format!("{action} {}: {source}", path.display()))
            }
            other => io::Error::other(other.to_string()),
        }
    }
}

/// Opens a replica's log and state machine under `dir` (`dir/log`, `dir/sm`).
pub async fn open(dir: impl Into<PathBuf>, config: StoreConfig) -> Result<(CommitLog, StateMachine), Error> {
    config.validate()?;
    let dir = dir.into();
    let log = CommitLog::open(dir.join("log"), &config).await?;
    let sm = StateMachine::open(dir.join("sm"), log.reader(), &config).await?;
    Ok((log, sm))
}
