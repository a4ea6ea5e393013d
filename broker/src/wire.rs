//! Conversions between the `raftmq.raft.v1` wire messages and openraft's types,
//! used by both the client ([`crate::network`]) and the server
//! ([`crate::service`]): JSON for control data, checksummed CommitLog records for
//! entries. Decoding validates what openraft would otherwise assert on, so a bad
//! or hostile peer gets an error, never a panic.

use bytes::Bytes;
use openraft::raft::AppendEntriesRequest;
use raftmq_proto::raft::v1 as pb;
use raftmq_raft_store::entry_codec::{decode_record, encode_record};
use raftmq_raft_store::{LogId, SnapshotMeta, TypeConfig, Vote, term_of};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A wire message that could not be turned into openraft's form.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct WireError {
    pub what: &'static str,
    pub reason: String,
}

impl WireError {
    fn new(what: &'static str, reason: impl ToString) -> Self {
        WireError {
            what,
            reason: reason.to_string(),
        }
    }
}

/// The control part of an AppendEntries request.
#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
}

/// The first chunk of a snapshot stream.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote,
    pub meta: SnapshotMeta,
}

pub fn to_json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, WireError> {
    serde_json::to_vec(value).map_err(|e| WireError::new(what, e))
}

pub fn from_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::new(what, e))
}

pub fn encode_append(
    group: &str,
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<pb::AppendEntriesRequest, WireError> {
    let header = to_json(
        "append header",
        &AppendHeader {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
        },
    )?;
    let entries = rpc
        .entries
        .iter()
        .map(|e| encode_record(e).map_err(|err| WireError::new("entry", err)))
        .collect::<Result<_, _>>()?;
    Ok(pb::AppendEntriesRequest {
        broker_group: group.to_owned(),
        header,
        entries,
    })
}

/// Decodes and checks an AppendEntries request: every record's checksum, and that
/// the entries directly follow `prev_log_id` with no gap and no term above the
/// sender's vote (openraft assumes both of a well-behaved leader).
pub fn decode_append(req: pb::AppendEntriesRequest) -> Result<AppendEntriesRequest<TypeConfig>, WireError> {
    let header: AppendHeader = from_json("append header", &req.header)?;
    let vote_term = header.vote.leader_id.term;
    let mut expected = header.prev_log_id.map_or(0, |p| p.index + 1);
    let mut last_term = header.prev_log_id.as_ref().map_or(0, term_of);
    let mut entries = Vec::with_capacity(req.entries.len());
    for bytes in req.entries {
        let entry = decode_record(Bytes::from(bytes)).map_err(|e| WireError::new("entry", e))?;
        let (term, index) = (term_of(&entry.log_id), entry.log_id.index);
        if index != expected {
            return Err(WireError::new(
                "entries",
                format!("entry index {index} where {expected} was expected"),
            ));
        }
        if term < last_term || term > vote_term {
            return Err(WireError::new(
                "entries",
                format!("entry {index} has term {term}, outside {last_term}..={vote_term}"),
            ));
        }
        entries.push(entry);
        expected = index + 1;
        last_term = term;
    }
    Ok(AppendEntriesRequest {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        entries,
        leader_commit: header.leader_commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::EntryPayload;
    use raftmq_raft_store::{Command, Entry, TopicConfig, log_id};

    fn vote(term: u64) -> Vote {
        openraft::impls::Vote::new_committed(term, 1)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Command::UpsertTopic(TopicConfig {
                name: format!("t{index}"),
                queues: 1,
                perm: 6,
                message_type: Default::default(),
                trace: false,
            })),
        }
    }

    fn request(prev: Option<LogId>, entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: vote(3),
            prev_log_id: prev,
            entries,
            leader_commit: Some(log_id(2, 4)),
        }
    }

    #[test]
    fn append_round_trips() {
        let rpc = request(Some(log_id(2, 4)), vec![entry(2, 5), entry(3, 6)]);
        let back = decode_append(encode_append("g", &rpc).unwrap()).unwrap();
        assert_eq!(back.vote, rpc.vote);
        assert_eq!(back.prev_log_id, rpc.prev_log_id);
        assert_eq!(back.leader_commit, rpc.leader_commit);
        assert_eq!(back.entries, rpc.entries);
    }

    #[test]
    fn gaps_terms_and_damage_are_refused() {
        let gap = encode_append("g", &request(Some(log_id(2, 4)), vec![entry(2, 6)])).unwrap();
        assert!(decode_append(gap).unwrap_err().to_string().contains("expected"));
        let future_term = encode_append("g", &request(None, vec![entry(9, 0)])).unwrap();
        assert!(decode_append(future_term).unwrap_err().to_string().contains("term 9"));
        let mut flipped = encode_append("g", &request(None, vec![entry(1, 0)])).unwrap();
        if let Some(b) = flipped.entries[0].last_mut() {
            *b ^= 0x40;
        }
        assert!(decode_append(flipped).is_err());
        let mut garbage = encode_append("g", &request(None, vec![])).unwrap();
        garbage.header = b"{not json".to_vec();
        assert!(decode_append(garbage).is_err());
    }
}
