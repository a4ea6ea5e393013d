//! The broker crate's one error type, for starting, running and stopping a node.
//! Raft RPC failures are not here: on the wire they are `tonic::Status`, and toward
//! openraft they are its own `RPCError` kinds (see [`crate::network`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use raftmq_raft_store::{NodeId, TypeConfig};

/// Why a broker node could not start, serve or stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid broker setting {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// The certificate and key files were read, but rustls refused them (a key
    /// that does not match the certificate, an unsupported key type).
    #[error("node {node_id}: TLS on the {port} port (tls.cert_file, tls.key_file): {source}")]
    Tls {
        node_id: NodeId,
        port: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("openraft rejected the Raft timing of node {node_id}: {source}")]
    RaftConfig {
        node_id: NodeId,
        #[source]
        source: openraft::ConfigError,
    },
    #[error("opening the store of node {node_id} at {path}: {source}")]
    Store {
        node_id: NodeId,
        path: PathBuf,
        #[source]
        source: raftmq_raft_store::Error,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting Raft for node {node_id} of {group}: {source}")]
    RaftStart {
        node_id: NodeId,
        group: String,
        #[source]
        source: openraft::error::Fatal<TypeConfig>,
    },
    #[error("initializing the membership of {group} from node {node_id}: {source}")]
    Initialize {
        node_id: NodeId,
        group: String,
        #[source]
        source: openraft::error::RaftError<TypeConfig, openraft::error::InitializeError<TypeConfig>>,
    },
    #[error("gRPC server of node {node_id} on {addr}: {source}")]
    Serve {
        node_id: NodeId,
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what} of node {node_id} failed: {source}")]
    Task {
        node_id: NodeId,
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}
