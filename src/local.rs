//! A local cluster on one machine: an in-process NameServer and one or more broker
//! groups whose replicas are separate `raftmq broker` processes, supervised and
//! restarted when they die. `raftmq dev` runs one on fixed ports (`--groups N` for
//! several groups); `raftmq bench` starts one on free ports when it is given no
//! NameServer.
//!
//! With `tls`, a throwaway CA and node certificate are made under the data dir
//! (`tls/`, once, then reused like the peer secret) and every port serves TLS.
//!
//! Replicas are processes, not tasks, so that the tour can `kill -9` a leader and
//! watch the group elect another, exactly as in a real deployment.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    pub data_dir: PathBuf,
    /// The NameServer's address; port 0 picks a free one.
    pub namesrv: String,
    /// The broker groups, in order; each gets `broker_ports.len() / groups.len()`
    /// replicas.
    pub groups: Vec<String>,
    /// One port per replica, group after group; 0 picks a free one.
    pub broker_ports: Vec<u16>,
    /// `sync` or `async` (passed to `raftmq broker --flush`).
    pub flush: String,
    pub auto_create_topics: bool,
    /// How long a dead replica stays dead before it is started again.
    pub restart_delay: Duration,
    /// Async worker threads per replica (`raftmq broker --worker-threads`); `None`
    /// splits this machine's cores among the replicas.
    pub worker_threads: Option<usize>,
    /// More `raftmq broker` arguments for every replica (e.g. transaction check timing).
    pub broker_args: Vec<String>,
    /// TLS on every port, with certificates made under `data_dir/tls`.
    pub tls: bool,
    /// Signed requests and the ACL on every broker: bootstrap admin
    /// [`DEV_ADMIN`], its secret made under `data_dir/admin-secret`.
    pub auth: bool,
    /// Serve metrics endpoints: the NameServer's and each replica's on its port
    /// plus [`METRICS_PORT_OFFSET`] (any free port when that port is any).
    /// Off, the replicas record no metrics at all.
    pub metrics: bool,
}

use raftmq_proto::metrics_http::METRICS_PORT_OFFSET;

/// The metrics port that goes with gRPC port `port` (0 stays 0: any).
pub fn metrics_port(port: u16) -> u16 {
    if port == 0 {
        0
    } else {
        port.saturating_add(METRICS_PORT_OFFSET)
    }
}

/// A group's replicas by node id: (client address, Raft peer address, metrics address).
type Endpoints = BTreeMap<u64, (String, String, Option<String>)>;

/// One supervised replica.
pub struct Replica {
    /// Its broker group (node ids are per group: every group has a node 1).
    pub group: String,
    pub node_id: u64,
    pub endpoint: String,
    /// Its metrics endpoint (`host:port`), when the cluster serves metrics.
    pub metrics: Option<String>,
    pub log_file: PathBuf,
    pub pid_file: PathBuf,
    supervisor: std::thread::JoinHandle<()>,
}

/// A running local cluster; [`LocalCluster::stop`] stops it in order.
pub struct LocalCluster {
    pub namesrv: String,
    /// The NameServer's metrics endpoint, when the cluster serves metrics.
    pub namesrv_metrics: Option<String>,
    pub groups: Vec<String>,
    /// Every group's replicas, group after group.
    pub replicas: Vec<Replica>,
    /// The CA clients must trust when the cluster runs TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// The bootstrap admin's secret file when the brokers require signed requests.
    pub admin_secret_file: Option<PathBuf>,
    token: CancellationToken,
    namesrv_task: tokio::task::JoinHandle<Result<(), raftmq_namesrv::Error>>,
}

/// The bootstrap admin's access key of `raftmq dev --auth`.
pub const DEV_ADMIN: &str = "admin";

/// The group's peer secret under the data dir: made once (random, owner-only),
/// then reused, since the replicas' Raft membership outlives a run.
fn peer_secret_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    secret_file(data_dir, "peer-secret")
}

/// A random secret in `data_dir/name`, made once (owner-only) and reused.
fn secret_file(data_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let mut random = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .with_context(|| format!("reading /dev/urandom for {name}"))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex.as_bytes()).and_then(|()| f.sync_all()))
        .with_context(|| format!("writing {name} to {}", path.display()))?;
    Ok(path)
}

/// The throwaway certificates under the data dir: made on the first TLS run,
/// reused after (a client keeps trusting the same `ca.pem`), made again if a
/// file is missing. Valid for 127.0.0.1 and localhost: dev binds loopback only.
fn tls_files(data_dir: &Path) -> anyhow::Result<raftmq_tls::certgen::Files> {
    use raftmq_tls::certgen::{CA_FILE, CERT_FILE, KEY_FILE};
    let dir = data_dir.join("tls");
    let files = raftmq_tls::certgen::Files {
        ca_file: dir.join(CA_FILE),
        cert_file: dir.join(CERT_FILE),
        key_file: dir.join(KEY_FILE),
    };
    if [&files.ca_file, &files.cert_file, &files.key_file]
        .iter()
        .all(|p| p.exists())
    {
        return Ok(files);
    }
    let hosts = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    raftmq_tls::certgen::write(&dir, &hosts)
        .with_context(|| format!("making throwaway TLS certificates in {}", dir.display()))
}

/// Binds `host:port`, or a free port when `port` is 0, and returns the bound address.
/// For replicas the socket is closed again and the child binds the same port: a free
/// port could in principle be taken in between, which start-up then reports.
fn free_addr(host: &str, port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind((host, port)).with_context(|| format!("binding {host}:{port}"))?;
    Ok(l.local_addr()?)
}

impl LocalCluster {
    pub async fn start(opts: LocalClusterOptions) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let exe = std::env::current_exe().context("finding the raftmq binary to start replicas with")?;
        let token = CancellationToken::new();
        // Until start-up completes, an early return stops whatever already started.
        let stop_on_error = token.clone().drop_guard();
        let ns_listener = tokio::net::TcpListener::bind(&opts.namesrv).await.with_context(|| {
            format!(
                "binding the NameServer to {} (is another raftmq running?)",
                opts.namesrv
            )
        })?;
        let ns_addr = ns_listener.local_addr()?;
        let namesrv = ns_addr.to_string();
        // One secret for every group of this cluster: it authenticates peers of
        // the same cluster (each signature also names its group), and the
        // brokers' registrations at the NameServer (the cluster secret).
        let admin_secret = match opts.auth {
            true => Some(secret_file(&opts.data_dir, "admin-secret")?),
            false => None,
        };
        let secret_file = peer_secret_file(&opts.data_dir)?;
        let tls = if opts.tls {
            Some(tls_files(&opts.data_dir)?)
        } else {
            None
        };
        let tls_config = raftmq_tls::TlsConfig {
            enabled: tls.is_some(),
            cert_file: tls.as_ref().map(|f| f.cert_file.clone()),
            key_file: tls.as_ref().map(|f| f.key_file.clone()),
            ca_file: tls.as_ref().map(|f| f.ca_file.clone()),
        };
        let ns_metrics = match opts.metrics {
            true => {
                // From the port asked for, not the one bound: any stays any.
                let asked = opts.namesrv.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                let addr = (ns_addr.ip(), metrics_port(asked.unwrap_or(ns_addr.port())));
                Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the NameServer's metrics port {addr:?}"))?,
                )
            }
            false => None,
        };
        let namesrv_metrics = ns_metrics
            .as_ref()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .transpose()?;
        let namesrv_task = tokio::spawn(raftmq_namesrv::serve_with_metrics(
            raftmq_namesrv::NameServerConfig {
                tls: tls_config,
                cluster_secret_file: Some(secret_file.clone()),
                ..raftmq_namesrv::NameServerConfig::default()
            },
            ns_listener,
            ns_metrics,
            token.clone(),
        ));

        anyhow::ensure!(
            !opts.groups.is_empty(),
            "a local cluster needs at least one broker group"
        );
        anyhow::ensure!(
            !opts.broker_ports.is_empty() && opts.broker_ports.len().is_multiple_of(opts.groups.len()),
            "{} broker port(s) cannot be split evenly among {} broker group(s)",
            opts.broker_ports.len(),
            opts.groups.len()
        );
        let per_group = opts.broker_ports.len() / opts.groups.len();
        // Each replica has a client port and a Raft peer port (DLedger's offset,
        // 10911 -> 40911; any free one when the client port is any). All ports are
        // bound once up front, so a clash is reported before anything starts.
        let mut layout: Vec<(String, Endpoints)> = Vec::new();
        for (group, ports) in opts.groups.iter().zip(opts.broker_ports.chunks(per_group)) {
            let mut endpoints = BTreeMap::new();
            for (id, port) in (1u64..).zip(ports) {
                let addr = free_addr("127.0.0.1", *port)
                    .with_context(|| format!("{group} replica {id}'s port (is another raftmq running?)"))?;
                let raft_port = if *port == 0 {
                    0
                } else {
                    port.saturating_add(raftmq_raft_store::RAFT_PORT_OFFSET)
                };
                let raft = free_addr("127.0.0.1", raft_port)
                    .with_context(|| format!("{group} replica {id}'s Raft peer port (is another raftmq running?)"))?;
                let metrics = match opts.metrics {
                    true => Some(
                        free_addr("127.0.0.1", metrics_port(*port))
                            .with_context(|| {
                                format!("{group} replica {id}'s metrics port (is another raftmq running?)")
                            })?
                            .to_string(),
                    ),
                    false => None,
                };
                endpoints.insert(id, (addr.to_string(), raft.to_string(), metrics));
            }
            layout.push((group.clone(), endpoints));
        }
        // The replicas share this machine's cores: each with a worker per core
        // wakes threads across all of them for every Raft round. Measured on 2
        // cores, one worker per replica vs two, 5 interleaved pairs: one at a time
        // p50 0.86 vs 0.90 ms on average, 256 in flight 63.3k vs 58.3k msgs/s;
        // consume and single-message RPCs within noise. With several groups the
        // cores are split among all their replicas (at least one each).
        let workers = opts.worker_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / opts.broker_ports.len().max(1)).max(1)
        });
        let mut replicas = Vec::new();
        for (group, endpoints) in &layout {
            let peers = endpoints
                .iter()
                .map(|(id, (a, r, _))| format!("{id}={a}/{r}"))
                .collect::<Vec<_>>()
                .join(",");
            for (&id, (endpoint, raft, metrics)) in endpoints {
                let name = format!("{group}-{id}");
                let mut args: Vec<String> = vec![
                    "broker".into(),
                    "--group".into(),
                    group.clone(),
                    "--node-id".into(),
                    id.to_string(),
                    "--listen".into(),
                    endpoint.clone(),
                    "--raft-listen".into(),
                    raft.clone(),
                    "--peer-secret-file".into(),
                    secret_file.display().to_string(),
                    "--set".into(),
                    format!("cluster_secret_file={}", secret_file.display()),
                    "--data-dir".into(),
                    opts.data_dir.join(&name).display().to_string(),
                    "--namesrv".into(),
                    namesrv.clone(),
                    "--peers".into(),
                    peers.clone(),
                    "--auto-create-topics".into(),
                    opts.auto_create_topics.to_string(),
                    "--flush".into(),
                    opts.flush.clone(),
                    "--worker-threads".into(),
                    workers.to_string(),
                    // Explicit either way: `raftmq broker` would otherwise derive one.
                    "--set".into(),
                    format!("metrics_listen={}", metrics.as_deref().unwrap_or_default()),
                ];
                if let Some(files) = &tls {
                    for (key, path) in [
                        ("cert_file", &files.cert_file),
                        ("key_file", &files.key_file),
                        ("ca_file", &files.ca_file),
                    ] {
                        args.push("--set".into());
                        args.push(format!("tls.{key}={}", path.display()));
                    }
                    args.push("--set".into());
                    args.push("tls.enabled=true".into());
                }
                if let Some(file) = &admin_secret {
                    for set in [
                        "auth.enabled=true".to_owned(),
                        format!("auth.admin_access_key={DEV_ADMIN}"),
                        format!("auth.admin_secret_file={}", file.display()),
                    ] {
                        args.push("--set".into());
                        args.push(set);
                    }
                }
                args.extend(opts.broker_args.iter().cloned());
                let log_file = opts.data_dir.join(format!("{name}.log"));
                let pid_file = opts.data_dir.join(format!("{name}.pid"));
                let spec = Arc::new(ChildSpec {
                    exe: exe.clone(),
                    args,
                    log_file: log_file.clone(),
                    pid_file: pid_file.clone(),
                });
                // The supervisor thread spawns the process itself: PR_SET_PDEATHSIG fires
                // when the spawning *thread* ends, and this thread lives as long as the
                // replica is supervised.
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let supervisor = {
                    let (token, delay, name) = (token.clone(), opts.restart_delay, name.clone());
                    std::thread::Builder::new()
                        .name(format!("supervise-{name}"))
                        .spawn(move || supervise(name, spec, token, delay, ready_tx))?
                };
                ready_rx
                    .await
                    .context("replica supervisor ended before starting it")?
                    .with_context(|| format!("starting replica {name}"))?;
                replicas.push(Replica {
                    group: group.clone(),
                    node_id: id,
                    endpoint: endpoint.clone(),
                    metrics: metrics.clone(),
                    log_file,
                    pid_file,
                    supervisor,
                });
            }
        }
        stop_on_error.disarm();
        Ok(LocalCluster {
            namesrv,
            namesrv_metrics,
            groups: opts.groups,
            replicas,
            tls_ca_file: tls.map(|f| f.ca_file),
            admin_secret_file: admin_secret,
            token,
            namesrv_task,
        })
    }

    /// A client configuration for this cluster (TLS when it runs TLS).
    pub fn client_config(&self) -> anyhow::Result<raftmq_client::ClientConfig> {
        let mut config = raftmq_client::ClientConfig::new(vec![self.namesrv.clone()]);
        if let Some(file) = &self.admin_secret_file {
            let secret = raftmq_broker::auth::read_secret(file).map_err(anyhow::Error::msg)?;
            config = config.with_credentials(DEV_ADMIN, secret);
        }
        Ok(match &self.tls_ca_file {
            Some(ca) => config.with_tls_ca_file(ca)?,
            None => config,
        })
    }

    /// Cancelled when the cluster is told to stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Waits until the NameServer names a leader for every group and that leader
    /// reports itself as such; returns each group's leader node id.
    pub async fn wait_for_leaders(&self, within: Duration) -> anyhow::Result<BTreeMap<String, u64>> {
        let client = raftmq_client::Client::new(self.client_config()?)?;
        let admin = client.admin();
        let deadline = Instant::now() + within;
        loop {
            let last = match admin.cluster_status().await {
                Ok(status) => {
                    let leaders: BTreeMap<String, u64> = status
                        .iter()
                        .filter(|g| self.groups.contains(&g.broker_group))
                        .filter_map(|g| Some((g.broker_group.clone(), g.leader_id?)))
                        .collect();
                    if leaders.len() == self.groups.len() {
                        return Ok(leaders);
                    }
                    let missing: Vec<&str> = self
                        .groups
                        .iter()
                        .filter(|g| !leaders.contains_key(*g))
                        .map(String::as_str)
                        .collect();
                    format!("no leader yet in {}", missing.join(", "))
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "broker groups {} have no leader after {within:?} ({last}); replica logs: {}",
                    self.groups.join(", "),
                    self.replicas
                        .iter()
                        .map(|r| r.log_file.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`LocalCluster::wait_for_leaders`], returning the first group's leader (for
    /// callers that run one group).
    pub async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<u64> {
        let leaders = self.wait_for_leaders(within).await?;
        self.groups
            .first()
            .and_then(|g| leaders.get(g).copied())
            .context("the local cluster has no broker group")
    }

    /// Stops every replica (SIGTERM, then SIGKILL after a grace period) and the
    /// NameServer.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        let supervisors = self.replicas.into_iter().map(|r| r.supervisor).collect::<Vec<_>>();
        tokio::task::spawn_blocking(move || {
            for s in supervisors {
                let _ = s.join();
            }
        })
        .await?;
        self.namesrv_task.await??;
        Ok(())
    }
}

/// How to (re)start one replica process.
struct ChildSpec {
    exe: PathBuf,
    args: Vec<String>,
    log_file: PathBuf,
    pid_file: PathBuf,
}

impl ChildSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.exe.display()))?;
        write_pid(&self.pid_file, child.id())?;
        Ok(child)
    }
}

fn write_pid(path: &Path, pid: u32) -> anyhow::Result<()> {
    std::fs::write(path, format!("{pid}\n")).with_context(|| format!("writing {}", path.display()))
}

/// Replicas must not outlive the process that started them (they would hold the
/// ports and the data directory): the kernel sends them SIGTERM when it dies.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe prctl(2).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs on its own thread: starts the child, waits for it, restarts it after
/// `delay` unless the cluster is stopping, and on stop sends SIGTERM and waits
/// (SIGKILL after 10 s).
fn supervise(
    name: String,
    spec: Arc<ChildSpec>,
    token: CancellationToken,
    delay: Duration,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) {
    let mut child = match spec.spawn() {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    loop {
        // Poll rather than block in wait(): the thread must also notice a stop.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if token.is_cancelled() => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "cannot watch replica process");
                    break None;
                }
            }
        };
        let Some(status) = status else {
            stop_child(&name, &mut child);
            return;
        };
        eprintln!(
            "replica {name} (pid {}) exited: {status}; restarting in {:.1}s",
            child.id(),
            delay.as_secs_f64()
        );
        let resume_at = Instant::now() + delay;
        while Instant::now() < resume_at {
            if token.is_cancelled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match spec.spawn() {
            Ok(c) => {
                eprintln!("replica {name} restarted (pid {})", c.id());
                child = c;
            }
            Err(e) => {
                eprintln!("replica {name} could not be restarted: {e:#}");
                return;
            }
        }
    }
}

fn stop_child(name: &str, child: &mut Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        let _ = child.kill();
        return;
    };
    // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                tracing::warn!(replica = %name, "replica did not stop within 10 s; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}
