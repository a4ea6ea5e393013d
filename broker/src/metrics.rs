//! A broker node's Prometheus metrics: what the request paths count (sends,
//! pulls, receives and acks by topic, send and replication latency), what Raft
//! reports through openraft's recorder (elections, batch sizes), and a
//! collector that reads everything else from the replica's state at scrape time
//! (Raft indexes and follower lag, CommitLog and RocksDB figures, consumer lag,
//! dead letters, timers, transactions, POP in flight), so none of it costs the
//! request paths anything. Served by [`raftmq_proto::metrics_http`].
//!
//! Hot-path recording is relaxed atomic adds. The per-topic counters take a
//! read lock once per request (not per message) to find the topic's slot; only
//! a topic's first request takes the write lock. Every labelled family is
//! bounded: past [`MAX_TOPIC_LABELS`] topics (or [`MAX_GROUP_LABELS`] groups,
//! [`MAX_LAG_SERIES`] lag series) the rest is summed under [`OTHER`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::Raft;
use openraft::async_runtime::WatchReceiver;
use openraft::metrics::MetricsRecorder;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use raftmq_proto::metrics_http::ConnectionCounts;
use raftmq_raft_store::stats::{AtomicHistogram, HistogramSnapshot};
use raftmq_raft_store::{DLQ_TOPIC_PREFIX, NodeId, StateMachine, StoreReader, TypeConfig};

/// Most topics counted under their own label; the rest share [`OTHER`].
pub const MAX_TOPIC_LABELS: usize = 256;
/// Most consumer groups (POP in flight) and DLQ topics under their own label.
pub const MAX_GROUP_LABELS: usize = 100;
/// Most (consumer group, topic, queue) lag series one scrape reports.
pub const MAX_LAG_SERIES: usize = 1000;
/// The label value that stands for everything past a family's bound.
pub const OTHER: &str = "_other";

static SECONDS: Unit = Unit::Seconds;
static BYTES: Unit = Unit::Bytes;

/// Message counts of one topic.
#[derive(Debug, Default)]
struct TopicStats {
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    pulled: AtomicU64,
    received: AtomicU64,
    acked: AtomicU64,
}

/// Per-topic counters with a bounded number of topics.
#[derive(Debug)]
struct TopicCounters {
    max: usize,
    topics: RwLock<HashMap<String, TopicStats>>,
    other: TopicStats,
}

impl TopicCounters {
    fn new(max: usize) -> TopicCounters {
        TopicCounters {
            max,
            topics: RwLock::new(HashMap::new()),
            other: TopicStats::default(),
        }
    }

    /// Runs `f` on `topic`'s counters, creating them if the bound allows.
    fn with(&self, topic: &str, f: impl FnOnce(&TopicStats)) {
        {
            // Counters hold no invariant a panicking holder could break.
            let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
            if let Some(stats) = topics.get(topic) {
                return f(stats);
            }
            if topics.len() >= self.max {
                return f(&self.other);
            }
        }
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if topics.len() >= self.max && !topics.contains_key(topic) {
            return f(&self.other);
        }
        f(topics.entry(topic.to_owned()).or_default());
    }

    /// (topic, value) of every topic, then [`OTHER`] when anything overflowed.
    fn values(&self, pick: impl Fn(&TopicStats) -> u64) -> Vec<(String, u64)> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64)> = topics.iter().map(|(t, s)| (t.clone(), pick(s))).collect();
        out.sort();
        if topics.len() >= self.max {
            out.push((OTHER.to_owned(), pick(&self.other)));
        }
        out
    }
}

/// What openraft reports through its recorder hook. Called on the Raft core
/// task, so every method is an atomic add or store.
#[derive(Debug)]
pub struct RaftRecorder {
    term: AtomicU64,
    elections: AtomicU64,
    votes: AtomicU64,
    write_batch: AtomicHistogram,
    apply_batch: AtomicHistogram,
}

impl MetricsRecorder for RaftRecorder {
    fn record_apply_batch(&self, entry_count: u64) {
        self.apply_batch.observe(entry_count as f64);
    }

    fn record_append_batch(&self, _entry_count: u64) {}

    fn record_write_batch(&self, entry_count: u64) {
        self.write_batch.observe(entry_count as f64);
    }

    fn set_current_term(&self, term: u64) {
        // Each term this replica sees begin is one election (won, lost or split).
        // The first report is the term it started in, not an election.
        let before = self.term.swap(term, Ordering::Relaxed);
        if before != 0 && term > before {
            self.elections.fetch_add(term - before, Ordering::Relaxed);
        }
    }

    fn set_last_log_index(&self, _index: u64) {}
    fn set_committed_index(&self, _index: u64) {}
    fn set_applied_index(&self, _index: u64) {}
    fn set_snapshot_index(&self, _index: u64) {}
    fn set_purged_index(&self, _index: u64) {}
    fn set_server_state(&self, _state: u8) {}

    fn increment_vote(&self) {
        self.votes.fetch_add(1, Ordering::Relaxed);
    }

    fn increment_heartbeat(&self) {}
    fn increment_append(&self) {}
}

/// The counters and histograms a broker node's request paths record into.
#[derive(Debug)]
pub struct BrokerMetrics {
    topics: TopicCounters,
    /// Send RPCs from arrival to the answer (the leader's send -> ack).
    send_seconds: AtomicHistogram,
    /// One AppendEntries from sent to answered, per follower session.
    replication_seconds: Arc<AtomicHistogram>,
    raft: Arc<RaftRecorder>,
    /// Client connections on the client port.
    pub connections: ConnectionCounts,
    /// Requests the ACL refused, by why.
    pub auth_refusals: Arc<crate::auth::Refusals>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            topics: TopicCounters::new(MAX_TOPIC_LABELS),
            send_seconds: AtomicHistogram::latency(),
            replication_seconds: Arc::new(AtomicHistogram::latency()),
            raft: Arc::new(RaftRecorder {
                term: AtomicU64::new(0),
                elections: AtomicU64::new(0),
                votes: AtomicU64::new(0),
                write_batch: AtomicHistogram::sizes(),
                apply_batch: AtomicHistogram::sizes(),
            }),
            connections: ConnectionCounts::default(),
            auth_refusals: Arc::default(),
        }
    }
}

impl BrokerMetrics {
    /// A send of `messages` (`bytes` of bodies) to `topic` was answered after `took`.
    pub fn sent(&self, topic: &str, messages: usize, bytes: usize, took: Duration) {
        self.topics.with(topic, |s| {
            s.sent.fetch_add(messages as u64, Ordering::Relaxed);
            s.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        });
        self.send_seconds.observe_duration(took);
    }

    pub fn pulled(&self, topic: &str, messages: usize) {
        if messages > 0 {
            self.topics.with(topic, |s| {
                s.pulled.fetch_add(messages as u64, Ordering::Relaxed);
            });
        }
    }

    pub fn received(&self, topic: &str, messages: usize) {
        if messages > 0 {
            self.topics.with(topic, |s| {
                s.received.fetch_add(messages as u64, Ordering::Relaxed);
            });
        }
    }

    pub fn acked(&self, topic: &str, messages: usize) {
        if messages > 0 {
            self.topics.with(topic, |s| {
                s.acked.fetch_add(messages as u64, Ordering::Relaxed);
            });
        }
    }

    /// The histogram the Raft network records replication rounds into.
    pub fn replication_seconds(&self) -> Arc<AtomicHistogram> {
        self.replication_seconds.clone()
    }

    /// The recorder to hand openraft (`Raft::set_metrics_recorder`).
    pub fn raft_recorder(&self) -> Arc<dyn MetricsRecorder> {
        self.raft.clone()
    }
}

/// Everything a scrape reads from the replica's state.
struct NodeCollector {
    metrics: Arc<BrokerMetrics>,
    raft: Raft<TypeConfig, StateMachine>,
    store: StoreReader,
    log: raftmq_raft_store::CommitLogReader,
}

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// The registry a broker node serves: every metric labelled with its broker
/// group and node id, so one dashboard can show every replica.
pub fn registry(
    group: &str,
    node_id: NodeId,
    metrics: Arc<BrokerMetrics>,
    raft: Raft<TypeConfig, StateMachine>,
    store: StoreReader,
    log: raftmq_raft_store::CommitLogReader,
) -> Registry {
    let labels = [
        (Cow::Borrowed("group"), Cow::Owned(group.to_owned())),
        (Cow::Borrowed("node"), Cow::Owned(node_id.to_string())),
    ];
    let mut registry = Registry::with_labels(labels.into_iter());
    metrics.connections.register(&mut registry);
    registry.register_collector(Box::new(NodeCollector {
        metrics,
        raft,
        store,
        log,
    }));
    registry
}

/// Writes one unlabelled gauge.
fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// Writes one unlabelled counter (the encoder adds `_total`).
pub(crate) fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, unit, c.metric_type())?)
}

/// Writes one labelled family of `kind` (gauge or counter), one sample per
/// entry; nothing at all when there is none (a family without samples, as a
/// follower's follower lag, is left out rather than described empty, which
/// stricter OpenMetrics parsers refuse).
pub(crate) fn family<const N: usize>(
    enc: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<&Unit>),
    kind: MetricType,
    series: impl IntoIterator<Item = ([(&'static str, String); N], i64)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in series {
        let e: MetricEncoder = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(u64::try_from(value).unwrap_or(0)).encode(e)?,
            _ => ConstGauge::new(value).encode(e)?,
        }
    }
    Ok(())
}

/// Writes one histogram. Its unit goes into the name only, without a `# UNIT`
/// line: Prometheus needs none, and strict parsers allow units on counters and
/// gauges only.
fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    h: &AtomicHistogram,
) -> fmt::Result {
    let HistogramSnapshot { sum, count, buckets } = h.snapshot();
    let name = match unit {
        Some(unit) => format!("{name}_{}", unit.as_str()),
        None => name.to_owned(),
    };
    let mut m = enc.encode_descriptor(&name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

fn index(id: Option<&raftmq_raft_store::LogId>) -> i64 {
    id.map_or(0, |l| i64::try_from(l.index).unwrap_or(i64::MAX))
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Adds `value` under `key` unless `max` keys are taken; then under [`OTHER`].
fn bounded_add(map: &mut BTreeMap<String, i64>, max: usize, key: &str, value: i64) {
    if let Some(v) = map.get_mut(key) {
        *v += value;
    } else if map.len() < max {
        map.insert(key.to_owned(), value);
    } else {
        *map.entry(OTHER.to_owned()).or_default() += value;
    }
}

impl NodeCollector {
    /// One per-topic counter family.
    fn topic_family(
        &self,
        enc: &mut DescriptorEncoder,
        spec: (&str, &str, Option<&Unit>),
        pick: fn(&TopicStats) -> u64,
    ) -> fmt::Result {
        let values = self.metrics.topics.values(pick);
        family(
            enc,
            spec,
            MetricType::Counter,
            values.into_iter().map(|(t, v)| ([("topic", t)], signed(v))),
        )
    }

    fn encode_requests(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        self.topic_family(
            enc,
            (
                "raftmq_messages_sent",
                "Messages stored by sends this node led, by topic",
                None,
            ),
            |s| s.sent.load(Ordering::Relaxed),
        )?;
        self.topic_family(
            enc,
            (
                "raftmq_sent",
                "Body bytes stored by sends this node led, by topic",
                Some(&BYTES),
            ),
            |s| s.sent_bytes.load(Ordering::Relaxed),
        )?;
        self.topic_family(
            enc,
            (
                "raftmq_messages_pulled",
                "Messages returned by pulls from this node, by topic",
                None,
            ),
            |s| s.pulled.load(Ordering::Relaxed),
        )?;
        self.topic_family(
            enc,
            (
                "raftmq_messages_received",
                "Messages handed out by POP receives, by topic",
                None,
            ),
            |s| s.received.load(Ordering::Relaxed),
        )?;
        self.topic_family(
            enc,
            ("raftmq_messages_acked", "POP messages acknowledged, by topic", None),
            |s| s.acked.load(Ordering::Relaxed),
        )?;
        histogram(
            enc,
            "raftmq_send_duration",
            "Send requests on the leader from arrival to the answer (stored on a majority and applied)",
            Some(&SECONDS),
            &m.send_seconds,
        )?;
        histogram(
            enc,
            "raftmq_replication_round_duration",
            "AppendEntries from sent to a follower to its answer",
            Some(&SECONDS),
            &m.replication_seconds,
        )?;
        let refusals = &m.auth_refusals;
        family(
            enc,
            (
                "raftmq_auth_refusals",
                "Client requests the ACL refused: unauthenticated (no, unknown, wrong, expired or replayed signature) or permission_denied",
                None,
            ),
            MetricType::Counter,
            [
                (
                    [("reason", "unauthenticated".to_owned())],
                    refusals.unauthenticated.load(Ordering::Relaxed) as i64,
                ),
                (
                    [("reason", "permission_denied".to_owned())],
                    refusals.permission_denied.load(Ordering::Relaxed) as i64,
                ),
            ],
        )
    }

    fn encode_raft(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let r = self.raft.metrics().borrow_watched().clone();
        gauge(
            enc,
            "raftmq_raft_term",
            "Current Raft term",
            None,
            signed(r.current_term),
        )?;
        gauge(
            enc,
            "raftmq_raft_leader_id",
            "Node id of the leader this replica knows, -1 when none",
            None,
            r.current_leader.map_or(-1, signed),
        )?;
        let leads = r.current_leader == Some(r.id);
        gauge(
            enc,
            "raftmq_raft_is_leader",
            "1 on the group's leader",
            None,
            i64::from(leads),
        )?;
        let last_log = r.last_log_index.map_or(0, signed);
        gauge(
            enc,
            "raftmq_raft_last_log_index",
            "Index of the last log entry",
            None,
            last_log,
        )?;
        gauge(
            enc,
            "raftmq_raft_committed_index",
            "Index of the last committed entry this replica knows",
            None,
            index(r.local_committed.as_ref()),
        )?;
        gauge(
            enc,
            "raftmq_raft_applied_index",
            "Index of the last entry applied to the state machine",
            None,
            index(r.last_applied.as_ref()),
        )?;
        gauge(
            enc,
            "raftmq_raft_purged_index",
            "Index up to which the log was purged (retention)",
            None,
            index(r.purged.as_ref()),
        )?;
        let recorder = &self.metrics.raft;
        counter(
            enc,
            "raftmq_raft_elections",
            "Terms this replica saw begin since it started: each is one election",
            None,
            recorder.elections.load(Ordering::Relaxed),
        )?;
        counter(
            enc,
            "raftmq_raft_votes",
            "Vote requests this replica handled",
            None,
            recorder.votes.load(Ordering::Relaxed),
        )?;
        histogram(
            enc,
            "raftmq_raft_write_batch_entries",
            "Client writes openraft merged into one append",
            None,
            &recorder.write_batch,
        )?;
        histogram(
            enc,
            "raftmq_raft_apply_batch_entries",
            "Entries applied to the state machine in one batch",
            None,
            &recorder.apply_batch,
        )?;
        // Only the leader tracks its followers.
        let matched = r.replication.iter().flatten().filter(|(id, _)| **id != r.id);
        family(
            enc,
            (
                "raftmq_raft_follower_lag_entries",
                "On the leader: entries each follower lacks (last log index - matched index)",
                None,
            ),
            MetricType::Gauge,
            matched.map(|(id, m)| ([("follower", id.to_string())], last_log - index(m.as_ref()))),
        )?;
        let acked: Vec<_> = r
            .heartbeat
            .iter()
            .flatten()
            .filter_map(|(id, at)| Some((*id, at.as_ref()?)))
            .filter(|(id, _)| *id != r.id)
            .collect();
        if acked.is_empty() {
            return Ok(());
        }
        let mut ages = enc.encode_descriptor(
            "raftmq_raft_follower_last_ack_age",
            "On the leader: time since each follower last acknowledged a heartbeat or append",
            Some(&SECONDS),
            MetricType::Gauge,
        )?;
        // A follower that never acknowledged has no sample.
        for (id, at) in acked {
            let age = openraft::Instant::elapsed(&**at).as_secs_f64();
            ConstGauge::new(age).encode(ages.encode_family(&[("follower", id.to_string())])?)?;
        }
        Ok(())
    }

    fn encode_storage(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let segments = self.store.segments();
        gauge(
            enc,
            "raftmq_commitlog_segments",
            "CommitLog segment files retained (the log's and the snapshot archive's)",
            None,
            signed(segments.len() as u64),
        )?;
        gauge(
            enc,
            "raftmq_commitlog",
            "Bytes of records in the retained CommitLog segments",
            Some(&BYTES),
            signed(segments.iter().map(|s| s.info.bytes).sum()),
        )?;
        let flush = self.log.stats();
        counter(
            enc,
            "raftmq_commitlog_fsyncs",
            "fdatasync calls on CommitLog segments",
            None,
            flush.fsyncs.load(Ordering::Relaxed),
        )?;
        histogram(
            enc,
            "raftmq_commitlog_fsync_duration",
            "One flush round's fdatasync of the CommitLog",
            Some(&SECONDS),
            &flush.fsync_seconds,
        )?;
        histogram(
            enc,
            "raftmq_commitlog_group_commit_appends",
            "Appends made durable by one flush round (group commit size)",
            None,
            &flush.group_commit_appends,
        )?;
        histogram(
            enc,
            "raftmq_apply_duration",
            "One state-machine apply batch: commands, RocksDB write and replies",
            Some(&SECONDS),
            self.store.apply_seconds(),
        )?;
        self.encode_rocksdb(enc)
    }

    fn encode_rocksdb(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        const PER_CF: [(&str, &str, &str, bool); 5] = [
            (
                "rocksdb.estimate-live-data-size",
                "raftmq_rocksdb_live_data",
                "RocksDB's estimate of live data, by column family",
                true,
            ),
            (
                "rocksdb.total-sst-files-size",
                "raftmq_rocksdb_sst_files",
                "Size of all SST files, by column family",
                true,
            ),
            (
                "rocksdb.cur-size-all-mem-tables",
                "raftmq_rocksdb_memtables",
                "Size of the memtables, by column family",
                true,
            ),
            (
                "rocksdb.estimate-pending-compaction-bytes",
                "raftmq_rocksdb_pending_compaction",
                "Bytes compaction still has to rewrite, by column family",
                true,
            ),
            (
                "rocksdb.estimate-num-keys",
                "raftmq_rocksdb_keys",
                "RocksDB's estimate of the keys, by column family",
                false,
            ),
        ];
        // DB-wide properties, read through the first column family.
        const DB_WIDE: [(&str, &str, &str); 3] = [
            (
                "rocksdb.num-running-compactions",
                "raftmq_rocksdb_running_compactions",
                "Compactions running now",
            ),
            (
                "rocksdb.num-running-flushes",
                "raftmq_rocksdb_running_flushes",
                "Flushes running now",
            ),
            (
                "rocksdb.is-write-stopped",
                "raftmq_rocksdb_write_stopped",
                "1 while RocksDB stops writes (too many L0 files or pending compaction)",
            ),
        ];
        let names: Vec<&str> = PER_CF.iter().map(|p| p.0).chain(DB_WIDE.iter().map(|p| p.0)).collect();
        let values = self.store.rocksdb_properties(&names);
        for (property, name, help, bytes) in PER_CF {
            let series = values
                .iter()
                .filter(|(_, p, _)| p == property)
                .map(|(cf, _, v)| ([("cf", (*cf).to_owned())], signed(*v)));
            family(enc, (name, help, bytes.then_some(&BYTES)), MetricType::Gauge, series)?;
        }
        for (property, name, help) in DB_WIDE {
            if let Some((_, _, v)) = values.iter().find(|(_, p, _)| p == property) {
                gauge(enc, name, help, None, signed(*v))?;
            }
        }
        Ok(())
    }

    fn encode_lifecycle(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let store = &self.store;
        gauge(
            enc,
            "raftmq_timers_pending",
            "Delayed messages and retries not yet due (RocksDB's key estimate)",
            None,
            signed(store.pending_timers_estimate()),
        )?;
        gauge(
            enc,
            "raftmq_transactions_pending",
            "Half messages whose transaction has not ended",
            None,
            signed(store.with_txn(|t| t.pending_count()) as u64),
        )?;
        let mut inflight = BTreeMap::new();
        let mut pop_progress = Vec::new();
        store.with_pop(|p| {
            for (group, g) in &p.groups {
                bounded_add(&mut inflight, MAX_GROUP_LABELS, group, signed(g.inflight() as u64));
                for ((topic, queue), q) in &g.queues {
                    if pop_progress.len() < MAX_LAG_SERIES {
                        pop_progress.push((group.clone(), topic.clone(), *queue, q.progress()));
                    }
                }
            }
        });
        family(
            enc,
            (
                "raftmq_pop_inflight_messages",
                "POP messages handed out and not yet acknowledged, by consumer group",
                None,
            ),
            MetricType::Gauge,
            inflight.into_iter().map(|(g, v)| ([("consumer_group", g)], v)),
        )?;
        let topics = store.topics().unwrap_or_default();
        gauge(
            enc,
            "raftmq_topics",
            "Topics on this broker group",
            None,
            signed(topics.len() as u64),
        )?;
        let mut dlq = BTreeMap::new();
        for t in topics.iter().filter(|t| t.name.starts_with(DLQ_TOPIC_PREFIX)) {
            let mut size = 0u64;
            for q in 0..t.queues {
                let next = store.queue_next_offset(&t.name, q).unwrap_or(0);
                let min = store.queue_min_offset(&t.name, q).unwrap_or(next);
                size += next.saturating_sub(min);
            }
            bounded_add(&mut dlq, MAX_GROUP_LABELS, &t.name, signed(size));
        }
        family(
            enc,
            (
                "raftmq_dlq_messages",
                "Messages retained in each dead-letter topic",
                None,
            ),
            MetricType::Gauge,
            dlq.into_iter().map(|(t, v)| ([("topic", t)], v)),
        )?;
        // Committed offsets (pull consumers) and POP progress, against each queue's end.
        let mut committed = store.consumer_offsets(None).unwrap_or_default();
        let dropped = committed.len().saturating_sub(MAX_LAG_SERIES);
        committed.truncate(MAX_LAG_SERIES);
        let room = MAX_LAG_SERIES - committed.len();
        let dropped = dropped + pop_progress.len().saturating_sub(room);
        committed.extend(pop_progress.into_iter().take(room));
        let lag = committed.into_iter().map(|(group, topic, queue, offset)| {
            let next = store.queue_next_offset(&topic, queue).unwrap_or(offset);
            (
                [
                    ("consumer_group", group),
                    ("topic", topic),
                    ("queue", queue.to_string()),
                ],
                signed(next.saturating_sub(offset)),
            )
        });
        family(
            enc,
            (
                "raftmq_consumer_lag_messages",
                "Messages between a consumer group's committed offset (or POP progress) and the queue's end",
                None,
            ),
            MetricType::Gauge,
            lag,
        )?;
        gauge(
            enc,
            "raftmq_consumer_lag_series_dropped",
            "Consumer-lag series left out of this scrape past the bound",
            None,
            signed(dropped as u64),
        )
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        self.encode_requests(&mut enc)?;
        self.encode_raft(&mut enc)?;
        self.encode_storage(&mut enc)?;
        self.encode_lifecycle(&mut enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_past_the_bound_share_one_label() {
        let t = TopicCounters::new(2);
        for topic in ["a", "b", "c", "d", "a"] {
            t.with(topic, |s| {
                s.sent.fetch_add(1, Ordering::Relaxed);
            });
        }
        let values = t.values(|s| s.sent.load(Ordering::Relaxed));
        assert_eq!(values, vec![("a".into(), 2), ("b".into(), 1), (OTHER.into(), 2)]);
    }
}
