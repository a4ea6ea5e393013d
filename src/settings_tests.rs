//! Tests of how `raftmq broker` and `raftmq namesrv` read their settings: the real
//! flags, a file, and a controlled environment, into the components' config structs.

use std::time::Duration;

use clap::Parser;

use crate::{Cli, Command, broker_settings, namesrv_settings};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn broker(args: &[&str], vars: &[(&str, &str)]) -> anyhow::Result<raftmq_broker::RaftNodeConfig> {
    let cli = Cli::try_parse_from(
        std::iter::once("raftmq")
            .chain(std::iter::once("broker"))
            .chain(args.iter().copied()),
    )?;
    match cli.command {
        Command::Broker(a) => broker_settings(&a, &env(vars)),
        _ => unreachable!("parsed a broker command"),
    }
}

const SECRET: (&str, &str) = ("RAFTMQ_PEER_SECRET", "0123456789abcdef");
/// The flags every broker needs, which the tests add to.
const BROKER_BASE: [&str; 8] = [
    "--group",
    "g",
    "--node-id",
    "1",
    "--data-dir",
    "/tmp/d",
    "--listen",
    "127.0.0.1:10911",
];

#[test]
fn flags_env_and_file_fill_one_config_in_precedence_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        "group = \"from-file\"\nnode_id = 3\nheartbeat_interval = \"50ms\"\nelection_timeout_min = \"150ms\"\n\
         [messaging]\nmax_body_bytes = 1024\n[store]\nflush = \"async\"\n",
    )
    .unwrap();
    let c = broker(
        &[
            "--config",
            file.to_str().unwrap(),
            "--group",
            "broker-x",
            "--listen",
            "127.0.0.1:10911",
            "--set",
            "messaging.max_pull_messages=7",
        ],
        &[
            SECRET,
            ("RAFTMQ_NODE_ID", "5"),
            ("RAFTMQ_DATA_DIR", "/tmp/d"),
            ("RAFTMQ_MESSAGING__MAX_BODY_BYTES", "2048"),
            ("RAFTMQ_NAMESRV", "a:1,b:2"),
            ("RAFTMQ_BIN", "/not/a/setting"),
            ("RAFTMQ_RETENTION__MAX_BYTES", "1073741824"),
            ("RAFTMQ_RETENTION__FILE_RESERVED_TIME", "24h"),
        ],
    )
    .unwrap();
    assert_eq!(
        c.retention.max_bytes,
        Some(1 << 30),
        "an unset optional key takes a number"
    );
    assert_eq!(c.retention.file_reserved_time, Duration::from_secs(24 * 3600));
    assert_eq!(c.broker_group, "broker-x", "a flag beats the file");
    assert_eq!(c.node_id, 5, "the environment beats the file");
    assert_eq!(
        c.heartbeat_interval,
        Duration::from_millis(50),
        "the file beats the default"
    );
    assert_eq!(c.messaging.max_body_bytes, 2048);
    assert_eq!(c.messaging.max_pull_messages, 7);
    assert_eq!(c.store.flush, raftmq_raft_store::FlushMode::Async);
    assert_eq!(c.nameservers, ["a:1", "b:2"]);
    assert_eq!(c.advertise_addr, "127.0.0.1:10911", "advertise defaults to listen");
    assert_eq!(c.raft_advertise_addr, "127.0.0.1:40911", "Raft on port + 30000");
    assert_eq!(
        c.messaging.max_delay,
        Duration::from_secs(3 * 24 * 3600),
        "untouched keys keep defaults"
    );
}

#[test]
fn bad_settings_name_the_key_and_where_it_came_from() {
    let base = BROKER_BASE;
    let err = |extra: &[&str], vars: &[(&str, &str)]| -> String {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        format!("{:#}", broker(&args, vars).unwrap_err())
    };
    let e = err(&[], &[SECRET, ("RAFTMQ_ELECTION_TIMEOUT_MAX", "soon")]);
    assert!(
        e.contains("election_timeout_max") && e.contains("RAFTMQ_ELECTION_TIMEOUT_MAX"),
        "{e}"
    );
    let e = err(&["--set", "messaging.max_body_bytez=1"], &[SECRET]);
    assert!(e.contains("unknown setting messaging.max_body_bytez"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[retention]\nfile_reserve_time = \"1h\"\n").unwrap();
    let e = err(&["--config", typo.to_str().unwrap()], &[SECRET]);
    assert!(
        e.contains("unknown setting retention.file_reserve_time") && e.contains("typo.toml"),
        "{e}"
    );
    let e = err(&["--set", "retention.disk_full_watermark=1.5"], &[SECRET]);
    assert!(e.contains("retention.disk_full_watermark"), "{e}");
    let e = err(&["--set", "election_timeout_max=100ms"], &[SECRET]);
    assert!(e.contains("election_timeout_max"), "validate() names the key: {e}");
    let e = err(&["--flush", "sometimes"], &[SECRET]);
    assert!(e.contains("store.flush") && e.contains("--flush"), "{e}");
    let e = err(&[], &[]);
    assert!(e.contains("peer secret"), "{e}");
    let e = format!("{:#}", broker(&["--group", "g"], &[SECRET]).unwrap_err());
    assert!(e.contains("node_id is required") && e.contains("RAFTMQ_NODE_ID"), "{e}");
}

#[test]
fn the_printed_defaults_read_back_and_old_keys_still_work() {
    let printed = toml::to_string_pretty(&broker(&["--print-config"], &[]).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defaults.toml");
    std::fs::write(&file, &printed).unwrap();
    let again = broker(&["--config", file.to_str().unwrap(), "--print-config"], &[]).unwrap();
    assert_eq!(toml::to_string_pretty(&again).unwrap(), printed);

    let old = dir.path().join("old.toml");
    std::fs::write(
        &old,
        "flush = \"async\"\nauto_create_topics = true\nfast_failover = false\n\
         transaction_first_check_ms = 1500\ntransaction_max_checks = 4\n",
    )
    .unwrap();
    let c = broker(&["--config", old.to_str().unwrap(), "--print-config"], &[]).unwrap();
    assert_eq!(c.store.flush, raftmq_raft_store::FlushMode::Async);
    assert!(c.messaging.auto_create_topics);
    assert!(!c.fast_failover.enabled);
    assert_eq!(c.messaging.transaction_first_check, Duration::from_millis(1500));
    assert_eq!(c.messaging.transaction_max_checks, 4);
}

#[test]
fn the_compose_file_settings_load() {
    let prod = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/broker.prod.toml");
    let replica = [
        SECRET,
        ("RAFTMQ_GROUP", "broker-a"),
        ("RAFTMQ_NODE_ID", "2"),
        ("RAFTMQ_ADVERTISE", "172.29.53.22:10911"),
        (
            "RAFTMQ_PEERS",
            "1=172.29.53.21:10911,2=172.29.53.22:10911,3=172.29.53.23:10911",
        ),
    ];
    // The plain compose cluster turns off what the production file turns on.
    let compose = [("RAFTMQ_TLS__ENABLED", "false"), ("RAFTMQ_AUTH__ENABLED", "false")];
    let c = broker(&["--config", prod], &[&replica[..], &compose[..]].concat()).unwrap();
    assert_eq!(c.raft_advertise_addr, "172.29.53.22:40911");
    assert!(!c.messaging.auto_create_topics);
    assert_eq!(c.peers.len(), 3);
    assert!(!c.tls.enabled && !c.auth.enabled);
    // The file alone turns TLS and the ACL on: each fails for want of its files here.
    let e = format!(
        "{:#}",
        broker(&["--config", prod], &[&replica[..], &compose[1..]].concat()).unwrap_err()
    );
    assert!(e.contains("tls.cert_file"), "{e}");
    let e = format!(
        "{:#}",
        broker(&["--config", prod], &[&replica[..], &compose[..1]].concat()).unwrap_err()
    );
    assert!(e.contains("auth.admin_secret_file"), "{e}");
}

#[test]
fn namesrv_settings_layer_too() {
    let cli = Cli::try_parse_from(["raftmq", "namesrv", "--broker-timeout-ms", "30000"]).unwrap();
    let Command::Namesrv(a) = cli.command else {
        unreachable!()
    };
    let c = namesrv_settings(&a, &env(&[("RAFTMQ_NAMESRV_LISTEN", "127.0.0.1:19876")])).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:19876");
    assert_eq!(c.broker_timeout, Duration::from_secs(30));
    assert_eq!(c.metrics_listen, "127.0.0.1:39876", "metrics on the port + 20000");
    let cli = Cli::try_parse_from(["raftmq", "namesrv", "--set", "heartbeat_interval=20s"]).unwrap();
    let Command::Namesrv(a) = cli.command else {
        unreachable!()
    };
    let e = format!("{:#}", namesrv_settings(&a, &[]).unwrap_err());
    assert!(e.contains("broker_timeout"), "{e}");
}

#[test]
fn the_metrics_endpoint_defaults_to_the_client_port_plus_20000_and_empty_turns_it_off() {
    let base = BROKER_BASE;
    let c = broker(&base, &[SECRET]).unwrap();
    assert_eq!(c.metrics_listen, "127.0.0.1:30911");
    let off: Vec<&str> = base.iter().copied().chain(["--metrics-listen", ""]).collect();
    assert_eq!(broker(&off, &[SECRET]).unwrap().metrics_listen, "");
    let env_off = broker(&base, &[SECRET, ("RAFTMQ_METRICS_LISTEN", "")]).unwrap();
    assert_eq!(env_off.metrics_listen, "");
    let bad: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--set", "metrics_listen=nowhere"])
        .collect();
    let e = format!("{:#}", broker(&bad, &[SECRET]).unwrap_err());
    assert!(e.contains("metrics_listen") && e.contains("nowhere"), "{e}");
}
