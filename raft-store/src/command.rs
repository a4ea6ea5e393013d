//! Typed Raft commands (what a normal log entry carries), their responses, and the
//! compact versioned binary encoding stored in CommitLog records.
//!
//! Encoding: a version byte, a command tag, then fields; lengths and counts are
//! LEB128 varints, timestamps and offsets fixed-width little-endian. Decoding from
//! `Bytes` slices message bodies out of the read buffer instead of copying them.
//! Validation of names and sizes belongs to the broker's edge; this module only
//! refuses bytes it cannot parse, with an error that says what was wrong.

use std::io;

use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};

/// Version of the command encoding written by this build. Version 2 added a
/// message's delivery time, version 3 an append's producer id and sequence,
/// version 4 an append's transaction (half message); entries of earlier
/// versions still decode.
pub const COMMAND_VERSION: u8 = 4;

/// RocketMQ's permission bits, kept so configs read the same to its users.
pub const PERM_READ: u8 = 4;
pub const PERM_WRITE: u8 = 2;

/// One message as stored: everything but the topic and queue, which its batch names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Empty when the producer set no tag.
    pub tag: String,
    pub keys: Vec<String>,
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
    /// The producer's clock when it created the message (ms since the epoch).
    pub born_timestamp_ms: u64,
    /// Delayed delivery (ms since the epoch); 0 = immediate. A message due after
    /// its batch's store time gets a timer instead of a ConsumeQueue row.
    #[serde(default)]
    pub deliver_at_ms: u64,
}

/// Where a stored message is and what its ConsumeQueue row needs, so that moving
/// it to another queue (a due timer, a retry, the dead-letter queue) writes a row
/// pointing at the same record instead of copying the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRef {
    pub raft_index: u64,
    pub batch_pos: u32,
    pub size: u32,
    pub tag_hash: u64,
}

/// A timer's key: due time, then the index of the entry that created it and a
/// slot within that entry (unique together, so two timers never collide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimerKey {
    pub due_ms: u64,
    pub created_index: u64,
    pub slot: u32,
}

/// One message queue's share of a POP receive, as the leader decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopPick {
    pub queue_id: u32,
    /// The queue's hand-out cursor the leader read; the new offsets apply only if
    /// it is still the cursor (else a concurrent receive took them first).
    pub from_cursor: u64,
    /// The cursor after this receive: offsets in `[from_cursor, to_cursor)` not in
    /// `new` were filtered out, and count as consumed by the group.
    pub to_cursor: u64,
    pub new: Vec<u64>,
    /// In-flight messages whose invisible time passed: `(offset, epoch)` as read.
    pub redeliver: Vec<(u64, u64)>,
    /// Expired messages past the group's max reconsume times: to the DLQ.
    pub dead: Vec<(u64, u64, MessageRef)>,
}

/// A consumer group's replicated settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerGroupConfig {
    pub name: String,
    /// POP: one delivery at a time per queue, in order.
    pub fifo: bool,
    pub max_reconsume_times: u32,
    /// The n-th retry waits the n-th delay; the last repeats.
    pub retry_delays_ms: Vec<u64>,
}

/// Messages for one message queue, appended as one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    pub topic: String,
    pub queue_id: u32,
    /// Stamped by the leader before proposing, so every replica stores the same time.
    pub store_timestamp_ms: u64,
    pub messages: Vec<Message>,
    /// An idempotent producer's id and this send's sequence number: a retry with
    /// the same pair is answered from the first attempt instead of stored again.
    #[serde(default)]
    pub producer: Option<ProducerSeq>,
    /// A transactional send: its one message is a half message, stored but
    /// invisible until an [`Command::EndTransactions`] commits it.
    #[serde(default)]
    pub transaction: Option<HalfSpec>,
}

/// What the state machine keeps for a half message's check-backs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfSpec {
    /// The producers asked about the outcome.
    pub producer_group: String,
    /// When the leader first checks (ms since the epoch), as it decided.
    pub first_check_ms: u64,
}

/// A transaction's id: the entry and batch position of its half message (what
/// its message id names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId {
    pub raft_index: u64,
    pub batch_pos: u32,
}

/// Who ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnEndSource {
    /// The producer that sent it.
    Client,
    /// A producer answering a check-back.
    Check,
    /// The leader, after the maximum checks went unanswered (always a rollback).
    Exhausted,
}

/// How one [`Command::EndTransactions`] item came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnEndOutcome {
    /// Committed (with where the message landed; `None` when its topic or queue
    /// is gone) or rolled back by this entry.
    Ended { queue_id: u32, queue_offset: Option<u64> },
    /// Ended earlier; `committed` says how.
    AlreadyEnded { committed: bool, source: TxnEndSource },
    /// Not pending and not remembered.
    Unknown,
}
/// Who sent an append, and which of its sends it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSeq {
    pub producer_id: String,
    pub sequence: u64,
}

/// A topic's replicated config. Stored as JSON (the state machine's topic rows,
/// and so snapshots) and carried by [`Command::UpsertTopic`] as JSON, so a field
/// added with `#[serde(default)]` reads from records written before it existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    /// Message queues this broker group serves for the topic.
    pub queues: u32,
    /// `PERM_READ | PERM_WRITE` bits.
    pub perm: u8,
    /// Which messages the topic accepts (RocketMQ 5's topic message type).
    /// Topics stored before the field existed accepted every kind, so a missing
    /// field reads as [`TopicMessageType::Mixed`].
    #[serde(default)]
    pub message_type: TopicMessageType,
    /// Message trace: messages sent while it is on have their life recorded in
    /// the trace topic (the broker's `trace` module). Left out of the JSON when
    /// off, so an untraced topic's rows read as they did before the field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trace: bool,
}

/// RocketMQ 5's topic message type: which kind of message a topic accepts. The
/// RocketMQ 5 gateway reports it in routes (`accept_message_types`) and refuses
/// sends of another kind; raftmq's own API stores whatever it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TopicMessageType {
    /// Every kind. The default: what topics stored before types existed, and
    /// auto-created topics, accept.
    #[default]
    Mixed,
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl TopicMessageType {
    /// Every type: MIXED, then the others in the order the proto numbers them.
    pub const ALL: [TopicMessageType; 5] = [
        TopicMessageType::Mixed,
        TopicMessageType::Normal,
        TopicMessageType::Fifo,
        TopicMessageType::Delay,
        TopicMessageType::Transaction,
    ];

    /// Whether a topic of this type accepts a message of kind `kind`: a MIXED
    /// topic accepts every kind, any other only its own.
    pub fn accepts(self, kind: TopicMessageType) -> bool {
        self == TopicMessageType::Mixed || self == kind
    }

    /// RocketMQ's name for the type ("MIXED", "NORMAL", "FIFO", "DELAY", "TRANSACTION").
    pub fn name(self) -> &'static str {
        match self {
            TopicMessageType::Mixed => "MIXED",
            TopicMessageType::Normal => "NORMAL",
            TopicMessageType::Fifo => "FIFO",
            TopicMessageType::Delay => "DELAY",
            TopicMessageType::Transaction => "TRANSACTION",
        }
    }
}

impl std::fmt::Display for TopicMessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One consumer group's progress in one message queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOffset {
    pub topic: String,
    pub queue_id: u32,
    pub offset: u64,
}

/// What a normal Raft entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Append(AppendBatch),
    /// Create the topic, or replace its config.
    UpsertTopic(TopicConfig),
    DeleteTopic {
        name: String,
    },
    /// Offsets go through Raft so a failover never rewinds a consumer group.
    CommitOffsets {
        group: String,
        offsets: Vec<QueueOffset>,
    },
    /// Makes due timers' messages visible. A key that is no longer pending (fired
    /// by an earlier entry, e.g. a previous leader's) is skipped: every timer fires
    /// exactly once whoever proposes it and however often.
    FireTimers {
        store_timestamp_ms: u64,
        timers: Vec<TimerKey>,
    },
    /// A push consumer's failed message: a timer into `%RETRY%<group>` due at
    /// `due_ms`, or (`due_ms` = 0) a row in `%DLQ%<group>` now.
    SendBack {
        group: String,
        message: MessageRef,
        /// The count the redelivered message will carry.
        reconsume_times: u32,
        due_ms: u64,
        store_timestamp_ms: u64,
    },
    /// Hands out messages of one topic to a POP consumer group.
    PopReceive {
        group: String,
        topic: String,
        /// The leader's clock; deadlines are `now_ms + invisible_ms`.
        now_ms: u64,
        invisible_ms: u64,
        picks: Vec<PopPick>,
    },
    /// Acks handed-out messages, each named by `(queue, offset, epoch)`.
    PopAck {
        group: String,
        topic: String,
        acks: Vec<(u32, u64, u64)>,
    },
    /// New deadline for one in-flight message; its epoch becomes this entry's index.
    PopChangeInvisible {
        group: String,
        topic: String,
        queue_id: u32,
        offset: u64,
        epoch: u64,
        deadline_ms: u64,
    },
    /// Moves one in-flight message to `%DLQ%<group>` now.
    PopDeadLetter {
        group: String,
        topic: String,
        queue_id: u32,
        offset: u64,
        epoch: u64,
        message: MessageRef,
        store_timestamp_ms: u64,
    },
    UpsertConsumerGroup(ConsumerGroupConfig),
    /// Commits or rolls back pending half messages.
    EndTransactions {
        ends: Vec<(TxnId, bool)>,
        source: TxnEndSource,
        store_timestamp_ms: u64,
    },
    /// The leader checked these transactions (once more each); the next check
    /// is due at `next_check_ms`.
    TransactionsChecked {
        ids: Vec<TxnId>,
        next_check_ms: u64,
    },
    /// Retention: every message stored by an entry at index <= `upto` is gone
    /// (the leader decided the horizon from whole segments). Each replica drops
    /// the ConsumeQueue rows, timers, POP and transaction state referring to them
    /// and records the horizon; freeing the disk follows off the apply path. A
    /// horizon at or below the current one changes nothing.
    Retain {
        upto: u64,
        /// Why the leader moved the horizon (time, size, disk), for logs.
        #[serde(default)]
        reason: String,
    },
    /// Creates or replaces a user of the ACL (see `acl.rs`).
    PutUser(crate::acl::User),
    /// Deletes a user and every rule of theirs.
    DeleteUser {
        access_key: String,
    },
    /// Creates or replaces a user's rule for one resource pattern.
    PutAclRule(crate::acl::AclRule),
    DeleteAclRule {
        access_key: String,
        kind: crate::acl::ResourceKind,
        pattern: String,
    },
}

/// The state machine's answer to one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    Empty,
    Appended {
        queue_id: u32,
        /// Queue offset of the batch's first message; the rest follow contiguously.
        first_offset: u64,
        count: u32,
    },
    TopicUpserted,
    TopicDeleted {
        existed: bool,
    },
    OffsetsCommitted,
    /// A retried append of an idempotent producer: what the first attempt
    /// stored (at entry `raft_index`); nothing was stored this time.
    Duplicate {
        raft_index: u64,
        queue_id: u32,
        first_offset: u64,
        count: u32,
        scheduled: bool,
        half: bool,
    },
    /// A transactional append: its message is stored as a pending half message.
    HalfStored {
        count: u32,
    },
    /// Per end in request order.
    TransactionsEnded {
        outcomes: Vec<TxnEndOutcome>,
    },
    /// The checks counted: each still-pending id with its check count now.
    TransactionsChecked {
        checked: Vec<(TxnId, u32)>,
    },
    /// An append whose messages are all delayed: stored, with a timer each.
    Scheduled {
        count: u32,
    },
    TimersFired {
        fired: u32,
    },
    SentBack {
        dead_lettered: bool,
    },
    /// The picks the state machine accepted, each `(queue, offset, attempt)`;
    /// their epoch is the entry's index.
    Popped {
        accepted: Vec<(u32, u64, u32)>,
    },
    /// Per ack in request order: whether it named the current delivery.
    PopAcked {
        ok: Vec<bool>,
    },
    /// Whether the handle named the current delivery (else nothing changed).
    PopChanged {
        ok: bool,
    },
    ConsumerGroupUpserted,
    /// A user or rule was put or deleted; `existed`: it was there before.
    AclChanged {
        existed: bool,
    },
    /// The retention horizon after a [`Command::Retain`]; `advanced` is false
    /// when it was already at or past `upto`.
    Retained {
        horizon: u64,
        advanced: bool,
    },
    /// The command was valid when proposed but not when applied (e.g. its topic was
    /// deleted in between). Every replica refuses it the same way.
    Rejected {
        reason: String,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append(b) => write!(
                f,
                "append {} message(s) to {}/{}",
                b.messages.len(),
                b.topic,
                b.queue_id
            ),
            Command::UpsertTopic(t) => write!(
                f,
                "upsert topic {} ({} queues, perm {}, type {}{})",
                t.name,
                t.queues,
                t.perm,
                t.message_type,
                if t.trace { ", traced" } else { "" }
            ),
            Command::DeleteTopic { name } => write!(f, "delete topic {name}"),
            Command::CommitOffsets { group, offsets } => {
                write!(f, "commit {} offset(s) of group {group}", offsets.len())
            }
            Command::FireTimers { timers, .. } => write!(f, "fire {} timer(s)", timers.len()),
            Command::SendBack {
                group, reconsume_times, ..
            } => write!(f, "send back a message of group {group} (reconsume {reconsume_times})"),
            Command::PopReceive {
                group, topic, picks, ..
            } => {
                write!(f, "POP receive for group {group} on {topic} ({} queue(s))", picks.len())
            }
            Command::PopAck { group, acks, .. } => write!(f, "POP ack of {} message(s) of group {group}", acks.len()),
            Command::PopChangeInvisible { group, .. } => write!(f, "POP change invisible time (group {group})"),
            Command::PopDeadLetter { group, .. } => write!(f, "POP dead-letter a message of group {group}"),
            Command::UpsertConsumerGroup(c) => write!(f, "upsert consumer group {}", c.name),
            Command::EndTransactions { ends, source, .. } => {
                write!(f, "end {} transaction(s) ({source:?})", ends.len())
            }
            Command::TransactionsChecked { ids, .. } => write!(f, "count a check of {} transaction(s)", ids.len()),
            Command::Retain { upto, reason } => write!(f, "retain entries after index {upto} ({reason})"),
            // Never the secret.
            Command::PutUser(u) => write!(f, "put user {} (admin {})", u.access_key, u.admin),
            Command::DeleteUser { access_key } => write!(f, "delete user {access_key}"),
            Command::PutAclRule(r) => write!(f, "put ACL rule of {} on {} {}", r.access_key, r.kind, r.pattern),
            Command::DeleteAclRule {
                access_key,
                kind,
                pattern,
            } => write!(f, "delete ACL rule of {access_key} on {kind} {pattern}"),
        }
    }
}

impl Command {
    /// The leader's clock stamped into the command, if it carries one: what
    /// time-based retention reads as a record's store time.
    pub fn store_time_ms(&self) -> Option<u64> {
        match self {
            Command::Append(b) => Some(b.store_timestamp_ms),
            Command::FireTimers { store_timestamp_ms, .. }
            | Command::SendBack { store_timestamp_ms, .. }
            | Command::PopDeadLetter { store_timestamp_ms, .. }
            | Command::EndTransactions { store_timestamp_ms, .. } => Some(*store_timestamp_ms),
            Command::PopReceive { now_ms, .. } => Some(*now_ms),
            _ => None,
        }
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

const TAG_APPEND: u8 = 1;
/// Topic upserts were hand-framed (name, queue count, permission) until topics
/// got a message type; they are now written with [`TAG_JSON`], and entries with
/// this tag still decode, as topics of type [`TopicMessageType::Mixed`] (what
/// every topic accepted then). An older build reads the JSON upserts too, but
/// drops the type it has no field for: in a group of mixed builds, such a
/// replica keeps the topic MIXED until it is upgraded and the topic set again.
const TAG_UPSERT_TOPIC: u8 = 2;
const TAG_DELETE_TOPIC: u8 = 3;
const TAG_COMMIT_OFFSETS: u8 = 4;
/// Message-lifecycle commands (timers, POP, retry, group configs), retention
/// and topic upserts are small and rare next to appends; they are encoded as JSON after the
/// tag rather than hand-framed, so adding a field cannot misframe one (and a
/// field added with `#[serde(default)]` needs no new encoding version).
const TAG_JSON: u8 = 5;

impl Command {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u8(COMMAND_VERSION);
        match self {
            Command::Append(b) => {
                out.put_u8(TAG_APPEND);
                put_str(out, &b.topic);
                put_varint(out, u64::from(b.queue_id));
                out.put_u64_le(b.store_timestamp_ms);
                match &b.producer {
                    Some(p) => {
                        out.put_u8(1);
                        put_str(out, &p.producer_id);
                        put_varint(out, p.sequence);
                    }
                    None => out.put_u8(0),
                }
                match &b.transaction {
                    Some(t) => {
                        out.put_u8(1);
                        put_str(out, &t.producer_group);
                        put_varint(out, t.first_check_ms);
                    }
                    None => out.put_u8(0),
                }
                put_varint(out, b.messages.len() as u64);
                for m in &b.messages {
                    put_str(out, &m.tag);
                    put_varint(out, m.keys.len() as u64);
                    for k in &m.keys {
                        put_str(out, k);
                    }
                    put_varint(out, m.properties.len() as u64);
                    for (k, v) in &m.properties {
                        put_str(out, k);
                        put_str(out, v);
                    }
                    out.put_u64_le(m.born_timestamp_ms);
                    put_varint(out, m.deliver_at_ms);
                    put_varint(out, m.body.len() as u64);
                    out.put_slice(&m.body);
                }
            }
            Command::DeleteTopic { name } => {
                out.put_u8(TAG_DELETE_TOPIC);
                put_str(out, name);
            }
            Command::CommitOffsets { group, offsets } => {
                out.put_u8(TAG_COMMIT_OFFSETS);
                put_str(out, group);
                put_varint(out, offsets.len() as u64);
                for o in offsets {
                    put_str(out, &o.topic);
                    put_varint(out, u64::from(o.queue_id));
                    out.put_u64_le(o.offset);
                }
            }
            other => {
                out.put_u8(TAG_JSON);
                // Serializing plain structs of strings and integers cannot fail.
                serde_json::to_writer(&mut *out, other).expect("command serializes to JSON");
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes a command; message bodies share `buf`'s memory.
    pub fn decode(mut buf: Bytes) -> io::Result<Command> {
        let r = &mut buf;
        let version = get_u8(r, "command version")?;
        if !(1..=COMMAND_VERSION).contains(&version) {
            return Err(invalid(format_args!(
                "command encoding version {version} is not supported (this build reads {COMMAND_VERSION})"
            )));
        }
        let cmd = match get_u8(r, "command tag")? {
            TAG_APPEND => {
                let topic = get_str(r, "topic")?;
                let queue_id = get_u32(r, "queue id")?;
                let store_timestamp_ms = get_u64_le(r, "store timestamp")?;
                let producer = if version >= 3 {
                    match get_u8(r, "producer flag")? {
                        0 => None,
                        1 => Some(ProducerSeq {
                            producer_id: get_str(r, "producer id")?,
                            sequence: get_varint(r, "sequence")?,
                        }),
                        other => return Err(invalid(format_args!("producer flag {other} is not 0 or 1"))),
                    }
                } else {
                    None
                };
                let transaction = if version >= 4 {
                    match get_u8(r, "transaction flag")? {
                        0 => None,
                        1 => Some(HalfSpec {
                            producer_group: get_str(r, "producer group")?,
                            first_check_ms: get_varint(r, "first check time")?,
                        }),
                        other => return Err(invalid(format_args!("transaction flag {other} is not 0 or 1"))),
                    }
                } else {
                    None
                };
                let n = get_count(r, "message count")?;
                let mut messages = Vec::with_capacity(n);
                for _ in 0..n {
                    let tag = get_str(r, "tag")?;
                    let nk = get_count(r, "key count")?;
                    let keys = (0..nk).map(|_| get_str(r, "key")).collect::<io::Result<_>>()?;
                    let np = get_count(r, "property count")?;
                    let properties = (0..np)
                        .map(|_| Ok((get_str(r, "property name")?, get_str(r, "property value")?)))
                        .collect::<io::Result<_>>()?;
                    let born_timestamp_ms = get_u64_le(r, "born timestamp")?;
                    let deliver_at_ms = if version >= 2 {
                        get_varint(r, "delivery time")?
                    } else {
                        0
                    };
                    let body = get_bytes(r, "body")?;
                    messages.push(Message {
                        tag,
                        keys,
                        properties,
                        body,
                        born_timestamp_ms,
                        deliver_at_ms,
                    });
                }
                Command::Append(AppendBatch {
                    topic,
                    queue_id,
                    store_timestamp_ms,
                    messages,
                    producer,
                    transaction,
                })
            }
            // Written by builds before topic message types (see the tag).
            TAG_UPSERT_TOPIC => Command::UpsertTopic(TopicConfig {
                name: get_str(r, "topic name")?,
                queues: get_u32(r, "queue count")?,
                perm: get_u8(r, "permission")?,
                message_type: TopicMessageType::Mixed,
                trace: false,
            }),
            TAG_DELETE_TOPIC => Command::DeleteTopic {
                name: get_str(r, "topic name")?,
            },
            TAG_COMMIT_OFFSETS => {
                let group = get_str(r, "group")?;
                let n = get_count(r, "offset count")?;
                let mut offsets = Vec::with_capacity(n);
                for _ in 0..n {
                    offsets.push(QueueOffset {
                        topic: get_str(r, "topic")?,
                        queue_id: get_u32(r, "queue id")?,
                        offset: get_u64_le(r, "offset")?,
                    });
                }
                Command::CommitOffsets { group, offsets }
            }
            TAG_JSON => {
                let cmd: Command = serde_json::from_slice(r.chunk())
                    .map_err(|e| invalid(format_args!("lifecycle command JSON: {e}")))?;
                if matches!(cmd, Command::Append(_)) {
                    return Err(invalid(format_args!("an append must use the binary framing")));
                }
                r.advance(r.remaining());
                cmd
            }
            other => return Err(invalid(format_args!("unknown command tag {other}"))),
        };
        if buf.has_remaining() {
            return Err(invalid(format_args!(
                "{} trailing bytes after command",
                buf.remaining()
            )));
        }
        Ok(cmd)
    }
}

/// Stable hash of a tag for ConsumeQueue rows (0 for no tag), so the broker can
/// filter without reading message bodies.
pub fn tag_hash(tag: &str) -> u64 {
    if tag.is_empty() {
        0
    } else {
        u64::from(crc32c::crc32c(tag.as_bytes())) | 1 << 32
    }
}

fn invalid(what: std::fmt::Arguments<'_>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("undecodable command: {what}"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.put_slice(s.as_bytes());
}

fn get_u8(r: &mut Bytes, what: &str) -> io::Result<u8> {
    if r.has_remaining() {
        Ok(r.get_u8())
    } else {
        Err(invalid(format_args!("truncated before {what}")))
    }
}

fn get_u64_le(r: &mut Bytes, what: &str) -> io::Result<u64> {
    if r.remaining() >= 8 {
        Ok(r.get_u64_le())
    } else {
        Err(invalid(format_args!("truncated in {what}")))
    }
}

fn get_varint(r: &mut Bytes, what: &str) -> io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = get_u8(r, what)?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(invalid(format_args!("varint too long in {what}")))
}

fn get_u32(r: &mut Bytes, what: &str) -> io::Result<u32> {
    u32::try_from(get_varint(r, what)?).map_err(|_| invalid(format_args!("{what} exceeds u32")))
}

/// A count that cannot exceed the bytes left (each item takes at least one byte),
/// so a corrupt count cannot make us allocate without bound.
fn get_count(r: &mut Bytes, what: &str) -> io::Result<usize> {
    let n = get_varint(r, what)?;
    if n > r.remaining() as u64 {
        return Err(invalid(format_args!(
            "{what} {n} exceeds the {} bytes left",
            r.remaining()
        )));
    }
    Ok(n as usize)
}

fn get_bytes(r: &mut Bytes, what: &str) -> io::Result<Bytes> {
    let n = get_varint(r, what)?;
    if n > r.remaining() as u64 {
        return Err(invalid(format_args!(
            "{what} length {n} exceeds the {} bytes left",
            r.remaining()
        )));
    }
    Ok(r.split_to(n as usize))
}

fn get_str(r: &mut Bytes, what: &str) -> io::Result<String> {
    let b = get_bytes(r, what)?;
    String::from_utf8(b.to_vec()).map_err(|_| invalid(format_args!("{what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            "[a-zA-Z]{0,8}",
            proptest::collection::vec("[a-z0-9]{1,12}", 0..3),
            proptest::collection::vec(("[a-z]{1,6}", ".{0,10}"), 0..3),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<u64>(),
            prop_oneof![Just(0u64), any::<u64>()],
        )
            .prop_map(|(tag, keys, properties, body, born, deliver_at_ms)| Message {
                tag,
                keys,
                properties,
                body: Bytes::from(body),
                born_timestamp_ms: born,
                deliver_at_ms,
            })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (
                "[a-zA-Z0-9_%|-]{1,20}",
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(arb_message(), 0..5),
                proptest::option::of(("[a-z0-9]{1,16}", any::<u64>())),
                proptest::option::of(("[a-z0-9]{1,16}", any::<u64>()))
            )
                .prop_map(
                    |(topic, queue_id, ts, messages, producer, txn)| Command::Append(AppendBatch {
                        topic,
                        queue_id,
                        store_timestamp_ms: ts,
                        messages,
                        producer: producer.map(|(producer_id, sequence)| ProducerSeq { producer_id, sequence }),
                        transaction: txn.map(|(producer_group, first_check_ms)| HalfSpec {
                            producer_group,
                            first_check_ms
                        }),
                    })
                ),
            (
                "[a-z]{1,10}",
                any::<u32>(),
                any::<u8>(),
                proptest::sample::select(&TopicMessageType::ALL[..])
            )
                .prop_map(|(name, queues, perm, message_type)| Command::UpsertTopic(TopicConfig {
                    name,
                    queues,
                    perm,
                    message_type,
                    trace: queues % 2 == 0,
                })),
            "[a-z]{1,10}".prop_map(|name| Command::DeleteTopic { name }),
            (
                "[a-z]{1,10}",
                proptest::collection::vec(("[a-z]{1,5}", any::<u32>(), any::<u64>()), 0..4)
            )
                .prop_map(|(group, o)| Command::CommitOffsets {
                    group,
                    offsets: o
                        .into_iter()
                        .map(|(topic, queue_id, offset)| QueueOffset {
                            topic,
                            queue_id,
                            offset
                        })
                        .collect()
                }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u32>()), 0..4)
            )
                .prop_map(|(ts, t)| Command::FireTimers {
                    store_timestamp_ms: ts,
                    timers: t
                        .into_iter()
                        .map(|(due_ms, created_index, slot)| TimerKey {
                            due_ms,
                            created_index,
                            slot
                        })
                        .collect()
                }),
            (
                "[a-z]{1,10}",
                "[a-z]{1,5}",
                proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..4)
            )
                .prop_map(|(group, topic, acks)| Command::PopAck { group, topic, acks }),
            (
                proptest::collection::vec((any::<u64>(), any::<u32>(), any::<bool>()), 0..4),
                any::<u64>()
            )
                .prop_map(|(ends, ts)| Command::EndTransactions {
                    ends: ends
                        .into_iter()
                        .map(|(raft_index, batch_pos, commit)| (TxnId { raft_index, batch_pos }, commit))
                        .collect(),
                    source: TxnEndSource::Check,
                    store_timestamp_ms: ts,
                }),
        ]
    }

    proptest! {
        #[test]
        fn command_round_trips(cmd in arb_command()) {
            let bytes = Bytes::from(cmd.encode());
            prop_assert_eq!(Command::decode(bytes).unwrap(), cmd);
        }

        #[test]
        fn truncated_command_is_an_error_not_a_panic(cmd in arb_command(), cut in any::<prop::sample::Index>()) {
            let bytes = cmd.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(Command::decode(Bytes::copy_from_slice(&bytes[..cut])).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Command::decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn version_1_entries_still_decode() {
        // A v1 append (written before delivery times existed): no delivery-time field.
        let mut v1 = vec![1, TAG_APPEND];
        put_str(&mut v1, "T");
        put_varint(&mut v1, 2);
        v1.put_u64_le(7);
        put_varint(&mut v1, 1);
        put_str(&mut v1, "tag");
        put_varint(&mut v1, 0);
        put_varint(&mut v1, 0);
        v1.put_u64_le(9);
        put_str(&mut v1, "body");
        let Command::Append(b) = Command::decode(Bytes::from(v1)).unwrap() else {
            panic!("not an append")
        };
        assert_eq!((b.queue_id, b.messages[0].deliver_at_ms), (2, 0));
        assert_eq!(&b.messages[0].body[..], b"body");
    }

    #[test]
    fn hand_framed_topic_upserts_of_older_builds_decode_as_mixed() {
        // How builds before topic message types wrote an upsert (versions 1 to 4).
        for version in 1..=4u8 {
            let mut old = vec![version, TAG_UPSERT_TOPIC];
            put_str(&mut old, "orders");
            put_varint(&mut old, 8);
            old.put_u8(PERM_READ | PERM_WRITE);
            assert_eq!(
                Command::decode(Bytes::from(old)).unwrap(),
                Command::UpsertTopic(TopicConfig {
                    name: "orders".into(),
                    queues: 8,
                    perm: PERM_READ | PERM_WRITE,
                    message_type: TopicMessageType::Mixed,
                    trace: false,
                })
            );
        }
    }

    #[test]
    fn a_topic_config_stored_without_a_message_type_decodes_as_mixed() {
        // A topic row (and so a snapshot row) written before message types existed.
        let old: TopicConfig = serde_json::from_str(r#"{"name":"orders","queues":4,"perm":6}"#).unwrap();
        assert_eq!(old.message_type, TopicMessageType::Mixed);
        assert_eq!((old.name.as_str(), old.queues, old.perm), ("orders", 4, 6));
        // And a JSON-framed upsert without the field.
        let mut entry = vec![COMMAND_VERSION, TAG_JSON];
        entry.extend_from_slice(br#"{"UpsertTopic":{"name":"orders","queues":4,"perm":6}}"#);
        let Command::UpsertTopic(t) = Command::decode(Bytes::from(entry)).unwrap() else {
            panic!("not a topic upsert")
        };
        assert_eq!(t.message_type, TopicMessageType::Mixed);
        // A typed config survives the round trip.
        let fifo = TopicConfig {
            message_type: TopicMessageType::Fifo,
            ..old
        };
        let back: TopicConfig = serde_json::from_slice(&serde_json::to_vec(&fifo).unwrap()).unwrap();
        assert_eq!(back, fifo);
    }

    #[test]
    fn an_untraced_topic_is_stored_as_before_and_a_traced_one_round_trips() {
        let old: TopicConfig = serde_json::from_str(r#"{"name":"orders","queues":4,"perm":6}"#).unwrap();
        assert!(!old.trace);
        // Off: the row is what builds before traces wrote.
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("trace"), "{json}");
        let traced = TopicConfig { trace: true, ..old };
        let back: TopicConfig = serde_json::from_slice(&serde_json::to_vec(&traced).unwrap()).unwrap();
        assert!(back.trace);
        let cmd = Command::UpsertTopic(traced);
        assert_eq!(Command::decode(Bytes::from(cmd.encode())).unwrap(), cmd);
    }

    #[test]
    fn mixed_accepts_every_type_and_the_others_only_their_own() {
        for t in TopicMessageType::ALL {
            assert!(TopicMessageType::Mixed.accepts(t));
            for kind in TopicMessageType::ALL {
                if t != TopicMessageType::Mixed {
                    assert_eq!(t.accepts(kind), t == kind, "{t} accepts {kind}");
                }
            }
        }
        let names: Vec<_> = TopicMessageType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["MIXED", "NORMAL", "FIFO", "DELAY", "TRANSACTION"]);
    }

    #[test]
    fn retain_round_trips_and_an_old_form_without_reason_decodes() {
        let cmd = Command::Retain {
            upto: 4096,
            reason: "size".into(),
        };
        assert_eq!(Command::decode(Bytes::from(cmd.encode())).unwrap(), cmd);
        let mut entry = vec![COMMAND_VERSION, TAG_JSON];
        entry.extend_from_slice(br#"{"Retain":{"upto":7}}"#);
        assert_eq!(
            Command::decode(Bytes::from(entry)).unwrap(),
            Command::Retain {
                upto: 7,
                reason: String::new()
            }
        );
        assert_eq!(cmd.store_time_ms(), None);
    }

    #[test]
    fn unknown_version_is_named() {
        let err = Command::decode(Bytes::from_static(&[9, 1])).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
