//! The time to build a snapshot over ~1 GiB of retained records: an ignored test
//! that prints its figure, for comparing snapshot layouts. It names no snapshot
//! data type, so the same file measures any version of the builder.
//!
//! Run: `cargo test -p raftmq-raft-store --test snapshot_build_time -- --ignored --nocapture`
//! (`SNAPSHOT_BENCH_MIB` changes the size).

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, Membership, RaftSnapshotBuilder};
use raftmq_raft_store::{
    AppendBatch, BrokerNode, Command, Entry, Message, StoreConfig, TopicConfig, TypeConfig, log_id,
};

/// Bytes of message body per entry: 4 messages of 16 KiB.
const PER_ENTRY: u64 = 4;
const BODY: usize = 16 * 1024;
/// Entries appended and applied per round, so memory stays small.
const ROUND: u64 = 512;

fn entry(index: u64) -> Entry {
    let payload = match index {
        1 => {
            let nodes = BTreeMap::from([(1u64, BrokerNode::new("127.0.0.1:1", "127.0.0.1:2"))]);
            EntryPayload::Membership(Membership::new(vec![[1u64].into()], nodes).expect("valid membership"))
        }
        2 => EntryPayload::Normal(Command::UpsertTopic(TopicConfig {
            name: "bench".into(),
            queues: 4,
            perm: 6,
            message_type: Default::default(),
            trace: false,
        })),
        _ => EntryPayload::Normal(Command::Append(AppendBatch {
            topic: "bench".into(),
            queue_id: (index % 4) as u32,
            store_timestamp_ms: 1_800_000_000_000 + index,
            messages: (0..PER_ENTRY)
                .map(|j| Message {
                    tag: "t".into(),
                    keys: vec![format!("key-{index}-{j}")],
                    properties: Vec::new(),
                    body: Bytes::from(vec![(index % 251) as u8; BODY]),
                    born_timestamp_ms: 1_700_000_000_000 + index,
                    deliver_at_ms: 0,
                })
                .collect(),
            producer: None,
            transaction: None,
        })),
    };
    Entry {
        log_id: log_id(1, index),
        payload,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a timing run over ~1 GiB; prints its figure"]
async fn time_to_build_a_snapshot_over_a_gib_of_retained_records() {
    let mib: u64 = std::env::var("SNAPSHOT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let entries = mib * 1024 * 1024 / (PER_ENTRY * BODY as u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        segment_bytes: 128 * 1024 * 1024,
        ..StoreConfig::default()
    };
    let (mut log, mut sm) = raftmq_raft_store::open(dir.path(), config).await.expect("store opens");
    let mut next = 1u64;
    let fill = Instant::now();
    while next <= entries {
        let batch: Vec<Entry> = (next..(next + ROUND).min(entries + 1)).map(entry).collect();
        next += batch.len() as u64;
        let (tx, rx) = TypeConfig::oneshot();
        log.append(batch.clone(), IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("flush callback").expect("flushed");
        sm.apply(futures::stream::iter(batch.into_iter().map(|e| Ok((e, None)))))
            .await
            .expect("apply");
    }
    println!("filled {entries} entries ({mib} MiB of bodies) in {:?}", fill.elapsed());
    for round in 1..=2 {
        let started = Instant::now();
        let snap = sm
            .try_create_snapshot_builder(true)
            .await
            .expect("builder")
            .build_snapshot()
            .await
            .expect("snapshot builds");
        println!(
            "build {round}: snapshot up to {:?} built in {:?}",
            snap.meta.last_log_id,
            started.elapsed()
        );
    }
}
