//! raftmq's wire formats: the `.proto` files under `proto/` and the tonic/prost code
//! generated from them at build time. Conversions to domain types live with the
//! crates that own those types, one module per message family. Also the one
//! wire format that is not gRPC: the metrics endpoint every process serves
//! ([`metrics_http`]).

pub mod metrics_http;
pub mod registration_auth;
pub mod request_auth;

/// Client-facing messaging, admin and NameServer APIs.
pub mod v1 {
    tonic::include_proto!("raftmq.v1");
}

/// Raft RPCs between replicas of one broker group.
pub mod raft {
    pub mod v1 {
        tonic::include_proto!("raftmq.raft.v1");
    }
}

/// The RocketMQ 5 gRPC API (`apache.rocketmq.v2`, service `MessagingService`) that
/// the official RocketMQ 5 SDKs speak. Wire format of apache/rocketmq-apis 68c2cc9;
/// the `.proto` files are under `proto/apache/rocketmq/v2/`.
pub mod rocketmq {
    pub mod v2 {
        tonic::include_proto!("apache.rocketmq.v2");

        /// Encoded `google.protobuf.FileDescriptorSet` of `definition.proto` and
        /// `service.proto` plus the google/protobuf files they import (as protoc's
        /// `--include_imports` writes it), e.g. for gRPC reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rocketmq_v2_descriptor.bin"));
    }
}
