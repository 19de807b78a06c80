//! Proxy metrics (`gatehouse_proxy_*`): the I/O backend and TCP congestion control in use,
//! tunnels, open streams, bytes forwarded, dial failures by reason, connections refused by ALPN
//! and reason, TLS handshakes by kind.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlpnLabel {
    pub alpn: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlgorithmLabel {
    pub algorithm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoreLabel {
    pub core: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// 1 for the I/O backend the workers run on (`io_uring` or `epoll`).
    pub io_backend: Family<BackendLabel, Gauge>,
    /// 1 for the TCP congestion control the public port's connections run (`cubic`, `bbr`, …).
    pub tcp_congestion: Family<AlgorithmLabel, Gauge>,
    pub tunnels: Gauge,
    /// Of `tunnels`, those over QUIC whose sessions run on QUIC streams of their own.
    pub quic_stream_tunnels: Gauge,
    pub streams: Gauge,
    pub sessions: Counter,
    pub bytes: Family<DirectionLabel, Counter>,
    pub dial_failures: Family<ReasonLabel, Counter>,
    pub refused: Family<AlpnLabel, Counter>,
    pub handovers: Counter,
    /// Tunnels per worker (core): new tunnels go to the worker holding the fewest.
    pub worker_tunnels: Family<CoreLabel, Gauge>,
    /// New tunnels handed to another worker than the one that accepted them.
    pub tunnel_moves: Counter,
    /// TLS handshakes completed, `full` or `resumed` (a session ticket from an earlier one).
    pub handshakes: Family<KindLabel, Counter>,
    /// 1 while the watch stream from Auth is alive (an event or keepalive in the last 20 s).
    pub auth_stream_up: Gauge,
    /// Proxies announced to this proxy's agents (this one included).
    pub cluster_proxies: Gauge,
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_proxy");
        r.register("tunnels", "Agent tunnels connected", self.tunnels.clone());
        r.register(
            "auth_stream_up",
            "1 while the watch stream from Auth is alive",
            self.auth_stream_up.clone(),
        );
        r.register(
            "cluster_proxies",
            "Proxies announced to this proxy's agents",
            self.cluster_proxies.clone(),
        );
        r.register(
            "quic_stream_tunnels",
            "Agent tunnels over QUIC whose sessions run on QUIC streams of their own",
            self.quic_stream_tunnels.clone(),
        );
        r.register(
            "io_backend",
            "The data plane's I/O backend (1 for the one in use)",
            self.io_backend.clone(),
        );
        r.register(
            "tcp_congestion",
            "TCP congestion control of the public port's connections (1 for the one in use)",
            self.tcp_congestion.clone(),
        );
        r.register(
            "streams",
            "User sessions open through tunnels",
            self.streams.clone(),
        );
        r.register("sessions", "User sessions started", self.sessions.clone());
        r.register(
            "bytes_forwarded",
            "Session bytes forwarded (to_agent, to_user)",
            self.bytes.clone(),
        );
        r.register(
            "dial_failures",
            "Sessions that could not reach their target, by reason",
            self.dial_failures.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed before serving, by ALPN and reason",
            self.refused.clone(),
        );
        r.register(
            "handovers",
            "Sessions moved to the core that owns their tunnel",
            self.handovers.clone(),
        );
        r.register(
            "worker_tunnels",
            "Agent tunnels per worker (core); a new tunnel goes to the worker holding the fewest",
            self.worker_tunnels.clone(),
        );
        r.register(
            "tunnel_moves",
            "New tunnels handed from the worker that accepted them to the one holding the fewest",
            self.tunnel_moves.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes completed, by kind (full, resumed)",
            self.handshakes.clone(),
        );
    }

    /// The gauge of `core`'s tunnels (one lookup, when the proxy starts).
    pub fn worker_tunnels(&self, core: usize) -> Gauge {
        self.worker_tunnels
            .get_or_create(&CoreLabel {
                core: core.to_string(),
            })
            .clone()
    }

    pub fn handshake(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.handshakes.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn set_io_backend(&self, backend: crate::io::IoBackend) {
        for b in [crate::io::IoBackend::IoUring, crate::io::IoBackend::Epoll] {
            self.io_backend
                .get_or_create(&BackendLabel {
                    backend: b.as_str(),
                })
                .set(i64::from(b == backend));
        }
    }

    pub fn set_tcp_congestion(&self, algorithm: &str) {
        self.tcp_congestion
            .get_or_create(&AlgorithmLabel {
                algorithm: algorithm.to_owned(),
            })
            .set(1);
    }

    pub fn refuse(&self, alpn: &str, reason: &str) {
        self.refused
            .get_or_create(&AlpnLabel {
                alpn: alpn.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A session's bytes, each way.
    pub(crate) fn session_bytes(&self, to_agent: u64, to_user: u64) {
        for (direction, n) in [("to_agent", to_agent), ("to_user", to_user)] {
            self.bytes
                .get_or_create(&DirectionLabel { direction })
                .inc_by(n);
        }
    }

    pub fn dial_failure(&self, reason: &str) {
        self.dial_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
