//! One running replica: opens the store, starts openraft with the gRPC network,
//! serves Raft RPC on an already-bound listener until cancelled, and stops in
//! order (stop accepting, let in-flight RPCs finish, then `raft.shutdown()`, which
//! drops the CommitLog and so flushes and closes it). The messaging and admin
//! services share the server with Raft RPC, so a node has one port.

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
use crate::group::GroupHandle;
use crate::messaging::Messaging;
use crate::network::{ChannelSettings, GrpcNetworkFactory};
use crate::service::RaftRpcService;

/// Subdirectory of the data dir where received snapshots are staged.
const INCOMING_DIR: &str = "snapshot-incoming";

/// A running broker replica.
pub struct RaftNode {
    config: RaftNodeConfig,
    raft: Raft<TypeConfig, StateMachine>,
    store: StoreReader,
    log: CommitLogReader,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RaftNode {
    /// Starts the replica and serves on `listener` (bound by the caller, so tests
    /// can bind port 0 and advertise what they got) until `shutdown` is cancelled.
    /// Cancelling only stops the server; call [`RaftNode::shutdown`] (or use
    /// [`RaftNode::run_until_cancelled`]) to stop Raft too.
    pub async fn start(
        config: RaftNodeConfig,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<RaftNode, Error> {
        config.validate()?;
        let node_id = config.node_id;
        let raft_config = Arc::new(config.raft_config()?);
        let local_addr = listener.local_addr().map_err(|source| Error::Io {
            action: "reading the listen address of",
            path: config.data_dir.clone(),
            source,
        })?;
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
        let network = GrpcNetworkFactory::new(
            node_id,
            &config.broker_group,
            ChannelSettings {
                connect_timeout: config.connect_timeout,
                max_message_bytes: config.max_rpc_message_bytes,
            },
        );
        let raft = Raft::new(node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|source| Error::RaftStart {
                node_id,
                group: config.broker_group.clone(),
                source,
            })?;

        let service = RaftRpcService::new(&config.broker_group, raft.clone(), incoming_dir, shutdown.clone())
            .into_server(config.max_rpc_message_bytes);
        let group = GroupHandle::new(
            &config.broker_group,
            node_id,
            raft.clone(),
            store.clone(),
            config.messaging.clone(),
            shutdown.clone(),
        );
        let messaging = Messaging::new(group.clone()).into_server(config.max_rpc_message_bytes);
        if !config.nameservers.is_empty() {
            crate::registration::spawn(
                group.clone(),
                config.cluster.clone(),
                config.advertise_addr.clone(),
                &config.nameservers,
                config.registration_interval,
                shutdown.clone(),
            );
        }
        let coordinator = crate::consumer_group::Coordinator::new(group.clone());
        let admin = Admin::new(group, coordinator.clone()).into_server();
        let consumer = coordinator.into_server();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            Server::builder()
                .add_service(service)
                .add_service(messaging)
                .add_service(admin)
                .add_service(consumer)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        });
        tracing::info!(
            node_id,
            group = %config.broker_group,
            listen = %local_addr,
            advertise = %config.advertise_addr,
            "broker replica started"
        );
        Ok(RaftNode {
            config,
            raft,
            store,
            log,
            local_addr,
            shutdown,
            server,
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

    /// What the membership records for this node: its advertised address.
    pub fn broker_node(&self) -> BrokerNode {
        BrokerNode {
            addr: self.config.advertise_addr.clone(),
        }
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
        let mut server = self.server;
        let served = match tokio::time::timeout(self.config.shutdown_grace, &mut server).await {
            Ok(joined) => joined
                .map_err(|source| Error::Task {
                    node_id,
                    what: "gRPC server task",
                    source,
                })
                .and_then(|r| {
                    r.map_err(|source| Error::Serve {
                        node_id,
                        addr: self.local_addr,
                        source,
                    })
                }),
            Err(_) => {
                tracing::warn!(node_id, grace = ?self.config.shutdown_grace, "in-flight RPCs outlived the grace period; dropping them");
                server.abort();
                Ok(())
            }
        };
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
