//! Edge validation of client input: names, sizes, counts. Everything a request can
//! get wrong is checked here before anything is proposed to Raft, so a bad request
//! never leaves part of itself written. Checks that need the replicated state
//! (does the topic exist, is the queue id in range) live with the handlers.

use std::time::Duration;

use raftmq_proto::v1 as pb;

use crate::api_error::ApiError;
use crate::config::MessagingConfig;

/// RocketMQ's limit on topic names.
pub const MAX_TOPIC_LEN: usize = 127;
/// Most queues a topic may have on one broker group.
pub const MAX_QUEUES: u32 = 1024;
/// Longest tag or key; RocketMQ keeps them short because they are indexed.
pub const MAX_TAG_LEN: usize = 255;
pub const MAX_KEY_LEN: usize = 255;
/// Most keys on one message.
pub const MAX_KEYS: usize = 32;

/// RocketMQ's topic rule: 1..=127 characters of `[%|a-zA-Z0-9_-]`.
pub fn topic_name(name: &str) -> Result<(), ApiError> {
    rocketmq_name("topic", name, MAX_TOPIC_LEN)
}

/// Longest consumer group name (RocketMQ's limit).
pub const MAX_CONSUMER_GROUP_LEN: usize = 255;
/// Longest consumer client id.
pub const MAX_CLIENT_ID_LEN: usize = 255;

/// Consumer groups follow the topic character rule, up to 255 characters. The
/// rule also keeps NUL out, which the offset index uses as a separator.
pub fn consumer_group_name(name: &str) -> Result<(), ApiError> {
    rocketmq_name("consumer group", name, MAX_CONSUMER_GROUP_LEN)
}

/// Producer groups follow the consumer-group rule.
pub fn producer_group_name(name: &str) -> Result<(), ApiError> {
    rocketmq_name("producer group", name, MAX_CONSUMER_GROUP_LEN)
}

/// A member's id: 1..=255 printable ASCII characters (host, pid, anything).
pub fn client_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "client_id is {} characters; 1 to {MAX_CLIENT_ID_LEN} are allowed",
            id.len()
        )));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ApiError::InvalidArgument(format!(
            "client_id {id:?} contains {c:?}; only printable ASCII without spaces is allowed"
        )));
    }
    Ok(())
}

fn rocketmq_name(kind: &str, name: &str, max_len: usize) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{kind} name is empty")));
    }
    if name.len() > max_len {
        return Err(ApiError::InvalidArgument(format!(
            "{kind} name is {} characters; at most {max_len} are allowed",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '_' | '-')))
    {
        return Err(ApiError::InvalidArgument(format!(
            "{kind} name {name:?} contains {c:?}; only [%|a-zA-Z0-9_-] are allowed"
        )));
    }
    Ok(())
}

/// Queue count of a topic being created or updated.
pub fn queue_count(queues: u32) -> Result<(), ApiError> {
    if (1..=MAX_QUEUES).contains(&queues) {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "queues_per_group {queues} is out of range 1..={MAX_QUEUES}"
        )))
    }
}

/// A tag is one token of a tag expression, so it may not contain the
/// expression's separator or whitespace.
fn tag(i: usize, tag: &str) -> Result<(), ApiError> {
    if tag.len() > MAX_TAG_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "message {i}: tag is {} bytes; at most {MAX_TAG_LEN} are allowed",
            tag.len()
        )));
    }
    if tag.contains("||") || tag.chars().any(|c| c.is_whitespace() || c.is_control()) || tag == "*" {
        return Err(ApiError::InvalidArgument(format!(
            "message {i}: tag {tag:?} may not be \"*\" or contain \"||\", whitespace or control characters"
        )));
    }
    Ok(())
}

fn keys(i: usize, keys: &[String]) -> Result<(), ApiError> {
    if keys.len() > MAX_KEYS {
        return Err(ApiError::InvalidArgument(format!(
            "message {i}: {} keys; at most {MAX_KEYS} are allowed",
            keys.len()
        )));
    }
    for k in keys {
        if k.is_empty() || k.len() > MAX_KEY_LEN || k.chars().any(|c| c.is_control()) {
            return Err(ApiError::InvalidArgument(format!(
                "message {i}: key {k:?} must be 1..={MAX_KEY_LEN} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// Checks a Send request against the limits; the topic's existence and the
/// queue id's range are checked by the caller against the replicated state.
pub fn send_request(req: &pb::SendRequest, limits: &MessagingConfig) -> Result<(), ApiError> {
    topic_name(&req.topic)?;
    if req.producer_id.len() > raftmq_raft_store::dedup::MAX_PRODUCER_ID_LEN || req.producer_id.contains('\0') {
        return Err(ApiError::InvalidArgument(format!(
            "producer_id of {} bytes: at most {} bytes, no NUL",
            req.producer_id.len(),
            raftmq_raft_store::dedup::MAX_PRODUCER_ID_LEN
        )));
    }
    if req.messages.is_empty() {
        return Err(ApiError::InvalidArgument("send request carries no messages".into()));
    }
    if req.transactional {
        producer_group_name(&req.producer_group)?;
        if req.messages.len() != 1 {
            return Err(ApiError::InvalidArgument(format!(
                "a transactional send carries exactly one message, not {}",
                req.messages.len()
            )));
        }
        let m = &req.messages[0];
        if m.deliver_at_ms != 0 || m.delay_ms != 0 || m.delay_level != 0 {
            return Err(ApiError::InvalidArgument(
                "a transactional message cannot be delayed (deliver_at_ms, delay_ms and delay_level must be 0)".into(),
            ));
        }
    } else if !req.producer_group.is_empty() {
        producer_group_name(&req.producer_group)?;
    }
    if req.messages.len() > limits.max_batch_messages {
        return Err(ApiError::ResourceExhausted(format!(
            "batch of {} messages exceeds the limit of {}",
            req.messages.len(),
            limits.max_batch_messages
        )));
    }
    let mut total = 0usize;
    for (i, m) in req.messages.iter().enumerate() {
        if !m.topic.is_empty() && m.topic != req.topic {
            return Err(ApiError::InvalidArgument(format!(
                "message {i}: topic {:?} differs from the request's topic {:?}; a batch is for one topic",
                m.topic, req.topic
            )));
        }
        if m.body.is_empty() {
            return Err(ApiError::InvalidArgument(format!("message {i}: body is empty")));
        }
        if m.body.len() > limits.max_body_bytes {
            return Err(ApiError::ResourceExhausted(format!(
                "message {i}: body of {} bytes exceeds the limit of {} bytes",
                m.body.len(),
                limits.max_body_bytes
            )));
        }
        tag(i, &m.tag)?;
        keys(i, &m.keys)?;
        let props: usize = m.properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + m.tag.len()
            + m.keys.iter().map(String::len).sum::<usize>();
        if props > limits.max_properties_bytes {
            return Err(ApiError::ResourceExhausted(format!(
                "message {i}: properties, tag and keys total {props} bytes, over the limit of {} bytes",
                limits.max_properties_bytes
            )));
        }
        if let Some(k) = m.properties.keys().find(|k| k.is_empty()) {
            return Err(ApiError::InvalidArgument(format!(
                "message {i}: property name {k:?} is empty"
            )));
        }
        total += m.body.len();
    }
    if total > limits.max_batch_bytes {
        return Err(ApiError::ResourceExhausted(format!(
            "batch bodies total {total} bytes, over the limit of {} bytes",
            limits.max_batch_bytes
        )));
    }
    Ok(())
}

/// RocketMQ's 18 delay levels, in ms.
pub const DELAY_LEVELS_MS: [u64; 18] = [
    1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 180_000, 240_000, 300_000, 360_000, 420_000, 480_000, 540_000,
    600_000, 1_200_000, 1_800_000, 3_600_000, 7_200_000,
];

/// Resolves each message's delivery time (absolute, relative or a delay level)
/// against `now_ms`: `Some(due)` per message when the batch is delayed, `None`
/// when it is immediate. A time not after `now_ms` delivers at once. Refuses a
/// message setting two of the fields, a level outside 1..18, a time past
/// `max_delay`, and a batch mixing delayed and immediate messages.
pub fn delivery_times(
    messages: &[pb::Message],
    now_ms: u64,
    max_delay: Duration,
) -> Result<Option<Vec<u64>>, ApiError> {
    let max_ms = u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX);
    let mut due = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let set = [m.deliver_at_ms != 0, m.delay_ms != 0, m.delay_level != 0];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(ApiError::InvalidArgument(format!(
                "message {i}: set at most one of deliver_at_ms, delay_ms and delay_level"
            )));
        }
        let at = if m.delay_level != 0 {
            let Some(d) = DELAY_LEVELS_MS.get(m.delay_level as usize - 1) else {
                return Err(ApiError::InvalidArgument(format!(
                    "message {i}: delay_level {} is not one of RocketMQ's levels 1 to 18",
                    m.delay_level
                )));
            };
            now_ms.saturating_add(*d)
        } else if m.delay_ms != 0 {
            if m.delay_ms > max_ms {
                return Err(ApiError::InvalidArgument(format!(
                    "message {i}: delay_ms {} exceeds the broker's maximum delay of {max_ms} ms",
                    m.delay_ms
                )));
            }
            now_ms.saturating_add(m.delay_ms)
        } else {
            m.deliver_at_ms
        };
        if at > now_ms.saturating_add(max_ms) {
            return Err(ApiError::InvalidArgument(format!(
                "message {i}: delivery time {at} is more than the broker's maximum delay of {max_ms} ms after now ({now_ms})"
            )));
        }
        due.push(if at > now_ms { at } else { 0 });
    }
    let delayed = due.iter().filter(|d| **d != 0).count();
    if delayed == 0 {
        return Ok(None);
    }
    if delayed != due.len() {
        return Err(ApiError::InvalidArgument(format!(
            "{delayed} of the batch's {} messages are delayed: a batch is either all delayed or all immediate",
            due.len()
        )));
    }
    Ok(Some(due))
}

/// A parsed tag expression: `None` accepts every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagFilter(Option<Vec<String>>);

impl TagFilter {
    /// `""` or `"*"` = all; otherwise `TagA || TagB` (whitespace around tags ignored).
    pub fn parse(expr: &str) -> Result<TagFilter, ApiError> {
        let expr = expr.trim();
        if expr.is_empty() || expr == "*" {
            return Ok(TagFilter(None));
        }
        let tags: Vec<String> = expr.split("||").map(|t| t.trim().to_owned()).collect();
        if tags.iter().any(|t| t.is_empty() || t == "*") {
            return Err(ApiError::InvalidArgument(format!(
                "tag expression {expr:?} is not \"*\" or \"TagA || TagB\""
            )));
        }
        Ok(TagFilter(Some(tags)))
    }

    /// The ConsumeQueue tag hashes that can match (`None`: every tag matches).
    pub fn tag_hashes(&self) -> Option<Vec<u64>> {
        self.0
            .as_ref()
            .map(|tags| tags.iter().map(|t| raftmq_raft_store::command::tag_hash(t)).collect())
    }

    pub fn matches(&self, tag: &str) -> bool {
        self.0.as_ref().is_none_or(|tags| tags.iter().any(|t| t == tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &[u8]) -> pb::Message {
        pb::Message {
            body: body.to_vec(),
            ..Default::default()
        }
    }

    fn req(messages: Vec<pb::Message>) -> pb::SendRequest {
        pb::SendRequest {
            topic: "T".into(),
            queue_id: None,
            messages,
            ..Default::default()
        }
    }

    #[test]
    fn topic_names_follow_rocketmq() {
        topic_name("Order_Topic-1%RETRY|x").unwrap();
        assert!(topic_name("").is_err());
        assert!(topic_name(&"a".repeat(128)).is_err());
        topic_name(&"a".repeat(127)).unwrap();
        let err = topic_name("a b").unwrap_err().to_string();
        assert!(err.contains("' '"), "{err}");
        assert!(topic_name("a.b").is_err());
    }

    #[test]
    fn send_limits_name_the_offending_message() {
        let limits = MessagingConfig {
            max_body_bytes: 10,
            ..Default::default()
        };
        send_request(&req(vec![msg(b"ok")]), &limits).unwrap();
        let err = send_request(&req(vec![msg(b"ok"), msg(b"")]), &limits).unwrap_err();
        assert!(
            matches!(&err, ApiError::InvalidArgument(m) if m.contains("message 1")),
            "{err}"
        );
        let err = send_request(&req(vec![msg(&[0; 11])]), &limits).unwrap_err();
        assert!(matches!(err, ApiError::ResourceExhausted(_)));
        assert!(send_request(&req(vec![]), &limits).is_err());
        let mut m = msg(b"x");
        m.topic = "other".into();
        assert!(send_request(&req(vec![m]), &limits).is_err());
        let mut m = msg(b"x");
        m.tag = "a||b".into();
        assert!(send_request(&req(vec![m]), &limits).is_err());
    }

    #[test]
    fn tag_expressions() {
        assert!(TagFilter::parse("*").unwrap().matches("x"));
        assert!(TagFilter::parse("").unwrap().matches(""));
        let f = TagFilter::parse("TagA || TagB").unwrap();
        assert!(f.matches("TagA") && f.matches("TagB"));
        assert!(!f.matches("TagC") && !f.matches(""));
        assert!(TagFilter::parse("TagA ||").is_err());
    }
}
