//! The Rust client (Producer, consumers, admin, route discovery) arrives with issue #3; nothing lives here yet.
