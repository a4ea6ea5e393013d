//! Users and ACL rules through the admin API (`raftmq.v1.AclService`): each
//! broker group keeps its own replicated copy, so a change goes to every live
//! group's leader, and a listing comes from the first group's.

use std::time::Duration;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::acl_service_client::AclServiceClient;

use crate::admin::Admin;
use crate::error::Error;

impl Admin {
    /// Runs `f` on every live group's leader, in turn; the answers in group order.
    async fn on_every_acl_leader<T, F, Fut>(&self, f: F) -> Result<Vec<T>, Error>
    where
        F: Fn(AclServiceClient<crate::route::RpcChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut out = Vec::new();
        for g in self.live_groups().await? {
            out.push(self.on_leader_as(&g, Duration::ZERO, AclServiceClient::new, &f).await?);
        }
        Ok(out)
    }

    /// Creates or replaces a user on every broker group; true if any had it.
    pub async fn put_user(&self, access_key: &str, secret: &str, admin: bool) -> Result<bool, Error> {
        let req = pb::PutUserRequest {
            access_key: access_key.to_owned(),
            secret: secret.to_owned(),
            admin,
        };
        let answers = self
            .on_every_acl_leader(|mut c| {
                let req = req.clone();
                async move { c.put_user(req).await }
            })
            .await?;
        Ok(answers.iter().any(|a| a.existed))
    }

    /// Deletes a user and their rules on every broker group; true if any had it.
    pub async fn delete_user(&self, access_key: &str) -> Result<bool, Error> {
        let req = pb::DeleteUserRequest {
            access_key: access_key.to_owned(),
        };
        let answers = self
            .on_every_acl_leader(|mut c| {
                let req = req.clone();
                async move { c.delete_user(req).await }
            })
            .await?;
        Ok(answers.iter().any(|a| a.existed))
    }

    /// The users (never their secrets) as the first live group holds them.
    pub async fn list_users(&self) -> Result<Vec<pb::UserInfo>, Error> {
        let groups = self.live_groups().await?;
        let Some(g) = groups.first() else { return Ok(Vec::new()) };
        let resp = self
            .on_leader_as(g, Duration::ZERO, AclServiceClient::new, |mut c| async move {
                c.list_users(pb::ListUsersRequest {}).await
            })
            .await?;
        Ok(resp.users)
    }

    /// Creates or replaces a rule on every broker group; true if any had it.
    pub async fn put_acl_rule(&self, rule: pb::AclRuleProto) -> Result<bool, Error> {
        let req = pb::PutAclRuleRequest { rule: Some(rule) };
        let answers = self
            .on_every_acl_leader(|mut c| {
                let req = req.clone();
                async move { c.put_acl_rule(req).await }
            })
            .await?;
        Ok(answers.iter().any(|a| a.existed))
    }

    /// Deletes a rule on every broker group; true if any had it.
    pub async fn delete_acl_rule(
        &self,
        access_key: &str,
        kind: pb::AclResourceKind,
        pattern: &str,
    ) -> Result<bool, Error> {
        let req = pb::DeleteAclRuleRequest {
            access_key: access_key.to_owned(),
            kind: kind as i32,
            pattern: pattern.to_owned(),
        };
        let answers = self
            .on_every_acl_leader(|mut c| {
                let req = req.clone();
                async move { c.delete_acl_rule(req).await }
            })
            .await?;
        Ok(answers.iter().any(|a| a.existed))
    }

    /// The rules (of `access_key`, or everyone's when empty) as the first live group holds them.
    pub async fn list_acl_rules(&self, access_key: &str) -> Result<Vec<pb::AclRuleProto>, Error> {
        let groups = self.live_groups().await?;
        let Some(g) = groups.first() else { return Ok(Vec::new()) };
        let req = pb::ListAclRulesRequest {
            access_key: access_key.to_owned(),
        };
        let resp = self
            .on_leader_as(g, Duration::ZERO, AclServiceClient::new, |mut c| {
                let req = req.clone();
                async move { c.list_acl_rules(req).await }
            })
            .await?;
        Ok(resp.rules)
    }
}
