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
    Broker,
    /// Run a whole local cluster: a NameServer and a 3-replica broker group.
    Dev {
        /// Where the replicas keep their data; a second run reuses it.
        #[arg(long, env = "RAFTMQ_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Administer a cluster: topics, groups, cluster status, offsets, messages.
    Admin,
    /// Send messages.
    Produce,
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
    match cli.command {
        Command::Namesrv(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run_namesrv(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Broker => not_yet("broker", 3),
        Command::Dev { data_dir } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run_dev(data_dir))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin => not_yet("admin", 3),
        Command::Produce => not_yet("produce", 3),
        Command::Consume => not_yet("consume", 4),
        Command::Bench => not_yet("bench", 6),
        Command::Store(StoreCommand::Verify { data_dir }) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(verify_store(data_dir))?;
            Ok(ExitCode::SUCCESS)
        }
    }
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
