//! The `raftmq` binary: parses the command line and dispatches to the component
//! crates.

mod acl_cli;
mod bench;
mod bench_lifecycle;
mod chaos;
mod chaos_lifecycle;
mod chaos_txn;
mod console;
mod failover_bench;
mod local;
mod settings;
#[cfg(test)]
mod settings_tests;
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
    /// Administer a cluster: topics, cluster status, consumer groups, messages,
    /// replicas and leadership.
    #[command(subcommand)]
    Admin(AdminCli),
    /// Send a bounded number of messages and report what happened.
    Produce(ProduceArgs),
    /// Print messages of one queue from an offset.
    Pull(PullArgs),
    /// Consume a topic as a member of a consumer group; prints (or counts) messages.
    Consume(ConsumeArgs),
    /// Benchmark a cluster (or a local one it starts): produce, consume, e2e.
    Bench(Box<bench::BenchArgs>),
    /// Serve the web console: cluster, topics, consumer groups, messages and live
    /// rates, in a browser (pages embedded in the binary).
    Console(console::ConsoleArgs),
    /// Run producers and consumers against a docker-compose cluster while killing,
    /// pausing and isolating its brokers; check nothing acknowledged was lost.
    Chaos(Box<chaos::ChaosArgs>),
    /// Inspect a replica's on-disk store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// TLS certificates.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Make a throwaway CA and one node certificate it signs (serverAuth and
    /// clientAuth, so brokers and NameServers can share it) for the given hosts:
    /// writes ca.pem, node.pem and node.key (mode 0600) into --out. The CA's key
    /// is not kept; run again (and restart every node) to add a host.
    Gen {
        /// Directory to write into (created if missing; an earlier set is replaced).
        #[arg(long)]
        out: PathBuf,
        /// IP addresses and DNS names the certificate is valid for, comma-separated
        /// (every address clients and peers dial: advertised hosts, 127.0.0.1 for
        /// health checks).
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
}

/// Settings of `raftmq namesrv`: the NameServer's config struct, filled from
/// defaults < `--config` file < `RAFTMQ_NAMESRV_*` environment < flags.
#[derive(clap::Args)]
struct NamesrvArgs {
    /// A TOML file of settings (`--print-config` lists every key with its default).
    #[arg(long, env = "RAFTMQ_NAMESRV_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:9876).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A broker node silent for this long is dropped from routes (default 10000).
    #[arg(long)]
    broker_timeout_ms: Option<u64>,
    /// Heartbeat interval the NameServer asks broker nodes to keep (default 2000).
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Address of the Prometheus metrics endpoint (default: --listen's port +
    /// 20000, 127.0.0.1:29876; empty: none).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Any setting as KEY=VALUE, e.g. `--set broker_timeout=30s` (repeatable; wins over the other flags).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective settings as TOML (every key, defaults included) and exit.
    #[arg(long)]
    print_config: bool,
}

/// Settings of `raftmq broker`: the flags for the common settings. Every setting
/// (these and all others) lives in `RaftNodeConfig`, filled from defaults <
/// `--config` file < `RAFTMQ_*` environment < flags (see `settings`).
#[derive(clap::Args, Default)]
struct BrokerArgs {
    /// A TOML file of settings (`--print-config` lists every key with its default).
    #[arg(long, env = "RAFTMQ_CONFIG")]
    config: Option<PathBuf>,
    /// Broker group (Raft group) this replica belongs to, e.g. broker-a.
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    node_id: Option<u64>,
    /// Address the client API listens on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// host:port clients dial (defaults to --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Address the Raft peer port listens on (default: --listen's port + 30000,
    /// DLedger's convention: 10911 -> 40911). Only the group's replicas use it.
    #[arg(long)]
    raft_listen: Option<SocketAddr>,
    /// host:port peers dial for Raft (default: --advertise's host, port + 30000).
    #[arg(long)]
    raft_advertise: Option<String>,
    /// Address of the Prometheus metrics endpoint, HTTP (default: --listen's
    /// port + 20000, 10911 -> 30911; empty: none, and nothing is recorded).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// File holding the group's peer secret (at least 16 bytes; surrounding
    /// whitespace ignored), the same on every replica. Raft RPCs are signed with
    /// it. The environment variable RAFTMQ_PEER_SECRET may give the secret itself
    /// instead (never a flag: command lines are visible to every local user).
    #[arg(long)]
    peer_secret_file: Option<PathBuf>,
    /// Campaign at once when the leader's connections close and it no longer
    /// answers (default true); false leaves a dead leader to the election timeout.
    #[arg(long)]
    fast_failover: Option<bool>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// NameServers to register with, comma-separated.
    #[arg(long, value_delimiter = ',')]
    namesrv: Option<Vec<String>>,
    /// The group's initial members as id=host:port (the client address; the Raft
    /// address is then port + 30000) or id=host:port/raft_host:raft_port,
    /// comma-separated; the lowest id forms the group on its first start.
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Create unknown topics on first send (off in production).
    #[arg(long)]
    auto_create_topics: Option<bool>,
    /// sync: acknowledge after fdatasync (default); async: before it.
    #[arg(long)]
    flush: Option<String>,
    /// Async worker threads (default: one per core). Replicas sharing a machine do
    /// better with the cores split among them (`raftmq dev` does that).
    #[arg(long)]
    worker_threads: Option<usize>,
    #[command(flatten)]
    transactions: TransactionTiming,
    /// Any setting as KEY=VALUE, e.g. `--set messaging.max_body_bytes=1048576`
    /// (repeatable; wins over the other flags).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective settings as TOML (every key, defaults included) and exit.
    #[arg(long)]
    print_config: bool,
}

/// When the leader asks producers about unresolved transactions.
#[derive(clap::Args, Clone, Default)]
struct TransactionTiming {
    /// First check of a transaction nobody ended, after its half message was
    /// stored (default 6000, RocketMQ's).
    #[arg(long)]
    transaction_first_check_ms: Option<u64>,
    /// Between later checks (default 30000).
    #[arg(long)]
    transaction_check_interval_ms: Option<u64>,
    /// Checks before an unresolved transaction is rolled back and counted (default 15).
    #[arg(long)]
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
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file
    /// (`raftmq dev --tls` prints it); without it, plaintext.
    #[arg(long, env = "RAFTMQ_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// Sign every request with this access key (brokers with `[auth] enabled`
    /// require it), and the secret in --secret-file.
    #[arg(long, env = "RAFTMQ_ACCESS_KEY", requires = "secret_file")]
    access_key: Option<String>,
    /// File holding the secret of --access-key.
    #[arg(long, env = "RAFTMQ_SECRET_FILE", requires = "access_key")]
    secret_file: Option<PathBuf>,
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
    /// Broker groups to run (broker-a, broker-b, ...), each of three replicas.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=26))]
    groups: u16,
    /// The replicas' ports on 127.0.0.1, three per group, group after group
    /// (default: group k, from 0, on 10911+10k..10913+10k); a single 0 picks free
    /// ports for all. A group's membership is fixed on the first run: keep the
    /// ports for later runs.
    #[arg(long, value_delimiter = ',')]
    broker_ports: Option<Vec<u16>>,
    /// Async worker threads per replica (default: the cores split among all replicas).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    #[command(flatten)]
    transactions: TransactionTiming,
    /// Serve every port over TLS (Raft peers with mutual TLS), with a throwaway
    /// CA and node certificate made under <data-dir>/tls (made once, then reused).
    #[arg(long)]
    tls: bool,
    /// Require signed requests and check the ACL on every broker: the bootstrap
    /// admin is `admin`, its secret made under <data-dir>/admin-secret.
    #[arg(long)]
    auth: bool,
    /// Serve no metrics endpoints (by default the NameServer's is on its port +
    /// 20000, 29876, and each replica's on its port + 20000, 30911-30913).
    #[arg(long)]
    no_metrics: bool,
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
    /// Message trace (RocketMQ's enableMsgTrace): the brokers record each
    /// message's life; see it with `raftmq admin trace --id ID`.
    #[arg(long, conflicts_with = "transactional")]
    trace: bool,
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

/// `raftmq admin`: the commands run in `tools.rs`, and membership changes.
#[derive(Subcommand)]
enum AdminCli {
    #[command(flatten)]
    Tools(AdminCommand),
    /// A broker group's replicas: add one (learner, catch-up, promotion), remove one.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// A broker group's leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Users of the ACL (an access key and a secret each): create, delete, list.
    #[command(subcommand)]
    User(acl_cli::UserCommand),
    /// ACL rules: which user may PUB, SUB or ADMIN on which topic, group or the cluster.
    #[command(subcommand)]
    Acl(acl_cli::AclCommand),
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Add a replica (started fresh, e.g. `raftmq broker` without --peers):
    /// it joins as a learner, catches up, then becomes a voter.
    Add {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// The broker group to grow.
        #[arg(long)]
        broker_group: String,
        /// The new replica's id (`--node-id` it was started with); prefer one
        /// the group never used.
        #[arg(long)]
        node_id: u64,
        /// The new replica's client address (host:port).
        #[arg(long)]
        endpoint: String,
        /// Its Raft address; default: the client port + 30000.
        #[arg(long)]
        raft_endpoint: Option<String>,
        /// How long it may take to catch up before the call gives up (it stays
        /// a learner; running the command again resumes).
        #[arg(long, default_value_t = 60)]
        catch_up_timeout_secs: u64,
    },
    /// Remove a replica (voter or learner); the leader itself may be removed.
    Remove {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// The broker group to shrink.
        #[arg(long)]
        broker_group: String,
        /// The replica to remove.
        #[arg(long)]
        node_id: u64,
    },
}

#[derive(Subcommand)]
enum LeaderCommand {
    /// Hand leadership to a voter (`--to`), or to the most caught-up other voter.
    Transfer {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// The broker group whose leadership moves.
        #[arg(long)]
        broker_group: String,
        /// The voter to lead next.
        #[arg(long)]
        to: Option<u64>,
        /// How long to wait for the new leader.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

/// Prints a membership as the replica commands report it.
fn print_membership(m: &raftmq_proto::v1::MembershipView) {
    println!(
        "broker group {} membership at log index {}{}:",
        m.broker_group,
        m.log_index,
        if m.committed {
            " (committed)"
        } else {
            " (not yet committed)"
        }
    );
    for member in &m.members {
        println!(
            "  node {}  {}  raft {}  {}",
            member.node_id,
            member.endpoint,
            member.raft_endpoint,
            if member.voter { "voter" } else { "learner" }
        );
    }
}

async fn run_membership_admin(cmd: AdminCli) -> anyhow::Result<()> {
    match cmd {
        AdminCli::Tools(cmd) => tools::run_admin(cmd).await,
        AdminCli::User(cmd) => acl_cli::run_user(cmd).await,
        AdminCli::Acl(cmd) => acl_cli::run_acl(cmd).await,
        AdminCli::Replica(ReplicaCommand::Add {
            namesrv,
            broker_group,
            node_id,
            endpoint,
            raft_endpoint,
            catch_up_timeout_secs,
        }) => {
            let m = tools::client(namesrv)?
                .admin()
                .add_replica(
                    &broker_group,
                    node_id,
                    &endpoint,
                    raft_endpoint.as_deref(),
                    Duration::from_secs(catch_up_timeout_secs),
                )
                .await
                .with_context(|| format!("adding node {node_id} ({endpoint}) to broker group {broker_group}"))?;
            println!("node {node_id} added to broker group {broker_group} as a voter");
            print_membership(&m);
            Ok(())
        }
        AdminCli::Replica(ReplicaCommand::Remove {
            namesrv,
            broker_group,
            node_id,
        }) => {
            let m = tools::client(namesrv)?
                .admin()
                .remove_replica(&broker_group, node_id)
                .await
                .with_context(|| format!("removing node {node_id} from broker group {broker_group}"))?;
            println!("node {node_id} removed from broker group {broker_group}; it stops serving and can be shut down");
            print_membership(&m);
            Ok(())
        }
        AdminCli::Leader(LeaderCommand::Transfer {
            namesrv,
            broker_group,
            to,
            timeout_secs,
        }) => {
            let r = tools::client(namesrv)?
                .admin()
                .transfer_leader(&broker_group, to, Duration::from_secs(timeout_secs))
                .await
                .with_context(|| format!("transferring the leadership of broker group {broker_group}"))?;
            println!(
                "broker group {broker_group} is led by node {} ({}) in term {}",
                r.leader_id, r.leader_endpoint, r.term
            );
            Ok(())
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
        /// Connect over TLS, trusting this PEM CA file.
        #[arg(long, env = "RAFTMQ_TLS_CA_FILE")]
        tls_ca_file: Option<PathBuf>,
    },
    /// A traced message's timeline (stored, delivered, acked, retried,
    /// dead-lettered), sorted by time.
    Trace {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// The message id (from produce, pull, consume or a SendResult).
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic (or update its queue count or message type) on every broker
    /// group, or on the --groups named. Run again with a group the topic is not on
    /// yet to extend it there (clients route to it after their next route refresh).
    Create {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        /// Broker groups to create it on, comma-separated (default: every live group).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Which messages RocketMQ 5 clients may send to the topic (mixed: any).
        /// Default: normal for a new topic; an existing topic keeps its type
        /// unless this is given, so changing --queues never changes what it accepts.
        #[arg(long, value_enum)]
        message_type: Option<TopicMessageTypeArg>,
        /// Message trace for every message sent to the topic (true) or not
        /// (false). Default: off for a new topic; an existing topic keeps its setting.
        #[arg(long)]
        trace: Option<bool>,
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

/// With SIGPIPE ignored, `println!` panics once stdout is a pipe its reader
/// closed (`raftmq admin cluster | head -5`), printing a backtrace. The reader
/// took what it wanted: end quietly and successfully instead, so a `set -o
/// pipefail` script reading the head of the output goes on. Every other panic
/// is reported as before. Only for commands that hold nothing to clean up
/// (`exit` skips destructors): not for servers, `dev`'s child processes,
/// `bench`, `chaos`'s containers or a consumer group member.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let command = cli.command;
    let holds_resources = match &command {
        Command::Broker(args) => !args.print_config,
        Command::Namesrv(args) => !args.print_config,
        Command::Dev(_) | Command::Bench(_) | Command::Chaos(_) | Command::Consume(_) | Command::Console(_) => true,
        Command::Admin(_) | Command::Produce(_) | Command::Pull(_) | Command::Store(_) | Command::Tls(_) => false,
    };
    if !holds_resources {
        quiet_on_closed_stdout();
    }
    // Server settings are read before the runtime exists: a broker's may set its
    // worker count. Other subcommands take tokio's default (one per core).
    let mut broker = None;
    let mut namesrv = None;
    let mut workers = 0;
    match &command {
        Command::Broker(args) => {
            let config = broker_settings(args, &std::env::vars().collect::<Vec<_>>())?;
            if args.print_config {
                print!("{}", toml::to_string_pretty(&config).context("printing the settings")?);
                return Ok(ExitCode::SUCCESS);
            }
            workers = config.worker_threads;
            broker = Some(config);
        }
        Command::Namesrv(args) => {
            let config = namesrv_settings(args, &std::env::vars().collect::<Vec<_>>())?;
            if args.print_config {
                print!("{}", toml::to_string_pretty(&config).context("printing the settings")?);
                return Ok(ExitCode::SUCCESS);
            }
            namesrv = Some(config);
        }
        _ => {}
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    let rt = builder.enable_all().build()?;
    rt.block_on(async move {
        match command {
            Command::Namesrv(_) => done(run_namesrv(namesrv.context("NameServer settings were not read")?).await),
            Command::Broker(_) => done(run_broker(broker.context("broker settings were not read")?).await),
            Command::Dev(args) => done(run_dev(args).await),
            Command::Admin(AdminCli::Tools(cmd)) => done(tools::run_admin(cmd).await),
            Command::Admin(cmd) => done(run_membership_admin(cmd).await),
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
            Command::Console(args) => done(console::run(args).await),
            Command::Tls(TlsCommand::Gen { out, hosts }) => {
                let files = raftmq_tls::certgen::write(&out, &hosts)?;
                println!("CA (give clients --tls-ca-file):   {}", files.ca_file.display());
                println!("node certificate (tls.cert_file): {}", files.cert_file.display());
                println!("node key (tls.key_file):          {}", files.key_file.display());
                Ok(ExitCode::SUCCESS)
            }
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

/// Old NameServer keys, still read.
const NAMESRV_LEGACY: &[(&str, settings::Legacy)] = &[
    ("broker_timeout_ms", settings::Legacy::Millis("broker_timeout")),
    ("heartbeat_interval_ms", settings::Legacy::Millis("heartbeat_interval")),
];

/// The NameServer's settings: defaults < `--config` < `RAFTMQ_NAMESRV_*` < flags.
fn namesrv_settings(args: &NamesrvArgs, env: &[(String, String)]) -> anyhow::Result<raftmq_namesrv::NameServerConfig> {
    let mut layers = settings::Layers::new(
        &raftmq_namesrv::NameServerConfig::default(),
        "RAFTMQ_NAMESRV_",
        NAMESRV_LEGACY,
    )?;
    if let Some(path) = &args.config {
        layers.file(path)?;
    }
    layers.env(env.iter().cloned(), &["config"])?;
    if let Some(listen) = args.listen {
        layers.flag("listen", listen.to_string(), "--listen")?;
    }
    if let Some(ms) = args.broker_timeout_ms {
        layers.flag("broker_timeout", format!("{ms}ms"), "--broker-timeout-ms")?;
    }
    if let Some(ms) = args.heartbeat_interval_ms {
        layers.flag("heartbeat_interval", format!("{ms}ms"), "--heartbeat-interval-ms")?;
    }
    if let Some(addr) = &args.metrics_listen {
        layers.flag("metrics_listen", addr.clone(), "--metrics-listen")?;
    }
    for assignment in &args.set {
        layers.set(assignment)?;
    }
    let metrics_set = layers.is_set("metrics_listen");
    let mut config: raftmq_namesrv::NameServerConfig = layers.extract()?;
    if !metrics_set && !args.print_config {
        config.metrics_listen = metrics_addr_of(config.listen)?.to_string();
    }
    if !args.print_config {
        config.validate()?;
    }
    Ok(config)
}

async fn run_namesrv(config: raftmq_namesrv::NameServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the NameServer to {}", config.listen))?;
    let metrics = bind_metrics(&config.metrics_listen, "the NameServer").await?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    println!("NameServer listening on {}", listener.local_addr()?);
    if let Some(m) = &metrics {
        println!("NameServer metrics on http://{}/metrics", m.local_addr()?);
    }
    raftmq_namesrv::serve_with_metrics(config, listener, metrics, token).await?;
    Ok(())
}

/// `addr`'s metrics address: the port + `METRICS_PORT_OFFSET` (0 stays 0: any).
fn metrics_addr_of(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    use raftmq_proto::metrics_http::METRICS_PORT_OFFSET;
    let port = match addr.port() {
        0 => 0,
        p => p.checked_add(METRICS_PORT_OFFSET).with_context(|| {
            format!("{addr}: port + {METRICS_PORT_OFFSET} is past 65535; set metrics_listen explicitly")
        })?,
    };
    Ok(SocketAddr::new(addr.ip(), port))
}

/// Binds a validated `metrics_listen` setting; empty means no endpoint.
async fn bind_metrics(addr: &str, whose: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {whose}'s metrics endpoint (metrics_listen) to {addr}"))?;
    Ok(Some(listener))
}

/// `raftmq dev`'s replicas per broker group.
const DEV_REPLICAS: usize = 3;

/// The name of `raftmq dev`'s group `k` (from 0): broker-a, broker-b, ...
fn dev_group_name(k: u16) -> String {
    format!("broker-{}", char::from(b'a' + (k % 26) as u8))
}

/// `raftmq dev`'s replica ports: as given (three per group, or one 0 for free
/// ports), else group k's on 10911+10k..10913+10k.
fn dev_broker_ports(groups: u16, given: Option<&[u16]>) -> anyhow::Result<Vec<u16>> {
    let want = usize::from(groups) * DEV_REPLICAS;
    match given {
        None => Ok((0..groups)
            .flat_map(|k| (0..DEV_REPLICAS as u16).map(move |r| 10911 + 10 * k + r))
            .collect()),
        Some([0]) => Ok(vec![0; want]),
        Some(ports) => {
            anyhow::ensure!(
                ports.len() == want,
                "--broker-ports needs {want} ports ({DEV_REPLICAS} per group for {groups} group(s)) or a single 0, got {}",
                ports.len()
            );
            Ok(ports.to_vec())
        }
    }
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let broker_ports = dev_broker_ports(args.groups, args.broker_ports.as_deref())?;
    let groups: Vec<String> = (0..args.groups).map(dev_group_name).collect();
    let cluster = local::LocalCluster::start(local::LocalClusterOptions {
        data_dir: args.data_dir.clone(),
        namesrv: args.namesrv_listen.clone(),
        groups: groups.clone(),
        broker_ports,
        flush: args.flush,
        // First contact should not need an admin step before the first send.
        auto_create_topics: true,
        restart_delay: Duration::from_secs(3),
        worker_threads: args.worker_threads.map(usize::from),
        broker_args: args.transactions.broker_args(),
        tls: args.tls,
        auth: args.auth,
        metrics: !args.no_metrics,
    })
    .await?;
    let token = cluster.token();
    cancel_on_signal(token.clone());
    let leader = tokio::select! {
        l = cluster.wait_for_leaders(Duration::from_secs(30)) => Some(l),
        _ = token.cancelled() => None,
    };
    match leader {
        Some(Ok(leaders)) => {
            println!("raftmq dev cluster is up (data under {}):", args.data_dir.display());
            println!("  NameServer        {}", cluster.namesrv);
            if let Some(m) = &cluster.namesrv_metrics {
                // Not "NameServer ...": scripts read the NameServer's address off that prefix.
                println!("  metrics           http://{m}/metrics (NameServer)");
            }
            for r in &cluster.replicas {
                let role = if leaders.get(&r.group) == Some(&r.node_id) {
                    "leader"
                } else {
                    "follower"
                };
                let pid = std::fs::read_to_string(&r.pid_file).unwrap_or_default();
                println!(
                    "  {} node {}  {}  pid {:<8} log {}  ({role})",
                    r.group,
                    r.node_id,
                    r.endpoint,
                    pid.trim(),
                    r.log_file.display()
                );
                if let Some(m) = &r.metrics {
                    println!("      metrics http://{m}/metrics");
                }
            }
            if groups.len() > 1 {
                println!(
                    "Broker groups {}: topics created on first send or with `raftmq admin topic create` get queues on each.",
                    groups.join(", ")
                );
            }
            if let Some(ca) = &cluster.tls_ca_file {
                println!("Every port serves TLS (Raft peers: mutual TLS). Clients trust the throwaway CA:");
                println!(
                    "  ./raftmq produce --tls-ca-file {ca} --namesrv {ns} --topic TopicTest   (or export RAFTMQ_TLS_CA_FILE={ca})",
                    ca = ca.display(),
                    ns = cluster.namesrv
                );
                println!(
                    "  Rust: ClientConfig::new(vec![\"{}\".into()]).with_tls_ca_file(...)",
                    cluster.namesrv
                );
                println!(
                    "  Python: raftmq.Client([\"{}\"], tls_ca_file=\"{}\")",
                    cluster.namesrv,
                    ca.display()
                );
            }
            if let Some(secret) = &cluster.admin_secret_file {
                println!(
                    "Brokers require signed requests. The bootstrap admin is `{}`, its secret in {}:",
                    local::DEV_ADMIN,
                    secret.display()
                );
                println!(
                    "  ./raftmq produce --access-key {} --secret-file {} --namesrv {} --topic TopicTest",
                    local::DEV_ADMIN,
                    secret.display(),
                    cluster.namesrv
                );
                println!(
                    "  more users: raftmq admin user create --user app ..., raftmq admin acl put --user app --topic 'Topic*' --perm pub,sub"
                );
            }
            println!("Topics are created on first send. A killed replica is restarted after 3 s; its pid file");
            println!(
                "is {}/<group>-N.pid (e.g. {}-1.pid). Ctrl-C stops the cluster.",
                args.data_dir.display(),
                groups[0]
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
fn read_peer_secret(env: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<raftmq_broker::PeerSecret> {
    let secret = match (env, file) {
        (Some(value), _) => value.to_owned(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading the peer secret from {}", path.display()))?
        }
        (None, None) => anyhow::bail!(
            "a peer secret is required (Raft peers authenticate with it): set peer_secret_file, \
             --peer-secret-file or RAFTMQ_PEER_SECRET, the same on every replica of the group"
        ),
    };
    Ok(raftmq_broker::PeerSecret::new(secret.trim().as_bytes().to_vec()))
}

/// Broker keys from before the settings had tables, still read.
const BROKER_LEGACY: &[(&str, settings::Legacy)] = &[
    (
        "auto_create_topics",
        settings::Legacy::Renamed("messaging.auto_create_topics"),
    ),
    ("flush", settings::Legacy::Renamed("store.flush")),
    ("fast_failover", settings::Legacy::Renamed("fast_failover.enabled")),
    (
        "transaction_first_check_ms",
        settings::Legacy::Millis("messaging.transaction_first_check"),
    ),
    (
        "transaction_check_interval_ms",
        settings::Legacy::Millis("messaging.transaction_check_interval"),
    ),
    (
        "transaction_max_checks",
        settings::Legacy::Renamed("messaging.transaction_max_checks"),
    ),
];

/// A broker's settings: defaults < `--config` < `RAFTMQ_*` < flags, then the
/// addresses derived from others and the peer secret, validated. With
/// `--print-config` nothing is required, so the defaults can be listed.
fn broker_settings(args: &BrokerArgs, env: &[(String, String)]) -> anyhow::Result<raftmq_broker::RaftNodeConfig> {
    use raftmq_broker::RaftNodeConfig;

    let mut layers = settings::Layers::new(&RaftNodeConfig::default(), "RAFTMQ_", BROKER_LEGACY)?;
    if let Some(path) = &args.config {
        layers.file(path)?;
    }
    layers.env(env.iter().cloned(), &["config", "peer_secret"])?;
    let strings = [
        ("group", &args.group, "--group"),
        ("advertise", &args.advertise, "--advertise"),
        ("raft_advertise", &args.raft_advertise, "--raft-advertise"),
        ("metrics_listen", &args.metrics_listen, "--metrics-listen"),
        ("flush", &args.flush, "--flush"),
    ];
    for (key, value, flag) in strings {
        if let Some(v) = value {
            layers.flag(key, v.clone(), flag)?;
        }
    }
    let addrs = [
        ("listen", args.listen, "--listen"),
        ("raft_listen", args.raft_listen, "--raft-listen"),
    ];
    for (key, value, flag) in addrs {
        if let Some(v) = value {
            layers.flag(key, v.to_string(), flag)?;
        }
    }
    let paths = [
        ("data_dir", &args.data_dir, "--data-dir"),
        ("peer_secret_file", &args.peer_secret_file, "--peer-secret-file"),
    ];
    for (key, value, flag) in paths {
        if let Some(v) = value {
            layers.flag(key, v.display().to_string(), flag)?;
        }
    }
    let lists = [
        ("namesrv", &args.namesrv, "--namesrv"),
        ("peers", &args.peers, "--peers"),
    ];
    for (key, value, flag) in lists {
        if let Some(v) = value {
            layers.flag(key, v.clone(), flag)?;
        }
    }
    let bools = [
        ("fast_failover", args.fast_failover, "--fast-failover"),
        ("auto_create_topics", args.auto_create_topics, "--auto-create-topics"),
    ];
    for (key, value, flag) in bools {
        if let Some(v) = value {
            layers.flag(key, v, flag)?;
        }
    }
    let to_i64 = |n: u64| i64::try_from(n).context("number out of range");
    if let Some(id) = args.node_id {
        layers.flag("node_id", to_i64(id)?, "--node-id")?;
    }
    if let Some(n) = args.worker_threads {
        layers.flag("worker_threads", to_i64(n as u64)?, "--worker-threads")?;
    }
    let t = &args.transactions;
    let timing = [
        (
            "transaction_first_check_ms",
            t.transaction_first_check_ms,
            "--transaction-first-check-ms",
        ),
        (
            "transaction_check_interval_ms",
            t.transaction_check_interval_ms,
            "--transaction-check-interval-ms",
        ),
        (
            "transaction_max_checks",
            t.transaction_max_checks.map(u64::from),
            "--transaction-max-checks",
        ),
    ];
    for (key, value, flag) in timing {
        if let Some(v) = value {
            layers.flag(key, to_i64(v)?, flag)?;
        }
    }
    for assignment in &args.set {
        layers.set(assignment)?;
    }
    if args.print_config {
        return layers.extract();
    }
    for (key, env) in [
        ("node_id", "RAFTMQ_NODE_ID"),
        ("group", "RAFTMQ_GROUP"),
        ("data_dir", "RAFTMQ_DATA_DIR"),
        ("listen", "RAFTMQ_LISTEN"),
    ] {
        anyhow::ensure!(
            layers.is_set(key),
            "setting {key} is required: give it in the config file, as {env} or as --{}",
            key.replace('_', "-")
        );
    }
    let metrics_set = layers.is_set("metrics_listen");
    let mut config: RaftNodeConfig = layers.extract()?;
    let listen = config.listen.context("setting listen is required")?;
    if !metrics_set {
        config.metrics_listen = metrics_addr_of(listen)?.to_string();
    }
    if config.advertise_addr.is_empty() {
        config.advertise_addr = listen.to_string();
    }
    let raft_listen: SocketAddr = match config.raft_listen {
        Some(addr) => addr,
        None => raft_port_of(&listen.to_string())?.parse()?,
    };
    if config.raft_advertise_addr.is_empty() {
        config.raft_advertise_addr = if config.raft_listen.is_some() {
            // An explicit raft_listen with its own port is what peers dial.
            let advertise = &config.advertise_addr;
            let host = advertise.rsplit_once(':').map_or(advertise.as_str(), |(h, _)| h);
            format!("{host}:{}", raft_listen.port())
        } else {
            raft_port_of(&config.advertise_addr)?
        };
    }
    config.raft_listen = Some(raft_listen);
    let secret_env = env
        .iter()
        .find(|(k, _)| k == "RAFTMQ_PEER_SECRET")
        .map(|(_, v)| v.as_str());
    config.peer_secret = read_peer_secret(secret_env, config.peer_secret_file.as_deref())?;
    // Parsed here too so a bad entry stops the start-up before anything binds.
    let peers = parse_peers(&config.peers)?;
    anyhow::ensure!(
        peers.is_empty() || peers.contains_key(&config.node_id),
        "peers does not list this node ({})",
        config.node_id
    );
    config.validate()?;
    Ok(config)
}

/// `peers` entries as the membership they describe.
fn parse_peers(peers: &[String]) -> anyhow::Result<std::collections::BTreeMap<u64, raftmq_raft_store::BrokerNode>> {
    peers.iter().map(|p| parse_peer(p)).collect()
}

async fn run_broker(config: raftmq_broker::RaftNodeConfig) -> anyhow::Result<()> {
    use raftmq_broker::RaftNode;

    let (node_id, group) = (config.node_id, config.broker_group.clone());
    let listen = config.listen.context("setting listen is required")?;
    let raft_listen = config.raft_listen.context("setting raft_listen was not derived")?;
    let peers = parse_peers(&config.peers)?;
    let client = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding broker node {node_id}'s client port to {listen}"))?;
    let raft = tokio::net::TcpListener::bind(raft_listen)
        .await
        .with_context(|| format!("binding broker node {node_id}'s Raft peer port to {raft_listen}"))?;
    let metrics = bind_metrics(&config.metrics_listen, &format!("broker node {node_id}")).await?;
    let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    let node = RaftNode::start(
        config,
        raftmq_broker::Listeners { client, raft, metrics },
        token.clone(),
    )
    .await?;
    // The lowest id forms the group, once; the others learn the membership from it.
    if peers.keys().next() == Some(&node_id) && !node.raft().is_initialized().await? {
        node.initialize(peers).await?;
        println!("formed broker group {group}");
    }
    println!("broker {group} node {node_id} listening on {listen} (Raft peers on {raft_listen})");
    if let Some(addr) = metrics_addr {
        println!("broker {group} node {node_id} metrics on http://{addr}/metrics");
    }
    node.run_until_cancelled().await?;
    Ok(())
}
