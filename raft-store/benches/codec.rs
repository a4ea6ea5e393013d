//! Codec benchmarks: the per-message CPU cost of the write path's encodings,
//! Command (what a Send becomes in the Raft log) and record framing (crc32c over
//! every byte written to a segment). `cargo bench -p raftmq-raft-store --bench codec`.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use raftmq_raft_store::record::{self, Decoded};
use raftmq_raft_store::{AppendBatch, Command, Message};

fn batch(messages: usize, size: usize) -> Command {
    Command::Append(AppendBatch {
        topic: "BenchTopic".into(),
        queue_id: 3,
        store_timestamp_ms: 1_700_000_000_000,
        messages: (0..messages)
            .map(|i| Message {
                tag: "TagA".into(),
                keys: vec![format!("order-{i}")],
                properties: vec![("seq".into(), i.to_string())],
                body: Bytes::from(vec![b'x'; size]),
                born_timestamp_ms: 1_700_000_000_000,
                deliver_at_ms: 0,
            })
            .collect(),
        producer: None,
        transaction: None,
    })
}

fn command(c: &mut Criterion) {
    let mut group = c.benchmark_group("command_1KiB");
    for n in [1usize, 32] {
        let cmd = batch(n, 1024);
        let encoded = Bytes::from(cmd.encode());
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("encode", n), &cmd, |b, cmd| {
            let mut out = Vec::with_capacity(encoded.len());
            b.iter(|| {
                out.clear();
                cmd.encode_into(&mut out);
                out.len()
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", n), &encoded, |b, encoded| {
            b.iter(|| Command::decode(encoded.clone()).expect("valid encoding"))
        });
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_framing");
    for size in [1024usize, 64 * 1024] {
        let payload = vec![7u8; size];
        let mut framed = Vec::new();
        record::encode_into(&mut framed, 5, 42, &payload);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, payload| {
            let mut out = Vec::with_capacity(framed.len());
            b.iter(|| {
                out.clear();
                record::encode_into(&mut out, 5, 42, payload);
                out.len()
            })
        });
        group.bench_with_input(BenchmarkId::new("decode_verify", size), &framed, |b, framed| {
            b.iter(|| match record::decode(framed) {
                Decoded::Record { payload, .. } => payload.len(),
                other => panic!("bench record did not decode: {other:?}"),
            })
        });
    }
    group.finish();
}

criterion_group!(benches, command, framing);
criterion_main!(benches);
