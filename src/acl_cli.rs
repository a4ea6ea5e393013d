//! `raftmq admin user|acl`: the ACL's users and rules from the command line
//! (written to every broker group through `raftmq_client::Admin`).

use std::path::PathBuf;

use anyhow::Context;
use raftmq_proto::v1 as pb;

use crate::NamesrvAddr;

#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Create a user (or give an existing one a new secret) on every broker group.
    Create {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        /// The new user's access key.
        #[arg(long)]
        user: String,
        /// File holding the new user's secret (at least 16 bytes, trimmed).
        /// Without it, a random secret is made and printed once.
        #[arg(long)]
        user_secret_file: Option<PathBuf>,
        /// May do everything, like the bootstrap admin.
        #[arg(long)]
        admin: bool,
    },
    /// Delete a user and every rule of theirs on every broker group.
    Delete {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        user: String,
    },
    /// List users (never their secrets).
    List(NamesrvAddr),
}

/// What a rule is about: exactly one of --topic, --group, --cluster.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Resource {
    /// A topic name, or a prefix ending in * (* alone: every topic).
    #[arg(long)]
    topic: Option<String>,
    /// A consumer (or producer) group name, or a prefix ending in *.
    #[arg(long)]
    group: Option<String>,
    /// The cluster itself (ADMIN: membership, users and rules, message lookups).
    #[arg(long)]
    cluster: bool,
}

impl Resource {
    fn parts(&self) -> (pb::AclResourceKind, String) {
        match (&self.topic, &self.group) {
            (Some(t), _) => (pb::AclResourceKind::Topic, t.clone()),
            (None, Some(g)) => (pb::AclResourceKind::Group, g.clone()),
            (None, None) => (pb::AclResourceKind::Cluster, String::new()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PermArg {
    Pub,
    Sub,
    Admin,
}

#[derive(clap::Subcommand)]
pub enum AclCommand {
    /// Allow (or with --deny, deny) a user permissions on a resource, on every
    /// broker group. The most specific matching rule decides; a deny beats an
    /// allow as specific; no rule means no.
    Put {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        user: String,
        #[command(flatten)]
        resource: Resource,
        /// Comma-separated: pub, sub, admin.
        #[arg(long, value_enum, value_delimiter = ',', required = true)]
        perm: Vec<PermArg>,
        #[arg(long)]
        deny: bool,
    },
    /// Delete a user's rule for one resource pattern on every broker group.
    Delete {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long)]
        user: String,
        #[command(flatten)]
        resource: Resource,
    },
    /// List rules (of --user, or everyone's).
    List {
        #[command(flatten)]
        namesrv: NamesrvAddr,
        #[arg(long, default_value = "")]
        user: String,
    },
}

/// 128 random bits from the kernel, in hex.
fn random_secret() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for a secret")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub async fn run_user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Create {
            namesrv,
            user,
            user_secret_file,
            admin,
        } => {
            let (secret, made) = match &user_secret_file {
                Some(path) => (
                    raftmq_broker::auth::read_secret(path).map_err(|e| anyhow::anyhow!("--user-secret-file: {e}"))?,
                    false,
                ),
                None => (random_secret()?, true),
            };
            let existed = crate::tools::client(namesrv)?
                .admin()
                .put_user(&user, &secret, admin)
                .await
                .with_context(|| format!("creating user {user}"))?;
            println!(
                "user {user} {}{}",
                if existed { "updated" } else { "created" },
                if admin { " (admin)" } else { "" }
            );
            if made {
                // Printed once, to stdout only: the broker never returns it.
                println!("secret: {secret}");
            }
        }
        UserCommand::Delete { namesrv, user } => {
            let existed = crate::tools::client(namesrv)?.admin().delete_user(&user).await?;
            println!("user {user} {}", if existed { "deleted" } else { "did not exist" });
        }
        UserCommand::List(namesrv) => {
            for u in crate::tools::client(namesrv)?.admin().list_users().await? {
                println!(
                    "{}{}  {} rule(s)",
                    u.access_key,
                    if u.admin { " (admin)" } else { "" },
                    u.rules
                );
            }
        }
    }
    Ok(())
}

pub async fn run_acl(cmd: AclCommand) -> anyhow::Result<()> {
    match cmd {
        AclCommand::Put {
            namesrv,
            user,
            resource,
            perm,
            deny,
        } => {
            let (kind, pattern) = resource.parts();
            let perms = perm
                .iter()
                .map(|p| match p {
                    PermArg::Pub => pb::AclPermission::Pub as i32,
                    PermArg::Sub => pb::AclPermission::Sub as i32,
                    PermArg::Admin => pb::AclPermission::Admin as i32,
                })
                .collect();
            let existed = crate::tools::client(namesrv)?
                .admin()
                .put_acl_rule(pb::AclRuleProto {
                    access_key: user.clone(),
                    kind: kind as i32,
                    pattern: pattern.clone(),
                    perms,
                    allow: !deny,
                })
                .await
                .with_context(|| format!("putting a rule for {user}"))?;
            println!(
                "rule of {user} on {} {pattern} {}",
                kind.as_str_name(),
                if existed { "replaced" } else { "added" }
            );
        }
        AclCommand::Delete {
            namesrv,
            user,
            resource,
        } => {
            let (kind, pattern) = resource.parts();
            let existed = crate::tools::client(namesrv)?
                .admin()
                .delete_acl_rule(&user, kind, &pattern)
                .await?;
            println!(
                "rule of {user} on {} {pattern} {}",
                kind.as_str_name(),
                if existed { "deleted" } else { "did not exist" }
            );
        }
        AclCommand::List { namesrv, user } => {
            for r in crate::tools::client(namesrv)?.admin().list_acl_rules(&user).await? {
                let kind = pb::AclResourceKind::try_from(r.kind).map_or("?", |k| k.as_str_name());
                let perms: Vec<&str> = r
                    .perms
                    .iter()
                    .map(|p| pb::AclPermission::try_from(*p).map_or("?", |p| p.as_str_name()))
                    .collect();
                println!(
                    "{} {} {} {} {}",
                    r.access_key,
                    if r.allow { "allow" } else { "deny" },
                    perms.join(","),
                    kind,
                    r.pattern
                );
            }
        }
    }
    Ok(())
}
