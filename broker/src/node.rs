//! One running replica: opens the store, starts openraft with the gRPC network,
//! serves on two already-bound listeners until cancelled, and stops in order
//! (stop accepting, let in-flight RPCs finish, wait for the background tasks
//! tracked in one `TaskTracker`, then `raft.shutdown()`, which drops the
//! CommitLog and so flushes and closes it). The client port serves the
//! messaging, admin and consumer-group services and RocketMQ 5's gRPC API
//! ([`crate::rocketmq`]); the peer port serves only Raft,
//! to signed requests of the group's members, so a client never reaches Raft.
//! With `tls.enabled` both ports serve TLS, and the peer port requires a client
//! certificate issued by the cluster CA (mutual TLS) before any request is read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use openraft::Raft;
use raftmq_raft_store::{BrokerNode, CommitLogReader, NodeId, StateMachine, StoreReader, TypeConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::admin::Admin;
use crate::config::RaftNodeConfig;
use crate::error::Error;
use crate::failover::{CampaignMarker, LeaderWatch};
use crate::faults::ClientFaultLayer;
use crate::group::GroupHandle;
use crate::messaging::Messaging;
use crate::network::{ChannelSettings, GrpcNetworkFactory, PeerLink};
use crate::service::RaftRpcService;

/// How often the client port pings each connection, and how long a ping may go
/// unanswered before the connection is closed.
const CLIENT_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const CLIENT_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Subdirectory of the data dir where received snapshots are staged.
const INCOMING_DIR: &str = "snapshot-incoming";

/// The ports of a node, bound by the caller.
pub struct Listeners {
    /// Messaging, admin and consumer groups.
    pub client: TcpListener,
    /// Raft RPC between the group's replicas.
    pub raft: TcpListener,
    /// The Prometheus metrics endpoint (HTTP); `None` serves none and records
    /// nothing.
    pub metrics: Option<TcpListener>,
}

/// A running broker replica.
pub struct RaftNode {
    config: RaftNodeConfig,
    raft: Raft<TypeConfig, StateMachine>,
    store: StoreReader,
    log: CommitLogReader,
    local_addr: SocketAddr,
    raft_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    servers: [JoinHandle<Result<(), tonic::transport::Error>>; 2],
    /// Background tasks (registration, watchers); each ends on `shutdown`.
    tasks: tokio_util::task::TaskTracker,
}

impl RaftNode {
    /// Starts the replica and serves on `listeners` (bound by the caller, so tests
    /// can bind port 0 and advertise what they got) until `shutdown` is cancelled.
    /// Cancelling only stops the servers; call [`RaftNode::shutdown`] (or use
    /// [`RaftNode::run_until_cancelled`]) to stop Raft too.
    pub async fn start(
        config: RaftNodeConfig,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<RaftNode, Error> {
        config.validate()?;
        let node_id = config.node_id;
        let mut raft_config = config.raft_config()?;
        // A follower whose log went backwards (a replica restarted on a wiped
        // disk under its old id, or `flush = async` losing a tail) is fed again
        // from the start instead of panicking the leader's Raft core, which
        // would take the leader down and leave its process without Raft. See
        // crate::membership for the procedure that avoids the situation.
        raft_config.allow_log_reversion = Some(true);
        let raft_config = Arc::new(raft_config);
        let addr_of = |l: &TcpListener| {
            l.local_addr().map_err(|source| Error::Io {
                action: "reading the listen address of",
                path: config.data_dir.clone(),
                source,
            })
        };
        let (local_addr, raft_addr) = (addr_of(&listeners.client)?, addr_of(&listeners.raft)?);
        // Read before anything listens: a bad file stops the start naming its key.
        let cluster_secret = match &config.cluster_secret_file {
            Some(path) => Some(std::sync::Arc::<[u8]>::from(
                raftmq_proto::registration_auth::read_secret(path).map_err(|reason| Error::Config {
                    key: "cluster_secret_file",
                    value: path.display().to_string(),
                    reason,
                })?,
            )),
            None => None,
        };
        // Read before anything listens: a bad file stops the start naming its key.
        let admin_credentials = config.auth.load()?;
        // Loaded before anything listens: a bad file stops the start naming its key.
        let tls = config.tls.load(raftmq_tls::Role::Node).map_err(|e| Error::Config {
            key: e.key,
            value: e.value,
            reason: e.reason,
        })?;
        // Built before the store opens and Raft starts, so a key rustls refuses
        // leaves nothing running.
        let tls_error = |port: &'static str| move |source| Error::Tls { node_id, port, source };
        let (client_builder, mut raft_builder) = match &tls {
            Some(tls) => (
                Server::builder()
                    .tls_config(tls.server())
                    .map_err(tls_error("client"))?,
                Server::builder()
                    .tls_config(tls.mutual_server())
                    .map_err(tls_error("Raft peer"))?,
            ),
            None => (Server::builder(), Server::builder()),
        };
        let metrics_addr = listeners.metrics.as_ref().map(addr_of).transpose()?;
        let metrics = listeners
            .metrics
            .is_some()
            .then(|| Arc::new(crate::metrics::BrokerMetrics::default()));
        let incoming_dir = config.data_dir.join(INCOMING_DIR);
        tokio::fs::create_dir_all(&incoming_dir)
            .await
            .map_err(|source| Error::Io {
                action: "creating",
                path: incoming_dir.clone(),
                source,
            })?;
        let (log_store, sm) = raftmq_raft_store::open(&config.data_dir, config.store.clone())
            .await
            .map_err(|source| Error::Store {
                node_id,
                path: config.data_dir.clone(),
                source,
            })?;
        let (store, log) = (sm.reader(), log_store.reader());
        let link = PeerLink {
            secret: config.peer_secret.clone(),
            campaign: CampaignMarker::default(),
            faults: config.faults.clone(),
            tls: tls.as_ref().map(raftmq_tls::Tls::mutual_client),
            replication_seconds: metrics.as_ref().map(|m| m.replication_seconds()),
        };
        let network = GrpcNetworkFactory::new(
            node_id,
            &config.broker_group,
            ChannelSettings {
                connect_timeout: config.connect_timeout,
                max_message_bytes: config.max_rpc_message_bytes,
            },
            link.clone(),
        );
        let raft = Raft::new(node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|source| Error::RaftStart {
                node_id,
                group: config.broker_group.clone(),
                source,
            })?;
        if let Some(m) = &metrics
            && let Err(e) = raft.set_metrics_recorder(Some(m.raft_recorder())).await
        {
            // Only elections and batch sizes are missing then; serve the rest.
            tracing::warn!(node_id, error = %e, "openraft refused the metrics recorder");
        }

        let group = GroupHandle::new(
            &config.broker_group,
            node_id,
            raft.clone(),
            store.clone(),
            config.messaging.clone(),
            shutdown.clone(),
            crate::group::NodeWiring {
                client_tls: tls.as_ref().map(raftmq_tls::Tls::client),
                metrics: metrics.clone(),
                auth: match admin_credentials {
                    Some(admin) => crate::auth::Auth::new(
                        admin,
                        &config.auth,
                        store.clone(),
                        metrics.as_ref().map(|m| m.auth_refusals.clone()).unwrap_or_default(),
                    ),
                    None => crate::auth::Auth::off(),
                },
            },
        );
        let watch = LeaderWatch::new(
            node_id,
            &config.broker_group,
            raft.clone(),
            config.fast_failover.clone(),
            link,
            (shutdown.clone(), group.tasks().clone()),
        );
        let service = RaftRpcService::new(
            &config.broker_group,
            raft.clone(),
            (config.peer_secret.clone(), config.peer_auth_window),
            (watch, config.faults.clone()),
            incoming_dir,
            shutdown.clone(),
        )
        .into_server(config.max_rpc_message_bytes);
        let transactions = crate::transactions::Transactions::new(group.clone());
        transactions.spawn_checker();
        // Measured by the retention task; sends refuse while the disk is full.
        let disk = crate::retention::DiskState::default();
        let messaging = Messaging::new(group.clone(), transactions).with_disk(disk.clone());
        if !config.nameservers.is_empty() {
            crate::registration::spawn(
                group.clone(),
                crate::registration::Identity {
                    cluster: config.cluster.clone(),
                    endpoint: config.advertise_addr.clone(),
                    secret: cluster_secret,
                },
                &config.nameservers,
                config.registration_interval,
                shutdown.clone(),
            );
        }
        let tasks = group.tasks().clone();
        // Without an endpoint the counts go nowhere; counting anyway keeps one
        // server type (two atomic adds per connection, none per request).
        let connections = metrics.as_ref().map(|m| m.connections.clone()).unwrap_or_default();
        if let (Some(listener), Some(m)) = (listeners.metrics, &metrics) {
            let mut registry = crate::metrics::registry(
                &config.broker_group,
                node_id,
                m.clone(),
                raft.clone(),
                store.clone(),
                log.clone(),
            );
            crate::trace::register_metrics(&mut registry, group.tracer());
            // Tracked, so shutdown waits for it: scrape connections hold the store.
            tasks.spawn(raftmq_proto::metrics_http::serve(
                listener,
                Arc::new(registry),
                shutdown.clone(),
            ));
        }
        crate::membership::spawn_removal_watch(group.clone(), config.connect_timeout);
        crate::timers::spawn(group.clone());
        crate::trace::spawn(group.clone());
        crate::retention::spawn(
            group.clone(),
            config.retention.clone(),
            config.data_dir.clone(),
            disk.clone(),
        );
        let coordinator = crate::consumer_group::Coordinator::new(group.clone());
        let admin = Admin::new(group.clone(), coordinator.clone()).with_disk(disk);
        let gate = crate::membership::MembershipGateLayer::new(group.clone(), admin.clone());
        let auth_layer = group.auth().clone();
        let acl = crate::acl_service::Acl::new(group.clone()).into_server();
        // RocketMQ 5 SDKs reach the same services through the gateway, which
        // forwards to the group's leader when this node does not lead.
        let upstream = crate::rocketmq::upstream::Upstream::new(
            group,
            config.nameservers.clone(),
            config.max_rpc_message_bytes,
            config.connect_timeout,
        );
        let rocketmq = crate::rocketmq::Gateway::new(upstream, messaging.clone(), coordinator.clone(), admin.clone())
            .into_server(config.max_rpc_message_bytes);
        let messaging = messaging.into_server(config.max_rpc_message_bytes);
        let admin = admin.into_server();
        let consumer = coordinator.into_server();
        let incoming = connections.count(TcpIncoming::from(listeners.client).with_nodelay(Some(true)));
        let stop = shutdown.clone();
        let faults = ClientFaultLayer {
            faults: config.faults.clone(),
            node: node_id,
        };
        let client_server = tokio::spawn(async move {
            client_builder
                // Pings find clients that vanished without closing their
                // connection (a paused or cut-off host), so their long-lived
                // streams (transaction check-backs) end instead of swallowing
                // what is sent to them.
                .http2_keepalive_interval(Some(CLIENT_PING_INTERVAL))
                .http2_keepalive_timeout(Some(CLIENT_PING_TIMEOUT))
                // A removed replica, or one not yet added, answers every client
                // request with why (see crate::membership); outermost, so peers'
                // membership probes bypass the test fault layer.
                .layer(gate)
                // Inside the gate: peers' membership probes need no credentials.
                .layer(crate::auth::AuthLayer { auth: auth_layer })
                .layer(faults)
                .add_service(messaging)
                .add_service(admin)
                .add_service(consumer)
                .add_service(rocketmq)
                .add_service(acl)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        });
        let incoming = TcpIncoming::from(listeners.raft).with_nodelay(Some(true));
        let stop = shutdown.clone();
        let raft_server = tokio::spawn(async move {
            raft_builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        });
        tracing::info!(
            node_id,
            group = %config.broker_group,
            listen = %local_addr,
            advertise = %config.advertise_addr,
            raft_listen = %raft_addr,
            raft_advertise = %config.raft_advertise_addr,
            tls = tls.is_some(),
            metrics = ?metrics_addr,
            "broker replica started"
        );
        Ok(RaftNode {
            config,
            raft,
            store,
            log,
            local_addr,
            raft_addr,
            metrics_addr,
            shutdown,
            servers: [client_server, raft_server],
            tasks,
        })
    }

    pub fn raft(&self) -> &Raft<TypeConfig, StateMachine> {
        &self.raft
    }

    /// Read access to the replicated state (ConsumeQueues, messages, topics).
    pub fn store(&self) -> &StoreReader {
        &self.store
    }

    pub fn log(&self) -> &CommitLogReader {
        &self.log
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// What the membership records for this node: its advertised addresses.
    pub fn broker_node(&self) -> BrokerNode {
        BrokerNode::new(&self.config.advertise_addr, &self.config.raft_advertise_addr)
    }

    /// The client address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Raft peer address actually listened on.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The metrics endpoint's address, when it serves one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Makes `members` the group's first membership. Call on one node of a new
    /// group; the others learn it by replication.
    pub async fn initialize(&self, members: BTreeMap<NodeId, BrokerNode>) -> Result<(), Error> {
        self.raft.initialize(members).await.map_err(|source| Error::Initialize {
            node_id: self.config.node_id,
            group: self.config.broker_group.clone(),
            source,
        })
    }

    /// Serves until the shutdown token is cancelled, then stops in order.
    pub async fn run_until_cancelled(self) -> Result<(), Error> {
        self.shutdown.cancelled().await;
        self.shutdown().await
    }

    /// Stops accepting connections, lets in-flight RPCs finish (up to
    /// `shutdown_grace`), then shuts Raft down, which closes the CommitLog.
    pub async fn shutdown(self) -> Result<(), Error> {
        let node_id = self.config.node_id;
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        let mut served = Ok(());
        for (mut server, addr) in self.servers.into_iter().zip([self.local_addr, self.raft_addr]) {
            let result = match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(joined) => joined
                    .map_err(|source| Error::Task {
                        node_id,
                        what: "gRPC server task",
                        source,
                    })
                    .and_then(|r| r.map_err(|source| Error::Serve { node_id, addr, source })),
                Err(_) => {
                    tracing::warn!(node_id, %addr, grace = ?self.config.shutdown_grace, "in-flight RPCs outlived the grace period; dropping them");
                    server.abort();
                    Ok(())
                }
            };
            served = served.and(result);
        }
        // Background tasks see the cancelled token and end; none may outlive Raft.
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                node_id,
                tasks = self.tasks.len(),
                "background tasks outlived the grace period"
            );
        }
        // Stop Raft even when the server failed: the log must still be closed.
        let stopped = self.raft.shutdown().await.map_err(|source| Error::Task {
            node_id,
            what: "Raft core",
            source,
        });
        tracing::info!(node_id, "broker replica stopped");
        served.and(stopped)
    }
}
