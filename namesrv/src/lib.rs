//! The NameServer (broker registry, liveness, route queries) arrives with issue #3; nothing lives here yet.
