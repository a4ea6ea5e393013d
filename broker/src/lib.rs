//! The broker node (openraft wiring, Raft RPC over gRPC, messaging services) arrives with issue #3; nothing lives here yet.
