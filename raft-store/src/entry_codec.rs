//! What a CommitLog record's payload holds for an openraft entry: a kind byte, then
//! the command (normal), nothing (blank) or the membership as JSON (rare, small).
//! The (term, index) live in the record header, not here.

use std::io;

use bytes::{Buf, Bytes};
use openraft::EntryPayload;

use crate::command::Command;
use crate::record::Header;
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
