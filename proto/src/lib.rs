//! raftmq's wire formats: the `.proto` files under `proto/` and the tonic/prost code
//! generated from them at build time. Conversions to domain types live with the
//! crates that own those types, one module per message family.

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
