//! Client settings. Every field has a default except the NameServer list;
//! [`ClientConfig::validate`] names the bad key and value.

use std::time::Duration;

use crate::error::Error;

/// How a client finds the cluster and how long it tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// NameServer `host:port`s, tried in order for each route query. NameServers
    /// never talk to each other, so any live one has the full picture.
    pub nameservers: Vec<String>,
    /// Longest wait for one request's answer (a pull adds its long-poll wait).
    /// This is how a paused or cut-off leader, which resets nothing and just goes
    /// silent, is noticed: past it the endpoint counts as dead for a moment and
    /// its replicas are asked who leads now (see the `leader` module). Default 1 s:
    /// a healthy send is answered in about a millisecond, and even a loaded
    /// broker's fsynced batch in tens, so 1 s is not mistaken for death, while the
    /// brokers' elections (200-400 ms timeout) are over by then, so the replicas
    /// asked next already name the new leader. A just-elected leader that cannot
    /// get its lease confirmed answers UNAVAILABLE after 1 s too: cutting that off
    /// costs nothing, as both mean "ask elsewhere". Must not exceed
    /// `send_deadline`. NameServer queries use it as well.
    pub request_timeout: Duration,
    /// Longest wait for a TCP connection. Default 500 ms: a live broker on a LAN
    /// answers in a millisecond, and a killed container's address answers nothing
    /// at all, so a long connect timeout is time lost to a dead leader.
    pub connect_timeout: Duration,
    /// With `Some(t)`, a channel with requests in flight pings its server every
    /// 200 ms and an RPC whose connection stops answering for `t` fails at once
    /// (UNAVAILABLE) instead of waiting out `request_timeout`: how a producer
    /// notices a paused or cut-off leader sooner than `request_timeout`, so it
    /// must be shorter than that. A killed process needs none of this (its sockets
    /// are closed, the client sees a reset).
    /// Default `None`: hyper's HTTP/2 keep-alive cost 30 % of pipelined throughput
    /// here (256 in flight: 24.1-25.3k msgs/s without, 17.2-18.6k with).
    pub dead_connection_timeout: Option<Duration>,
    /// Total time one `send` may take, retries included; also bounds pulls (plus
    /// their long-poll wait), admin calls and consumer heartbeats. Default 3 s:
    /// covers a silent leader's `request_timeout` (1 s), the election (under
    /// 0.5 s) and finding the new leader, with room for one more slow answer.
    pub send_deadline: Duration,
    /// A cached route older than this is fetched again before its next use.
    /// Default 30 s, RocketMQ's `pollNameServerInterval`; a `NOT_LEADER` or a
    /// connection error refreshes earlier.
    pub route_refresh_interval: Duration,
    /// Concurrent single-message sends are combined into one Send RPC (one Raft
    /// entry) of up to this many messages while earlier RPCs are in flight: those
    /// bound for one queue (keyed or explicit) per queue, unkeyed ones per topic,
    /// each batch taking the next queue. An idle producer sends at once: nothing
    /// waits to fill a batch. Default 128; 1 turns combining off.
    pub max_auto_batch: usize,
    /// Idempotent sends: each producer numbers its send RPCs, and a retried RPC
    /// (after a timeout or a failover) is answered by the broker group from its
    /// first attempt instead of stored again. Default on.
    pub idempotent: bool,
    /// TLS toward NameServers and brokers, trusting the CA read from a file
    /// ([`ClientConfig::with_tls_ca_file`]); every connection then uses
    /// `https://`. Default `None`: plaintext. A NameServer written
    /// `https://host:port` needs it; one written `http://host:port` is refused
    /// with it, so nothing goes out in the clear by mistake.
    pub tls: Option<raftmq_tls::ClientTls>,
    /// An access key and secret: every call to a broker is then signed
    /// (HMAC-SHA256 over the time, a nonce and the method; see
    /// `raftmq_proto::request_auth`), as brokers with `[auth] enabled` require.
    /// Default `None`: unsigned.
    pub credentials: Option<raftmq_proto::request_auth::Credentials>,
}

impl ClientConfig {
    pub fn new(nameservers: Vec<String>) -> ClientConfig {
        ClientConfig {
            nameservers,
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            dead_connection_timeout: None,
            send_deadline: Duration::from_secs(3),
            route_refresh_interval: Duration::from_secs(30),
            max_auto_batch: 128,
            idempotent: true,
            tls: None,
            credentials: None,
        }
    }

    /// Signs every call with `access_key` and `secret`.
    pub fn with_credentials(mut self, access_key: impl Into<String>, secret: impl Into<String>) -> ClientConfig {
        self.credentials = Some(raftmq_proto::request_auth::Credentials {
            access_key: access_key.into(),
            secret: secret.into(),
        });
        self
    }

    /// Turns TLS on, trusting the PEM CA certificate(s) in `ca_file`; the error
    /// names the file when it is missing, unreadable or not PEM.
    pub fn with_tls_ca_file(mut self, ca_file: &std::path::Path) -> Result<ClientConfig, Error> {
        let tls = raftmq_tls::ClientTls::from_ca_file("tls_ca_file", ca_file).map_err(|e| Error::Config {
            key: e.key.into(),
            value: e.value,
            reason: e.reason,
        })?;
        self.tls = Some(tls);
        Ok(self)
    }

    /// Checks the settings; the error names the bad key and value.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: String, value: String, reason: &str| Error::Config {
            key,
            value,
            reason: reason.into(),
        };
        if self.nameservers.is_empty() {
            return Err(bad(
                "nameservers".into(),
                "[]".into(),
                "name at least one NameServer host:port",
            ));
        }
        if let Some(c) = &self.credentials {
            raftmq_proto::request_auth::check_access_key(&c.access_key)
                .map_err(|reason| bad("credentials.access_key".into(), format!("{:?}", c.access_key), &reason))?;
            if c.secret.is_empty() {
                return Err(bad("credentials.secret".into(), "<empty>".into(), "must not be empty"));
            }
        }
        for (i, ns) in self.nameservers.iter().enumerate() {
            let tls = self.tls.as_ref().map(raftmq_tls::ClientTls::config);
            if let Err(e) = raftmq_tls::endpoint(ns, tls.as_ref()) {
                let reason = match e {
                    raftmq_tls::EndpointError::Uri { .. } => "not a host:port".to_owned(),
                    other => other.to_string(),
                };
                return Err(bad(format!("nameservers[{i}]"), format!("{ns:?}"), &reason));
            }
        }
        for (key, value) in [
            ("request_timeout", self.request_timeout),
            ("send_deadline", self.send_deadline),
            ("connect_timeout", self.connect_timeout),
            (
                "dead_connection_timeout",
                self.dead_connection_timeout.unwrap_or(Duration::MAX),
            ),
            ("route_refresh_interval", self.route_refresh_interval),
        ] {
            if value.is_zero() {
                return Err(bad(key.into(), format!("{value:?}"), "must be above zero"));
            }
        }
        // Timeouts that could never fire first are mistakes, not choices.
        let longer = |key: &str, value: Duration, than: &str| Error::Config {
            key: key.into(),
            value: format!("{value:?}"),
            reason: format!("must be shorter than {than}, which would end the wait first"),
        };
        if self.request_timeout > self.send_deadline {
            return Err(longer("request_timeout", self.request_timeout, "send_deadline"));
        }
        if self.connect_timeout > self.request_timeout {
            return Err(longer("connect_timeout", self.connect_timeout, "request_timeout"));
        }
        if let Some(t) = self.dead_connection_timeout
            && t >= self.request_timeout
        {
            return Err(longer("dead_connection_timeout", t, "request_timeout"));
        }
        if self.max_auto_batch == 0 {
            return Err(bad(
                "max_auto_batch".into(),
                "0".into(),
                "must be at least 1 (1 sends every message alone)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_bad_key() {
        let ok = ClientConfig::new(vec!["127.0.0.1:9876".into()]);
        assert!(ok.validate().is_ok());
        let err = ClientConfig::new(vec![]).validate().unwrap_err().to_string();
        assert!(err.contains("nameservers"), "{err}");
        let err = ClientConfig::new(vec!["127.0.0.1:9876".into(), "not an endpoint".into()])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nameservers[1]"), "{err}");
        let mut zero = ok.clone();
        zero.send_deadline = Duration::ZERO;
        assert!(zero.validate().unwrap_err().to_string().contains("send_deadline"));
    }

    #[test]
    fn timeouts_must_nest() {
        let ok = ClientConfig::new(vec!["127.0.0.1:9876".into()]);
        let mut c = ok.clone();
        c.request_timeout = c.send_deadline + Duration::from_millis(1);
        assert!(c.validate().unwrap_err().to_string().contains("request_timeout"));
        let mut c = ok.clone();
        c.connect_timeout = c.request_timeout * 2;
        assert!(c.validate().unwrap_err().to_string().contains("connect_timeout"));
        let mut c = ok.clone();
        c.dead_connection_timeout = Some(c.request_timeout);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("dead_connection_timeout")
        );
        c.dead_connection_timeout = Some(Duration::from_millis(500));
        assert!(c.validate().is_ok());
    }
}
