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

/// Version of the command encoding written by this build.
pub const COMMAND_VERSION: u8 = 1;

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
}

/// Messages for one message queue, appended as one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    pub topic: String,
    pub queue_id: u32,
    /// Stamped by the leader before proposing, so every replica stores the same time.
    pub store_timestamp_ms: u64,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    /// Message queues this broker group serves for the topic.
    pub queues: u32,
    /// `PERM_READ | PERM_WRITE` bits.
    pub perm: u8,
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
            Command::UpsertTopic(t) => write!(f, "upsert topic {} ({} queues, perm {})", t.name, t.queues, t.perm),
            Command::DeleteTopic { name } => write!(f, "delete topic {name}"),
            Command::CommitOffsets { group, offsets } => {
                write!(f, "commit {} offset(s) of group {group}", offsets.len())
            }
        }
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

const TAG_APPEND: u8 = 1;
const TAG_UPSERT_TOPIC: u8 = 2;
const TAG_DELETE_TOPIC: u8 = 3;
const TAG_COMMIT_OFFSETS: u8 = 4;

impl Command {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u8(COMMAND_VERSION);
        match self {
            Command::Append(b) => {
                out.put_u8(TAG_APPEND);
                put_str(out, &b.topic);
                put_varint(out, u64::from(b.queue_id));
                out.put_u64_le(b.store_timestamp_ms);
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
                    put_varint(out, m.body.len() as u64);
                    out.put_slice(&m.body);
                }
            }
            Command::UpsertTopic(t) => {
                out.put_u8(TAG_UPSERT_TOPIC);
                put_str(out, &t.name);
                put_varint(out, u64::from(t.queues));
                out.put_u8(t.perm);
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
        if version != COMMAND_VERSION {
            return Err(invalid(format_args!(
                "command encoding version {version} is not supported (this build reads {COMMAND_VERSION})"
            )));
        }
        let cmd = match get_u8(r, "command tag")? {
            TAG_APPEND => {
                let topic = get_str(r, "topic")?;
                let queue_id = get_u32(r, "queue id")?;
                let store_timestamp_ms = get_u64_le(r, "store timestamp")?;
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
                    let body = get_bytes(r, "body")?;
                    messages.push(Message {
                        tag,
                        keys,
                        properties,
                        body,
                        born_timestamp_ms,
                    });
                }
                Command::Append(AppendBatch {
                    topic,
                    queue_id,
                    store_timestamp_ms,
                    messages,
                })
            }
            TAG_UPSERT_TOPIC => Command::UpsertTopic(TopicConfig {
                name: get_str(r, "topic name")?,
                queues: get_u32(r, "queue count")?,
                perm: get_u8(r, "permission")?,
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
        )
            .prop_map(|(tag, keys, properties, body, born)| Message {
                tag,
                keys,
                properties,
                body: Bytes::from(body),
                born_timestamp_ms: born,
            })
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (
                "[a-zA-Z0-9_%|-]{1,20}",
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(arb_message(), 0..5)
            )
                .prop_map(|(topic, queue_id, ts, messages)| Command::Append(AppendBatch {
                    topic,
                    queue_id,
                    store_timestamp_ms: ts,
                    messages
                })),
            ("[a-z]{1,10}", any::<u32>(), any::<u8>())
                .prop_map(|(name, queues, perm)| Command::UpsertTopic(TopicConfig { name, queues, perm })),
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
    fn unknown_version_is_named() {
        let err = Command::decode(Bytes::from_static(&[9, 1])).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
