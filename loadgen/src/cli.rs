//! `loadgen`'s command line: every scenario and its options (clap). `main.rs` runs them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::throughput;

#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about = "Gatehouse load generator")]
pub(crate) struct Cli {
    /// Write the report as JSON to this file too.
    #[arg(long, global = true)]
    pub(crate) json: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Scenario {
    /// Password logins per second against Auth: each login verifies an argon2id hash, signs an
    /// SSH and an X.509 certificate and stores two audit events durably.
    Logins {
        /// Start a throwaway cluster (gatehouse and gctl next to this binary) and a user.
        #[arg(long, conflicts_with_all = ["auth", "ca_pin", "user"])]
        spawn: bool,
        /// Auth API address of a running cluster.
        #[arg(long, required_unless_present = "spawn")]
        auth: Option<String>,
        /// The cluster's CA pin.
        #[arg(long, required_unless_present = "spawn")]
        ca_pin: Option<String>,
        #[arg(long, required_unless_present = "spawn")]
        user: Option<String>,
        /// The user's password (or set LOADGEN_PASSWORD).
        #[arg(long, env = "LOADGEN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// PID of the Auth process, to report its CPU use (known with --spawn).
        #[arg(long)]
        auth_pid: Option<u32>,
        /// Concurrent clients, each with its own connection.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// How long to run.
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// Machine ID renewals: N bots (added and joined with real tokens) each on one kept
    /// connection to a throwaway Auth, renewing SSH + X.509 identities back to back; each
    /// renewal durable (its generation and audit event) before it is answered.
    Renewals {
        /// Simulated bots, each with its own connection.
        #[arg(long, default_value_t = 256)]
        bots: usize,
        /// How long to renew.
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// Audit events at fleet scale: E emitters on their own connections send batches through
    /// the real `EmitEvents` RPC to a throwaway Auth on SQLite or PostgreSQL (started here);
    /// events per second durably stored, the rows counted in the database, then one actor's
    /// events of the last hour searched for.
    Audit {
        /// Emitters, each with its own connection.
        #[arg(long, default_value_t = 32)]
        emitters: usize,
        /// Events per `EmitEvents` call (at most 1000).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// How long to emit (unless --events is given).
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        /// Stop once this many events are stored (e.g. 10000000 for the search figure).
        #[arg(long, default_value_t = 0)]
        events: u64,
        /// sqlite (Auth's data dir) or postgres (a server this scenario starts).
        #[arg(long, default_value = "sqlite")]
        storage: String,
        /// Distinct actors the events name.
        #[arg(long, default_value_t = 10_000)]
        actors: usize,
        /// Searches for one actor's events of the last hour, after the ingest.
        #[arg(long, default_value_t = 100)]
        searches: usize,
    },
    /// A fleet behind two edge proxies while both Auths (on a PostgreSQL started here) restart:
    /// agent reconnects, connections Auth accepts, heartbeat writes, time until every node is
    /// listed again. Each simulated agent has its own joined identity and a tunnel to each proxy.
    AuthRestart {
        /// Simulated agents.
        #[arg(long, default_value_t = 15_000)]
        agents: usize,
        /// Generator processes per proxy.
        #[arg(long, default_value_t = 2)]
        procs: usize,
        /// How long both Auths stay down.
        #[arg(long, default_value = "10s")]
        down: humantime::Duration,
        /// How long to watch after the Auths are back (heartbeat rates, reconnects).
        #[arg(long, default_value = "60s")]
        observe: humantime::Duration,
    },
    /// Trusted clusters at scale: a leaf with N agents listed through the root's proxy (timed),
    /// then L simulated leaves holding a tunnel each to the root's proxy (its memory per leaf).
    Leaves {
        /// Simulated leaf clusters at the root.
        #[arg(long, default_value_t = 100)]
        leaves: usize,
        /// Agents in the real leaf.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Listings of the leaf's nodes through the root, timed.
        #[arg(long, default_value_t = 20)]
        lists: usize,
    },
    /// Simulated agents hold idle tunnels (real TLS, real joined certificates, heartbeats):
    /// connect rate, Proxy memory per tunnel and Proxy CPU while idle. Spawns its own cluster.
    Tunnels {
        /// Tunnels to hold.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Generator processes (each from its own 127.0.0.x address; ≤ 10k tunnels each).
        #[arg(long, default_value_t = 2)]
        procs: usize,
        /// Joined identities the simulated agents share (each joins with a real token).
        #[arg(long, default_value_t = 16)]
        identities: usize,
        /// How long to hold the tunnels idle while measuring CPU.
        #[arg(long, default_value = "10s")]
        hold: humantime::Duration,
        /// Proxy worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// The agents' tunnel transport: tls or quic.
        #[arg(long, default_value = "tls")]
        transport: gatehouse_dataplane::io::quic::TunnelTransport,
        /// Rounds, each on a freshly started cluster. The report gives every round and the
        /// medians.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Bulk streams client -> middle -> sink over TLS, for each path (proxy, direct, naive
    /// relay): GB/s and GB per CPU-second of the middle box. Spawns its own cluster.
    Throughput {
        /// Concurrent streams.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// How long each run lasts.
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        /// Rounds; each round runs every path once, in turn (so drift on a shared machine
        /// touches all paths alike). The report gives each path's median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Paths to measure.
        #[arg(long, value_delimiter = ',', default_value = "direct,naive,proxy")]
        paths: Vec<throughput::Path>,
        /// Proxy worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Which way the bytes flow: `upload` (client to sink: at the proxy TLS in, tunnel out)
        /// or `download` (a source to the client: tunnel in, TLS out).
        #[arg(long, value_enum, default_value_t = throughput::Direction::Upload)]
        direction: throughput::Direction,
    },
    /// Fixed-rate 64-byte request/response over K sessions through an echo, proxy beside direct:
    /// p50/p99/p99.9/max, coordinated-omission corrected, and the latency the proxy adds.
    Latency {
        #[arg(long, default_value_t = 32)]
        sessions: usize,
        /// Total requests per second over all sessions.
        #[arg(long, default_value_t = 20000.0)]
        rate: f64,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Rounds; each runs direct, then the proxy (so drift on a shared machine touches both
        /// alike). The report gives every round and the medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// New sessions as fast as C workers can open them (TLS handshake, route, stream open, one
    /// byte echoed, close), proxy beside direct TLS: sessions/s, latency, per proxy CPU-second.
    Sessions {
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Which handshakes to measure: `full` (every session a new client), `resumed` (one
        /// client resuming each session with its previous ticket), or both.
        #[arg(long, value_delimiter = ',', default_value = "full,resumed")]
        handshakes: Vec<Handshakes>,
        /// Rounds; each runs every path and handshake kind once, in turn. The report gives
        /// every run and the medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Paths to measure: direct (TLS straight to the echo), proxy, or both.
        #[arg(long, value_delimiter = ',', default_value = "direct,proxy")]
        paths: Vec<SessionPath>,
    },
    /// Real SSH with the user's certificate (russh client): new sessions per second (TLS + SSH
    /// handshake, certificate auth, `exec true`, exit status) and one channel's bulk upload,
    /// through the Proxy to a real agent process, through a jump sshd to a target sshd (as
    /// `ssh -J`), and straight to that sshd (both trust the cluster's user CA); then OpenSSH's
    /// `scp` of one file to /dev/null on each path. Logs in as the user running loadgen.
    Ssh {
        /// Workers opening sessions back to back.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// How long each measurement lasts (bulk: at most 5 s).
        #[arg(long, default_value = "5s")]
        duration: humantime::Duration,
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Rounds, each measuring every path in turn; the report gives every run and the medians.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// The size of the file OpenSSH's scp copies on each path, MiB.
        #[arg(long, default_value_t = 1024)]
        scp_mib: u64,
        /// Paths to measure.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "gatehouse,proxyjump,openssh"
        )]
        paths: Vec<crate::ssh::SshPath>,
        /// Measurements on each path.
        #[arg(long, value_delimiter = ',', default_value = "sessions,bulk,scp")]
        parts: Vec<crate::ssh::Part>,
    },
    /// Session recordings: N concurrent recorded PTY sessions printing at a fixed rate through
    /// the Proxy to one real agent (Auth's CPU while it ingests them, MB per Auth CPU-second,
    /// recordings completed per second, agent memory per session); then one session printing
    /// `--overhead-mb` with recording on and off, in interleaved rounds (the agent's own CPU).
    Recordings {
        /// Concurrent recorded sessions.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// What each session prints, KB per second.
        #[arg(long, default_value_t = 10)]
        rate_kb: u64,
        /// How long each session prints.
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
        /// The one session's output for the on/off comparison, MB (0: skip it).
        #[arg(long, default_value_t = 200)]
        overhead_mb: u64,
        /// Rounds of the on/off comparison.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The web terminal under load beside `gsh ssh`'s path: N sessions printing through the
    /// proxy (WebSockets, then SSH), the proxy's CPU per MB delivered and keystroke echo latency
    /// on one more shell of each path. Spawns its own cluster and one real agent.
    Web {
        /// Concurrent printing sessions per path.
        #[arg(long, default_value_t = 500)]
        terminals: usize,
        /// What each session prints, KB per second.
        #[arg(long, default_value_t = 2)]
        rate_kb: u64,
        /// How long each session prints.
        #[arg(long, default_value = "40s")]
        duration: humantime::Duration,
        /// Keystrokes timed on the echo probe.
        #[arg(long, default_value_t = 200)]
        probes: usize,
    },
    /// Print text at a fixed rate (the sessions `loadgen recordings` starts run this).
    #[command(hide = true)]
    Print {
        #[arg(long, default_value_t = 10)]
        rate_kb: u64,
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
    },
    /// The agents' tunnel transports (TLS over TCP, QUIC) over an emulated wide-area link with
    /// delay, a rate and random loss (a TUN device; needs root): per loss rate and transport,
    /// one download's throughput through a tunnel, then request/response latency through it.
    /// Spawns its own cluster, one Proxy per transport, both behind the same link.
    Link {
        /// One-way delay each direction (the round trip is twice this).
        #[arg(long, default_value = "20ms")]
        delay: humantime::Duration,
        /// Packet loss rates to measure, in percent, each direction.
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,2")]
        loss: Vec<f64>,
        /// The link's rate each direction, Mbit/s (0: unlimited).
        #[arg(long, default_value_t = 100.0)]
        rate_mbit: f64,
        /// The longest a packet queues for the rate before the link drops it.
        #[arg(long, default_value = "40ms")]
        queue: humantime::Duration,
        /// Tunnel transports to measure.
        #[arg(long, value_delimiter = ',', default_value = "tls,quic")]
        transports: Vec<gatehouse_dataplane::io::quic::TunnelTransport>,
        /// Download streams for the throughput part.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Sessions for the latency part. Each has one request outstanding at a time, so a
        /// session's share of the rate must leave room for the round trip.
        #[arg(long, default_value_t = 64)]
        sessions: usize,
        /// Requests per second over all sessions, for the latency part.
        #[arg(long, default_value_t = 400.0)]
        rate: f64,
        /// How long each part lasts.
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        /// Before the rounds of each loss rate, a download through every tunnel for this long,
        /// not measured, so each congestion controller settles to the new loss rate.
        #[arg(long, default_value = "5s")]
        settle: humantime::Duration,
        /// Rounds per loss rate; each measures every transport once, in turn.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Then measure the requests again while a download runs through the same tunnel.
        #[arg(long)]
        loaded: bool,
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// (internal) a generator worker process holding simulated agents' tunnels.
    #[command(hide = true)]
    WorkerAgents {
        #[arg(long)]
        identities: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        proxy: std::net::SocketAddr,
        #[arg(long)]
        source_ip: std::net::IpAddr,
        #[arg(long, default_value = "tls")]
        transport: gatehouse_dataplane::io::quic::TunnelTransport,
    },
}

/// The handshakes `loadgen sessions` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Handshakes {
    Full,
    Resumed,
}

/// The paths `loadgen sessions` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SessionPath {
    Direct,
    Proxy,
}
