//! The `raftmq` binary: parses the command line and dispatches to the component
//! crates.

mod bench;
mod bench_lifecycle;
mod chaos;
mod chaos_lifecycle;
mod chaos_txn;
mod failover_bench;
mod local;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "raftmq",
    version,
    about = "A RocketMQ-style message broker whose broker groups are Raft groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a NameServer (route registry).
    Namesrv(NamesrvArgs),
    /// Run one broker node (one replica of one broker group).
    Broker(Box<BrokerArgs>),
    /// Run a whole local cluster: a NameServer and a 3-replica broker group.
    Dev(DevArgs),
    /// Administer a cluster: topics, cluster status, consumer groups, messages.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Send a bounded number of messages and report what happened.
    Produce(ProduceArgs),
    /// Print messages of one queue from an offset.
    Pull(PullArgs),
    /// Consume a topic as a member of a consumer group; prints (or counts) messages.
    Consume(ConsumeArgs),
    /// Benchmark a cluster (or a local one it starts): produce, consume, e2e.
    Bench(Box<bench::BenchArgs>),
    /// Run producers and consumers against a docker-compose cluster while killing,
    /// pausing and isolating its brokers; check nothing acknowledged was lost.
    Chaos(Box<chaos::ChaosArgs>),
    /// Inspect a replica's on-disk store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(clap::Args)]
struct NamesrvArgs {
    /// Address to listen on.
    #[arg(long, env = "RAFTMQ_NAMESRV_LISTEN", default_value = "127.0.0.1:9876")]
    listen: SocketAddr,
    /// A broker node silent for this long is dropped from routes.
    #[arg(long, env = "RAFTMQ_BROKER_TIMEOUT_MS", default_value_t = 10_000)]
    broker_timeout_ms: u64,
    /// Heartbeat interval the NameServer asks broker nodes to keep.
    #[arg(long, env = "RAFTMQ_HEARTBEAT_INTERVAL_MS", default_value_t = 2_000)]
    heartbeat_interval_ms: u64,
}

/// Settings of `raftmq broker`. Precedence: defaults < `--config` file < env < flags.
#[derive(clap::Args, Default)]
struct BrokerArgs {
    /// A TOML file with any of the settings below (same names, snake_case).
    #[arg(long, env = "RAFTMQ_CONFIG")]
    config: Option<PathBuf>,
    /// Broker group (Raft group) this replica belongs to, e.g. broker-a.
    #[arg(long, env = "RAFTMQ_GROUP")]
    group: Option<String>,
    #[arg(long, env = "RAFTMQ_NODE_ID")]
    node_id: Option<u64>,
    /// Address the client API listens on.
    #[arg(long, env = "RAFTMQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// host:port clients dial (defaults to --listen).
    #[arg(long, env = "RAFTMQ_ADVERTISE")]
    advertise: Option<String>,
    /// Address the Raft peer port listens on (default: --listen's port + 30000,
    /// DLedger's convention: 10911 -> 40911). Only the group's replicas use it.
    #[arg(long, env = "RAFTMQ_RAFT_LISTEN")]
    raft_listen: Option<SocketAddr>,
    /// host:port peers dial for Raft (default: --advertise's host, port + 30000).
    #[arg(long, env = "RAFTMQ_RAFT_ADVERTISE")]
    raft_advertise: Option<String>,
    /// File holding the group's peer secret (at least 16 bytes; surrounding
    /// whitespace ignored), the same on every replica. Raft RPCs are signed with
    /// it. The environment variable RAFTMQ_PEER_SECRET may give the secret itself
    /// instead (never a flag: command lines are visible to every local user).
    #[arg(long, env = "RAFTMQ_PEER_SECRET_FILE")]
    peer_secret_file: Option<PathBuf>,
    /// Campaign at once when the leader's connections close and it no longer
    /// answers (default true); false leaves a dead leader to the election timeout.
    #[arg(long, env = "RAFTMQ_FAST_FAILOVER")]
    fast_failover: Option<bool>,
    #[arg(long, env = "RAFTMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// NameServers to register with, comma-separated.
    #[arg(long, env = "RAFTMQ_NAMESRV", value_delimiter = ',')]
    namesrv: Option<Vec<String>>,
    /// The group's initial members as id=host:port (the client address; the Raft
    /// address is then port + 30000) or id=host:port/raft_host:raft_port,
    /// comma-separated; the lowest id forms the group on its first start.
    #[arg(long, env = "RAFTMQ_PEERS", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Create unknown topics on first send (off in production).
    #[arg(long, env = "RAFTMQ_AUTO_CREATE_TOPICS")]
    auto_create_topics: Option<bool>,
    /// sync: acknowledge after fdatasync (default); async: before it.
    #[arg(long, env = "RAFTMQ_FLUSH")]
    flush: Option<String>,
    /// Async worker threads (default: one per core). Replicas sharing a machine do
    /// better with the cores split among them (`raftmq dev` does that).
    #[arg(long, env = "RAFTMQ_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(flatten)]
    transactions: TransactionTiming,
}

/// When the leader asks producers about unresolved transactions.
#[derive(clap::Args, Clone, Default)]
struct TransactionTiming {
    /// First check of a transaction nobody ended, after its half message was
    /// stored (default 6000, RocketMQ's).
    #[arg(long, env = "RAFTMQ_TRANSACTION_FIRST_CHECK_MS")]
    transaction_first_check_ms: Option<u64>,
    /// Between later checks (default 30000).
    #[arg(long, env = "RAFTMQ_TRANSACTION_CHECK_INTERVAL_MS")]
    transaction_check_interval_ms: Option<u64>,
    /// Checks before an unresolved transaction is rolled back and counted (default 15).
    #[arg(long, env = "RAFTMQ_TRANSACTION_MAX_CHECKS")]
    transaction_max_checks: Option<u32>,
}

impl TransactionTiming {
    /// As `raftmq broker` arguments, for the replicas `raftmq dev` starts.
    fn broker_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                v.push(flag.to_owned());
                v.push(value);
            }
        };
        push(
            "--transaction-first-check-ms",
            self.transaction_first_check_ms.map(|x| x.to_string()),
        );
        push(
            "--transaction-check-interval-ms",
            self.transaction_check_interval_ms.map(|x| x.to_string()),
        );
        push(
            "--transaction-max-checks",
            self.transaction_max_checks.map(|x| x.to_string()),
        );
        v
    }
}

/// The `--config` file of `raftmq broker`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BrokerFile {
    group: Option<String>,
    node_id: Option<u64>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    raft_listen: Option<SocketAddr>,
    raft_advertise: Option<String>,
    peer_secret_file: Option<PathBuf>,
    fast_failover: Option<bool>,
    data_dir: Option<PathBuf>,
    namesrv: Option<Vec<String>>,
    peers: Option<Vec<String>>,
    auto_create_topics: Option<bool>,
    flush: Option<String>,
    worker_threads: Option<usize>,
    transaction_first_check_ms: Option<u64>,
    transaction_check_interval_ms: Option<u64>,
    transaction_max_checks: Option<u32>,
}

#[derive(clap::Args)]
struct NamesrvAddr {
    /// NameServer address(es), comma-separated.
    #[arg(
        long,
        env = "RAFTMQ_NAMESRV",
        default_value = "127.0.0.1:9876",
        value_delimiter = ','
    )]
    namesrv: Vec<String>,
}

#[derive(clap::Args)]
struct DevArgs {
    /// Where the replicas keep their data and logs; a second run reuses it.
    #[arg(long, env = "RAFTMQ_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// sync: acknowledge after fdatasync on a majority (default); async: before it.
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    flush: String,
    /// The NameServer's address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9876")]
    namesrv_listen: String,
    /// The three replicas' ports on 127.0.0.1 (0: any free port). The group's
    /// membership is fixed on the first run: keep the ports for later runs.
    #[arg(long, value_delimiter = ',', default_value = "10911,10912,10913")]
    broker_ports: Vec<u16>,
    /// Async worker threads per replica (default: the cores split among the three).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    #[command(flatten)]
    transactions: TransactionTiming,
}

#[derive(clap::Args)]
struct PullArgs {
    #[command(flatten)]
    namesrv: NamesrvAddr,
    #[arg(long)]
    topic: String,
    /// Broker group (default: the first in the topic's route).
    #[arg(long)]
    group: Option<String>,
    #[arg(long, default_value_t = 0)]
    queue: u32,
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// At most this many messages are printed.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Tag expression: `*` or `TagA || TagB`.
    #[arg(long, default_value = "*")]
    tag: String,
    /// SQL92 filter over properties and TAGS (instead of --tag), e.g. "a > 5 AND TAGS = 'x'".
    #[arg(long, conflicts_with = "tag")]
    sql: Option<String>,
    /// Long-poll this long for the first message when the queue has none.
    #[arg(long, default_value_t = 0)]
    wait_ms: u64,
}

#[derive(clap::Args)]
struct ConsumeArgs {
    #[command(flatten)]
    namesrv: NamesrvAddr,
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Exit after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Tag expression: `*` or `TagA || TagB` (filtered on the broker).
    #[arg(long, default_value = "*")]
    tag: String,
    /// SQL92 filter over properties and TAGS (instead of --tag), e.g. "a > 5 AND TAGS = 'x'".
    #[arg(long, conflicts_with = "tag")]
    sql: Option<String>,
    /// Consume as a POP group (RocketMQ 5's SimpleConsumer): receive, then ack
    /// each message; unacked messages come back after --invisible-ms.
    #[arg(long, conflicts_with_all = ["broadcast", "orderly"])]
    pop: bool,
    /// POP: how long a received message stays invisible to the group.
    #[arg(long, default_value_t = 30_000, requires = "pop")]
    invisible_ms: u64,
    /// Every member gets every message; offsets kept in --offset-dir.
    #[arg(long)]
    broadcast: bool,
    /// Where a group with no committed offset starts: first, last, or a time in
    /// ms since the epoch.
    #[arg(long, default_value = "first")]
    from: String,
    /// One message at a time per queue, in queue order.
    #[arg(long)]
    orderly: bool,
    /// Count messages instead of printing each.
    #[arg(long)]
    quiet: bool,
    /// Exit when no message arrived for this long (0: never).
    #[arg(long, default_value_t = 0)]
    idle_exit_ms: u64,
    /// Broadcasting offsets directory.
    #[arg(long, default_value = ".")]
    offset_dir: PathBuf,
}

#[derive(clap::Args)]
struct ProduceArgs {
    #[command(flatten)]
    namesrv: NamesrvAddr,
    #[arg(long)]
    topic: String,
    /// How many messages to send (always bounded).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value = "")]
    tag: String,
    /// Sharding key: messages with one key keep their order.
    #[arg(long)]
    key: Option<String>,
    /// Deliver at this time (ms since the Unix epoch), not before.
    #[arg(long, conflicts_with_all = ["delay_ms", "delay_level"])]
    deliver_at: Option<u64>,
    /// Deliver this many ms after the broker stores each message.
    #[arg(long, conflicts_with = "delay_level")]
    delay_ms: Option<u64>,
    /// RocketMQ delay level 1..18 (1s 5s 10s 30s 1m 2m ... 2h).
    #[arg(long)]
    delay_level: Option<u32>,
    /// User property `name=value` on every message (repeatable).
    #[arg(long = "property", value_name = "NAME=VALUE")]
    properties: Vec<String>,
    /// Send each message as a transactional (half) message of --producer-group,
    /// invisible to consumers until its transaction ends as --outcome says.
    /// With it, --key is only the message's key (indexed once committed), not a
    /// sharding key.
    #[arg(long, requires = "producer_group", conflicts_with_all = ["deliver_at", "delay_ms", "delay_level"])]
    transactional: bool,
    /// The producer group brokers ask (check back) about unresolved transactions.
    #[arg(long, requires = "transactional")]
    producer_group: Option<String>,
    /// How each transaction ends: commit, rollback, or unknown (left to the
    /// brokers' check-backs, which this command answers with --check-answer).
    #[arg(long, value_enum, default_value = "commit", requires = "transactional")]
    outcome: TxnAnswer,
    /// The answer to a check-back: for transactions left unknown (or sent by
    /// another producer of the group). A transaction whose commit or rollback
    /// failed is answered with that decision instead.
    #[arg(long, value_enum, default_value = "commit", requires = "transactional")]
    check_answer: TxnAnswer,
    /// Longest wait for check-backs to resolve the transactions left unknown
    /// (or whose end failed) before giving up.
    #[arg(long, default_value_t = 60, requires = "transactional")]
    wait_secs: u64,
}

/// A transaction's outcome as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TxnAnswer {
    Commit,
    Rollback,
    Unknown,
}

impl From<TxnAnswer> for raftmq_client::TransactionResolution {
    fn from(a: TxnAnswer) -> Self {
        match a {
            TxnAnswer::Commit => raftmq_client::TransactionResolution::Commit,
            TxnAnswer::Rollback => raftmq_client::TransactionResolution::Rollback,
            TxnAnswer::Unknown => raftmq_client::TransactionResolution::Unknown,
        }
    }
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Broker groups, their leaders and replicas, as each group's leader reports them.
    Cluster(NamesrvAddr),
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Consumer groups: list, describe (members, offsets, lag), reset offsets.
    #[command(subcommand)]
    Group(GroupCommand),
    /// A consumer group's dead-letter queue (`%DLQ%<group>`): list, resend.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Transactional messages: the pending half messages and each group's totals.
    #[command(subcommand)]
    Transaction(TransactionCommand),
    /// Look a message up by id (`--id`), or by key (`--topic T --key K`).
    Message {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long, conflicts_with_all = ["topic", "key"], required_unless_present = "key")]
        id: Option<String>,
        #[arg(long, requires = "key")]
        topic: Option<String>,
        #[arg(long, requires = "topic")]
        key: Option<String>,
    },
    /// Exit 0 if the server at an endpoint answers (a container health check that
    /// needs no shell): a broker node's AdminService or a NameServer's route service.
    Health {
        /// A broker node's host:port.
        #[arg(long, conflicts_with = "namesrv", required_unless_present = "namesrv")]
        broker: Option<String>,
        /// A NameServer's host:port.
        #[arg(long)]
        namesrv: Option<String>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic (or update its queue count or message type) on every broker group.
    Create {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        /// Which messages RocketMQ 5 clients may send to the topic (mixed: any).
        /// Default: normal for a new topic; an existing topic keeps its type
        /// unless this is given, so changing --queues never changes what it accepts.
        #[arg(long, value_enum)]
        message_type: Option<TopicMessageTypeArg>,
    },
    /// List topics on every broker group, with their queues, permission and message type.
    List(NamesrvAddr),
}

/// A topic's message type as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TopicMessageTypeArg {
    Normal,
    Fifo,
    Delay,
    Transaction,
    Mixed,
}

impl From<TopicMessageTypeArg> for raftmq_proto::v1::MessageType {
    fn from(t: TopicMessageTypeArg) -> Self {
        use raftmq_proto::v1::MessageType;
        match t {
            TopicMessageTypeArg::Normal => MessageType::Normal,
            TopicMessageTypeArg::Fifo => MessageType::Fifo,
            TopicMessageTypeArg::Delay => MessageType::Delay,
            TopicMessageTypeArg::Transaction => MessageType::Transaction,
            TopicMessageTypeArg::Mixed => MessageType::Mixed,
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// The dead letters of a consumer group, with where they came from.
    List {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        group: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
    },
    /// Send a dead letter back to its original topic (it stays in the DLQ).
    Resend {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        group: String,
        /// The message id as `dlq list` shows it.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum TransactionCommand {
    /// Per broker group, the pending half messages (oldest first) with their
    /// age and check-backs, and the group's committed / rolled-back totals.
    List {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// Only this producer group's pending transactions (totals stay the group's).
        #[arg(long)]
        producer_group: Option<String>,
        /// At most this many pending transactions per broker group (the broker caps it at 10,000).
        #[arg(long, default_value_t = 100)]
        max: u32,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Every consumer group with committed offsets or live members.
    List(NamesrvAddr),
    /// A group's members, and per queue its committed offset, end and lag.
    Describe {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        group: String,
    },
    /// Set a consumer group's retry and POP settings on every broker group.
    Config {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        group: String,
        /// POP: one delivery at a time per queue, in order.
        #[arg(long)]
        fifo: bool,
        /// Failed deliveries before the dead-letter queue (default 16).
        #[arg(long)]
        max_retries: Option<u32>,
        /// Backoff per retry in ms, comma-separated; the last repeats
        /// (default RocketMQ's 10s,30s,1m,...,2h).
        #[arg(long, value_delimiter = ',')]
        retry_delays_ms: Vec<u64>,
    },
    /// Move a group's offsets in every queue of a topic; running members jump
    /// on their next heartbeat.
    ResetOffset {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        /// first, last, or a time in ms since the epoch.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Open a replica's data directory (recovering a torn tail), read back every
    /// retained record verifying its checksum, and print what it holds.
    Verify {
        /// The replica's data directory (holds `log/` and `sm/`).
        #[arg(long, env = "RAFTMQ_DATA_DIR")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): every subcommand talks gRPC, and a
    // write to a connection a killed peer left behind must be an error to retry,
    // not a signal that kills the broker or the client. (Restoring the default
    // action for `raftmq admin cluster | head` killed `raftmq chaos` mid-run.)
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
    // Colour only on a terminal: container logs and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let command = cli.command;
    // A broker's config file may set its worker count, which the runtime needs
    // before anything runs; other subcommands take tokio's default (one per core).
    let (broker_file, workers) = match &command {
        Command::Broker(args) => {
            let file = read_broker_file(args.config.as_deref())?;
            let workers = args.worker_threads.or(file.worker_threads);
            (Some(file), workers)
        }
        _ => (None, None),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        anyhow::ensure!(
            (1..=1024).contains(&n),
            "invalid worker_threads = {n}: must be between 1 and 1024"
        );
        builder.worker_threads(n);
    }
    let rt = builder.enable_all().build()?;
    rt.block_on(async move {
        match command {
            Command::Namesrv(args) => done(run_namesrv(args).await),
            Command::Broker(args) => done(run_broker(*args, broker_file.unwrap_or_default()).await),
            Command::Dev(args) => done(run_dev(args).await),
            Command::Admin(cmd) => done(tools::run_admin(cmd).await),
            Command::Produce(args) => tools::run_produce(args).await,
            Command::Pull(args) => done(tools::run_pull(args).await),
            Command::Store(StoreCommand::Verify { data_dir }) => done(tools::verify_store(data_dir).await),
            Command::Bench(args) => done(bench::run(*args).await),
            Command::Chaos(args) => Ok(if chaos::run(*args).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }),
            Command::Consume(args) => done(tools::run_consume(args).await),
        }
    })
}

/// Cancels `token` on the first SIGINT or SIGTERM so servers stop cleanly; a
/// second SIGINT exits at once.
fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C still stops");
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down (press Ctrl-C again to exit at once)");
        token.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}

async fn run_namesrv(args: NamesrvArgs) -> anyhow::Result<()> {
    let config = raftmq_namesrv::NameServerConfig {
        broker_timeout: Duration::from_millis(args.broker_timeout_ms),
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
    };
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the NameServer to {}", args.listen))?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    println!("NameServer listening on {}", listener.local_addr()?);
    raftmq_namesrv::serve(config, listener, token).await?;
    Ok(())
}

const DEV_GROUP: &str = "broker-a";

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.broker_ports.len() == 3,
        "--broker-ports needs three ports (one per replica), got {}",
        args.broker_ports.len()
    );
    let cluster = local::LocalCluster::start(local::LocalClusterOptions {
        data_dir: args.data_dir.clone(),
        namesrv: args.namesrv_listen.clone(),
        group: DEV_GROUP.to_owned(),
        broker_ports: args.broker_ports.clone(),
        flush: args.flush,
        // First contact should not need an admin step before the first send.
        auto_create_topics: true,
        restart_delay: Duration::from_secs(3),
        worker_threads: args.worker_threads.map(usize::from),
        broker_args: args.transactions.broker_args(),
    })
    .await?;
    let token = cluster.token();
    cancel_on_signal(token.clone());
    let leader = tokio::select! {
        l = cluster.wait_for_leader(Duration::from_secs(30)) => Some(l),
        _ = token.cancelled() => None,
    };
    match leader {
        Some(Ok(leader)) => {
            println!("raftmq dev cluster is up (data under {}):", args.data_dir.display());
            println!("  NameServer        {}", cluster.namesrv);
            for r in &cluster.replicas {
                let role = if r.node_id == leader { "leader" } else { "follower" };
                let pid = std::fs::read_to_string(&r.pid_file).unwrap_or_default();
                println!(
                    "  {DEV_GROUP} node {}  {}  pid {:<8} log {}  ({role})",
                    r.node_id,
                    r.endpoint,
                    pid.trim(),
                    r.log_file.display()
                );
            }
            println!("Topics are created on first send. A killed replica is restarted after 3 s; its pid file");
            println!(
                "is {}/{DEV_GROUP}-N.pid. Ctrl-C stops the cluster.",
                args.data_dir.display()
            );
            token.cancelled().await;
        }
        Some(Err(e)) => {
            cluster.stop().await?;
            return Err(e);
        }
        None => {}
    }
    cluster.stop().await
}

use raftmq_raft_store::RAFT_PORT_OFFSET;

/// `host:port` with the port moved by [`RAFT_PORT_OFFSET`] (port 0 stays 0: any).
fn raft_port_of(addr: &str) -> anyhow::Result<String> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{addr:?}: port is not a number"))?;
    if port == 0 {
        return Ok(format!("{host}:0"));
    }
    let raft = port.checked_add(RAFT_PORT_OFFSET).with_context(|| {
        format!("{addr:?}: port + {RAFT_PORT_OFFSET} is past 65535; give the Raft address explicitly")
    })?;
    Ok(format!("{host}:{raft}"))
}

/// Parses `id=host:port` or `id=host:port/raft_host:raft_port`.
fn parse_peer(p: &str) -> anyhow::Result<(u64, raftmq_raft_store::BrokerNode)> {
    let (id, addrs) = p
        .split_once('=')
        .with_context(|| format!("peer {p:?} is not id=host:port"))?;
    let id = id
        .trim()
        .parse()
        .with_context(|| format!("peer {p:?}: node id is not a number"))?;
    let (addr, raft) = match addrs.split_once('/') {
        Some((addr, raft)) => (addr.trim().to_owned(), raft.trim().to_owned()),
        None => (addrs.trim().to_owned(), raft_port_of(addrs.trim())?),
    };
    anyhow::ensure!(addr.contains(':'), "peer {p:?}: address is not host:port");
    anyhow::ensure!(raft.contains(':'), "peer {p:?}: Raft address is not host:port");
    Ok((id, raftmq_raft_store::BrokerNode::new(addr, raft)))
}

/// The peer secret: RAFTMQ_PEER_SECRET, or the file's contents.
fn read_peer_secret(file: Option<&std::path::Path>) -> anyhow::Result<raftmq_broker::PeerSecret> {
    let secret = match (std::env::var("RAFTMQ_PEER_SECRET"), file) {
        (Ok(value), _) => value,
        (Err(_), Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading the peer secret from {}", path.display()))?
        }
        (Err(_), None) => anyhow::bail!(
            "a peer secret is required (Raft peers authenticate with it): set peer_secret_file, \
             --peer-secret-file or RAFTMQ_PEER_SECRET, the same on every replica of the group"
        ),
    };
    Ok(raftmq_broker::PeerSecret::new(secret.trim().as_bytes().to_vec()))
}

/// The broker's `--config` file, or every setting unset without one.
fn read_broker_file(path: Option<&std::path::Path>) -> anyhow::Result<BrokerFile> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        None => Ok(BrokerFile::default()),
    }
}

async fn run_broker(args: BrokerArgs, file: BrokerFile) -> anyhow::Result<()> {
    use raftmq_broker::{RaftNode, RaftNodeConfig};
    use raftmq_raft_store::{BrokerNode, FlushMode};

    let group = args
        .group
        .or(file.group)
        .context("--group (or group in the config file) is required")?;
    let node_id = args.node_id.or(file.node_id).context("--node-id is required")?;
    let listen = args.listen.or(file.listen).context("--listen is required")?;
    let advertise = args.advertise.or(file.advertise).unwrap_or_else(|| listen.to_string());
    let raft_listen: SocketAddr = match args.raft_listen.or(file.raft_listen) {
        Some(addr) => addr,
        None => raft_port_of(&listen.to_string())?.parse()?,
    };
    let raft_advertise = match args.raft_advertise.or(file.raft_advertise) {
        Some(addr) => addr,
        // An explicit --raft-listen with its own port is what peers dial.
        None if args.raft_listen.or(file.raft_listen).is_some() => {
            let host = advertise.rsplit_once(':').map_or(advertise.as_str(), |(h, _)| h);
            format!("{host}:{}", raft_listen.port())
        }
        None => raft_port_of(&advertise)?,
    };
    let peer_secret = read_peer_secret(args.peer_secret_file.or(file.peer_secret_file).as_deref())?;
    let data_dir = args.data_dir.or(file.data_dir).context("--data-dir is required")?;
    let peers = args
        .peers
        .or(file.peers)
        .unwrap_or_default()
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<std::collections::BTreeMap<u64, BrokerNode>>>()?;
    anyhow::ensure!(
        peers.is_empty() || peers.contains_key(&node_id),
        "--peers does not list this node ({node_id})"
    );
    let mut config = RaftNodeConfig::new(node_id, group.clone(), data_dir, advertise);
    config.raft_advertise_addr = raft_advertise;
    config.peer_secret = peer_secret;
    config.fast_failover.enabled = args.fast_failover.or(file.fast_failover).unwrap_or(true);
    config.nameservers = args.namesrv.or(file.namesrv).unwrap_or_default();
    config.messaging.auto_create_topics = args.auto_create_topics.or(file.auto_create_topics).unwrap_or(false);
    let t = &args.transactions;
    if let Some(ms) = t.transaction_first_check_ms.or(file.transaction_first_check_ms) {
        config.messaging.transaction_first_check = Duration::from_millis(ms);
    }
    if let Some(ms) = t.transaction_check_interval_ms.or(file.transaction_check_interval_ms) {
        config.messaging.transaction_check_interval = Duration::from_millis(ms);
    }
    if let Some(n) = t.transaction_max_checks.or(file.transaction_max_checks) {
        config.messaging.transaction_max_checks = n;
    }
    config.store.flush = match args.flush.or(file.flush).as_deref() {
        None | Some("sync") => FlushMode::Sync,
        Some("async") => FlushMode::Async,
        Some(other) => anyhow::bail!("invalid flush = {other:?}: must be sync or async"),
    };
    let client = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding broker node {node_id}'s client port to {listen}"))?;
    let raft = tokio::net::TcpListener::bind(raft_listen)
        .await
        .with_context(|| format!("binding broker node {node_id}'s Raft peer port to {raft_listen}"))?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    let node = RaftNode::start(config, raftmq_broker::Listeners { client, raft }, token.clone()).await?;
    // The lowest id forms the group, once; the others learn the membership from it.
    if peers.keys().next() == Some(&node_id) && !node.raft().is_initialized().await? {
        node.initialize(peers).await?;
        println!("formed broker group {group}");
    }
    println!("broker {group} node {node_id} listening on {listen} (Raft peers on {raft_listen})");
    node.run_until_cancelled().await?;
    Ok(())
}
