//! CommitLog benchmarks: fsynced appends of 1 KiB records in batches of 1, 16 and
//! 256; appends pipelined the way openraft 0.10 issues them (group commit); read by
//! index; and a plain write + `fdatasync` loop on the same disk as the baseline.
//!
//! `cargo bench -p raftmq-raft-store --bench commitlog`. Data goes under
//! `$RAFTMQ_BENCH_DIR` (default: the system temp dir) so the disk can be chosen.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, RaftLogReader};
use raftmq_raft_store::{AppendBatch, Command, CommitLog, Entry, Message, StoreConfig, TypeConfig, log_id};

const RECORD_BYTES: usize = 1024;

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("RAFTMQ_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    tempfile::tempdir_in(base).expect("bench dir")
}

fn entry(index: u64) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::Append(AppendBatch {
            topic: "bench".into(),
            queue_id: 0,
            store_timestamp_ms: 0,
            messages: vec![Message {
                tag: String::new(),
                keys: Vec::new(),
                properties: Vec::new(),
                body: Bytes::from(vec![7u8; RECORD_BYTES]),
                born_timestamp_ms: 0,
                deliver_at_ms: 0,
            }],
            producer: None,
            transaction: None,
        })),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn open(dir: &std::path::Path) -> CommitLog {
    CommitLog::open(dir.join("log"), &StoreConfig::default())
        .await
        .expect("open")
}

fn report(label: &str, log: &CommitLog, records: u64, elapsed: Duration) {
    let fsyncs = log.stats().fsyncs.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "{label}: {:.0} records/s, {:.0} fsyncs/s ({records} records, {fsyncs} fsyncs in {:.2}s)",
        records as f64 / secs,
        fsyncs as f64 / secs,
        secs
    );
}

fn append_fsync(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_fsync_1KiB");
    for batch in [1u64, 16, 256] {
        group.throughput(Throughput::Elements(batch));
        let dir = bench_dir();
        let mut log = rt.block_on(open(dir.path()));
        let mut next = 1u64;
        let (mut total_records, mut total_time) = (0u64, Duration::ZERO);
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let entries: Vec<Entry> = (next..next + batch).map(entry).collect();
                        next += batch;
                        let (tx, rx) = TypeConfig::oneshot();
                        log.append(entries, IOFlushed::signal(tx)).await.expect("append");
                        rx.await.expect("flusher alive").expect("fsync");
                    }
                    let took = start.elapsed();
                    total_records += iters * batch;
                    total_time += took;
                    took
                })
            });
        });
        report(&format!("append batch={batch}"), &log, total_records, total_time);
    }
    group.finish();
}

/// 64 single-record appends issued before any flush completes, as openraft 0.10
/// does under load: the flusher covers them with few fsyncs.
fn append_pipelined(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_pipelined_1KiB");
    const IN_FLIGHT: u64 = 64;
    group.throughput(Throughput::Elements(IN_FLIGHT));
    let dir = bench_dir();
    let mut log = rt.block_on(open(dir.path()));
    let mut next = 1u64;
    let (mut total_records, mut total_time) = (0u64, Duration::ZERO);
    group.bench_function("64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut waits = Vec::with_capacity(IN_FLIGHT as usize);
                    for _ in 0..IN_FLIGHT {
                        let (tx, rx) = TypeConfig::oneshot();
                        log.append(vec![entry(next)], IOFlushed::signal(tx))
                            .await
                            .expect("append");
                        next += 1;
                        waits.push(rx);
                    }
                    for rx in waits {
                        rx.await.expect("flusher alive").expect("fsync");
                    }
                }
                let took = start.elapsed();
                total_records += iters * IN_FLIGHT;
                total_time += took;
                took
            })
        });
    });
    report("append pipelined 64x1", &log, total_records, total_time);
    group.finish();
}

fn read_by_index(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    const N: u64 = 20_000;
    let log = rt.block_on(async {
        let mut log = open(dir.path()).await;
        for chunk in (1..=N).collect::<Vec<_>>().chunks(256) {
            let (tx, rx) = TypeConfig::oneshot();
            log.append(
                chunk.iter().map(|&i| entry(i)).collect::<Vec<_>>(),
                IOFlushed::signal(tx),
            )
            .await
            .expect("append");
            rx.await.expect("flusher alive").expect("fsync");
        }
        log
    });
    let mut reader = log.reader();
    let mut group = c.benchmark_group("read_1KiB");
    group.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    group.bench_function("by_index", |b| {
        b.iter(|| {
            // A stride that visits indexes out of order, across segments.
            i = (i + 7919) % N + 1;
            let got = rt.block_on(reader.try_get_log_entries(i..=i)).expect("read");
            assert_eq!(got.len(), 1);
        })
    });
    group.throughput(Throughput::Elements(256));
    group.bench_function("range_256", |b| {
        b.iter(|| {
            i = (i + 7919) % (N - 256) + 1;
            let got = rt.block_on(reader.try_get_log_entries(i..i + 256)).expect("read");
            assert_eq!(got.len(), 256);
        })
    });
    group.finish();
}

/// The disk's own price: write 1 KiB and `fdatasync`, in a loop.
fn fdatasync_baseline(c: &mut Criterion) {
    let dir = bench_dir();
    let mut f = std::fs::File::create(dir.path().join("baseline")).expect("create");
    let buf = vec![7u8; RECORD_BYTES + 24];
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(1));
    let (mut n, mut t) = (0u64, Duration::ZERO);
    group.bench_function("write_1KiB_fdatasync", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                f.write_all(&buf).expect("write");
                f.sync_data().expect("fdatasync");
            }
            let took = start.elapsed();
            n += iters;
            t += took;
            took
        })
    });
    eprintln!("baseline: {:.0} fdatasyncs/s", n as f64 / t.as_secs_f64().max(1e-9));
    group.finish();
}

fn config() -> Criterion {
    // Two cores and a real disk: short warm-up, enough samples to be stable.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = fdatasync_baseline, append_fsync, append_pipelined, read_by_index
}
criterion_main!(benches);
