//! The knobs of discovery and their defaults, each with the reason for its value.
//!
//! Not here: the key layout (see [`crate::keys`]) or how retries are spaced out at run time
//! (the jitter lives with the retry loops' delay generator).

use std::path::PathBuf;
use std::time::Duration;

/// How to reach etcd, under which key prefix, and how patiently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`. Default: that one URL, etcd's own
    /// default client address, for local runs.
    pub endpoints: Vec<String>,
    /// Prepended to every key, so several fleets can share one etcd; a missing trailing `/`
    /// is added. Default empty: keys start with `services/`, where operators look first.
    pub prefix: String,
    /// Longest wait to open a TCP connection to etcd. Default 2 s: a healthy etcd on the
    /// same network answers in milliseconds, and a dead one should be retried, not waited on.
    pub connect_timeout: Duration,
    /// Longest wait for any single etcd request (grant, put, get, revoke, one keepalive round
    /// trip, opening a watch). Default 3 s: below the 10 s lease TTL, so a hung request is
    /// abandoned and retried while the lease still stands.
    pub request_timeout: Duration,
    /// HTTP/2 ping interval on etcd connections, so a connection to a vanished host fails
    /// instead of hanging a watch forever. Default 10 s: etcd closes connections that ping
    /// more often than every 5 s (`--grpc-keepalive-min-time`).
    pub http2_keepalive_interval: Duration,
    /// How long an unanswered HTTP/2 ping may wait before the connection is dropped.
    /// Default 5 s: with the interval, a dead connection is noticed within 15 s.
    pub http2_keepalive_timeout: Duration,
    /// Spacing of a watcher's reconnect attempts while etcd is unreachable.
    /// Default 100 ms doubling to 2 s: quick recovery from a blip, and a restarted etcd is
    /// not hammered by a whole fleet of watchers at once (the delays are jittered).
    pub reconnect_backoff: Backoff,
    /// TLS to etcd (the endpoints must then be `https://`). Default none: plain text, as
    /// etcd serves by default.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA its servers' certificates chain to and, for etcd's
/// `--client-cert-auth`, a client certificate. The files are read at each connect, so
/// rotated files are used from the next connection on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This process's certificate and its private key, PEM, if etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: String::new(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            reconnect_backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(2),
            },
            tls: None,
        }
    }
}

/// How an instance keeps its registration alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// Lease TTL: how long a crashed instance stays visible to watchers. Default 10 s, the
    /// design's figure: long enough to ride out a short etcd hiccup, short enough that
    /// balancers stop sending to a dead instance soon. etcd counts whole seconds and
    /// raises TTLs below its minimum (2 s with default election settings).
    pub ttl: Duration,
    /// How often the lease is refreshed. Default 3 s: about a third of the TTL, so two
    /// refreshes can be lost before the lease expires.
    pub keepalive_interval: Duration,
    /// Spacing of retries while etcd is unreachable or the lease must be granted again.
    /// Default 100 ms doubling to 1 s: well under the TTL, so the instance re-registers
    /// within about a second of etcd coming back (jittered, so a fleet spreads out).
    pub retry_backoff: Backoff,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(3),
            retry_backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
        }
    }
}

/// Exponential backoff between retries: `initial`, doubling each failure up to `max`, each
/// delay jittered down by up to half so that many clients do not retry in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay (at least 1 ms is used).
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}
