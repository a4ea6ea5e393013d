//! `raftmq bench delay` and `raftmq bench pop`, and the pending-timer prefill of
//! `bench produce --pending-timers N`: the message-lifecycle workloads.
//!
//! * delay: `--count` messages due evenly over `--spread` seconds (starting 5 s
//!   after the run begins), read back by pull consumers; latency is lateness,
//!   the consumer's clock at receipt minus the due time. Early receipts (before
//!   the due time) and messages never received are counted apart; both must be 0.
//! * pop: `--count` messages (produced first if the topic holds fewer) received
//!   and acked by `--consumers` SimpleConsumers of one POP group, `--pull-batch`
//!   per receive, one ack RPC per batch; latency is one receive + ack round.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use raftmq_client::{Client, Filter, MessageExt, Producer, PullConsumer};
use raftmq_proto::v1 as pb;

use crate::bench::{BenchArgs, Counters, Outcome, finish, histogram, progress, record};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends `messages(i)` for i in 0..count with up to `inflight` sends outstanding
/// per producer; returns (acknowledged, failed).
async fn send_all(
    producers: &[Producer],
    topic: &str,
    count: u64,
    inflight: usize,
    make: impl Fn(u64) -> pb::Message + Clone + Send + 'static,
) -> (u64, u64) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for p in producers {
        let (p, topic, next, make) = (p.clone(), topic.to_owned(), next.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut pending = FuturesUnordered::new();
            loop {
                while pending.len() < inflight {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let (p, topic, m) = (p.clone(), topic.clone(), make(i));
                    pending.push(async move { p.send(&topic, m).await });
                }
                match pending.next().await {
                    Some(Ok(_)) => ok += 1,
                    Some(Err(e)) => {
                        failed += 1;
                        if failed <= 5 {
                            eprintln!("bench: send failed: {e}");
                        }
                    }
                    None => break,
                }
            }
            (ok, failed)
        }));
    }
    let mut total = (0, 0);
    for w in workers {
        if let Ok((ok, failed)) = w.await {
            total.0 += ok;
            total.1 += failed;
        }
    }
    total
}

/// Stores `n` 16-byte messages due an hour from now, so a produce run measures
/// sends with that many timers pending.
pub async fn prefill_timers(producers: &[Producer], topic: &str, n: u64, inflight: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let due = now_ms() + 3_600_000;
    let (ok, failed) = send_all(producers, topic, n, inflight, move |_| {
        pb::Message::new(vec![b't'; 16]).with_deliver_at(due)
    })
    .await;
    anyhow::ensure!(
        failed == 0 && ok == n,
        "storing {n} pending timers: {ok} ok, {failed} failed"
    );
    eprintln!(
        "bench: {n} timers pending (due in an hour), stored in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What `delay` counted besides lateness.
pub struct DelayCounts {
    pub early: u64,
    pub never: u64,
}

pub async fn delay(
    args: &BenchArgs,
    producers: &[Producer],
    consumers: &[PullConsumer],
    queues: &[(String, u32)],
) -> anyhow::Result<(Outcome, DelayCounts)> {
    let spread_ms = (args.spread * 1000.0) as u64;
    let first_due = now_ms() + 5_000;
    let count = args.count;
    // Where each queue ends now: delayed messages land after it when due.
    let mut start_offsets = Vec::new();
    for (g, q) in queues {
        let r = consumers[0]
            .pull(&args.topic, g, *q, u64::MAX, 1, Duration::ZERO, &Filter::all())
            .await?;
        start_offsets.push(r.max_offset);
    }
    let size = args.size;
    let send_started = Instant::now();
    let (sent, failed) = send_all(producers, &args.topic, count, args.inflight, move |i| {
        let mut m = pb::Message::new(vec![b'd'; size]).with_deliver_at(first_due + i * spread_ms / count.max(1));
        m.properties.insert("seq".into(), i.to_string());
        m
    })
    .await;
    eprintln!(
        "bench: {sent} delayed messages stored in {:.1}s ({failed} failed); due over {}s from {} ms",
        send_started.elapsed().as_secs_f64(),
        args.spread,
        first_due
    );
    anyhow::ensure!(
        now_ms() < first_due,
        "sending took longer than the 5 s before the first due time; lower --count"
    );
    let started = Instant::now();
    let stop_at = Instant::now() + Duration::from_millis(first_due + spread_ms - now_ms()) + Duration::from_secs(10);
    let counters = Arc::new(Counters::default());
    let progress = progress("delay", counters.clone(), started);
    let early = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for (i, consumer) in consumers.iter().enumerate() {
        let mine: Vec<(String, u32, u64)> = queues
            .iter()
            .zip(&start_offsets)
            .skip(i)
            .step_by(consumers.len())
            .map(|((g, q), o)| (g.clone(), *q, *o))
            .collect();
        let (consumer, topic, c, early) = (consumer.clone(), args.topic.clone(), counters.clone(), early.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut seen = HashSet::new();
            let mut offsets: Vec<u64> = mine.iter().map(|(_, _, o)| *o).collect();
            while Instant::now() < stop_at && c.ok.load(Ordering::Relaxed) < sent {
                for (k, (g, q, _)) in mine.iter().enumerate() {
                    let r = match consumer
                        .pull(
                            &topic,
                            g,
                            *q,
                            offsets[k],
                            1024,
                            Duration::from_millis(20),
                            &Filter::all(),
                        )
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("bench: pull failed: {e}");
                            continue;
                        }
                    };
                    let at = now_ms();
                    offsets[k] = r.next_offset;
                    for m in r.messages {
                        let Some(body) = m.message else { continue };
                        if !seen.insert(m.message_id) {
                            continue;
                        }
                        if at < body.deliver_at_ms {
                            early.fetch_add(1, Ordering::Relaxed);
                        } else {
                            record(&mut hist, Duration::from_millis(at - body.deliver_at_ms));
                        }
                        c.ok.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(body.body.len() as u64, Ordering::Relaxed);
                    }
                }
            }
            hist
        }));
    }
    let mut latency = histogram();
    for w in workers {
        latency.add(&w.await.context("a delay consumer failed")?)?;
    }
    let outcome = finish(&counters, progress, started, latency).await;
    let never = sent.saturating_sub(outcome.ok);
    Ok((
        outcome,
        DelayCounts {
            early: early.load(Ordering::Relaxed),
            never,
        },
    ))
}

pub async fn pop(args: &BenchArgs, clients: &[Client]) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(args.duration);
    let counters = Arc::new(Counters::default());
    let progress = progress("pop", counters.clone(), started);
    let mut workers = Vec::new();
    for client in clients {
        let consumer = client
            .simple_consumer("bench-pop", &args.topic)
            .invisible_duration(Duration::from_secs(60));
        let (c, count, batch) = (counters.clone(), args.count, args.pull_batch);
        workers.push(tokio::spawn(async move {
            let mut hist = histogram();
            while Instant::now() < stop_at && c.ok.load(Ordering::Relaxed) < count {
                let t = Instant::now();
                let got = match consumer.receive(batch, Duration::from_millis(200)).await {
                    Ok(g) => g,
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("bench: receive failed: {e}");
                        continue;
                    }
                };
                if got.is_empty() {
                    continue;
                }
                let handles: Vec<String> = got.iter().map(|m| m.receipt_handle.clone()).collect();
                match consumer.ack_all(&got[0].broker_group, &handles).await {
                    Ok(results) => {
                        let ok = results.iter().filter(|r| r.ok).count() as u64;
                        c.ok.fetch_add(ok, Ordering::Relaxed);
                        c.errors.fetch_add(results.len() as u64 - ok, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("bench: ack failed: {e}");
                    }
                }
                record(&mut hist, t.elapsed());
                let bytes: usize = got
                    .iter()
                    .map(|m| m.message.message.as_ref().map_or(0, |b| b.body.len()))
                    .sum();
                c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            hist
        }));
    }
    let mut latency = histogram();
    for w in workers {
        latency.add(&w.await.context("a POP consumer failed")?)?;
    }
    Ok(finish(&counters, progress, started, latency).await)
}
