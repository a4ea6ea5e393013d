//! raftmq-namesrv: the NameServer. Broker nodes register with every NameServer at
//! start, every few seconds and when their Raft role changes; clients ask any
//! NameServer for a topic's route (per broker group: leader endpoint, follower
//! endpoints, queue count, permission, message type). NameServers are stateless
//! and never talk to each other; a node silent past `broker_timeout` leaves the
//! routes. With `tls.enabled` it serves TLS only (no client certificate asked:
//! authenticating brokers is registration's business, not the transport's).

pub mod metrics;
pub mod registry;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::name_server_service_server::{NameServerService, NameServerServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

pub use registry::Registry;

/// NameServer settings: the one struct that `raftmq namesrv`'s TOML file,
/// `RAFTMQ_NAMESRV_*` environment variables and flags fill (by these serde names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NameServerConfig {
    /// Address to listen on. Default 127.0.0.1:9876 (RocketMQ's port); a
    /// NameServer other hosts reach must listen on their network.
    pub listen: std::net::SocketAddr,
    /// A broker node not heard from for this long is dropped from routes.
    /// Default 10 s: five missed heartbeats at the default interval.
    #[serde(with = "humantime_serde")]
    pub broker_timeout: Duration,
    /// How often brokers are told to heartbeat. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// TLS on the listener (the `[tls]` table: `enabled`, `cert_file`,
    /// `key_file`; `ca_file` is not read). Default off.
    pub tls: raftmq_tls::TlsConfig,
    /// Address the Prometheus metrics endpoint (HTTP, `GET /metrics`) listens
    /// on; empty: none. `raftmq namesrv` defaults it to `listen`'s host with the
    /// port + 20000 (9876 -> 29876); the library serves the listener its caller
    /// binds (see [`serve_with_metrics`]).
    pub metrics_listen: String,
    /// File holding the cluster secret (at least 16 bytes, trimmed), read once
    /// at start. Set, every registration must be signed with it (see
    /// `raftmq_proto::registration_auth`) or is refused UNAUTHENTICATED; unset,
    /// any client may register a broker and redirect its topics' producers, so
    /// set it wherever others can reach the NameServer. Default unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<std::path::PathBuf>,
}

impl Default for NameServerConfig {
    fn default() -> Self {
        NameServerConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9876)),
            broker_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            tls: raftmq_tls::TlsConfig::default(),
            metrics_listen: String::new(),
            cluster_secret_file: None,
        }
    }
}

impl NameServerConfig {
    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self) -> Result<(), Error> {
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval > Duration::from_secs(60) {
            return Err(Error::Config {
                key: "heartbeat_interval",
                value: format!("{:?}", self.heartbeat_interval),
                reason: "must be between 1 ms and 60 s".into(),
            });
        }
        if self.broker_timeout < self.heartbeat_interval * 2 {
            return Err(Error::Config {
                key: "broker_timeout",
                value: format!("{:?}", self.broker_timeout),
                reason: format!(
                    "must be at least twice heartbeat_interval ({:?}), or one late heartbeat drops a live node",
                    self.heartbeat_interval
                ),
            });
        }
        if !self.metrics_listen.is_empty() {
            let addr: SocketAddr = self.metrics_listen.parse().map_err(|e| Error::Config {
                key: "metrics_listen",
                value: self.metrics_listen.clone(),
                reason: format!("must be ip:port, or empty for no metrics endpoint ({e})"),
            })?;
            if addr.port() != 0 && addr == self.listen {
                return Err(Error::Config {
                    key: "metrics_listen",
                    value: self.metrics_listen.clone(),
                    reason: "must differ from listen (the gRPC port)".into(),
                });
            }
        }
        self.tls.validate(raftmq_tls::Role::Server).map_err(tls_config)
    }
}

fn tls_config(e: raftmq_tls::Error) -> Error {
    Error::Config {
        key: e.key,
        value: e.value,
        reason: e.reason,
    }
}

/// The NameServer crate's error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid NameServer setting {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("NameServer on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    /// The files were read, but rustls refused them (a key that does not
    /// match the certificate, an unsupported key type).
    #[error("NameServer TLS (tls.cert_file, tls.key_file): {source}")]
    Tls {
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading the NameServer's listen address: {source}")]
    Listen {
        #[source]
        source: std::io::Error,
    },
}

/// The `raftmq.v1.NameServerService` implementation.
#[derive(Clone)]
pub struct NameServer {
    registry: Arc<Mutex<Registry>>,
    config: NameServerConfig,
    metrics: metrics::NameServerMetrics,
    /// The cluster secret registrations are signed with; `None`: unsigned accepted.
    cluster_secret: Option<Arc<[u8]>>,
}

impl NameServer {
    pub fn new(config: NameServerConfig) -> Self {
        NameServer {
            registry: Arc::default(),
            config,
            metrics: Default::default(),
            cluster_secret: None,
        }
    }

    /// Requires every registration to be signed with `secret`.
    pub fn with_cluster_secret(mut self, secret: Vec<u8>) -> Self {
        self.cluster_secret = Some(secret.into());
        self
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry holds no invariant a panicking holder could break halfway.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops silent nodes; called periodically so the registry does not grow
    /// with nodes that went away (queries already ignore them).
    pub fn expire(&self) -> usize {
        self.registry().expire(Instant::now(), self.config.broker_timeout)
    }
}

#[tonic::async_trait]
impl NameServerService for NameServer {
    #[tracing::instrument(level = "debug", skip_all, fields(group = %request.get_ref().broker_group, node_id = request.get_ref().node_id))]
    async fn register_broker(
        &self,
        request: Request<pb::RegisterBrokerRequest>,
    ) -> Result<Response<pb::RegisterBrokerResponse>, Status> {
        self.metrics.registrations.inc();
        if let Some(secret) = &self.cluster_secret {
            use prost::Message as _;
            let header = request
                .metadata()
                .get(raftmq_proto::registration_auth::REGISTRATION_AUTH_KEY)
                .and_then(|v| v.to_str().ok());
            let body = request.get_ref().encode_to_vec();
            if let Err(reason) = raftmq_proto::registration_auth::verify(
                secret,
                header,
                &body,
                raftmq_proto::registration_auth::unix_ms(),
            ) {
                self.metrics.registrations_refused.inc();
                let r = request.get_ref();
                tracing::warn!(group = %r.broker_group, node_id = r.node_id, endpoint = %r.endpoint, %reason, "registration refused");
                return Err(Status::unauthenticated(format!(
                    "registration of {} node {} refused: {reason}",
                    r.broker_group, r.node_id
                )));
            }
        }
        self.registry()
            .register(request.into_inner(), Instant::now())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::RegisterBrokerResponse {
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(topic = %request.get_ref().topic))]
    async fn query_route(
        &self,
        request: Request<pb::QueryRouteRequest>,
    ) -> Result<Response<pb::QueryRouteResponse>, Status> {
        let topic = request.into_inner().topic;
        self.metrics.route_queries.inc();
        registry::check_name(&topic)
            .map_err(|reason| Status::invalid_argument(format!("topic name {topic:?} is invalid: {reason}")))?;
        let groups = self
            .registry()
            .route(&topic, Instant::now(), self.config.broker_timeout);
        if groups.is_empty() {
            self.metrics.route_misses.inc();
            return Err(Status::not_found(format!(
                "no live broker group serves topic {topic:?}"
            )));
        }
        Ok(Response::new(pb::QueryRouteResponse { topic, groups }))
    }

    async fn list_cluster(
        &self,
        _request: Request<pb::ListClusterRequest>,
    ) -> Result<Response<pb::ListClusterResponse>, Status> {
        let groups = self.registry().cluster(Instant::now(), self.config.broker_timeout);
        Ok(Response::new(pb::ListClusterResponse { groups }))
    }
}

/// Serves a NameServer on an already-bound `listener` until `shutdown` fires,
/// with no metrics endpoint.
pub async fn serve(config: NameServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<(), Error> {
    serve_with_metrics(config, listener, None, shutdown).await
}

/// [`serve`], plus the Prometheus metrics endpoint on `metrics` when given.
pub async fn serve_with_metrics(
    config: NameServerConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let mut builder = match config.tls.load(raftmq_tls::Role::Server).map_err(tls_config)? {
        Some(tls) => Server::builder()
            .tls_config(tls.server())
            .map_err(|source| Error::Tls { source })?,
        None => Server::builder(),
    };
    let addr = listener.local_addr().map_err(|source| Error::Listen { source })?;
    let mut server = NameServer::new(config.clone());
    if let Some(path) = &config.cluster_secret_file {
        let secret = raftmq_proto::registration_auth::read_secret(path).map_err(|reason| Error::Config {
            key: "cluster_secret_file",
            value: path.display().to_string(),
            reason,
        })?;
        server = server.with_cluster_secret(secret);
    }
    let endpoint = metrics.map(|listener| {
        let registry = server.metrics.registry(server.registry.clone(), config.broker_timeout);
        tokio::spawn(raftmq_proto::metrics_http::serve(
            listener,
            Arc::new(registry),
            shutdown.clone(),
        ))
    });
    let connections = server.metrics.connections.clone();
    let expirer = {
        let (server, stop) = (server.clone(), shutdown.clone());
        let every = config.broker_timeout / 4;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => { server.expire(); }
                }
            }
        })
    };
    tracing::info!(
        listen = %addr,
        tls = config.tls.enabled,
        signed_registrations = config.cluster_secret_file.is_some(),
        "NameServer started"
    );
    let served = builder
        .add_service(NameServerServiceServer::new(server))
        .serve_with_incoming_shutdown(
            connections.count(TcpIncoming::from(listener)),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|source| Error::Serve { addr, source });
    expirer.abort();
    if let Some(endpoint) = endpoint {
        // Stopped with the gRPC server even when that one failed on its own.
        endpoint.abort();
    }
    tracing::info!(listen = %addr, "NameServer stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_proto::v1::name_server_service_client::NameServerServiceClient;

    async fn start(
        config: NameServerConfig,
    ) -> (String, CancellationToken, tokio::task::JoinHandle<Result<(), Error>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let task = tokio::spawn(serve(config, listener, token.clone()));
        (url, token, task)
    }

    fn registration(node_id: u64, leader: u64) -> pb::RegisterBrokerRequest {
        pb::RegisterBrokerRequest {
            cluster: "dev".into(),
            broker_group: "broker-a".into(),
            node_id,
            endpoint: format!("127.0.0.1:{}", 20000 + node_id),
            term: 3,
            leader_id: Some(leader),
            leader_endpoint: format!("127.0.0.1:{}", 20000 + leader),
            follower_endpoints: vec![],
            topics: vec![pb::TopicConfig {
                name: "orders".into(),
                queues_per_group: 8,
                perm: pb::Permission::ReadWrite as i32,
                message_type: pb::MessageType::Transaction as i32,
                trace: None,
            }],
        }
    }

    /// A registration signed with `secret` at `unix_ms`.
    fn signed(req: pb::RegisterBrokerRequest, secret: &[u8], unix_ms: u64) -> Request<pb::RegisterBrokerRequest> {
        use prost::Message as _;
        let value = raftmq_proto::registration_auth::sign(secret, &req.encode_to_vec(), unix_ms);
        let mut r = Request::new(req);
        r.metadata_mut().insert(
            raftmq_proto::registration_auth::REGISTRATION_AUTH_KEY,
            value.parse().expect("ASCII"),
        );
        r
    }

    #[tokio::test]
    async fn with_a_cluster_secret_forged_registrations_are_refused_and_routes_stay() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster-secret");
        let secret = b"the-cluster-secret-0123456789";
        std::fs::write(&file, [secret.as_slice(), b"\n"].concat()).unwrap();
        let (url, token, task) = start(NameServerConfig {
            cluster_secret_file: Some(file),
            ..NameServerConfig::default()
        })
        .await;
        let mut client = NameServerServiceClient::connect(url).await.unwrap();
        let now = raftmq_proto::registration_auth::unix_ms();
        // The real brokers, signed with the cluster secret.
        for n in 0..3 {
            client
                .register_broker(signed(registration(n, 1), secret, now))
                .await
                .unwrap();
        }
        let leader_of = |route: pb::QueryRouteResponse| route.groups[0].leader_endpoint.clone();
        let route = || pb::QueryRouteRequest { topic: "orders".into() };
        assert_eq!(
            leader_of(client.query_route(route()).await.unwrap().into_inner()),
            "127.0.0.1:20001"
        );

        // An attacker's registration naming itself leader of broker-a at a higher term.
        let mut fake = registration(1, 1);
        fake.term = 99;
        fake.endpoint = "10.6.6.6:10911".into();
        fake.leader_endpoint = "10.6.6.6:10911".into();
        let cases = [
            ("unsigned", Request::new(fake.clone()), "no x-raftmq-registration-auth"),
            (
                "wrong secret",
                signed(fake.clone(), b"not-the-cluster-secret", now),
                "does not match",
            ),
            (
                "expired",
                signed(
                    fake.clone(),
                    secret,
                    now - 2 * raftmq_proto::registration_auth::WINDOW_MS,
                ),
                "window",
            ),
            (
                "tampered",
                {
                    // A real broker's signed registration with its endpoint changed.
                    let mut r = signed(registration(1, 1), secret, now);
                    r.get_mut().leader_endpoint = "10.6.6.6:10911".into();
                    r
                },
                "does not match",
            ),
        ];
        for (what, req, says) in cases {
            let err = client.register_broker(req).await.expect_err(what);
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err}");
            assert!(
                err.message().contains(says) && err.message().contains("broker-a"),
                "{what}: {err}"
            );
            assert!(
                !err.message().contains("the-cluster-secret"),
                "{what}: the secret leaked: {err}"
            );
        }
        // Nothing changed: the route still names the real leader, and a new
        // group registered unsigned never appears.
        let mut other = registration(7, 7);
        other.broker_group = "broker-z".into();
        assert!(client.register_broker(other).await.is_err());
        let route = client.query_route(route()).await.unwrap().into_inner();
        assert_eq!(route.groups.len(), 1, "{route:?}");
        assert_eq!(leader_of(route), "127.0.0.1:20001");
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_short_or_missing_cluster_secret_file_stops_the_start_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").unwrap();
        for path in [short, dir.path().join("missing")] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let config = NameServerConfig {
                cluster_secret_file: Some(path.clone()),
                ..NameServerConfig::default()
            };
            let err = serve(config, listener, CancellationToken::new())
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cluster_secret_file") && err.contains(&path.display().to_string()),
                "{err}"
            );
            assert!(!err.contains("tiny"), "the contents leaked: {err}");
        }
    }

    #[tokio::test]
    async fn registered_brokers_are_routed_over_grpc_and_bad_input_is_named() {
        let (url, token, task) = start(NameServerConfig::default()).await;
        let mut client = NameServerServiceClient::connect(url).await.unwrap();
        for n in 0..3 {
            let resp = client.register_broker(registration(n, 1)).await.unwrap().into_inner();
            assert_eq!(resp.heartbeat_interval_ms, 2000);
        }
        let route = client
            .query_route(pb::QueryRouteRequest { topic: "orders".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(route.groups.len(), 1);
        assert_eq!(route.groups[0].leader_endpoint, "127.0.0.1:20001");
        assert_eq!(route.groups[0].follower_endpoints.len(), 2);
        assert_eq!(route.groups[0].queues, 8);
        assert_eq!(route.groups[0].message_type(), pb::MessageType::Transaction);

        let missing = client
            .query_route(pb::QueryRouteRequest { topic: "nope".into() })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        assert!(missing.message().contains("nope"), "{}", missing.message());
        let bad = client
            .query_route(pb::QueryRouteRequest {
                topic: "bad topic".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let mut no_endpoint = registration(5, 1);
        no_endpoint.endpoint.clear();
        let err = client.register_broker(no_endpoint).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("endpoint"), "{}", err.message());

        let cluster = client
            .list_cluster(pb::ListClusterRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cluster.groups[0].replicas.len(), 3);
        assert_eq!(cluster.groups[0].leader_id, Some(1));

        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn serves_tls_to_a_client_trusting_its_ca_only() {
        let dir = tempfile::tempdir().unwrap();
        let files = raftmq_tls::certgen::write(dir.path(), &["127.0.0.1".to_owned()]).unwrap();
        let config = NameServerConfig {
            tls: raftmq_tls::TlsConfig {
                enabled: true,
                cert_file: Some(files.cert_file),
                key_file: Some(files.key_file),
                ca_file: None,
            },
            ..NameServerConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let token = CancellationToken::new();
        let task = tokio::spawn(serve(config, listener, token.clone()));
        let ca = raftmq_tls::ClientTls::from_ca_file("ca", &files.ca_file).unwrap();
        let channel = raftmq_tls::endpoint(&addr, Some(&ca.config()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = NameServerServiceClient::new(channel);
        client.register_broker(registration(1, 1)).await.unwrap();
        // Plaintext to the TLS port gets no gRPC answer.
        let plain = NameServerServiceClient::connect(format!("http://{addr}")).await;
        if let Ok(mut plain) = plain {
            plain
                .list_cluster(pb::ListClusterRequest {})
                .await
                .expect_err("plaintext answered by a TLS port");
        }
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = NameServerConfig {
            broker_timeout: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(2),
            ..NameServerConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("broker_timeout"), "{err}");
    }
}
