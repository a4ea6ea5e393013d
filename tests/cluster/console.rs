//! `raftmq console` against an in-process cluster: its JSON API over real HTTP.
//! The console runs as the binary (its router lives in the binary crate, which an
//! integration test cannot link), on a free port it prints. A topic created
//! through the API is what the admin API lists, a message sent by the client is
//! found and browsed, a group's lag is the admin API's, a delete removes the
//! topic, and bad input of every kind is a 4xx whose JSON names what was wrong.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{Context, ensure};
use raftmq_client::{Client, MessageExt};
use raftmq_proto::v1 as pb;
use raftmq_proto::v1::consumer_service_client::ConsumerServiceClient;
use serde_json::{Value, json};

use super::fixtures::{
    Check, DEADLINE, GROUP, eventually, http, spawn_with_lines, start_with_client, wait_for_known_route,
};

const BIN: &str = env!("CARGO_BIN_EXE_raftmq");
const TOPIC: &str = "console-made";
const QUEUES: u32 = 3;
const SENT: u64 = 7;

/// A `raftmq console` process; killed on drop.
struct ConsoleProcess {
    child: Child,
    addr: SocketAddr,
}

impl ConsoleProcess {
    /// Starts the console on a free port and waits for the line naming it.
    fn start(namesrv: &str) -> anyhow::Result<ConsoleProcess> {
        let (child, rx) = spawn_with_lines(
            Command::new(BIN).args(["console", "--namesrv", namesrv, "--listen", "127.0.0.1:0"]),
            "raftmq console",
        )?;
        let mut console = ConsoleProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("raftmq console printed no 'console listening on' line in time")?;
            if let Some(url) = line.trim().strip_prefix("console listening on http://") {
                console.addr = url.trim_end_matches('/').parse().context("the console's address")?;
                return Ok(console);
            }
        }
    }

    /// A call to the API: the status and the JSON answer.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let content_type = (!body.is_empty()).then_some("application/json");
        self.raw(method, path, content_type, body.as_bytes()).await
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<(u16, Value)> {
        let (status, head, body) = http(self.addr, method, path, content_type, body).await?;
        ensure!(
            head.contains("content-type: application/json"),
            "{method} {path} answered {status} without JSON: {head}"
        );
        let v = serde_json::from_slice(&body).with_context(|| format!("{method} {path}: the answer is not JSON"))?;
        Ok((status, v))
    }

    /// A call that must succeed.
    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, v) = self.call(method, path, body).await?;
        ensure!(status == 200, "{method} {path} answered {status}: {v}");
        Ok(v)
    }

    /// A call that must be refused with `status`, its error naming `says`.
    async fn refused(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
        says: &str,
    ) -> anyhow::Result<()> {
        let (got, v) = self.call(method, path, body).await?;
        check_refusal(method, path, got, &v, status, says)
    }
}

fn check_refusal(method: &str, path: &str, got: u16, v: &Value, status: u16, says: &str) -> anyhow::Result<()> {
    let error = v["error"].as_str().unwrap_or_default();
    ensure!(
        got == status && error.contains(says),
        "{method} {path}: wanted {status} naming {says:?}, got {got}: {v}"
    );
    Ok(())
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of a group's lag over every queue, as the admin API reports it.
async fn admin_lag(client: &Client, group: &str) -> anyhow::Result<u64> {
    let found = client.admin().describe_consumer_group(group).await?;
    Ok(found.iter().flat_map(|d| &d.queues).map(|q| q.lag).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_api_creates_finds_and_deletes_through_the_admin_api_and_refuses_bad_input() -> anyhow::Result<()> {
    let _turn = super::fixtures::ONE_AT_A_TIME.lock().await;
    let (ns, cluster, client) = start_with_client().await?;
    let mut console = ConsoleProcess::start(&ns.addr)?;

    // The pages and their assets are served from the binary.
    let (status, head, page) = http(console.addr, "GET", "/", None, b"").await?;
    ensure!(
        status == 200 && head.contains("text/html"),
        "GET / answered {status}: {head}"
    );
    ensure!(String::from_utf8_lossy(&page).contains("raftmq console"));
    ensure!(head.contains("content-security-policy: default-src 'self'"), "{head}");
    for asset in ["/app.js", "/style.css"] {
        let (status, _, _) = http(console.addr, "GET", asset, None, b"").await?;
        ensure!(status == 200, "GET {asset} answered {status}");
    }

    // The cluster page: the group, its leader and three replicas, as the leader sees them.
    let c = console.ok("GET", "/api/cluster", None).await?;
    let g = &c["groups"][0];
    ensure!(g["broker_group"] == GROUP && g["leader_id"].is_u64(), "{c}");
    ensure!(g["replicas"].as_array().map(Vec::len) == Some(3), "{c}");
    ensure!(c["source"] == "leaders", "{c}");

    // A topic created through the console is the admin API's.
    let made = console
        .ok(
            "POST",
            "/api/topics",
            Some(json!({"name": TOPIC, "queues": QUEUES, "message_type": "fifo", "access_key": "", "secret": ""})),
        )
        .await?;
    ensure!(made["ok"] == true, "{made}");
    let listed = client.admin().list_topics().await?;
    let t = listed
        .iter()
        .find(|(_, t)| t.name == TOPIC)
        .with_context(|| format!("{TOPIC} is not in the admin list {listed:?}"))?;
    ensure!(
        t.1.queues_per_group == QUEUES && t.1.message_type() == pb::MessageType::Fifo,
        "{t:?}"
    );
    let topics = console.ok("GET", "/api/topics", None).await?;
    ensure!(
        topics["topics"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["name"] == TOPIC
                && t["groups"][0]["message_type"] == "FIFO"
                && t["groups"][0]["queues"] == QUEUES)),
        "{topics}"
    );

    // Messages sent by the client: counted in the queues' offsets, found by id and
    // by key, and browsed from their queue.
    wait_for_known_route(&client, TOPIC).await?;
    let producer = client.producer();
    let mut receipts = Vec::new();
    for i in 0..SENT {
        let mut m = pb::Message::new(format!("console body {i}").into_bytes());
        m.keys = vec![format!("k{i}")];
        receipts.push(producer.send(TOPIC, m).await?);
    }
    let detail = console.ok("GET", &format!("/api/topics/{TOPIC}"), None).await?;
    ensure!(detail["max_offset_sum"] == SENT, "{detail}");
    ensure!(
        detail["groups"][0]["queues"].as_array().map(Vec::len) == Some(QUEUES as usize),
        "{detail}"
    );
    let first = &receipts[0];
    let found = console
        .ok("GET", &format!("/api/messages/by-id?id={}", first.message_id), None)
        .await?;
    ensure!(
        found["messages"][0]["message_id"] == first.message_id.as_str()
            && found["messages"][0]["body_preview"] == "console body 0",
        "{found}"
    );
    let by_key = console
        .ok("GET", &format!("/api/messages/by-key?topic={TOPIC}&key=k3"), None)
        .await?;
    ensure!(by_key["messages"][0]["keys"][0] == "k3", "{by_key}");
    let q = first.queue_id;
    let browsed = console
        .ok(
            "GET",
            &format!("/api/messages/browse?topic={TOPIC}&queue={q}&offset=0&count=100"),
            None,
        )
        .await?;
    let in_queue = receipts.iter().filter(|r| r.queue_id == q).count();
    ensure!(
        browsed["messages"].as_array().map(Vec::len) == Some(in_queue) && browsed["broker_group"] == GROUP,
        "{browsed}"
    );

    // A group's offsets moved through the console, and its lag as the admin API says.
    let reset = console
        .ok(
            "POST",
            "/api/groups/console-group/reset-offset",
            Some(json!({"topic": TOPIC, "to": "first"})),
        )
        .await?;
    ensure!(
        reset["queues"].as_array().map(Vec::len) == Some(QUEUES as usize),
        "{reset}"
    );
    let g = console.ok("GET", "/api/groups/console-group", None).await?;
    ensure!(g["total_lag"] == SENT, "{g}");
    ensure!(g["total_lag"] == admin_lag(&client, "console-group").await?, "{g}");
    let groups = console.ok("GET", "/api/groups", None).await?;
    ensure!(
        groups["groups"]
            .as_array()
            .is_some_and(|a| a.iter().any(|g| g["name"] == "console-group")),
        "{groups}"
    );
    // No dead letters yet: an empty list, not an error.
    let dlq = console.ok("GET", "/api/groups/console-group/dlq", None).await?;
    ensure!(dlq["messages"].as_array().is_some_and(Vec::is_empty), "{dlq}");

    // A dead letter (a group allowing no retry sends a message back once), listed
    // and resent to its topic through the console.
    client
        .admin()
        .update_consumer_group(pb::ConsumerGroupConfig {
            name: "console-dlq".into(),
            fifo: false,
            max_reconsume_times: Some(0),
            retry_delays_ms: Vec::new(),
        })
        .await?;
    let leader = cluster.wait_for_leader(DEADLINE).await?;
    let mut consumers = ConsumerServiceClient::connect(format!("http://{}", cluster.replica(leader).addr)).await?;
    let back = consumers
        .send_back(pb::SendBackRequest {
            consumer_group: "console-dlq".into(),
            message_id: first.message_id.clone(),
            reconsume_times: 0,
            delay_ms: 0,
        })
        .await?
        .into_inner();
    ensure!(back.dead_lettered, "{back:?}");
    let letters = eventually(DEADLINE, "the console to list the dead letter", async || {
        let (status, v) = console.call("GET", "/api/groups/console-dlq/dlq", None).await?;
        Ok(match v["messages"].as_array() {
            Some(a) if status == 200 && !a.is_empty() => Check::Done(v.clone()),
            _ => Check::Pending(format!("{status} {v}")),
        })
    })
    .await?;
    ensure!(
        letters["messages"][0]["message_id"] == first.message_id.as_str(),
        "{letters}"
    );
    let resent = console
        .ok(
            "POST",
            "/api/groups/console-dlq/dlq/resend",
            Some(json!({"id": first.message_id})),
        )
        .await?;
    ensure!(resent["broker_group"] == GROUP, "{resent}");
    let detail = console.ok("GET", &format!("/api/topics/{TOPIC}"), None).await?;
    ensure!(
        detail["max_offset_sum"] == SENT + 1,
        "the resent message is not in {TOPIC}: {detail}"
    );

    // Bad input: a 4xx naming what was wrong, and the console still serves.
    let browse_too_many = format!("/api/messages/browse?topic={TOPIC}&count=100000");
    let browse_past_queues = format!("/api/messages/browse?topic={TOPIC}&queue={QUEUES}");
    let create = |body: Value| ("POST", "/api/topics", Some(body));
    for ((method, path, body), status, says) in [
        (create(json!({"name": "bad name", "queues": 1})), 400, "topic name"),
        (
            create(json!({"name": "ok", "queues": 0})),
            400,
            "queues 0 is out of range",
        ),
        (create(json!({"name": "ok", "queues": "four"})), 400, "queues"),
        (create(json!({"name": "ok", "queue": 1})), 400, "unknown field `queue`"),
        (create(json!({"queues": 1})), 400, "missing field `name`"),
        (create(json!({"name": "ok", "queues": 1, "perm": "all"})), 400, "perm"),
        (
            create(json!({"name": "ok", "queues": 1, "access_key": "admin"})),
            400,
            "without a secret",
        ),
        (
            create(json!({"name": "ok", "queues": 1, "groups": ["broker-z"]})),
            400,
            "broker-z",
        ),
        (
            (
                "POST",
                "/api/groups/g/reset-offset",
                Some(json!({"topic": TOPIC, "to": "yesterday"})),
            ),
            400,
            "to:",
        ),
        (
            ("POST", "/api/groups/g/dlq/resend", Some(json!({"id": "not an id"}))),
            400,
            "message id",
        ),
        (
            ("GET", browse_too_many.as_str(), None),
            400,
            "count=100000 is out of range",
        ),
        (("GET", browse_past_queues.as_str(), None), 400, "out of range"),
        (
            ("GET", "/api/messages/browse?topic=no-such-topic", None),
            404,
            "no-such-topic",
        ),
        (("GET", "/api/messages/browse?queue=1", None), 400, "topic is required"),
        (("GET", "/api/messages/browse?topic=x&bogus=1", None), 400, "bogus"),
        (("GET", "/api/messages/by-id?id=%21%21", None), 400, "message id"),
        (
            ("GET", "/api/messages/by-key?topic=a%20b&key=k", None),
            400,
            "topic name",
        ),
        (("GET", "/api/topics/no-such-topic", None), 404, "no-such-topic"),
        (("GET", "/api/groups/no-such-group", None), 404, "no-such-group"),
        (("GET", "/api/groups/console-group/dlq?max=0", None), 400, "max=0"),
        (("GET", "/api/no-such-path", None), 404, "no such API path"),
        (("PUT", "/api/topics", None), 405, "method"),
    ] {
        console.refused(method, path, body, status, says).await?;
    }
    // Not JSON, and JSON sent as another type (what a cross-site form could send).
    for (content_type, body, status, says) in [
        ("application/json", &b"{not json"[..], 400, "request body"),
        ("text/plain", br#"{"name":"csrf","queues":1}"#, 415, "application/json"),
    ] {
        let (got, v) = console.raw("POST", "/api/topics", Some(content_type), body).await?;
        check_refusal("POST", "/api/topics", got, &v, status, says)?;
    }
    // Past the body limit.
    let big = vec![b' '; 100 * 1024];
    let (got, _, _) = http(console.addr, "POST", "/api/topics", Some("application/json"), &big).await?;
    ensure!(got == 413, "a 100 KiB body answered {got}");
    ensure!(
        !client
            .admin()
            .list_topics()
            .await?
            .iter()
            .any(|(_, t)| t.name == "csrf" || t.name == "ok"),
        "a refused create created a topic"
    );

    // Deleted through the console: gone from the admin list.
    let deleted = console
        .ok("DELETE", &format!("/api/topics/{TOPIC}"), Some(json!({})))
        .await?;
    ensure!(deleted["existed"] == true, "{deleted}");
    eventually(DEADLINE, "the deleted topic to leave the admin list", async || {
        let listed = client.admin().list_topics().await?;
        Ok(if listed.iter().any(|(_, t)| t.name == TOPIC) {
            Check::Pending(format!("{listed:?}"))
        } else {
            Check::Done(())
        })
    })
    .await?;
    ensure!(
        console.child.try_wait()?.is_none(),
        "the console exited while serving bad input"
    );
    drop(console);
    cluster.shutdown().await?;
    ns.stop().await?;
    Ok(())
}
