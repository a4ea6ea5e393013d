//! Conversions between the `raftmq.v1` wire types and raft-store's domain types,
//! and the message id format. Kept in one module so the services only speak
//! domain types.
//!
//! # Message ids
//!
//! 34 upper-case hex characters, the length RocketMQ 5 clients expect:
//! `01` (format version) | crc32c of the broker group name (8) | Raft index of
//! the entry (16) | position of the message in its batch (8). A Raft index is
//! never reused for a committed entry, so within a group the id is unique
//! forever; the group hash separates groups (two group names whose crc32c
//! collide would need renaming; the admin tooling can check that). The id is
//! computed, not stored, so a follower derives the same id from its
//! ConsumeQueue row.

use raftmq_proto::v1 as pb;
use raftmq_raft_store::command::{PERM_READ, PERM_WRITE};
use raftmq_raft_store::{Message, StoredMessage, TopicConfig, TopicMessageType};

use crate::api_error::ApiError;

/// Builds a message id (see the module docs).
pub fn message_id(group: &str, raft_index: u64, batch_pos: u32) -> String {
    format!(
        "01{:08X}{raft_index:016X}{batch_pos:08X}",
        crc32c::crc32c(group.as_bytes())
    )
}

/// What a message id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId {
    pub group_crc: u32,
    pub raft_index: u64,
    pub batch_pos: u32,
}

/// Parses an id made by [`message_id`]; the error says what is wrong with it.
pub fn parse_message_id(id: &str) -> Result<MessageId, ApiError> {
    let bad = |why: &str| ApiError::InvalidArgument(format!("message id {id:?} {why}"));
    if id.len() != 34 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("is not 34 hexadecimal characters"));
    }
    if &id[..2] != "01" {
        return Err(bad("has an unknown format version (this build reads 01)"));
    }
    let hex = |r: std::ops::Range<usize>| u64::from_str_radix(&id[r], 16).map_err(|_| bad("is not hexadecimal"));
    Ok(MessageId {
        group_crc: hex(2..10)? as u32,
        raft_index: hex(10..26)?,
        batch_pos: hex(26..34)? as u32,
    })
}

/// Parses an id that broker group `group` must have stored: an id of another
/// group is NOT_FOUND here (the id names its group), saying which.
pub fn parse_own_message_id(id: &str, group: &str) -> Result<MessageId, ApiError> {
    let parsed = parse_message_id(id)?;
    let ours = crc32c::crc32c(group.as_bytes());
    if parsed.group_crc != ours {
        return Err(ApiError::NotFound(format!(
            "message id {id} was stored by another broker group (group hash {:08X}, this is {group} with {ours:08X})",
            parsed.group_crc
        )));
    }
    Ok(parsed)
}

/// A validated wire message as stored. Properties are sorted so every replica
/// and every read returns them in the same order.
pub fn message_from_pb(m: pb::Message) -> Message {
    let mut properties: Vec<(String, String)> = m.properties.into_iter().collect();
    properties.sort();
    Message {
        tag: m.tag,
        keys: m.keys,
        properties,
        body: m.body.into(),
        born_timestamp_ms: m.born_timestamp_ms,
        // The edge resolved delay_ms and delay_level into this absolute time.
        deliver_at_ms: m.deliver_at_ms,
    }
}

/// Property naming the topic a retried or dead-lettered message was sent to.
pub const PROPERTY_ORIGIN_TOPIC: &str = "ORIGIN_TOPIC";
pub const PROPERTY_ORIGIN_QUEUE_ID: &str = "ORIGIN_QUEUE_ID";
pub const PROPERTY_ORIGIN_QUEUE_OFFSET: &str = "ORIGIN_QUEUE_OFFSET";
pub const PROPERTY_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";

/// A stored message as consumers see it. A message read from a retry topic or a
/// dead-letter queue keeps its id and shows its original topic, with the
/// `ORIGIN_*` properties saying where it was first stored.
pub fn pulled_message(group: &str, m: StoredMessage) -> pb::PulledMessage {
    let id = message_id(group, m.raft_index, m.batch_pos);
    let mut properties: std::collections::HashMap<String, String> = m.message.properties.into_iter().collect();
    let mut topic = m.topic;
    if let Some(o) = m.origin {
        properties.insert(PROPERTY_ORIGIN_TOPIC.into(), o.topic.clone());
        properties.insert(PROPERTY_ORIGIN_QUEUE_ID.into(), o.queue_id.to_string());
        if let Some(off) = o.queue_offset {
            properties.insert(PROPERTY_ORIGIN_QUEUE_OFFSET.into(), off.to_string());
        }
        properties.insert(PROPERTY_ORIGIN_MESSAGE_ID.into(), id.clone());
        topic = o.topic;
    }
    pb::PulledMessage {
        reconsume_times: m.reconsume_times,
        message_id: id,
        queue_id: m.queue_id,
        queue_offset: m.queue_offset,
        store_timestamp_ms: m.store_timestamp_ms,
        message: Some(pb::Message {
            topic,
            tag: m.message.tag,
            keys: m.message.keys,
            properties,
            body: m.message.body.to_vec(),
            born_timestamp_ms: m.message.born_timestamp_ms,
            deliver_at_ms: m.message.deliver_at_ms,
            ..Default::default()
        }),
    }
}

/// Permission bits from the wire; UNSPECIFIED means read-write, RocketMQ's default.
pub fn perm_from_pb(perm: i32) -> Result<u8, ApiError> {
    match pb::Permission::try_from(perm) {
        Ok(pb::Permission::Unspecified | pb::Permission::ReadWrite) => Ok(PERM_READ | PERM_WRITE),
        Ok(pb::Permission::Read) => Ok(PERM_READ),
        Ok(pb::Permission::Write) => Ok(PERM_WRITE),
        Err(_) => Err(ApiError::InvalidArgument(format!(
            "permission {perm} is not one of READ (4), WRITE (2), READ_WRITE (6)"
        ))),
    }
}

pub fn perm_to_pb(perm: u8) -> pb::Permission {
    match (perm & PERM_READ != 0, perm & PERM_WRITE != 0) {
        (true, true) => pb::Permission::ReadWrite,
        (true, false) => pb::Permission::Read,
        (false, true) => pb::Permission::Write,
        (false, false) => pb::Permission::Unspecified,
    }
}

/// A topic message type from the wire; `None` for UNSPECIFIED, whose meaning
/// depends on the request (see `CreateTopicRequest` in the proto).
pub fn message_type_from_pb(message_type: i32) -> Result<Option<TopicMessageType>, ApiError> {
    match pb::MessageType::try_from(message_type) {
        Ok(pb::MessageType::Unspecified) => Ok(None),
        Ok(pb::MessageType::Normal) => Ok(Some(TopicMessageType::Normal)),
        Ok(pb::MessageType::Fifo) => Ok(Some(TopicMessageType::Fifo)),
        Ok(pb::MessageType::Delay) => Ok(Some(TopicMessageType::Delay)),
        Ok(pb::MessageType::Transaction) => Ok(Some(TopicMessageType::Transaction)),
        Ok(pb::MessageType::Mixed) => Ok(Some(TopicMessageType::Mixed)),
        Err(_) => Err(ApiError::InvalidArgument(format!(
            "message type {message_type} is not one of NORMAL (1), FIFO (2), DELAY (3), TRANSACTION (4), \
             MIXED (5), or UNSPECIFIED (0)"
        ))),
    }
}

pub fn message_type_to_pb(message_type: TopicMessageType) -> pb::MessageType {
    match message_type {
        TopicMessageType::Mixed => pb::MessageType::Mixed,
        TopicMessageType::Normal => pb::MessageType::Normal,
        TopicMessageType::Fifo => pb::MessageType::Fifo,
        TopicMessageType::Delay => pb::MessageType::Delay,
        TopicMessageType::Transaction => pb::MessageType::Transaction,
    }
}

pub fn topic_to_pb(t: TopicConfig) -> pb::TopicConfig {
    pb::TopicConfig {
        name: t.name,
        queues_per_group: t.queues,
        perm: perm_to_pb(t.perm) as i32,
        message_type: message_type_to_pb(t.message_type) as i32,
        trace: Some(t.trace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_34_hex_and_distinct() {
        let a = message_id("broker-a", 7, 0);
        assert_eq!(a.len(), 34);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, message_id("broker-a", 7, 1));
        assert_ne!(a, message_id("broker-b", 7, 0));
        assert_ne!(a, message_id("broker-a", 8, 0));
    }

    #[test]
    fn message_ids_parse_back_and_bad_ones_say_why() {
        let id = parse_message_id(&message_id("broker-a", 0x1234_5678_9abc, 7)).unwrap();
        assert_eq!(id.raft_index, 0x1234_5678_9abc);
        assert_eq!(id.batch_pos, 7);
        assert_eq!(id.group_crc, crc32c::crc32c(b"broker-a"));
        let err = |s: &str| parse_message_id(s).unwrap_err().to_string();
        assert!(err("abc").contains("34 hexadecimal"), "{}", err("abc"));
        assert!(err(&"Z".repeat(34)).contains("34 hexadecimal"));
        assert!(err(&format!("02{}", "0".repeat(32))).contains("format version"));
    }

    #[test]
    fn perm_round_trips() {
        for p in [PERM_READ, PERM_WRITE, PERM_READ | PERM_WRITE] {
            assert_eq!(perm_from_pb(perm_to_pb(p) as i32).unwrap(), p);
        }
        assert!(perm_from_pb(99).is_err());
    }

    #[test]
    fn message_types_round_trip_and_an_unknown_one_is_named() {
        for t in TopicMessageType::ALL {
            assert_eq!(message_type_from_pb(message_type_to_pb(t) as i32).unwrap(), Some(t));
        }
        assert_eq!(message_type_from_pb(0).unwrap(), None);
        let err = message_type_from_pb(42).unwrap_err().to_string();
        assert!(
            err.contains("42") && err.contains("FIFO") && err.contains("MIXED"),
            "{err}"
        );
    }
}
