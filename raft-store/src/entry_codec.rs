//! What a CommitLog record's payload holds for an openraft entry: a kind byte, then
//! the command (normal), nothing (blank) or the membership as JSON (rare, small).
//! The (term, index) live in the record header, not here. Also the whole-record form
//! (header + payload, checksummed) that Raft RPCs carry between replicas.

use std::io;

use bytes::{Buf, Bytes};
use openraft::EntryPayload;

use crate::command::Command;
use crate::record::{self, Decoded, Header};
use crate::{Entry, log_id};

const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

/// Appends `entry`'s payload encoding to `out`.
pub fn encode_payload(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    match &entry.payload {
        EntryPayload::Blank => out.push(KIND_BLANK),
        EntryPayload::Normal(cmd) => {
            out.push(KIND_NORMAL);
            cmd.encode_into(out);
        }
        EntryPayload::Membership(m) => {
            out.push(KIND_MEMBERSHIP);
            serde_json::to_writer(&mut *out, m).map_err(io::Error::other)?;
        }
    }
    Ok(())
}

/// Rebuilds the entry stored in a record whose checksum already held.
pub fn decode_entry(header: &Header, mut payload: Bytes) -> io::Result<Entry> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("entry {} (term {}): {what}", header.index, header.term),
        )
    };
    if !payload.has_remaining() {
        return Err(bad("empty payload".into()));
    }
    let payload = match payload.get_u8() {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(Command::decode(payload).map_err(|e| bad(e.to_string()))?),
        KIND_MEMBERSHIP => {
            EntryPayload::Membership(serde_json::from_slice(&payload).map_err(|e| bad(format!("membership: {e}")))?)
        }
        other => return Err(bad(format!("unknown entry kind {other}"))),
    };
    Ok(Entry {
        log_id: log_id(header.term, header.index),
        payload,
    })
}

/// The command in a record's payload, if it is a normal entry; `None` for blank
/// and membership entries. Used by the message read path, which needs no `Entry`.
pub fn decode_command(header: &Header, payload: Bytes) -> io::Result<Option<Command>> {
    match decode_entry(header, payload)?.payload {
        EntryPayload::Normal(cmd) => Ok(Some(cmd)),
        _ => Ok(None),
    }
}

/// Encodes `entry` as one framed, checksummed CommitLog record: the form entries
/// travel in between replicas, so a follower verifies what it received.
pub fn encode_record(entry: &Entry) -> io::Result<Vec<u8>> {
    let mut payload = Vec::new();
    encode_payload(entry, &mut payload)?;
    if payload.len() > record::MAX_PAYLOAD_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "entry {} has {} bytes, over the record limit",
                entry.log_id.index,
                payload.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(record::HEADER_LEN + payload.len());
    record::encode_into(&mut out, crate::term_of(&entry.log_id), entry.log_id.index, &payload);
    Ok(out)
}

/// Decodes a record made by [`encode_record`], verifying its checksum.
pub fn decode_record(bytes: Bytes) -> io::Result<Entry> {
    match record::decode(&bytes) {
        Decoded::Record { header, payload } => {
            if record::HEADER_LEN + payload.len() != bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "entry record {} has {} trailing bytes",
                        header.index,
                        bytes.len() - record::HEADER_LEN - payload.len()
                    ),
                ));
            }
            decode_entry(&header, bytes.slice(record::HEADER_LEN..))
        }
        Decoded::Incomplete => Err(io::Error::new(io::ErrorKind::InvalidData, "entry record is truncated")),
        Decoded::Corrupt { header } => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("entry record {} fails its checksum", header.index),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AppendBatch, Command, Message};
    use crate::log_id;

    #[test]
    fn record_round_trips_and_rejects_damage() {
        let entry = Entry {
            log_id: log_id(3, 42),
            payload: EntryPayload::Normal(Command::Append(AppendBatch {
                topic: "t".into(),
                queue_id: 1,
                store_timestamp_ms: 5,
                messages: vec![Message {
                    tag: "a".into(),
                    keys: vec!["k".into()],
                    properties: vec![],
                    body: Bytes::from_static(b"hello"),
                    born_timestamp_ms: 1,
                    deliver_at_ms: 0,
                }],
                producer: None,
                transaction: None,
            })),
        };
        let bytes = encode_record(&entry).unwrap();
        assert_eq!(decode_record(Bytes::from(bytes.clone())).unwrap(), entry);
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode_record(Bytes::from(bad)).is_err());
        assert!(decode_record(Bytes::copy_from_slice(&bytes[..bytes.len() - 1])).is_err());
    }
}
