//! `raftmq.v1.AclService`: users and ACL rules, managed by the cluster's admins
//! and written through the group's Raft log (so every replica enforces them,
//! across failovers and in snapshots). Checks every field before proposing;
//! answers with what existed before. Secrets go in, never out.

use raftmq_proto::request_auth;
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::acl_service_server::{AclService, AclServiceServer};
use raftmq_raft_store::acl::{MAX_RULES_PER_USER, MAX_USERS};
use raftmq_raft_store::{AclRule, Command, Permission, ResourceKind, Response, User};
use tonic::{Request, Status};
use tracing::Instrument;

use crate::admin::answer;
use crate::api_error::ApiError;
use crate::group::GroupHandle;

/// Longest secret and rule pattern accepted (they are held in memory by every replica).
const MAX_SECRET_BYTES: usize = 256;
const MAX_PATTERN_BYTES: usize = 255;

#[derive(Clone)]
pub struct Acl {
    group: GroupHandle,
}

fn kind_of(k: i32) -> Result<ResourceKind, ApiError> {
    match pb::AclResourceKind::try_from(k) {
        Ok(pb::AclResourceKind::Topic) => Ok(ResourceKind::Topic),
        Ok(pb::AclResourceKind::Group) => Ok(ResourceKind::Group),
        Ok(pb::AclResourceKind::Cluster) => Ok(ResourceKind::Cluster),
        _ => Err(ApiError::InvalidArgument(format!(
            "kind {k} is not a resource kind (TOPIC, GROUP or CLUSTER)"
        ))),
    }
}

fn kind_to_pb(k: ResourceKind) -> pb::AclResourceKind {
    match k {
        ResourceKind::Topic => pb::AclResourceKind::Topic,
        ResourceKind::Group => pb::AclResourceKind::Group,
        ResourceKind::Cluster => pb::AclResourceKind::Cluster,
    }
}

fn perm_of(p: i32) -> Result<Permission, ApiError> {
    match pb::AclPermission::try_from(p) {
        Ok(pb::AclPermission::Pub) => Ok(Permission::Pub),
        Ok(pb::AclPermission::Sub) => Ok(Permission::Sub),
        Ok(pb::AclPermission::Admin) => Ok(Permission::Admin),
        _ => Err(ApiError::InvalidArgument(format!(
            "permission {p} is not PUB, SUB or ADMIN"
        ))),
    }
}

fn perm_to_pb(p: Permission) -> pb::AclPermission {
    match p {
        Permission::Pub => pb::AclPermission::Pub,
        Permission::Sub => pb::AclPermission::Sub,
        Permission::Admin => pb::AclPermission::Admin,
    }
}

fn rule_to_pb(r: &AclRule) -> pb::AclRuleProto {
    pb::AclRuleProto {
        access_key: r.access_key.clone(),
        kind: kind_to_pb(r.kind) as i32,
        pattern: r.pattern.clone(),
        perms: r.perms.iter().map(|p| perm_to_pb(*p) as i32).collect(),
        allow: r.allow,
    }
}

fn access_key(ak: &str) -> Result<(), ApiError> {
    request_auth::check_access_key(ak).map_err(|e| ApiError::InvalidArgument(format!("access_key: {e}")))
}

/// The resource pattern as stored: empty for the cluster (there is one).
fn pattern(kind: ResourceKind, pattern: &str) -> Result<String, ApiError> {
    if kind == ResourceKind::Cluster {
        return Ok(String::new());
    }
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "pattern must be 1 to {MAX_PATTERN_BYTES} bytes (a name, or a prefix ending in *), not {}",
            pattern.len()
        )));
    }
    if pattern.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "pattern {pattern:?} holds a control character"
        )));
    }
    Ok(pattern.to_owned())
}

fn changed(r: Response) -> Result<bool, ApiError> {
    match r {
        Response::AclChanged { existed } => Ok(existed),
        Response::Rejected { reason } => Err(ApiError::FailedPrecondition(reason)),
        other => Err(ApiError::Internal(format!(
            "unexpected answer to an ACL change: {other}"
        ))),
    }
}

impl Acl {
    pub fn new(group: GroupHandle) -> Self {
        Acl { group }
    }

    pub fn into_server(self) -> AclServiceServer<Self> {
        AclServiceServer::new(self)
    }

    async fn put_user(&self, req: pb::PutUserRequest) -> Result<pb::PutUserResponse, ApiError> {
        access_key(&req.access_key)?;
        if req.secret.len() < request_auth::MIN_SECRET_BYTES || req.secret.len() > MAX_SECRET_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "secret must be {} to {MAX_SECRET_BYTES} bytes, not {}",
                request_auth::MIN_SECRET_BYTES,
                req.secret.len()
            )));
        }
        if req.secret.chars().any(char::is_whitespace) {
            return Err(ApiError::InvalidArgument(
                "secret holds whitespace (secret files are trimmed, so it could never be presented)".into(),
            ));
        }
        self.group.ensure_leader()?;
        let (known, count) = self
            .group
            .store()
            .with_acl(|a| (a.user(&req.access_key).is_some(), a.users().count()));
        if !known && count >= MAX_USERS {
            return Err(ApiError::ResourceExhausted(format!(
                "broker group {} already has {MAX_USERS} users",
                self.group.group()
            )));
        }
        let cmd = Command::PutUser(User {
            access_key: req.access_key,
            secret: req.secret,
            admin: req.admin,
        });
        let existed = changed(self.group.write(cmd).await?.response)?;
        Ok(pb::PutUserResponse { existed })
    }

    async fn delete_user(&self, req: pb::DeleteUserRequest) -> Result<pb::DeleteUserResponse, ApiError> {
        access_key(&req.access_key)?;
        self.group.ensure_leader()?;
        let cmd = Command::DeleteUser {
            access_key: req.access_key,
        };
        let existed = changed(self.group.write(cmd).await?.response)?;
        Ok(pb::DeleteUserResponse { existed })
    }

    async fn put_rule(&self, req: pb::PutAclRuleRequest) -> Result<pb::PutAclRuleResponse, ApiError> {
        let r = req
            .rule
            .ok_or_else(|| ApiError::InvalidArgument("rule is required".into()))?;
        access_key(&r.access_key)?;
        let kind = kind_of(r.kind)?;
        let pattern = pattern(kind, &r.pattern)?;
        let mut perms = r.perms.iter().map(|p| perm_of(*p)).collect::<Result<Vec<_>, _>>()?;
        perms.sort();
        perms.dedup();
        if perms.is_empty() {
            return Err(ApiError::InvalidArgument(
                "perms must name at least one of PUB, SUB, ADMIN".into(),
            ));
        }
        self.group.ensure_leader()?;
        let (user, rules, replaces) = self.group.store().with_acl(|a| {
            (
                a.user(&r.access_key).is_some(),
                a.rule_count(&r.access_key),
                a.rules()
                    .any(|x| x.access_key == r.access_key && x.kind == kind && x.pattern == pattern),
            )
        });
        if !user {
            return Err(ApiError::NotFound(format!(
                "no user {:?}: create it first (raftmq admin user create)",
                r.access_key
            )));
        }
        if !replaces && rules >= MAX_RULES_PER_USER {
            return Err(ApiError::ResourceExhausted(format!(
                "user {:?} already has {MAX_RULES_PER_USER} rules",
                r.access_key
            )));
        }
        let cmd = Command::PutAclRule(AclRule {
            access_key: r.access_key,
            kind,
            pattern,
            perms,
            allow: r.allow,
        });
        let existed = changed(self.group.write(cmd).await?.response)?;
        Ok(pb::PutAclRuleResponse { existed })
    }

    async fn delete_rule(&self, req: pb::DeleteAclRuleRequest) -> Result<pb::DeleteAclRuleResponse, ApiError> {
        access_key(&req.access_key)?;
        let kind = kind_of(req.kind)?;
        let pattern = pattern(kind, &req.pattern)?;
        self.group.ensure_leader()?;
        let cmd = Command::DeleteAclRule {
            access_key: req.access_key,
            kind,
            pattern,
        };
        let existed = changed(self.group.write(cmd).await?.response)?;
        Ok(pb::DeleteAclRuleResponse { existed })
    }
}

#[tonic::async_trait]
impl AclService for Acl {
    async fn put_user(
        &self,
        request: Request<pb::PutUserRequest>,
    ) -> Result<tonic::Response<pb::PutUserResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        // The access key only: never the secret.
        let span = tracing::info_span!("acl", rpc = "PutUser", access_key = %req.access_key, admin = req.admin);
        async { answer("PutUser", Acl::put_user(self, req).await) }
            .instrument(span)
            .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<tonic::Response<pb::DeleteUserResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("acl", rpc = "DeleteUser", access_key = %req.access_key);
        async { answer("DeleteUser", Acl::delete_user(self, req).await) }
            .instrument(span)
            .await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<tonic::Response<pb::ListUsersResponse>, Status> {
        self.group.auth().admin(&request)?;
        let users = self.group.store().with_acl(|a| {
            a.users()
                .map(|u| pb::UserInfo {
                    access_key: u.access_key.clone(),
                    admin: u.admin,
                    rules: a.rule_count(&u.access_key) as u32,
                })
                .collect()
        });
        Ok(tonic::Response::new(pb::ListUsersResponse { users }))
    }

    async fn put_acl_rule(
        &self,
        request: Request<pb::PutAclRuleRequest>,
    ) -> Result<tonic::Response<pb::PutAclRuleResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("acl", rpc = "PutAclRule");
        async { answer("PutAclRule", Acl::put_rule(self, req).await) }
            .instrument(span)
            .await
    }

    async fn delete_acl_rule(
        &self,
        request: Request<pb::DeleteAclRuleRequest>,
    ) -> Result<tonic::Response<pb::DeleteAclRuleResponse>, Status> {
        self.group.auth().admin(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("acl", rpc = "DeleteAclRule", access_key = %req.access_key);
        async { answer("DeleteAclRule", Acl::delete_rule(self, req).await) }
            .instrument(span)
            .await
    }

    async fn list_acl_rules(
        &self,
        request: Request<pb::ListAclRulesRequest>,
    ) -> Result<tonic::Response<pb::ListAclRulesResponse>, Status> {
        self.group.auth().admin(&request)?;
        let ak = &request.get_ref().access_key;
        let rules = self.group.store().with_acl(|a| {
            a.rules()
                .filter(|r| ak.is_empty() || &r.access_key == ak)
                .map(rule_to_pb)
                .collect()
        });
        Ok(tonic::Response::new(pb::ListAclRulesResponse { rules }))
    }
}
