//! RocketMQ 5 messages to and from raftmq's own: what a SendMessage stores, and
//! what a delivered message carries back to the SDK.
//!
//! What RocketMQ 5 keeps in system properties and raftmq has no field for is
//! stored as message properties under RocketMQ's own names, so a RocketMQ user
//! looking at a raw message recognises them: `UNIQ_KEY` (the id the SDK made;
//! SDKs compare ids, so the same id must come back on delivery), `__SHARDINGKEY`
//! (the FIFO message group) and `TRAN_MSG` (sent in a transaction). They are
//! taken out of the user properties again on delivery.

use std::collections::HashMap;
use std::time::Duration;

use prost_types::Timestamp;
use raftmq_proto::rocketmq::v2;
use raftmq_proto::v1 as pb;
use raftmq_raft_store::TopicMessageType;
use v2::Code;

pub const PROPERTY_MESSAGE_ID: &str = "UNIQ_KEY";
pub const PROPERTY_MESSAGE_GROUP: &str = "__SHARDINGKEY";
pub const PROPERTY_TRANSACTION: &str = "TRAN_MSG";
/// Set only for bodies the SDK compressed (the Java SDK gzips large ones): they
/// are stored as sent and delivered with the same encoding.
pub const PROPERTY_BODY_ENCODING: &str = "RMQ5_BODY_ENCODING";
const RESERVED: [&str; 4] = [
    PROPERTY_MESSAGE_ID,
    PROPERTY_MESSAGE_GROUP,
    PROPERTY_TRANSACTION,
    PROPERTY_BODY_ENCODING,
];
/// Longest client-made message id accepted (SDKs make 34 characters).
const MAX_MESSAGE_ID_LEN: usize = 128;
const MAX_MESSAGE_GROUP_LEN: usize = 128;

/// A refusal with the RocketMQ code that names what was wrong.
pub type Refusal = (Code, String);

/// One message of a SendMessage, checked and converted.
#[derive(Debug)]
pub struct Outgoing {
    pub kind: TopicMessageType,
    pub id: String,
    pub message_group: Option<String>,
    pub message: pb::Message,
}

pub fn kind_name(kind: TopicMessageType) -> &'static str {
    kind.name()
}

pub fn kind_to_v2(kind: TopicMessageType) -> v2::MessageType {
    match kind {
        TopicMessageType::Normal => v2::MessageType::Normal,
        TopicMessageType::Fifo => v2::MessageType::Fifo,
        TopicMessageType::Delay => v2::MessageType::Delay,
        TopicMessageType::Transaction => v2::MessageType::Transaction,
        TopicMessageType::Mixed => v2::MessageType::Unspecified,
    }
}

/// The message types a topic of `kind` accepts, as routes list them.
pub fn accepted(kind: TopicMessageType) -> Vec<i32> {
    match kind {
        TopicMessageType::Mixed => vec![
            v2::MessageType::Normal as i32,
            v2::MessageType::Fifo as i32,
            v2::MessageType::Delay as i32,
            v2::MessageType::Transaction as i32,
        ],
        other => vec![kind_to_v2(other) as i32],
    }
}

pub fn ms_of(t: &Timestamp) -> u64 {
    let ms = i128::from(t.seconds) * 1000 + i128::from(t.nanos) / 1_000_000;
    u64::try_from(ms).unwrap_or(0)
}

pub fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Checks and converts one SDK message. `now_ms` and `max_delay` bound the
/// delivery time as the broker's own send path does.
pub fn outgoing(m: v2::Message, now_ms: u64, max_delay: Duration) -> Result<Outgoing, Refusal> {
    let topic = m.topic.map(|t| t.name).unwrap_or_default();
    let sys = m
        .system_properties
        .ok_or_else(|| (Code::BadRequest, "a message without system_properties".to_owned()))?;
    let id = sys.message_id;
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN || id.contains('\0') {
        return Err((
            Code::IllegalMessageId,
            format!("message_id {id:?} must be 1 to {MAX_MESSAGE_ID_LEN} characters"),
        ));
    }
    let encoding = v2::Encoding::try_from(sys.body_encoding).unwrap_or(v2::Encoding::Unspecified);
    let message_group = sys.message_group.filter(|g| !g.is_empty());
    if let Some(g) = &message_group
        && (g.len() > MAX_MESSAGE_GROUP_LEN || g.contains('\0'))
    {
        return Err((
            Code::IllegalMessageGroup,
            format!(
                "message_group of {} bytes: at most {MAX_MESSAGE_GROUP_LEN}, no NUL",
                g.len()
            ),
        ));
    }
    let deliver_at_ms = sys.delivery_timestamp.as_ref().map_or(0, ms_of);
    let declared = v2::MessageType::try_from(sys.message_type).unwrap_or(v2::MessageType::Unspecified);
    let kind = match declared {
        v2::MessageType::Normal => TopicMessageType::Normal,
        v2::MessageType::Fifo => TopicMessageType::Fifo,
        v2::MessageType::Delay => TopicMessageType::Delay,
        v2::MessageType::Transaction => TopicMessageType::Transaction,
        // An SDK that does not say: what the properties make it.
        _ if message_group.is_some() => TopicMessageType::Fifo,
        _ if deliver_at_ms > 0 => TopicMessageType::Delay,
        _ => TopicMessageType::Normal,
    };
    let conflict = match kind {
        TopicMessageType::Fifo if message_group.is_none() => Some("a FIFO message needs a message_group"),
        TopicMessageType::Delay if deliver_at_ms == 0 => Some("a DELAY message needs a delivery_timestamp"),
        TopicMessageType::Normal if message_group.is_some() || deliver_at_ms > 0 => {
            Some("a NORMAL message carries neither a message_group nor a delivery_timestamp")
        }
        TopicMessageType::Transaction if message_group.is_some() || deliver_at_ms > 0 => {
            Some("a TRANSACTION message carries neither a message_group nor a delivery_timestamp")
        }
        TopicMessageType::Fifo if deliver_at_ms > 0 => Some("a FIFO message cannot be delayed"),
        _ => None,
    };
    if let Some(why) = conflict {
        return Err((Code::MessagePropertyConflictWithType, format!("message {id}: {why}")));
    }
    let deliver_at_ms = if kind == TopicMessageType::Delay {
        let max = now_ms.saturating_add(u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX));
        if deliver_at_ms > max {
            return Err((
                Code::IllegalDeliveryTime,
                format!(
                    "message {id}: delivery_timestamp {deliver_at_ms} ms is more than {} s ahead (max_delay); \
                     RocketMQ 5 SDKs give it in whole seconds since the epoch",
                    max_delay.as_secs()
                ),
            ));
        }
        // Already due: delivered at once, as RocketMQ does.
        if deliver_at_ms <= now_ms { 0 } else { deliver_at_ms }
    } else {
        0
    };
    let mut properties = HashMap::with_capacity(m.user_properties.len() + 2);
    for (k, v) in m.user_properties {
        if RESERVED.contains(&k.as_str()) {
            return Err((
                Code::IllegalMessagePropertyKey,
                format!("message {id}: user property {k:?} is reserved"),
            ));
        }
        properties.insert(k, v);
    }
    properties.insert(PROPERTY_MESSAGE_ID.to_owned(), id.clone());
    if let Some(g) = &message_group {
        properties.insert(PROPERTY_MESSAGE_GROUP.to_owned(), g.clone());
    }
    if kind == TopicMessageType::Transaction {
        properties.insert(PROPERTY_TRANSACTION.to_owned(), "true".to_owned());
    }
    if encoding == v2::Encoding::Gzip {
        properties.insert(PROPERTY_BODY_ENCODING.to_owned(), "GZIP".to_owned());
    }
    Ok(Outgoing {
        kind,
        id,
        message_group,
        message: pb::Message {
            topic,
            tag: sys.tag.unwrap_or_default(),
            keys: sys.keys,
            properties,
            body: m.body,
            born_timestamp_ms: sys.born_timestamp.as_ref().map_or(0, ms_of),
            deliver_at_ms,
            delay_ms: 0,
            delay_level: 0,
        },
    })
}

/// What a delivery adds to a stored message.
pub struct Delivery {
    pub receipt_handle: String,
    pub attempt: u32,
    pub invisible_until_ms: u64,
}

/// A stored message as an SDK receives it (or, without a delivery, as a
/// transaction check-back carries it).
pub fn incoming(
    p: pb::PulledMessage,
    namespace: &str,
    store_host: &str,
    delivery: Option<Delivery>,
    now_ms: u64,
) -> v2::Message {
    let m = p.message.unwrap_or_default();
    let mut props = m.properties;
    let id = props.remove(PROPERTY_MESSAGE_ID).unwrap_or(p.message_id);
    let message_group = props.remove(PROPERTY_MESSAGE_GROUP);
    let transactional = props.remove(PROPERTY_TRANSACTION).is_some();
    let encoding = match props.remove(PROPERTY_BODY_ENCODING).as_deref() {
        Some("GZIP") => v2::Encoding::Gzip,
        _ => v2::Encoding::Identity,
    };
    let kind = if message_group.is_some() {
        v2::MessageType::Fifo
    } else if transactional {
        v2::MessageType::Transaction
    } else if m.deliver_at_ms > 0 {
        v2::MessageType::Delay
    } else {
        v2::MessageType::Normal
    };
    // Python checks the digest; CRC32 (zlib's, upper-case hex) is one it knows.
    let checksum = format!("{:08X}", crc32fast::hash(&m.body));
    let (receipt_handle, delivery_attempt, invisible_duration) = match delivery {
        Some(d) => (
            Some(d.receipt_handle),
            Some(i32::try_from(d.attempt.max(1)).unwrap_or(i32::MAX)),
            Some(prost_types::Duration {
                seconds: (d.invisible_until_ms.saturating_sub(now_ms) / 1000) as i64,
                nanos: ((d.invisible_until_ms.saturating_sub(now_ms) % 1000) * 1_000_000) as i32,
            }),
        ),
        None => (None, None, None),
    };
    v2::Message {
        topic: Some(v2::Resource {
            resource_namespace: namespace.to_owned(),
            name: m.topic,
        }),
        user_properties: props,
        system_properties: Some(v2::SystemProperties {
            tag: (!m.tag.is_empty()).then_some(m.tag),
            keys: m.keys,
            message_id: id,
            body_digest: Some(v2::Digest {
                r#type: v2::DigestType::Crc32 as i32,
                checksum,
            }),
            body_encoding: encoding as i32,
            message_type: kind as i32,
            born_timestamp: Some(timestamp(m.born_timestamp_ms)),
            born_host: String::new(),
            store_timestamp: Some(timestamp(p.store_timestamp_ms)),
            store_host: store_host.to_owned(),
            delivery_timestamp: (m.deliver_at_ms > 0).then(|| timestamp(m.deliver_at_ms)),
            receipt_handle,
            queue_id: i32::try_from(p.queue_id).unwrap_or(i32::MAX),
            queue_offset: Some(i64::try_from(p.queue_offset).unwrap_or(i64::MAX)),
            invisible_duration,
            delivery_attempt,
            message_group,
            ..Default::default()
        }),
        body: m.body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdk_message(kind: v2::MessageType) -> v2::Message {
        v2::Message {
            topic: Some(v2::Resource {
                resource_namespace: String::new(),
                name: "t".into(),
            }),
            user_properties: [("k".to_owned(), "v".to_owned())].into(),
            system_properties: Some(v2::SystemProperties {
                tag: Some("tagA".into()),
                keys: vec!["key1".into()],
                message_id: "01AABBCCDDEEFF00112233445566778899".into(),
                message_type: kind as i32,
                body_encoding: v2::Encoding::Identity as i32,
                born_timestamp: Some(timestamp(1_000)),
                ..Default::default()
            }),
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn a_message_round_trips_with_its_sdk_id_and_a_digest_python_accepts() {
        let out = outgoing(sdk_message(v2::MessageType::Normal), 5_000, Duration::from_secs(60)).expect("valid");
        assert_eq!(out.kind, TopicMessageType::Normal);
        let pulled = pb::PulledMessage {
            message: Some(out.message),
            message_id: "01RAFTMQID".into(),
            queue_id: 2,
            queue_offset: 7,
            store_timestamp_ms: 5_000,
            reconsume_times: 0,
        };
        let delivery = Delivery {
            receipt_handle: "h".into(),
            attempt: 1,
            invisible_until_ms: 35_000,
        };
        let m = incoming(pulled, "", "127.0.0.1:1", Some(delivery), 5_000);
        let sys = m.system_properties.expect("system properties");
        assert_eq!(sys.message_id, "01AABBCCDDEEFF00112233445566778899");
        assert_eq!(m.user_properties, [("k".to_owned(), "v".to_owned())].into());
        assert_eq!(sys.body_encoding, v2::Encoding::Identity as i32);
        assert_eq!(sys.delivery_attempt, Some(1));
        // zlib.crc32(b"hello") == 0x3610A686
        assert_eq!(sys.body_digest.map(|d| d.checksum), Some("3610A686".to_owned()));
        assert_eq!(sys.message_type, v2::MessageType::Normal as i32);
        assert_eq!(sys.tag.as_deref(), Some("tagA"));
    }

    #[test]
    fn python_delivery_times_in_whole_seconds_are_understood_and_bounded() {
        let mut m = sdk_message(v2::MessageType::Delay);
        if let Some(s) = m.system_properties.as_mut() {
            s.delivery_timestamp = Some(Timestamp {
                seconds: 1_010,
                nanos: 0,
            });
        }
        let out = outgoing(m.clone(), 1_000_000, Duration::from_secs(60)).expect("10 s ahead");
        assert_eq!(out.message.deliver_at_ms, 1_010_000);
        let err = outgoing(m, 1_000_000 - 60_000, Duration::from_secs(59)).expect_err("too far");
        assert_eq!(err.0, Code::IllegalDeliveryTime);
    }

    #[test]
    fn types_that_contradict_the_properties_are_refused() {
        let err = outgoing(sdk_message(v2::MessageType::Fifo), 0, Duration::from_secs(1)).expect_err("no group");
        assert_eq!(err.0, Code::MessagePropertyConflictWithType);
        let mut m = sdk_message(v2::MessageType::Normal);
        m.user_properties.insert(PROPERTY_MESSAGE_ID.into(), "x".into());
        let err = outgoing(m, 0, Duration::from_secs(1)).expect_err("reserved");
        assert_eq!(err.0, Code::IllegalMessagePropertyKey);
    }
}
