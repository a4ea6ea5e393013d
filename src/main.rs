//! The `raftmq` binary: parses the command line and dispatches to the component
//! crates. Subcommands whose component has not landed yet say so and exit non-zero
//! instead of pretending to work.

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
    Dev {
        /// Where the replicas keep their data; a second run reuses it.
        #[arg(long, env = "RAFTMQ_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Administer a cluster: topics and cluster status (groups, offsets and
    /// message queries come with issue #4).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Send a bounded number of messages and report what happened.
    Produce(ProduceArgs),
    /// Consume messages.
    Consume,
    /// Benchmark a cluster.
    Bench,
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
    /// Address to listen on (Raft RPCs and the client API share it).
    #[arg(long, env = "RAFTMQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// host:port peers and clients dial (defaults to --listen).
    #[arg(long, env = "RAFTMQ_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "RAFTMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// NameServers to register with, comma-separated.
    #[arg(long, env = "RAFTMQ_NAMESRV", value_delimiter = ',')]
    namesrv: Option<Vec<String>>,
    /// The group's initial members as id=host:port, comma-separated; the lowest id
    /// forms the group on its first start.
    #[arg(long, env = "RAFTMQ_PEERS", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Create unknown topics on first send (off in production).
    #[arg(long, env = "RAFTMQ_AUTO_CREATE_TOPICS")]
    auto_create_topics: Option<bool>,
    /// sync: acknowledge after fdatasync (default); async: before it.
    #[arg(long, env = "RAFTMQ_FLUSH")]
    flush: Option<String>,
}

/// The `--config` file of `raftmq broker`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BrokerFile {
    group: Option<String>,
    node_id: Option<u64>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    namesrv: Option<Vec<String>>,
    peers: Option<Vec<String>>,
    auto_create_topics: Option<bool>,
    flush: Option<String>,
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
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Broker groups, their leaders and replicas, as each group's leader reports them.
    Cluster(NamesrvAddr),
    #[command(subcommand)]
    Topic(TopicCommand),
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic (or update its queue count) on every broker group.
    Create {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 4)]
        queues: u32,
    },
    /// List topics on every broker group.
    List(NamesrvAddr),
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

fn not_yet(what: &str, issue: u32) -> anyhow::Result<ExitCode> {
    eprintln!("raftmq {what}: not implemented yet; it arrives with issue #{issue}.");
    Ok(ExitCode::from(2))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let command = match cli.command {
        Command::Consume => return not_yet("consume", 4),
        Command::Bench => return not_yet("bench", 6),
        other => other,
    };
    // One runtime for whichever subcommand runs; the placeholders above need none.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match command {
            Command::Namesrv(args) => done(run_namesrv(args).await),
            Command::Broker(args) => done(run_broker(*args).await),
            Command::Dev { data_dir } => done(run_dev(data_dir).await),
            Command::Admin(cmd) => done(run_admin(cmd).await),
            Command::Produce(args) => run_produce(args).await,
            Command::Store(StoreCommand::Verify { data_dir }) => done(verify_store(data_dir).await),
            Command::Consume | Command::Bench => unreachable!("handled before the runtime starts"),
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

/// Fixed local endpoints of `raftmq dev`: RocketMQ's NameServer and broker ports.
const DEV_NAMESRV: &str = "127.0.0.1:9876";
const DEV_GROUP: &str = "broker-a";
const DEV_BROKER_PORTS: [u16; 3] = [10911, 10912, 10913];

async fn run_dev(data_dir: PathBuf) -> anyhow::Result<()> {
    use raftmq_broker::{RaftNode, RaftNodeConfig};

    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    let ns_listener = tokio::net::TcpListener::bind(DEV_NAMESRV)
        .await
        .with_context(|| format!("binding the NameServer to {DEV_NAMESRV} (is another raftmq running?)"))?;
    let namesrv = tokio::spawn(raftmq_namesrv::serve(
        raftmq_namesrv::NameServerConfig::default(),
        ns_listener,
        token.clone(),
    ));
    let mut nodes = Vec::new();
    for (id, port) in (1u64..).zip(DEV_BROKER_PORTS) {
        let addr = format!("127.0.0.1:{port}");
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding broker replica {id} to {addr}"))?;
        let mut config = RaftNodeConfig::new(id, DEV_GROUP, data_dir.join(format!("{DEV_GROUP}-{id}")), addr);
        config.nameservers = vec![DEV_NAMESRV.to_owned()];
        // First contact should not need an admin step before the first send.
        config.messaging.auto_create_topics = true;
        nodes.push(RaftNode::start(config, listener, token.clone()).await?);
    }
    // The first run forms the group; later runs find the membership in the log.
    if !nodes[0].raft().is_initialized().await? {
        let members = nodes.iter().map(|n| (n.node_id(), n.broker_node())).collect();
        nodes[0].initialize(members).await?;
    }
    let leader = nodes[0]
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .context("waiting for broker-a to elect a leader")?
        .current_leader;
    println!("raftmq dev cluster is up (data under {}):", data_dir.display());
    println!("  NameServer        {DEV_NAMESRV}");
    for n in &nodes {
        let role = if Some(n.node_id()) == leader {
            "leader"
        } else {
            "follower"
        };
        println!("  {DEV_GROUP} node {}  {}  ({role})", n.node_id(), n.broker_node().addr);
    }
    println!("Topics are created on first send. Ctrl-C stops the cluster.");
    token.cancelled().await;
    for n in nodes {
        let id = n.node_id();
        if let Err(e) = n.shutdown().await {
            tracing::warn!(node_id = id, error = %e, "replica did not stop cleanly");
        }
    }
    namesrv.await??;
    Ok(())
}

/// Parses `id=host:port`.
fn parse_peer(p: &str) -> anyhow::Result<(u64, String)> {
    let (id, addr) = p
        .split_once('=')
        .with_context(|| format!("peer {p:?} is not id=host:port"))?;
    let id = id
        .trim()
        .parse()
        .with_context(|| format!("peer {p:?}: node id is not a number"))?;
    anyhow::ensure!(addr.contains(':'), "peer {p:?}: address is not host:port");
    Ok((id, addr.trim().to_owned()))
}

async fn run_broker(args: BrokerArgs) -> anyhow::Result<()> {
    use raftmq_broker::{RaftNode, RaftNodeConfig};
    use raftmq_raft_store::{BrokerNode, FlushMode};

    let file: BrokerFile = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => BrokerFile::default(),
    };
    let group = args
        .group
        .or(file.group)
        .context("--group (or group in the config file) is required")?;
    let node_id = args.node_id.or(file.node_id).context("--node-id is required")?;
    let listen = args.listen.or(file.listen).context("--listen is required")?;
    let advertise = args.advertise.or(file.advertise).unwrap_or_else(|| listen.to_string());
    let data_dir = args.data_dir.or(file.data_dir).context("--data-dir is required")?;
    let peers = args
        .peers
        .or(file.peers)
        .unwrap_or_default()
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<std::collections::BTreeMap<u64, String>>>()?;
    anyhow::ensure!(
        peers.is_empty() || peers.contains_key(&node_id),
        "--peers does not list this node ({node_id})"
    );
    let mut config = RaftNodeConfig::new(node_id, group.clone(), data_dir, advertise);
    config.nameservers = args.namesrv.or(file.namesrv).unwrap_or_default();
    config.messaging.auto_create_topics = args.auto_create_topics.or(file.auto_create_topics).unwrap_or(false);
    config.store.flush = match args.flush.or(file.flush).as_deref() {
        None | Some("sync") => FlushMode::Sync,
        Some("async") => FlushMode::Async,
        Some(other) => anyhow::bail!("invalid flush = {other:?}: must be sync or async"),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding broker node {node_id} to {listen}"))?;
    let token = tokio_util::sync::CancellationToken::new();
    cancel_on_signal(token.clone());
    let node = RaftNode::start(config, listener, token.clone()).await?;
    // The lowest id forms the group, once; the others learn the membership from it.
    if peers.keys().next() == Some(&node_id) && !node.raft().is_initialized().await? {
        let members = peers.into_iter().map(|(id, addr)| (id, BrokerNode { addr })).collect();
        node.initialize(members).await?;
        println!("formed broker group {group}");
    }
    println!("broker {group} node {node_id} listening on {listen}");
    node.run_until_cancelled().await?;
    Ok(())
}

fn client(namesrv: NamesrvAddr) -> anyhow::Result<raftmq_client::Client> {
    Ok(raftmq_client::Client::new(raftmq_client::ClientConfig::new(
        namesrv.namesrv,
    ))?)
}

async fn run_produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    use raftmq_client::MessageExt;
    let producer = client(args.namesrv)?.producer();
    let started = std::time::Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    for i in 0..args.count {
        let mut msg = raftmq_proto::v1::Message::new(vec![b'x'; args.size]);
        msg.tag = args.tag.clone();
        msg.properties.insert("seq".into(), i.to_string());
        let sent = match &args.key {
            Some(k) => {
                msg.keys = vec![k.clone()];
                producer.send_with_key(&args.topic, k, msg).await
            }
            None => producer.send(&args.topic, msg).await,
        };
        match sent {
            Ok(r) => {
                ok += 1;
                if ok == 1 || i + 1 == args.count {
                    println!(
                        "sent {} to {}/{}@{} id {}",
                        i, r.broker_group, r.queue_id, r.queue_offset, r.message_id
                    );
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("message {i}: {e}");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{ok} sent, {failed} failed in {secs:.2}s ({:.0} msgs/s)",
        ok as f64 / secs.max(1e-9)
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_admin(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Cluster(ns) => {
            for g in client(ns)?.admin().cluster_status().await? {
                println!(
                    "{}  term {}  leader {} ({})",
                    g.broker_group,
                    g.term,
                    g.leader_id.map_or("-".to_owned(), |l| l.to_string()),
                    g.leader_endpoint
                );
                for r in g.replicas {
                    println!(
                        "  node {}  {}  {:?}  last log {}  applied {}",
                        r.node_id,
                        r.endpoint,
                        raftmq_proto::v1::ReplicaRole::try_from(r.role).unwrap_or_default(),
                        r.last_log_index.map_or("-".to_owned(), |v| v.to_string()),
                        r.applied_index.map_or("-".to_owned(), |v| v.to_string()),
                    );
                }
            }
        }
        AdminCommand::Topic(TopicCommand::Create { namesrv, topic, queues }) => {
            client(namesrv)?
                .admin()
                .create_topic(&topic, queues, raftmq_proto::v1::Permission::ReadWrite)
                .await?;
            println!("topic {topic} created with {queues} queue(s) per broker group");
        }
        AdminCommand::Topic(TopicCommand::List(ns)) => {
            for (group, t) in client(ns)?.admin().list_topics().await? {
                println!("{group}  {}  queues {}  perm {}", t.name, t.queues_per_group, t.perm);
            }
        }
    }
    Ok(())
}

async fn verify_store(dir: PathBuf) -> anyhow::Result<()> {
    use raftmq_raft_store as store;
    let (log, sm) = store::open(&dir, store::StoreConfig::default())
        .await
        .with_context(|| format!("opening store at {}", dir.display()))?;
    let reader = log.reader();
    let mut records = 0u64;
    let mut bytes = 0u64;
    if let Some((first, last)) = reader.physical_range() {
        let mut next = first;
        while next <= last {
            let end = (next + 4096).min(last + 1);
            for (_, payload) in reader.read_records(next, end)? {
                records += 1;
                bytes += payload.len() as u64;
            }
            next = end;
        }
    }
    let sm_reader = sm.reader();
    println!("data dir:        {}", dir.display());
    println!("log range:       {:?}", reader.physical_range());
    println!("purged through:  {:?}", reader.purged());
    println!("records read:    {records} ({bytes} payload bytes), all checksums valid");
    println!("applied:         {:?}", sm_reader.applied()?);
    println!("topics:          {}", sm_reader.topics()?.len());
    println!("queue rows:      {}", sm_reader.consume_queue_rows()?);
    log.shutdown().await?;
    Ok(())
}
