//! A broker group's users (access key and secret) and ACL rules: replicated
//! state like topics, so every replica enforces the same rules and a failover
//! changes nothing. The state machine applies `PutUser`/`DeleteUser`/
//! `PutAclRule`/`DeleteAclRule`; brokers read [`AclState`] to authenticate and
//! authorize each request.
//!
//! Secrets are kept as given: checking an HMAC needs the key itself (as in
//! RocketMQ's ACL). They sit in the Raft log and the state's RocksDB, so the
//! data directory is as sensitive as the secrets.

use std::collections::BTreeMap;
use std::io;

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::state_machine::{SmState, rocks_io};

pub(crate) const CF_ACL: &str = "acl";

/// Most users a group holds, and most rules per user: both are written by
/// admins only, but every one is held in memory by every replica.
pub const MAX_USERS: usize = 10_000;
pub const MAX_RULES_PER_USER: usize = 1_000;

/// One user. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub access_key: String,
    pub secret: String,
    /// Admins may do everything, like the bootstrap admin of the config file.
    #[serde(default)]
    pub admin: bool,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("access_key", &self.access_key)
            .field("secret", &"<redacted>")
            .field("admin", &self.admin)
            .finish()
    }
}

/// What a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    Topic,
    Group,
    /// The cluster itself: membership, users and rules, cluster views.
    Cluster,
}

impl ResourceKind {
    fn byte(self) -> u8 {
        match self {
            ResourceKind::Topic => b't',
            ResourceKind::Group => b'g',
            ResourceKind::Cluster => b'c',
        }
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResourceKind::Topic => "topic",
            ResourceKind::Group => "group",
            ResourceKind::Cluster => "cluster",
        })
    }
}

/// What a rule grants or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// Send to a topic, end its transactions.
    Pub,
    /// Consume a topic, as a consumer group.
    Sub,
    /// Create, change, delete or inspect the resource.
    Admin,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Permission::Pub => "PUB",
            Permission::Sub => "SUB",
            Permission::Admin => "ADMIN",
        })
    }
}

/// One rule: `access_key` may (`allow`) or may not use `perms` on resources
/// of `kind` whose name is `pattern`, or starts with it when it ends in `*`
/// (`*` alone: every name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRule {
    pub access_key: String,
    pub kind: ResourceKind,
    pub pattern: String,
    pub perms: Vec<Permission>,
    pub allow: bool,
}

impl AclRule {
    /// How specifically the rule names `name`: `None` if it does not match;
    /// an exact name beats every prefix, a longer prefix a shorter one.
    fn specificity(&self, name: &str) -> Option<usize> {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix).then_some(prefix.len()),
            None => (self.pattern == name).then_some(usize::MAX),
        }
    }
}

/// Every user and rule of the group, in memory (both are few and read on
/// every request).
#[derive(Debug, Default, Clone)]
pub struct AclState {
    users: BTreeMap<String, User>,
    /// By (access key, kind, pattern): one rule per resource pattern and user.
    rules: BTreeMap<(String, ResourceKind, String), AclRule>,
}

fn user_key(access_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + access_key.len());
    k.push(b'u');
    k.extend_from_slice(access_key.as_bytes());
    k
}

fn rule_key(access_key: &str, kind: ResourceKind, pattern: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + access_key.len() + pattern.len());
    k.push(b'r');
    k.extend_from_slice(access_key.as_bytes());
    k.push(0);
    k.push(kind.byte());
    k.extend_from_slice(pattern.as_bytes());
    k
}

fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ACL row: {e}"))
}

impl AclState {
    /// Reads every user and rule of a state generation.
    pub(crate) fn load(state: &SmState) -> io::Result<AclState> {
        let mut s = AclState::default();
        for item in state.db.iterator_cf(state.cf(CF_ACL), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(rocks_io("scan ACL rows"))?;
            match k.first() {
                Some(b'u') => {
                    let u: User = serde_json::from_slice(&v).map_err(invalid)?;
                    s.users.insert(u.access_key.clone(), u);
                }
                Some(b'r') => {
                    let r: AclRule = serde_json::from_slice(&v).map_err(invalid)?;
                    s.rules.insert((r.access_key.clone(), r.kind, r.pattern.clone()), r);
                }
                _ => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("ACL row key {k:?}")));
                }
            }
        }
        Ok(s)
    }

    pub fn user(&self, access_key: &str) -> Option<&User> {
        self.users.get(access_key)
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn rules(&self) -> impl Iterator<Item = &AclRule> {
        self.rules.values()
    }

    pub fn rule_count(&self, access_key: &str) -> usize {
        self.rules
            .range((access_key.to_owned(), ResourceKind::Topic, String::new())..)
            .take_while(|((ak, _, _), _)| ak == access_key)
            .count()
    }

    /// Whether `access_key` may use `perm` on the resource `kind`/`name`.
    /// Admins may do everything. Otherwise the most specific matching rule
    /// decides, a deny winning over an allow equally specific; no matching
    /// rule means no.
    pub fn allows(&self, access_key: &str, perm: Permission, kind: ResourceKind, name: &str) -> bool {
        let Some(user) = self.users.get(access_key) else {
            return false;
        };
        if user.admin {
            return true;
        }
        let mut best: Option<(usize, bool)> = None;
        let start = (access_key.to_owned(), kind, String::new());
        for ((ak, k, _), rule) in self.rules.range(start..) {
            if ak != access_key || *k != kind {
                break;
            }
            if !rule.perms.contains(&perm) {
                continue;
            }
            let Some(s) = rule.specificity(name) else { continue };
            best = match best {
                Some((bs, ballow)) if bs > s || (bs == s && !ballow) => Some((bs, ballow)),
                _ => Some((s, rule.allow)),
            };
        }
        best.is_some_and(|(_, allow)| allow)
    }

    /// Creates or replaces a user (a new secret takes effect at once).
    pub(crate) fn put_user(&mut self, state: &SmState, wb: &mut WriteBatch, u: &User) -> io::Result<bool> {
        wb.put_cf(
            state.cf(CF_ACL),
            user_key(&u.access_key),
            serde_json::to_vec(u).map_err(io::Error::other)?,
        );
        Ok(self.users.insert(u.access_key.clone(), u.clone()).is_some())
    }

    /// Deletes a user and every rule of theirs.
    pub(crate) fn delete_user(&mut self, state: &SmState, wb: &mut WriteBatch, access_key: &str) -> bool {
        let cf = state.cf(CF_ACL);
        wb.delete_cf(cf, user_key(access_key));
        let theirs: Vec<_> = self
            .rules
            .keys()
            .filter(|(ak, _, _)| ak == access_key)
            .cloned()
            .collect();
        for (ak, kind, pattern) in theirs {
            wb.delete_cf(cf, rule_key(&ak, kind, &pattern));
            self.rules.remove(&(ak, kind, pattern));
        }
        self.users.remove(access_key).is_some()
    }

    /// Creates or replaces the rule of a user for one resource pattern.
    pub(crate) fn put_rule(&mut self, state: &SmState, wb: &mut WriteBatch, r: &AclRule) -> io::Result<bool> {
        wb.put_cf(
            state.cf(CF_ACL),
            rule_key(&r.access_key, r.kind, &r.pattern),
            serde_json::to_vec(r).map_err(io::Error::other)?,
        );
        Ok(self
            .rules
            .insert((r.access_key.clone(), r.kind, r.pattern.clone()), r.clone())
            .is_some())
    }

    pub(crate) fn delete_rule(
        &mut self,
        state: &SmState,
        wb: &mut WriteBatch,
        access_key: &str,
        kind: ResourceKind,
        pattern: &str,
    ) -> bool {
        wb.delete_cf(state.cf(CF_ACL), rule_key(access_key, kind, pattern));
        self.rules
            .remove(&(access_key.to_owned(), kind, pattern.to_owned()))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(rules: &[(&str, ResourceKind, &str, &[Permission], bool)]) -> AclState {
        let mut s = AclState::default();
        for ak in ["app", "root"] {
            s.users.insert(
                ak.into(),
                User {
                    access_key: ak.into(),
                    secret: "s".repeat(16),
                    admin: ak == "root",
                },
            );
        }
        for (ak, kind, pattern, perms, allow) in rules {
            let r = AclRule {
                access_key: (*ak).into(),
                kind: *kind,
                pattern: (*pattern).into(),
                perms: perms.to_vec(),
                allow: *allow,
            };
            s.rules.insert((r.access_key.clone(), r.kind, r.pattern.clone()), r);
        }
        s
    }

    #[test]
    fn the_most_specific_rule_decides_and_deny_wins_a_tie() {
        use Permission::*;
        use ResourceKind::*;
        let s = state_with(&[
            ("app", Topic, "orders*", &[Pub, Sub], true),
            ("app", Topic, "orders-secret", &[Sub], false),
            ("app", Topic, "audit*", &[Pub], true),
            ("app", Topic, "audit*", &[Pub], true),
            ("app", Group, "*", &[Sub], true),
        ]);
        assert!(s.allows("app", Pub, Topic, "orders-eu"));
        assert!(s.allows("app", Sub, Topic, "orders"));
        assert!(
            !s.allows("app", Sub, Topic, "orders-secret"),
            "exact deny beats prefix allow"
        );
        assert!(s.allows("app", Pub, Topic, "orders-secret"), "the deny names SUB only");
        assert!(!s.allows("app", Sub, Topic, "audit-log"), "no rule grants SUB there");
        assert!(!s.allows("app", Pub, Topic, "payments"), "no rule: no");
        assert!(!s.allows("app", Admin, Topic, "orders"));
        assert!(s.allows("app", Sub, Group, "anything"));
        assert!(!s.allows("app", Sub, Cluster, ""));
        assert!(!s.allows("nobody", Pub, Topic, "orders"), "unknown user");
        assert!(s.allows("root", Admin, Cluster, ""), "admins may do everything");

        let tie = state_with(&[("app", Topic, "t*", &[Pub], true), ("app", Topic, "t*x", &[Pub], false)]);
        // "t*x" is an exact name (only a trailing * is a wildcard): no match for "tax".
        assert!(tie.allows("app", Pub, Topic, "tax"));
        assert!(!tie.allows("app", Pub, Topic, "t*x"));
        assert_eq!(s.rule_count("app"), 4);
        assert_eq!(s.rule_count("root"), 0);
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let u = User {
            access_key: "k".into(),
            secret: "very-secret-value-123".into(),
            admin: false,
        };
        assert!(!format!("{u:?}").contains("very-secret"));
    }
}
