//! raft-store against real files: openraft's storage suite, crash recovery (torn and
//! corrupt records), restart between log write and apply, truncation and purge
//! across segments, and snapshots that carry retained messages to a new replica.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, StorageError};
use raftmq_raft_store::record::{self, Decoded};
use raftmq_raft_store::{
    AppendBatch, BrokerNode, Command, CommitLog, Entry, Message, QueueOffset, SnapshotData, StateMachine, StoreConfig,
    TopicConfig, TypeConfig, log_id,
};
use tempfile::TempDir;

const TOPIC: &str = "orders";
/// The smallest segment size the config allows, so a few hundred 1 KiB entries span
/// several segments.
const SMALL_SEGMENTS: u64 = 64 * 1024;

fn config(segment_bytes: u64) -> StoreConfig {
    StoreConfig {
        segment_bytes,
        ..StoreConfig::default()
    }
}

fn message(i: u64, body_len: usize) -> Message {
    Message {
        tag: if i.is_multiple_of(2) {
            "even".into()
        } else {
            "odd".into()
        },
        keys: vec![format!("key-{i}")],
        properties: vec![("seq".into(), i.to_string())],
        body: Bytes::from(vec![(i % 251) as u8; body_len]),
        born_timestamp_ms: 1_700_000_000_000 + i,
        deliver_at_ms: 0,
    }
}

fn membership_entry(index: u64) -> Entry {
    let nodes = BTreeMap::from([(1u64, BrokerNode::new("127.0.0.1:1", "127.0.0.1:2"))]);
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(Membership::new(vec![[1u64].into()], nodes).unwrap()),
    }
}

fn normal(term: u64, index: u64, cmd: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn topic_cmd() -> Command {
    Command::UpsertTopic(TopicConfig {
        name: TOPIC.into(),
        queues: 4,
        perm: 6,
        message_type: Default::default(),
        trace: false,
    })
}

/// An append of `per_entry` messages to queue `(index % 4)`, message numbers
/// derived from the entry index so every message is distinct.
fn append_cmd(index: u64, per_entry: u64, body_len: usize) -> Command {
    Command::Append(AppendBatch {
        topic: TOPIC.into(),
        queue_id: (index % 4) as u32,
        store_timestamp_ms: 1_800_000_000_000 + index,
        messages: (0..per_entry).map(|j| message(index * 1000 + j, body_len)).collect(),
        producer: None,
        transaction: None,
    })
}

/// Entries 1..=n: membership, topic, then appends.
fn workload(n: u64, per_entry: u64, body_len: usize) -> Vec<Entry> {
    (1..=n)
        .map(|i| match i {
            1 => membership_entry(1),
            2 => normal(1, 2, topic_cmd()),
            _ => normal(1, i, append_cmd(i, per_entry, body_len)),
        })
        .collect()
}

async fn append(log: &mut CommitLog, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(io::Error::other)?
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> io::Result<()> {
    sm.apply(futures::stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await
}

/// A snapshot of `sm` as it stands, built as openraft's trigger builds one.
async fn build_snapshot(sm: &mut StateMachine) -> openraft::alias::SnapshotOf<TypeConfig, SnapshotData> {
    sm.try_create_snapshot_builder(true)
        .await
        .expect("builder")
        .build_snapshot()
        .await
        .unwrap()
}

async fn open(dir: &Path, segment_bytes: u64) -> (CommitLog, StateMachine) {
    raftmq_raft_store::open(dir, config(segment_bytes))
        .await
        .expect("store opens")
}

/// A closed store holding `workload(n, per_entry, body_len)`, for tests that then
/// damage its files.
async fn written_store(n: u64, per_entry: u64, body_len: usize) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, sm) = open(dir.path(), SMALL_SEGMENTS).await;
    append(&mut log, workload(n, per_entry, body_len)).await.unwrap();
    log.shutdown().await.unwrap();
    drop(sm);
    dir
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("log/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Byte offsets of every record in a segment file.
fn record_offsets(path: &Path) -> Vec<usize> {
    let data = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    while let Decoded::Record { header, .. } = record::decode(&data[pos..]) {
        out.push(pos);
        pos += header.record_len() as usize;
    }
    out
}

fn flip_bit(path: &Path, at: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[at] ^= 0x10;
    std::fs::write(path, data).unwrap();
}

async fn last_log_index(log: &mut CommitLog) -> Option<u64> {
    log.get_log_state().await.unwrap().last_log_id.map(|l| l.index)
}

// ---------------------------------------------------------------- openraft suite

struct Builder;

impl StoreBuilder<TypeConfig, CommitLog, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, CommitLog, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(dir.path(), SMALL_SEGMENTS).await;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_disk() {
    Suite::<TypeConfig, CommitLog, StateMachine, Builder, TempDir>::test_all(Builder)
        .await
        .expect("openraft storage suite");
}

// ---------------------------------------------------------------- recovery

#[tokio::test]
async fn torn_last_record_is_dropped_and_the_log_continues() {
    let dir = written_store(10, 1, 100).await;

    let seg = segment_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let (mut log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    assert_eq!(last_log_index(&mut log).await, Some(9), "torn record 10 is dropped");
    // The next append lands where the torn record was, and reads back intact.
    append(&mut log, vec![normal(1, 10, append_cmd(10, 1, 100))])
        .await
        .unwrap();
    let got = log.get_log_reader().await.try_get_log_entries(1..=10).await.unwrap();
    assert_eq!(got, workload(10, 1, 100));
}

#[tokio::test]
async fn bit_flip_in_last_record_is_treated_as_torn() {
    let dir = written_store(10, 1, 100).await;

    let seg = segment_files(dir.path()).pop().unwrap();
    let last = *record_offsets(&seg).last().unwrap();
    flip_bit(&seg, last + record::HEADER_LEN + 20);

    let (mut log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    assert_eq!(last_log_index(&mut log).await, Some(9));
}

#[tokio::test]
async fn bit_flip_mid_active_segment_refuses_to_open_naming_file_and_offset() {
    let dir = written_store(10, 1, 100).await;

    let seg = segment_files(dir.path()).pop().unwrap();
    let fifth = record_offsets(&seg)[4];
    flip_bit(&seg, fifth + record::HEADER_LEN + 3);

    let err = match raftmq_raft_store::open(dir.path(), config(SMALL_SEGMENTS)).await {
        Ok(_) => panic!("a corrupt record followed by valid ones must not be dropped silently"),
        Err(e) => e.to_string(),
    };
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "error names the file: {err}");
    assert!(
        err.contains(&format!("offset {fifth}")),
        "error names the offset: {err}"
    );
}

#[tokio::test]
async fn bit_flip_in_length_field_mid_segment_is_not_mistaken_for_a_torn_tail() {
    let dir = written_store(10, 1, 100).await;

    let seg = segment_files(dir.path()).pop().unwrap();
    let third = record_offsets(&seg)[2];
    // Bit 29 of the length: the record now claims to run far past the file's end.
    flip_bit(&seg, third + 3);
    assert!(
        raftmq_raft_store::open(dir.path(), config(SMALL_SEGMENTS))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn bit_flip_in_sealed_segment_is_refused_on_read_and_on_rescan() {
    let dir = written_store(300, 1, 1024).await;

    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3, "300 KiB over 64 KiB segments: {segs:?}");
    let sealed = &segs[0];
    let offsets = record_offsets(sealed);
    let victim = offsets[offsets.len() / 2];
    flip_bit(sealed, victim + record::HEADER_LEN + 50);
    let victim_index = (offsets.len() / 2 + 1) as u64;

    // Sealed segments open from their index file without a scan, so the damage is
    // found when the record is read: the read fails, naming file and offset.
    let (log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let mut reader = log.reader();
    let err = reader
        .try_get_log_entries(victim_index..victim_index + 1)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("00000000000000000001.log") && msg.contains(&format!("offset {victim}")),
        "{msg}"
    );
    // Neighbours still read; nothing is skipped silently in a range read either.
    assert_eq!(
        reader.try_get_log_entries(1..victim_index).await.unwrap().len() as u64,
        victim_index - 1
    );
    assert!(reader.try_get_log_entries(1..=300).await.is_err());
    drop((log, _sm));

    // Without the index file the segment is rescanned and opening is refused.
    std::fs::remove_file(sealed.with_extension("idx")).unwrap();
    let err = raftmq_raft_store::open(dir.path(), config(SMALL_SEGMENTS))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains(&format!("offset {victim}")), "{err}");
}

#[tokio::test]
async fn startup_uses_segment_index_files_and_rebuilds_a_bad_one() {
    let dir = written_store(300, 1, 1024).await;
    let entries = workload(300, 1, 1024);
    let segs = segment_files(dir.path());
    for s in &segs[..segs.len() - 1] {
        assert!(s.with_extension("idx").exists(), "sealed segment {s:?} has an index");
    }
    assert!(
        !segs.last().unwrap().with_extension("idx").exists(),
        "active segment has none"
    );
    // A damaged index is ignored and the segment rescanned.
    flip_bit(&segs[1].with_extension("idx"), 5);

    let (log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let got = log.reader().try_get_log_entries(1..=300).await.unwrap();
    assert_eq!(got, entries);
}

// ---------------------------------------------------------------- vote

#[tokio::test]
async fn vote_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, sm) = open(dir.path(), SMALL_SEGMENTS).await;
    append(&mut log, workload(5, 1, 10)).await.unwrap();
    let vote = raftmq_raft_store::Vote::new_committed(7, 3);
    log.save_vote(&vote).await.unwrap();
    log.save_committed(Some(log_id(1, 4))).await.unwrap();
    log.shutdown().await.unwrap();
    drop(sm);

    let (mut log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    assert_eq!(log.get_log_reader().await.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
}

// ---------------------------------------------------------------- truncate / purge

#[tokio::test]
async fn truncation_across_segments_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, sm) = open(dir.path(), SMALL_SEGMENTS).await;
    append(&mut log, workload(300, 1, 1024)).await.unwrap();
    let before = segment_files(dir.path()).len();
    // Keep 1..=30 (inside the first segment): later segments must go.
    log.truncate_after(Some(log_id(1, 30))).await.unwrap();
    assert_eq!(last_log_index(&mut log).await, Some(30));
    assert!(segment_files(dir.path()).len() < before);
    // A new leader's entries replace the truncated suffix.
    let replacement: Vec<Entry> = (31..=40).map(|i| normal(2, i, append_cmd(i, 1, 1024))).collect();
    append(&mut log, replacement.clone()).await.unwrap();
    log.shutdown().await.unwrap();
    drop(sm);

    let (mut log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 40)));
    let got = log.reader().try_get_log_entries(31..=40).await.unwrap();
    assert_eq!(got, replacement);
}

#[tokio::test]
async fn purge_is_logical_and_retention_deletes_whole_segments_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path(), SMALL_SEGMENTS).await;
    append(&mut log, workload(300, 1, 1024)).await.unwrap();
    let segs = segment_files(dir.path());

    log.purge(log_id(1, 150)).await.unwrap();
    // openraft no longer sees purged entries, but nothing was deleted.
    assert_eq!(segment_files(dir.path()), segs);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 150)));
    assert_eq!(state.last_log_id, Some(log_id(1, 300)));
    let visible = log.reader().try_get_log_entries(100..=160).await.unwrap();
    assert_eq!(visible.first().map(|e| e.log_id.index), Some(151));

    // Retention may not go above the purge point, and keeps a straddling segment.
    let removed = log.apply_retention(u64::MAX).await.unwrap();
    assert!(removed >= 1);
    let (first, last) = log.reader().physical_range().unwrap();
    assert!(first <= 151 && first > 1, "first retained index {first}");
    assert_eq!(last, 300);
    assert_eq!(log.reader().try_get_log_entries(151..=300).await.unwrap().len(), 150);
}

// ---------------------------------------------------------------- apply & restart

/// Messages carried by the append entries among `entries`.
fn message_count(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command::Append(b)) => b.messages.len() as u64,
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn restart_between_log_write_and_apply_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let entries = workload(120, 5, 200);
    {
        let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
        append(&mut log, entries.clone()).await.unwrap();
        apply(&mut sm, entries[..70].to_vec()).await.unwrap();
        // Dropped without shutdown: the log holds 120 entries, the state 70.
    }
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let reader = sm.reader();
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 70)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(reader.consume_queue_rows().unwrap(), message_count(&entries[..70]));

    // Re-applying the rest (what openraft does on start-up) completes the state
    // with offsets continuing where they stopped.
    let rest = log.reader().try_get_log_entries(71..=120).await.unwrap();
    apply(&mut sm, rest).await.unwrap();
    assert_eq!(reader.consume_queue_rows().unwrap(), message_count(&entries));
    for q in 0..4u32 {
        let msgs = reader.read_messages(TOPIC, q, 0, 10_000).unwrap();
        assert_eq!(msgs.len() as u64, reader.queue_next_offset(TOPIC, q).unwrap());
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.queue_offset, i as u64, "queue {q} offsets are dense");
        }
    }
    assert_eq!(last_log_index(&mut log).await, Some(120));
}

#[tokio::test]
async fn messages_read_back_by_offset_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(40, 3, 64);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let reader = sm.reader();
    // Entry 7 went to queue 3 with messages 7000..7003.
    let by_key = reader.messages_by_key(TOPIC, "key-7001", 10).unwrap();
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].message, message(7001, 64));
    let q3 = reader.read_messages(TOPIC, 3, 0, 100).unwrap();
    assert_eq!(q3[0].message, message(3000, 64));
    assert_eq!(q3[0].raft_index, 3);
    assert_eq!(q3[3].message, message(7000, 64));
    assert_eq!(q3[3].store_timestamp_ms, 1_800_000_000_007);
    // The key index and a message id's (index, position) both lead to the row a
    // Pull returns, queue offset included.
    assert_eq!(by_key[0], q3[4]);
    assert_eq!(reader.message_at(7, 1).unwrap().as_ref(), Some(&q3[4]));
    assert_eq!(reader.message_at(7, 99).unwrap(), None, "past the batch's end");
    assert_eq!(reader.message_at(10_000, 0).unwrap(), None, "never written");
    // A tag filter on the ConsumeQueue's tag hash returns only that tag and still
    // reports how far it scanned.
    let odd = raftmq_raft_store::command::tag_hash("odd");
    let (odd_msgs, scanned_to) = reader.read_messages_tagged(TOPIC, 3, 0, 6, Some(&[odd])).unwrap();
    assert_eq!(scanned_to, 6);
    assert_eq!(
        odd_msgs.iter().map(|m| m.queue_offset).collect::<Vec<_>>(),
        q3[..6]
            .iter()
            .filter(|m| m.message.tag == "odd")
            .map(|m| m.queue_offset)
            .collect::<Vec<_>>()
    );
    let (none, _) = reader.read_messages_tagged(TOPIC, 3, 0, 6, Some(&[])).unwrap();
    assert!(none.is_empty());
    // A start "from a timestamp" lands on the first message stored at or after it.
    assert_eq!(reader.offset_for_timestamp(TOPIC, 3, 1_800_000_000_005).unwrap(), 3);
    assert_eq!(reader.offset_for_timestamp(TOPIC, 3, 0).unwrap(), 0);
    let end = reader.queue_next_offset(TOPIC, 3).unwrap();
    assert_eq!(reader.offset_for_timestamp(TOPIC, 3, u64::MAX).unwrap(), end);
}

#[tokio::test]
async fn committed_consumer_offsets_list_by_group_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let mut entries = workload(4, 1, 8);
    let commit = |index: u64, group: &str, offsets: &[(u32, u64)]| {
        normal(
            1,
            index,
            Command::CommitOffsets {
                group: group.into(),
                offsets: offsets
                    .iter()
                    .map(|&(queue_id, offset)| QueueOffset {
                        topic: TOPIC.into(),
                        queue_id,
                        offset,
                    })
                    .collect(),
            },
        )
    };
    entries.push(commit(5, "group-b", &[(0, 3), (2, 9)]));
    entries.push(commit(6, "group-a", &[(1, 1)]));
    // A later commit replaces the earlier one (a reset may move it back).
    entries.push(commit(7, "group-b", &[(0, 2)]));
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let reader = sm.reader();
    let row = |g: &str, q: u32, o: u64| (g.to_owned(), TOPIC.to_owned(), q, o);
    assert_eq!(
        reader.consumer_offsets(None).unwrap(),
        vec![row("group-a", 1, 1), row("group-b", 0, 2), row("group-b", 2, 9)]
    );
    assert_eq!(
        reader.consumer_offsets(Some("group-b")).unwrap(),
        vec![row("group-b", 0, 2), row("group-b", 2, 9)]
    );
    // A group whose name is a prefix of another's sees only its own rows.
    assert_eq!(reader.consumer_offsets(Some("group")).unwrap(), vec![]);
    assert_eq!(reader.consumer_offset("group-b", TOPIC, 2).unwrap(), Some(9));
    assert_eq!(reader.consumer_offset("group-b", TOPIC, 3).unwrap(), None);
}

// ---------------------------------------------------------------- snapshots

#[tokio::test]
async fn snapshot_brings_a_new_replica_every_retained_message() {
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(200, 2, 512);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries.clone()).await.unwrap();
    let snap = build_snapshot(&mut sm).await;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 200)));
    let src = sm.reader();

    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    // What openraft does after installing: purge its own log up to the snapshot.
    dlog.purge(log_id(1, 200)).await.unwrap();
    let dst = dsm.reader();
    let assert_same = |dst: &raftmq_raft_store::StoreReader| {
        for q in 0..4 {
            let a = src.read_messages(TOPIC, q, 0, 10_000).unwrap();
            let b = dst.read_messages(TOPIC, q, 0, 10_000).unwrap();
            assert!(!a.is_empty());
            assert_eq!(a, b, "queue {q} matches after install");
        }
    };
    assert_same(&dst);
    assert_eq!(dsm.applied_state().await.unwrap().0, Some(log_id(1, 200)));

    // Replication continues after the snapshot, and both halves stay readable.
    let next: Vec<Entry> = (201..=210).map(|i| normal(1, i, append_cmd(i, 2, 512))).collect();
    append(&mut dlog, next.clone()).await.unwrap();
    apply(&mut dsm, next).await.unwrap();
    let q1 = dst.read_messages(TOPIC, 1, 0, 10_000).unwrap();
    assert_eq!(q1.last().unwrap().raft_index, 209);
    dlog.shutdown().await.unwrap();
    // Every handle on the state must go before the directory is reopened.
    drop((dsm, dst));

    // And after a restart.
    let (_dlog, dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    let dst = dsm.reader();
    let q1_again = dst.read_messages(TOPIC, 1, 0, 10_000).unwrap();
    assert_eq!(q1_again, q1);
    // The re-installed replica can itself serve a snapshot with everything.
    let mut dsm = dsm;
    let again = dsm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("installed snapshot is kept");
    assert_eq!(again.meta.last_log_id, Some(log_id(1, 200)));
    let rebuilt = build_snapshot(&mut dsm).await;
    assert_eq!(rebuilt.meta.last_log_id, Some(log_id(1, 210)));
}

#[tokio::test]
async fn corrupt_snapshot_is_refused_and_leaves_state_alone() {
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(20, 1, 100);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let snap = build_snapshot(&mut sm).await;

    // The wire format, as a leader would stream it, with one bit flipped.
    let staged = tempfile::tempdir().unwrap();
    let path = staged.path().join("stream");
    let mut out = std::fs::File::create(&path).unwrap();
    let len = snap.snapshot.write_wire(&mut out).unwrap() as usize;
    drop(out);
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, len);
    flip_bit(&path, len - 40);

    let dst_dir = tempfile::tempdir().unwrap();
    let (_dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    let file = raftmq_raft_store::SnapshotData::Stream(std::fs::File::open(&path).unwrap());
    assert!(dsm.install_snapshot(&snap.meta, file).await.is_err());
    assert_eq!(dsm.applied_state().await.unwrap().0, None, "nothing was installed");
}

/// The last index of the `n`-th segment file (0-based) of the CommitLog under `dir`.
fn segment_last_index(reader: &raftmq_raft_store::StoreReader, n: usize) -> u64 {
    let log: Vec<_> = reader.segments().into_iter().filter(|s| !s.archive).collect();
    log[n].info.next_index - 1
}

fn retain(index: u64, upto: u64) -> Entry {
    normal(
        1,
        index,
        Command::Retain {
            upto,
            reason: "test".into(),
        },
    )
}

/// Streams `data` in the wire format into a file under `dir`, as a receiver stages it.
fn stream_to_file(data: &raftmq_raft_store::SnapshotData, dir: &Path) -> raftmq_raft_store::SnapshotData {
    let path = dir.join("received");
    let mut out = std::fs::File::create(&path).unwrap();
    data.write_wire(&mut out).unwrap();
    out.sync_all().unwrap();
    raftmq_raft_store::SnapshotData::Stream(std::fs::File::open(&path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_hard_links_the_segments_and_streams_exactly_the_retained_records() {
    use std::os::unix::fs::MetadataExt;
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(300, 2, 512);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let src = sm.reader();
    let horizon = segment_last_index(&src, 1);
    let mut more = vec![retain(301, horizon)];
    more.extend((302..=310).map(|i| normal(1, i, append_cmd(i, 2, 512))));
    append(&mut log, more.clone()).await.unwrap();
    apply(&mut sm, more).await.unwrap();
    // Appended but not applied: the snapshot must stop at 310 inside the
    // segment being written.
    let unapplied: Vec<Entry> = (311..=315).map(|i| normal(1, i, append_cmd(i, 2, 512))).collect();
    append(&mut log, unapplied).await.unwrap();
    assert!(src.segments().len() >= 5, "the log spans many segments");

    let snap = build_snapshot(&mut sm).await;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 310)));
    assert_eq!(src.snapshot_horizon(), horizon);
    let snap_dir = snap
        .snapshot
        .local_dir()
        .expect("a local snapshot directory")
        .to_owned();
    assert!(snap_dir.join("manifest.json").is_file());
    assert!(snap_dir.join("db").is_dir(), "the rows are a RocksDB checkpoint");

    // Every retained segment is linked (same inode), and none wholly at or below
    // the horizon is.
    let seg_dir = src_dir.path().join("log/segments");
    let mut linked = 0;
    for s in src.segments() {
        let name = format!("{:020}.log", s.info.first_index);
        let link = snap_dir.join(format!("log-{name}"));
        if s.info.next_index - 1 <= horizon {
            assert!(!link.exists(), "{name} lies wholly at or below the horizon");
            continue;
        }
        let (a, b) = (
            std::fs::metadata(seg_dir.join(&name)).unwrap(),
            std::fs::metadata(&link).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "{name} is a hard link, not a copy");
        assert_eq!(a.dev(), b.dev());
        assert!(a.nlink() >= 2);
        linked += 1;
    }
    assert!(linked >= 3, "only {linked} segments linked");

    // The wire format installs on a fresh store with exactly (horizon, 310].
    let staged = tempfile::tempdir().unwrap();
    let received = stream_to_file(&snap.snapshot, staged.path());
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, received).await.unwrap();
    dlog.purge(log_id(1, 310)).await.unwrap();
    let dst = dsm.reader();
    let archived: Vec<_> = dst.segments().into_iter().filter(|s| s.archive).collect();
    assert_eq!(archived.first().map(|s| s.info.first_index), Some(horizon + 1));
    assert_eq!(archived.last().map(|s| s.info.next_index), Some(311));
    for q in 0..4 {
        let a = src.read_messages(TOPIC, q, 0, 10_000).unwrap();
        let b = dst.read_messages(TOPIC, q, 0, 10_000).unwrap();
        assert!(a.iter().all(|m| m.raft_index > horizon && m.raft_index <= 310));
        assert!(!a.is_empty());
        assert_eq!(a, b, "queue {q} after install");
    }
    assert_eq!(dst.retention_horizon(), horizon);
    assert_eq!(dst.snapshot_horizon(), horizon);

    // The installed replica serves a snapshot of its own, linking its archive.
    let served = dsm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the installed state has a snapshot");
    assert_eq!(served.meta.last_log_id, Some(log_id(1, 310)));
    let served_dir = served.snapshot.local_dir().expect("a local snapshot").to_owned();
    let archive_link = std::fs::read_dir(&served_dir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name().to_string_lossy().starts_with("archive-"))
        .expect("the archive is linked");
    let name = archive_link.file_name().to_string_lossy()["archive-".len()..].to_owned();
    let state_dir = std::fs::read_dir(dst_dir.path().join("sm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("archive").join(&name).exists())
        .expect("the archive segment");
    assert_eq!(
        archive_link.metadata().unwrap().ino(),
        std::fs::metadata(state_dir.join("archive").join(&name)).unwrap().ino()
    );
    // And what it serves installs again with the same messages.
    let third_dir = tempfile::tempdir().unwrap();
    let (_tlog, mut tsm) = open(third_dir.path(), SMALL_SEGMENTS).await;
    let again = stream_to_file(&served.snapshot, staged.path());
    tsm.install_snapshot(&served.meta, again).await.unwrap();
    for q in 0..4 {
        assert_eq!(
            src.read_messages(TOPIC, q, 0, 10_000).unwrap(),
            tsm.reader().read_messages(TOPIC, q, 0, 10_000).unwrap(),
            "queue {q} after a second hop"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_after_retention_deleted_the_segments_it_links() {
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(300, 2, 512);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let src = sm.reader();
    let before: Vec<_> = (0..4)
        .map(|q| src.read_messages(TOPIC, q, 0, 10_000).unwrap())
        .collect();
    let old = build_snapshot(&mut sm).await;
    let old_dir = old.snapshot.local_dir().unwrap().to_owned();

    // Retention moves past three segments and deletes them.
    let horizon = segment_last_index(&src, 2);
    let gone: Vec<PathBuf> = src
        .segments()
        .iter()
        .filter(|s| s.info.next_index - 1 <= horizon)
        .map(|s| {
            src_dir
                .path()
                .join(format!("log/segments/{:020}.log", s.info.first_index))
        })
        .collect();
    assert_eq!(gone.len(), 3);
    let more = vec![retain(301, horizon)];
    append(&mut log, more.clone()).await.unwrap();
    apply(&mut sm, more).await.unwrap();
    log.purge(log_id(1, 301)).await.unwrap();
    let (deleted, _) = src.free_through(horizon).await.unwrap();
    assert_eq!(deleted, 3);
    assert!(gone.iter().all(|p| !p.exists()), "the segments are deleted");

    // A newer snapshot replaces the old one, which a transfer still holds.
    let newer = build_snapshot(&mut sm).await;
    assert_eq!(newer.meta.last_log_id, Some(log_id(1, 301)));
    assert!(old_dir.exists(), "a snapshot being streamed stays");

    // The old snapshot still streams every record it was built with.
    let staged = tempfile::tempdir().unwrap();
    let received = stream_to_file(&old.snapshot, staged.path());
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&old.meta, received).await.unwrap();
    dlog.purge(log_id(1, 300)).await.unwrap();
    let dst = dsm.reader();
    for (q, want) in before.iter().enumerate() {
        assert_eq!(
            &dst.read_messages(TOPIC, q as u32, 0, 10_000).unwrap(),
            want,
            "queue {q}"
        );
    }
    let archived: Vec<_> = dst.segments().into_iter().filter(|s| s.archive).collect();
    assert_eq!(archived.first().map(|s| s.info.first_index), Some(1));

    // Once the transfer is done the replaced snapshot goes.
    drop(old);
    assert!(!old_dir.exists(), "the replaced snapshot is removed after its last use");
    let left: Vec<_> = std::fs::read_dir(src_dir.path().join("sm/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![newer.snapshot.local_dir().unwrap().to_owned()]);
}

#[tokio::test]
async fn an_interrupted_snapshot_build_is_removed_and_the_complete_one_stays_current() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let entries = workload(50, 1, 100);
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let snap = build_snapshot(&mut sm).await;
    let good = snap.snapshot.local_dir().unwrap().to_owned();
    drop(snap);
    log.shutdown().await.unwrap();
    drop(sm);
    // What crashes leave: a build's temp directory, and (damage) a directory
    // with a later number but no manifest.
    let snaps = dir.path().join("sm/snapshots");
    std::fs::create_dir_all(snaps.join("snap-0000000099.tmp/db")).unwrap();
    std::fs::write(snaps.join("snap-0000000099.tmp/log-x.log"), b"partial").unwrap();
    std::fs::create_dir_all(snaps.join("snap-0000000098-1-50-h0")).unwrap();

    let (_log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let current = sm.get_current_snapshot().await.unwrap().expect("the complete snapshot");
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 50)));
    assert_eq!(current.snapshot.local_dir(), Some(good.as_path()));
    let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(left, vec![good]);
}

// ---------------------------------------------------------------- real Raft

mod single_node {
    use super::*;
    use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
    use openraft::network::RPCOption;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
    use openraft::{Raft, RaftNetworkFactory, RaftNetworkV2};

    /// A one-node group sends no RPCs; any attempt is a bug this makes loud.
    pub struct NoNetwork;

    fn unreachable() -> Unreachable<TypeConfig> {
        Unreachable::new(&io::Error::other("single-node test has no network"))
    }

    impl RaftNetworkV2<TypeConfig> for NoNetwork {
        type SnapshotData = raftmq_raft_store::SnapshotData;

        async fn append_entries(
            &mut self,
            _rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
            Err(RPCError::Unreachable(unreachable()))
        }

        async fn vote(
            &mut self,
            _rpc: VoteRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
            Err(RPCError::Unreachable(unreachable()))
        }

        async fn full_snapshot(
            &mut self,
            _vote: raftmq_raft_store::Vote,
            _snapshot: openraft::alias::SnapshotOf<TypeConfig, raftmq_raft_store::SnapshotData>,
            _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
            _option: RPCOption,
        ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
            Err(StreamingError::Unreachable(unreachable()))
        }
    }

    pub struct NoNetworkFactory;

    impl RaftNetworkFactory<TypeConfig> for NoNetworkFactory {
        type Network = NoNetwork;
        async fn new_client(&mut self, _target: u64, _node: &BrokerNode) -> NoNetwork {
            NoNetwork
        }
    }

    fn raft_config() -> Arc<openraft::Config> {
        let mut c = raftmq_raft_store::recommended_raft_config("test");
        c.election_timeout_min = 150;
        c.election_timeout_max = 300;
        c.heartbeat_interval = 50;
        Arc::new(c.validate().unwrap())
    }

    struct Node {
        raft: Raft<TypeConfig, StateMachine>,
        store: raftmq_raft_store::StoreReader,
        log: raftmq_raft_store::CommitLogReader,
    }

    async fn start(dir: &Path) -> Node {
        let (log, sm) = open(dir, SMALL_SEGMENTS).await;
        let (store, log_reader) = (sm.reader(), log.reader());
        let raft = Raft::new(1, raft_config(), NoNetworkFactory, log, sm).await.unwrap();
        Node {
            raft,
            store,
            log: log_reader,
        }
    }

    /// Runs a node on its own runtime and drops the runtime mid-flight: every task
    /// is cancelled where it stands, with no `raft.shutdown()`, as a crash would.
    fn write_then_abandon(dir: PathBuf) -> u64 {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let acked = rt.block_on(async {
                let raft = start(&dir).await.raft;
                raft.initialize(BTreeMap::from([(1u64, BrokerNode::new("127.0.0.1:1", "127.0.0.1:2"))]))
                    .await
                    .unwrap();
                raft.wait(Some(Duration::from_secs(10)))
                    .current_leader(1, "elected")
                    .await
                    .unwrap();
                raft.client_write(topic_cmd()).await.unwrap();
                let mut acked = 0u64;
                for i in 0..50u64 {
                    match raft.client_write(append_cmd(i, 4, 128)).await.unwrap().response() {
                        raftmq_raft_store::Response::Appended { count, .. } => acked += u64::from(*count),
                        other => panic!("unexpected response {other:?}"),
                    }
                }
                // More writes in flight when the runtime goes away.
                for i in 50..60u64 {
                    let _ = raft.client_write_ff(append_cmd(i, 4, 128), None).await;
                }
                acked
            });
            // Every task is dropped where it stands (no raft.shutdown()), as a crash
            // would; waiting for that to finish releases RocksDB's lock before the
            // test reopens the store (shutdown_background raced it).
            rt.shutdown_timeout(Duration::from_secs(10));
            acked
        })
        .join()
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_writes_survive_an_abrupt_stop_and_are_reapplied() {
        let dir = tempfile::tempdir().unwrap();
        let acked = write_then_abandon(dir.path().to_path_buf());
        assert_eq!(acked, 200);

        let Node { raft, store, mut log } = start(dir.path()).await;
        // Membership, topic and 50 acknowledged appends: index 52 at least. The
        // sole voter commits its whole log on restart, so wait for all of it:
        // `raft.shutdown()` does not join openraft's state-machine task, and reads
        // below taken while it still applied would see two different states.
        let last = log.physical_range().map(|(_, last)| last);
        assert!(last >= Some(52), "the log holds the acknowledged entries: {last:?}");
        raft.wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(last, "re-applied after restart")
            .await
            .unwrap();
        raft.shutdown().await.unwrap();
        let applied = store.applied().unwrap().unwrap().index;
        let rows = store.consume_queue_rows().unwrap();
        let total: u64 = (0..4).map(|q| store.queue_next_offset(TOPIC, q).unwrap()).sum();
        assert!(rows >= acked, "every acknowledged message is indexed: {rows} < {acked}");
        assert_eq!(rows, total, "ConsumeQueue rows match queue offsets");
        // Rows match exactly what the applied prefix of the log carries.
        let applied_entries = log.try_get_log_entries(1..=applied).await.unwrap();
        assert_eq!(rows, message_count(&applied_entries));
    }
}

// ------------------------------------------------ message lifecycle state

/// A delayed message at `due_ms` (store time 1_800_000_000_000).
fn delayed_cmd(seq: u64, due_ms: u64) -> Command {
    let mut m = message(seq, 16);
    m.deliver_at_ms = due_ms;
    Command::Append(AppendBatch {
        topic: TOPIC.into(),
        queue_id: 0,
        store_timestamp_ms: 1_800_000_000_000,
        messages: vec![m],
        producer: None,
        transaction: None,
    })
}

fn pop_receive(queue_id: u32, from: u64, to: u64, now_ms: u64) -> Command {
    Command::PopReceive {
        group: "g".into(),
        topic: TOPIC.into(),
        now_ms,
        invisible_ms: 1_000,
        picks: vec![raftmq_raft_store::PopPick {
            queue_id,
            from_cursor: from,
            to_cursor: to,
            new: (from..to).collect(),
            redeliver: vec![],
            dead: vec![],
        }],
    }
}

/// Per queue: (queue, cursor, in flight as (offset, attempt, deadline)).
type PopSummary = Vec<(u32, u64, Vec<(u64, u32, u64)>)>;

fn pop_summary(r: &raftmq_raft_store::StoreReader) -> PopSummary {
    r.with_pop(|p| {
        p.groups
            .get("g")
            .map(|g| {
                g.queues
                    .iter()
                    .map(|((_, q), pq)| {
                        let inflight = pq
                            .inflight
                            .iter()
                            .map(|(o, f)| (*o, f.attempt, f.deadline_ms))
                            .collect();
                        (*q, pq.cursor, inflight)
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Timers, POP state and group configs are state-machine state: a replica that
/// installs a snapshot, or restarts, has exactly what the source had; a fire
/// applied twice (an old leader's and a new one's) delivers once; and a
/// follower applying a delayed send and its firing in one batch gets it right.
#[tokio::test]
async fn lifecycle_state_travels_in_snapshots_survives_restart_and_fires_once() {
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let base = 1_800_000_000_000u64;
    let mut entries = workload(10, 2, 64); // queue q gets entries with index % 4 == q
    entries.push(normal(1, 11, delayed_cmd(1, base + 5_000)));
    entries.push(normal(1, 12, delayed_cmd(2, base + 9_000)));
    // Entries 3..=10 put 2 messages each into queues 3,0,1,2,...: queue 1 has 4.
    entries.push(normal(1, 13, pop_receive(1, 0, 3, base)));
    entries.push(normal(
        1,
        14,
        Command::PopAck {
            group: "g".into(),
            topic: TOPIC.into(),
            acks: vec![(1, 1, 13), (1, 2, 999)],
        },
    ));
    entries.push(normal(
        1,
        15,
        Command::UpsertConsumerGroup(raftmq_raft_store::ConsumerGroupConfig {
            name: "g".into(),
            fifo: true,
            max_reconsume_times: 3,
            retry_delays_ms: vec![100],
        }),
    ));
    // A stale receive (cursor moved on) hands out nothing.
    entries.push(normal(1, 16, pop_receive(1, 0, 4, base)));
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let src = sm.reader();
    let expected_pop = vec![(1u32, 3u64, vec![(0u64, 1u32, base + 1_000), (2, 1, base + 1_000)])];
    assert_eq!(
        pop_summary(&src),
        expected_pop,
        "ack of 1 applied, ack with a stale epoch refused"
    );
    assert_eq!(src.with_pop(|p| p.config("g").max_reconsume_times), 3);
    let due = src.due_timers(0, base + 10_000, 100).unwrap();
    assert_eq!(due.len(), 2);
    assert!(
        src.due_timers(0, base + 4_999, 100).unwrap().is_empty(),
        "nothing is due early"
    );
    assert_eq!(src.next_timer_due(0).unwrap(), Some(base + 5_000));

    let snap = build_snapshot(&mut sm).await;
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    dlog.purge(log_id(1, 16)).await.unwrap();
    let dst = dsm.reader();
    assert_eq!(pop_summary(&dst), expected_pop, "POP state travels in the snapshot");
    assert!(dst.with_pop(|p| p.config("g").fifo));
    assert_eq!(
        dst.due_timers(0, base + 10_000, 100).unwrap(),
        due,
        "timers travel in the snapshot"
    );

    // Fire both timers twice over (a deposed leader's command, then the new
    // leader's): each message lands once, keeping its id (entry 11 and 12).
    let fire = |index: u64| {
        normal(
            2,
            index,
            Command::FireTimers {
                store_timestamp_ms: base + 9_500,
                timers: due.clone(),
            },
        )
    };
    let more = vec![fire(17), fire(18)];
    append(&mut dlog, more.clone()).await.unwrap();
    apply(&mut dsm, more).await.unwrap();
    let q0 = dst.read_messages(TOPIC, 0, 0, 100).unwrap();
    let fired: Vec<_> = q0.iter().filter(|m| m.raft_index >= 11).map(|m| m.raft_index).collect();
    assert_eq!(fired, vec![11, 12], "each timer fired once");
    assert!(dst.due_timers(0, u64::MAX, 100).unwrap().is_empty());
    let found = dst.message_at(12, 0).unwrap().expect("a fired message is found by id");
    assert_eq!(found.queue_offset, q0.last().unwrap().queue_offset);
    dlog.shutdown().await.unwrap();
    drop((dsm, dst));

    // After a restart: POP state is reloaded, timers stay fired.
    let (_dlog, dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    let dst = dsm.reader();
    assert_eq!(pop_summary(&dst), expected_pop, "POP state reloads on restart");
    assert!(
        dst.due_timers(0, u64::MAX, 100).unwrap().is_empty(),
        "fired timers stay fired"
    );

    // A follower that applies a delayed send and its firing in one batch.
    let f_dir = tempfile::tempdir().unwrap();
    let (mut flog, mut fsm) = open(f_dir.path(), SMALL_SEGMENTS).await;
    let key = raftmq_raft_store::TimerKey {
        due_ms: base + 5,
        created_index: 3,
        slot: 0,
    };
    let batch = vec![
        membership_entry(1),
        normal(1, 2, topic_cmd()),
        normal(1, 3, delayed_cmd(9, base + 5)),
        normal(
            1,
            4,
            Command::FireTimers {
                store_timestamp_ms: base + 6,
                timers: vec![key, key],
            },
        ),
    ];
    append(&mut flog, batch.clone()).await.unwrap();
    apply(&mut fsm, batch).await.unwrap();
    let q0 = fsm.reader().read_messages(TOPIC, 0, 0, 10).unwrap();
    assert_eq!(q0.len(), 1, "fired exactly once within one apply batch: {q0:?}");
    assert_eq!(q0[0].message.deliver_at_ms, base + 5);
}

/// An idempotent producer's retried append is stored once, and the memory of it
/// travels in snapshots and survives a restart.
#[tokio::test]
async fn a_retried_idempotent_append_is_stored_once_across_snapshot_install_and_restart() {
    let with_producer = |seq: u64| {
        let Command::Append(mut b) = append_cmd(7, 2, 32) else {
            unreachable!("append_cmd builds appends")
        };
        b.queue_id = 0;
        b.producer = Some(raftmq_raft_store::ProducerSeq {
            producer_id: "p1".into(),
            sequence: seq,
        });
        Command::Append(b)
    };
    let rows = |r: &raftmq_raft_store::StoreReader| r.read_messages(TOPIC, 0, 0, 100).unwrap().len();
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = vec![
        membership_entry(1),
        normal(1, 2, topic_cmd()),
        normal(1, 3, with_producer(1)),
        normal(1, 4, with_producer(1)),
        normal(1, 5, with_producer(2)),
    ];
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    assert_eq!(rows(&sm.reader()), 4, "sequence 1 stored once, sequence 2 once");

    let snap = build_snapshot(&mut sm).await;
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    dlog.purge(log_id(1, 5)).await.unwrap();
    let retry = vec![normal(2, 6, with_producer(1)), normal(2, 7, with_producer(2))];
    append(&mut dlog, retry.clone()).await.unwrap();
    apply(&mut dsm, retry).await.unwrap();
    assert_eq!(
        rows(&dsm.reader()),
        4,
        "retries after a snapshot install are recognised"
    );
    dlog.shutdown().await.unwrap();
    drop(dsm);

    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    let more = vec![normal(2, 8, with_producer(2)), normal(2, 9, with_producer(3))];
    append(&mut dlog, more.clone()).await.unwrap();
    apply(&mut dsm, more).await.unwrap();
    assert_eq!(rows(&dsm.reader()), 6, "after a restart: 2 recognised, 3 new");
}

/// Pending half messages, their check counts and ended transactions' outcomes
/// travel in snapshots and survive a restart; a commit after the install makes
/// the half message visible at the next offset, a rollback never does.
#[tokio::test]
async fn transaction_state_travels_in_snapshots_and_survives_restart() {
    use raftmq_raft_store::{HalfSpec, TxnEndSource, TxnId};
    let half = |seq: u64| {
        let Command::Append(mut b) = append_cmd(seq, 1, 32) else {
            unreachable!("append_cmd builds appends")
        };
        b.queue_id = 0;
        b.transaction = Some(HalfSpec {
            producer_group: "pg".into(),
            first_check_ms: 1_000,
        });
        Command::Append(b)
    };
    let id = |raft_index| TxnId {
        raft_index,
        batch_pos: 0,
    };
    let end = |i: u64, commit| Command::EndTransactions {
        ends: vec![(id(i), commit)],
        source: TxnEndSource::Client,
        store_timestamp_ms: 2_000,
    };
    let rows = |r: &raftmq_raft_store::StoreReader| r.read_messages(TOPIC, 0, 0, 100).unwrap();
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = vec![
        membership_entry(1),
        normal(1, 2, topic_cmd()),
        normal(1, 3, half(1)),
        normal(1, 4, half(2)),
        normal(1, 5, half(3)),
        normal(
            1,
            6,
            Command::TransactionsChecked {
                ids: vec![id(3), id(4)],
                next_check_ms: 9_000,
            },
        ),
        normal(1, 7, end(3, true)),
    ];
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let committed = rows(&sm.reader());
    assert_eq!(committed.len(), 1, "only the committed half message is visible");
    assert_eq!((committed[0].raft_index, committed[0].queue_offset), (3, 0));

    let snap = build_snapshot(&mut sm).await;
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    dlog.purge(log_id(1, 7)).await.unwrap();
    let pending = dsm.reader().with_txn(|t| t.list(None, 10));
    let summary: Vec<(u64, u32, u64)> = pending
        .iter()
        .map(|(i, p)| (i.raft_index, p.checks, p.next_check_ms))
        .collect();
    assert_eq!(summary, vec![(4, 1, 9_000), (5, 0, 1_000)], "pending with their checks");
    assert!(dsm.reader().with_txn(|t| t.ended(&id(3)).is_some_and(|e| e.committed)));
    let more = vec![
        normal(2, 8, end(4, true)),
        normal(2, 9, end(5, false)),
        normal(2, 10, end(3, false)),
    ];
    append(&mut dlog, more.clone()).await.unwrap();
    apply(&mut dsm, more).await.unwrap();
    let visible: Vec<(u64, u64)> = rows(&dsm.reader())
        .iter()
        .map(|m| (m.raft_index, m.queue_offset))
        .collect();
    assert_eq!(visible, vec![(3, 0), (4, 1)], "the commit after the install lands next");
    // Found by id at the offset it landed on, like any message.
    let by_id = dsm
        .reader()
        .message_at(4, 0)
        .unwrap()
        .expect("committed half message by id");
    assert_eq!(by_id.queue_offset, 1);
    dlog.shutdown().await.unwrap();
    drop(dsm);

    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    let totals = dsm.reader().with_txn(|t| (t.pending_count(), t.totals()));
    assert_eq!(totals.0, 0);
    assert_eq!((totals.1.committed, totals.1.rolled_back), (2, 1));
    let again = vec![normal(2, 11, end(5, true))];
    append(&mut dlog, again.clone()).await.unwrap();
    apply(&mut dsm, again).await.unwrap();
    let ended = dsm.reader().with_txn(|t| t.ended(&id(5)));
    assert!(
        ended.is_some_and(|e| !e.committed && e.source == TxnEndSource::Client),
        "after a restart a late commit of a rolled-back transaction changes nothing: {ended:?}"
    );
    assert_eq!(rows(&dsm.reader()).len(), 2);
}

/// The dedup window forgets the send stored longest ago, not the lowest
/// sequence number, so the numbers may be arbitrary keys (the RocketMQ 5
/// gateway hashes the SDKs' client message ids into them).
#[tokio::test]
async fn the_dedup_window_forgets_the_oldest_send_whatever_its_number() {
    use raftmq_raft_store::dedup::DEDUP_WINDOW;
    let with_seq = |seq: u64| {
        let Command::Append(mut b) = append_cmd(1, 1, 8) else {
            unreachable!("append_cmd builds appends")
        };
        b.queue_id = 0;
        b.producer = Some(raftmq_raft_store::ProducerSeq {
            producer_id: "gateway-client".into(),
            sequence: seq,
        });
        Command::Append(b)
    };
    // First a send numbered 5, then DEDUP_WINDOW - 1 large pseudo-random
    // numbers, then one numbered 1: the window is full and 5 is the oldest.
    let mut seqs = vec![5u64];
    seqs.extend((1..DEDUP_WINDOW as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 << 40));
    seqs.push(1);
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let mut entries = vec![membership_entry(1), normal(1, 2, topic_cmd())];
    let mut index = 3;
    for s in &seqs {
        entries.push(normal(1, index, with_seq(*s)));
        index += 1;
    }
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let reader = sm.reader();
    let stored = || reader.queue_next_offset(TOPIC, 0).unwrap();
    let before = stored();
    assert_eq!(before, seqs.len() as u64);
    // The retry of the newest send (numbered 1, the lowest) is recognised...
    let retry_newest = vec![normal(1, index, with_seq(1))];
    append(&mut log, retry_newest.clone()).await.unwrap();
    apply(&mut sm, retry_newest).await.unwrap();
    assert_eq!(stored(), before, "the newest send was forgotten instead of the oldest");
    // ... and the oldest one's (numbered 5) is stored again: it left the window.
    let retry_oldest = vec![normal(1, index + 1, with_seq(5))];
    append(&mut log, retry_oldest.clone()).await.unwrap();
    apply(&mut sm, retry_oldest).await.unwrap();
    assert_eq!(stored(), before + 1, "the window holds more than DEDUP_WINDOW sends");
}

// ------------------------------------------------ retention

/// Entries 1..=200 (membership, topic, appends of two messages), a delayed
/// message at 60 and a POP delivery of queue 0's first rows, then `Retain` up
/// to 100 and four more appends.
fn retention_workload() -> Vec<Entry> {
    let mut entries = workload(200, 2, 512);
    entries[59] = normal(1, 60, delayed_cmd(60_000, u64::MAX / 2));
    entries[99] = normal(1, 100, pop_receive(0, 0, 4, 1_800_000_000_000));
    entries.push(normal(
        1,
        201,
        Command::Retain {
            upto: 100,
            reason: "test".into(),
        },
    ));
    entries.extend((202..=205).map(|i| normal(1, i, append_cmd(i, 2, 512))));
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_trims_every_replica_alike_and_snapshots_carry_only_what_is_retained() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let entries = retention_workload();
    append(&mut log, entries.clone()).await.unwrap();
    let r = sm.reader();
    let mut horizons = r.horizon_watch();
    let rest = entries[100..].to_vec();
    apply(&mut sm, entries[..100].to_vec()).await.unwrap();
    assert_eq!(
        r.next_timer_due(0).unwrap(),
        Some(u64::MAX / 2),
        "the delayed message waits"
    );
    assert_eq!(r.with_pop(|p| p.groups.get("g").map(|g| g.inflight())), Some(4));
    // Entries 101..=200 are in the batch with the retention.
    apply(&mut sm, rest).await.unwrap();
    assert_eq!(r.retention_horizon(), 100);
    assert!(horizons.has_changed().unwrap() && *horizons.borrow_and_update() == 100);

    let check = |r: &raftmq_raft_store::StoreReader, who: &str| {
        for q in 0..4u32 {
            let rows = r.read_messages(TOPIC, q, 0, 10_000).unwrap();
            let min = r.queue_min_offset(TOPIC, q).unwrap();
            assert_eq!(
                rows.first().map(|m| m.queue_offset),
                Some(min),
                "{who} queue {q} starts at its min"
            );
            assert!(
                rows.iter().all(|m| m.raft_index > 100),
                "{who} queue {q} serves trimmed entries"
            );
            // Entries 101..=200 and 202..=205 of this queue, two messages each.
            let want = (101..=200u64)
                .chain(202..=205)
                .filter(|i| i % 4 == u64::from(q))
                .count()
                * 2;
            assert_eq!(rows.len(), want, "{who} queue {q}");
            assert!(min > 0, "{who} queue {q} min {min}");
        }
        assert!(r.message_at(50, 0).unwrap().is_none(), "{who}: a trimmed message by id");
        assert!(
            r.messages_by_key(TOPIC, "key-50000", 8).unwrap().is_empty(),
            "{who}: by key"
        );
        assert_eq!(
            r.messages_by_key(TOPIC, "key-150000", 8).unwrap().len(),
            1,
            "{who}: retained by key"
        );
        assert_eq!(
            r.next_timer_due(0).unwrap(),
            None,
            "{who}: the trimmed delayed message's timer"
        );
        let pop = r.with_pop(|p| p.groups.get("g").map(|g| g.inflight()));
        assert_eq!(pop, Some(0), "{who}: deliveries of trimmed rows are forgotten");
    };
    check(&r, "source");

    // A horizon at or below the current one changes nothing.
    let stale = vec![normal(
        1,
        206,
        Command::Retain {
            upto: 50,
            reason: "stale".into(),
        },
    )];
    append(&mut log, stale.clone()).await.unwrap();
    apply(&mut sm, stale).await.unwrap();
    assert_eq!(r.retention_horizon(), 100);

    // A snapshot carries the trimmed state and only records above the horizon.
    let snap = build_snapshot(&mut sm).await;
    assert_eq!(r.snapshot_horizon(), 100, "the snapshot says which horizon it honours");
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    assert_eq!(dsm.reader().snapshot_horizon(), 0);
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    dlog.purge(log_id(1, 206)).await.unwrap();
    let d = dsm.reader();
    assert_eq!(d.retention_horizon(), 100);
    assert_eq!(d.snapshot_horizon(), 100);
    check(&d, "installed");
    let archived: Vec<_> = d.segments().into_iter().filter(|s| s.archive).collect();
    assert!(!archived.is_empty());
    assert_eq!(
        archived[0].info.first_index, 101,
        "the archive starts above the horizon"
    );

    // Freeing the disk deletes whole segments at or below the horizon, never
    // above the purge point; reads are unchanged.
    assert_eq!(r.free_through(100).await.unwrap(), (0, 0), "nothing is purged yet");
    log.purge(log_id(1, 150)).await.unwrap();
    let (deleted, _) = r.free_through(100).await.unwrap();
    assert!(deleted > 0, "no segment deleted");
    let left = r.segments();
    assert!(
        left.iter().all(|s| s.info.next_index - 1 > 100),
        "a segment wholly below the horizon is left: {left:?}"
    );
    assert!(
        left.iter().any(|s| s.info.first_index <= 101),
        "the segment straddling the horizon is kept"
    );
    check(&r, "source after deletion");
    log.shutdown().await.unwrap();
    drop((sm, r, horizons));

    // The horizon and the trimmed state are durable.
    let (_log, sm) = open(dir.path(), SMALL_SEGMENTS).await;
    let r = sm.reader();
    assert_eq!(r.retention_horizon(), 100);
    assert_eq!(r.snapshot_horizon(), 100, "known again after a restart");
    check(&r, "reopened");
}

/// ConsumeQueue rows are filed in epochs of 2^16 rows (raft-store's `cq.rs`);
/// retention drops whole epochs with one range delete and the rest per queue.
/// 200 entries of 1,000 messages cross three epoch boundaries; a horizon at
/// entry 150 drops two epochs whole and part of the third. Every queue must
/// then hold exactly the rows of entries above 150, in order, here, after a
/// restart and on a replica built from a snapshot, and appends go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_across_consume_queue_epochs_keeps_exactly_the_rows_above_the_horizon() {
    const PER_ENTRY: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path(), 64 << 20).await;
    let mut entries = workload(200, PER_ENTRY, 8);
    entries.push(retain(201, 150));
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let check = |r: &raftmq_raft_store::StoreReader, who: &str| {
        for q in 0..4u32 {
            let want: Vec<u64> = (151..=200u64).filter(|i| i % 4 == u64::from(q)).collect();
            let rows = r.read_messages(TOPIC, q, 0, 100_000).unwrap();
            assert_eq!(rows.len() as u64, want.len() as u64 * PER_ENTRY, "{who} queue {q}");
            let min = r.queue_min_offset(TOPIC, q).unwrap();
            assert_eq!(rows.first().map(|m| m.queue_offset), Some(min), "{who} queue {q}");
            // Offsets consecutive from the minimum, entries in order, each
            // entry's messages in batch order: nothing skipped or repeated
            // across the epoch boundaries.
            for (n, m) in rows.iter().enumerate() {
                let n = n as u64;
                assert_eq!(m.queue_offset, min + n, "{who} queue {q} row {n}");
                assert_eq!(m.raft_index, want[(n / PER_ENTRY) as usize], "{who} queue {q} row {n}");
            }
            // A read from the middle of the queue starts where asked.
            let mid = r.read_messages(TOPIC, q, min + 5_432, 3).unwrap();
            assert_eq!(
                mid.iter().map(|m| m.queue_offset).collect::<Vec<_>>(),
                vec![min + 5_432, min + 5_433, min + 5_434],
                "{who} queue {q}"
            );
        }
        assert_eq!(
            r.consume_queue_rows().unwrap(),
            50 * PER_ENTRY,
            "{who}: rows left in all"
        );
    };
    let r = sm.reader();
    assert_eq!(r.retention_horizon(), 150);
    check(&r, "source");

    let snap = build_snapshot(&mut sm).await;
    let dst_dir = tempfile::tempdir().unwrap();
    let (mut dlog, mut dsm) = open(dst_dir.path(), 64 << 20).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    dlog.purge(log_id(1, 201)).await.unwrap();
    check(&dsm.reader(), "installed");

    log.shutdown().await.unwrap();
    drop((sm, r));
    let (mut log, mut sm) = open(dir.path(), 64 << 20).await;
    check(&sm.reader(), "reopened");
    // Appends after the restart continue each queue's offsets.
    let more: Vec<Entry> = (202..=205).map(|i| normal(1, i, append_cmd(i, PER_ENTRY, 8))).collect();
    append(&mut log, more.clone()).await.unwrap();
    apply(&mut sm, more).await.unwrap();
    let r = sm.reader();
    for q in 0..4u32 {
        let min = r.queue_min_offset(TOPIC, q).unwrap();
        let next = r.queue_next_offset(TOPIC, q).unwrap();
        let rows = r.read_messages(TOPIC, q, 0, 100_000).unwrap();
        assert_eq!(rows.len() as u64, next - min, "queue {q} after more appends");
        assert_eq!(rows.last().map(|m| m.raft_index), Some(202 + ((q as u64 + 2) % 4)));
    }
}

/// Users and ACL rules are replicated state: they travel in snapshots (a
/// replica installed from one enforces the same rules), survive a restart, and
/// a deleted user takes their rules along. Secrets never reach `Debug` output.
#[tokio::test]
async fn acl_state_travels_in_snapshots_and_survives_restart() {
    use raftmq_raft_store::{AclRule, Permission, ResourceKind, User};
    let user = |ak: &str, admin| {
        Command::PutUser(User {
            access_key: ak.into(),
            secret: format!("{ak}-secret-0123456789"),
            admin,
        })
    };
    let rule = |ak: &str, pattern: &str, perms: Vec<Permission>, allow| {
        Command::PutAclRule(AclRule {
            access_key: ak.into(),
            kind: ResourceKind::Topic,
            pattern: pattern.into(),
            perms,
            allow,
        })
    };
    let src_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(src_dir.path(), SMALL_SEGMENTS).await;
    let entries = vec![
        membership_entry(1),
        normal(1, 2, user("app", false)),
        normal(1, 3, user("gone", false)),
        normal(
            1,
            4,
            rule("app", "orders*", vec![Permission::Pub, Permission::Sub], true),
        ),
        normal(1, 5, rule("app", "orders-secret", vec![Permission::Sub], false)),
        normal(1, 6, rule("gone", "*", vec![Permission::Pub], true)),
        normal(
            1,
            7,
            Command::DeleteUser {
                access_key: "gone".into(),
            },
        ),
    ];
    append(&mut log, entries.clone()).await.unwrap();
    apply(&mut sm, entries).await.unwrap();
    let decisions = |r: &raftmq_raft_store::StoreReader| {
        r.with_acl(|a| {
            (
                a.user("app").map(|u| u.secret.clone()),
                a.allows("app", Permission::Pub, ResourceKind::Topic, "orders-eu"),
                a.allows("app", Permission::Sub, ResourceKind::Topic, "orders-secret"),
                a.user("gone").is_some(),
                a.rules().count(),
            )
        })
    };
    let want = (Some("app-secret-0123456789".to_owned()), true, false, false, 2);
    assert_eq!(decisions(&sm.reader()), want, "applied on the source");
    let cmd = user("app", false);
    assert!(!format!("{cmd:?} {cmd}").contains("app-secret"), "a secret in {cmd:?}");

    let snap = build_snapshot(&mut sm).await;
    let dst_dir = tempfile::tempdir().unwrap();
    let (dlog, mut dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    dsm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(decisions(&dsm.reader()), want, "installed from the snapshot");
    dlog.shutdown().await.unwrap();
    drop(dsm);
    let (_dlog, dsm) = open(dst_dir.path(), SMALL_SEGMENTS).await;
    assert_eq!(decisions(&dsm.reader()), want, "after a restart");
}
