//! `latency` and `sessions`: request/response through an echo, proxy path beside direct.
//!
//! latency: K sessions send a 64-byte request at a fixed total rate and wait for the echo. The
//! slots are evenly spaced (session i's n-th at start + (n·K + i) / rate) and fired by a pacer
//! thread of its own that sleeps with 1 ns timer slack: tokio's timers are 1 ms coarse, and at
//! 20,000/s they fired twenty requests together each millisecond, so the tails measured how
//! fast a burst drained rather than the latency of one request at that rate. A request whose
//! slot came while the previous one was still outstanding is timed from its slot (coordinated
//! omission corrected: a stall counts against every request it delayed); otherwise from when it
//! was sent, so a late wake-up of the generator is not charged to the system under test.
//!
//! sessions: new sessions as fast as C workers can open them: TLS handshake, route, stream open,
//! one byte echoed, close. Reports sessions/s and setup latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::throughput::{Path, Target, client_stream, client_stream_with};

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub scenario: &'static str,
    pub path: Path,
    pub sessions: usize,
    pub rate_per_s: f64,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// `one_agent`: behind the proxy, every session to the first simulated agent (the one a
/// download's first stream goes to), instead of alternating between the two.
pub async fn latency(
    target: &Target,
    ca: &str,
    sessions: usize,
    rate: f64,
    duration: Duration,
    one_agent: bool,
) -> anyhow::Result<LatencyReport> {
    let path = target.path;
    let per_session = rate / sessions as f64;
    let interval = Duration::from_secs_f64(1.0 / per_session.max(1e-3));
    let mut streams = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let index = if one_agent { 0 } else { i };
        streams.push(client_stream(target, ca, index, "echo").await?);
    }
    let start = Instant::now() + Duration::from_millis(200);
    let schedule = Schedule {
        start,
        end: start + duration,
        interval,
        sessions,
    };
    let pacer = Pacer::start(schedule)?;
    let mut tasks = Vec::new();
    let _bar = crate::progress::timed(&format!("latency {}", path.name()), duration);
    for (i, (mut tls, fire)) in streams.into_iter().zip(pacer.fire.clone()).enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_max(60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let msg = [0x42u8; 64];
            let mut buf = [0u8; 64];
            let mut n = 0u32;
            let mut prev_done = start;
            while let Some(intended) = schedule.slot(i, n) {
                // A signal left from a slot that passed while a request was outstanding does
                // not send early: only the time decides.
                while Instant::now() < intended {
                    fire.notified().await;
                }
                let sent = Instant::now();
                let from = if prev_done > intended { intended } else { sent };
                tls.write_all(&msg).await?;
                tls.read_exact(&mut buf).await?;
                prev_done = Instant::now();
                hist.record(prev_done.duration_since(from).as_micros() as u64)
                    .ok();
                n += 1;
            }
            let _ = tls.shutdown().await;
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut hist =
        Histogram::<u64>::new_with_max(60_000_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?;
    for t in tasks {
        hist.add(t.await??).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    pacer.join();
    Ok(LatencyReport {
        scenario: "latency",
        path,
        sessions,
        rate_per_s: rate,
        requests: hist.len(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
    })
}

/// What the proxy path adds to the direct one, in µs (negative when it measured faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Added {
    pub p50_us: i64,
    pub p99_us: i64,
    pub p999_us: i64,
}

impl Added {
    fn between(direct: &LatencyReport, proxy: &LatencyReport) -> Self {
        let d = |p: u64, q: u64| {
            i64::try_from(p).unwrap_or(i64::MAX) - i64::try_from(q).unwrap_or(i64::MAX)
        };
        Self {
            p50_us: d(proxy.p50_us, direct.p50_us),
            p99_us: d(proxy.p99_us, direct.p99_us),
            p999_us: d(proxy.p999_us, direct.p999_us),
        }
    }
}

/// One round: the direct path, then the proxy path, back to back.
#[derive(Debug, Serialize)]
pub struct LatencyRound {
    pub direct: LatencyReport,
    pub proxy: LatencyReport,
    pub added: Added,
}

/// Every round, each path's medians over the rounds, and the median of the rounds' added
/// latencies (each round's proxy run against the direct run just before it, so drift between
/// rounds cancels).
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    pub rounds: Vec<LatencyRound>,
    /// Direct, then proxy: each field the median over the rounds.
    pub medians: Vec<LatencyReport>,
    pub added: Added,
}

impl LatencySummary {
    pub fn new(pairs: Vec<(LatencyReport, LatencyReport)>) -> Self {
        let rounds: Vec<LatencyRound> = pairs
            .into_iter()
            .map(|(direct, proxy)| LatencyRound {
                added: Added::between(&direct, &proxy),
                direct,
                proxy,
            })
            .collect();
        let med = |pick: fn(&LatencyRound) -> &LatencyReport| -> Option<LatencyReport> {
            let first = rounds.first().map(pick)?;
            let of = |f: fn(&LatencyReport) -> u64| {
                crate::median_int(rounds.iter().map(|r| f(pick(r))).collect())
            };
            Some(LatencyReport {
                requests: of(|r| r.requests),
                p50_us: of(|r| r.p50_us),
                p99_us: of(|r| r.p99_us),
                p999_us: of(|r| r.p999_us),
                max_us: of(|r| r.max_us),
                ..first.clone()
            })
        };
        let medians = [med(|r| &r.direct), med(|r| &r.proxy)]
            .into_iter()
            .flatten()
            .collect();
        let added_of =
            |f: fn(&Added) -> i64| crate::median_int(rounds.iter().map(|r| f(&r.added)).collect());
        let added = Added {
            p50_us: added_of(|a| a.p50_us),
            p99_us: added_of(|a| a.p99_us),
            p999_us: added_of(|a| a.p999_us),
        };
        Self {
            rounds,
            medians,
            added,
        }
    }
}

/// When each request of a latency run is due: session `i`'s `n`-th slot is at
/// `start + n·interval + i·interval/sessions`, so the run's slots are evenly spaced.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    end: Instant,
    interval: Duration,
    sessions: usize,
}

impl Schedule {
    /// Session `i`'s `n`-th slot, or `None` past the end of the run.
    fn slot(&self, i: usize, n: u32) -> Option<Instant> {
        let offset = self
            .interval
            .mul_f64(i as f64 / self.sessions.max(1) as f64);
        let t = self.start + offset + self.interval * n;
        (t <= self.end).then_some(t)
    }
}

/// Fires every slot of a [`Schedule`] at its time, from a thread of its own (stopped when the
/// pacer is dropped, as when a session fails).
struct Pacer {
    fire: Vec<Arc<tokio::sync::Notify>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    fn start(schedule: Schedule) -> anyhow::Result<Self> {
        let fire: Vec<_> = (0..schedule.sessions)
            .map(|_| Arc::new(tokio::sync::Notify::new()))
            .collect();
        let signals = fire.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("latency-pacer".into())
            .spawn(move || {
                precise_sleeps();
                // Slots in time order: session 0's n-th is the earliest of round n.
                for n in 0u32.. {
                    if schedule.slot(0, n).is_none()
                        || stopped.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        break;
                    }
                    for (i, signal) in signals.iter().enumerate() {
                        let Some(t) = schedule.slot(i, n) else { break };
                        loop {
                            let now = Instant::now();
                            if now >= t {
                                break;
                            }
                            std::thread::sleep(t - now);
                        }
                        signal.notify_one();
                    }
                }
            })?;
        Ok(Self {
            fire,
            stop,
            thread: Some(thread),
        })
    }

    /// Wait for the last slot to be fired.
    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// This thread's sleeps end on time: Linux lets a normal thread's timers fire up to 50 µs late
/// (timer slack) to batch wake-ups, which is as long as the gap between slots at 20,000/s.
#[allow(unsafe_code)]
pub(crate) fn precise_sleeps() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and touches only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionsReport {
    pub scenario: &'static str,
    pub path: Path,
    pub concurrency: usize,
    pub sessions: u64,
    pub errors: u64,
    pub sessions_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub middle_cpu_s: Option<f64>,
    pub sessions_per_middle_cpu_s: Option<f64>,
    /// The client reused one TLS config (and so its session tickets) for every session.
    pub resumption: bool,
    /// Sessions whose TLS handshake was a resumption.
    pub resumed: u64,
}

/// Every run of every round (in order), and per path and handshake kind the medians over the
/// rounds of the rates and latencies, with the counts (sessions, errors, resumed) summed.
#[derive(Debug, Serialize)]
pub struct SessionsSummary {
    pub rounds: usize,
    pub runs: Vec<SessionsReport>,
    pub medians: Vec<SessionsReport>,
}

impl SessionsSummary {
    pub fn new(rounds: usize, runs: Vec<SessionsReport>) -> Self {
        let mut medians: Vec<SessionsReport> = Vec::new();
        for r in &runs {
            if medians
                .iter()
                .any(|m| m.path == r.path && m.resumption == r.resumption)
            {
                continue;
            }
            let same: Vec<&SessionsReport> = runs
                .iter()
                .filter(|x| x.path == r.path && x.resumption == r.resumption)
                .collect();
            let of =
                |f: fn(&SessionsReport) -> f64| crate::median(same.iter().map(|x| f(x)).collect());
            let per_cpu: Vec<f64> = same
                .iter()
                .filter_map(|x| x.sessions_per_middle_cpu_s)
                .collect();
            let cpu: Vec<f64> = same.iter().filter_map(|x| x.middle_cpu_s).collect();
            medians.push(SessionsReport {
                sessions: same.iter().map(|x| x.sessions).sum(),
                errors: same.iter().map(|x| x.errors).sum(),
                resumed: same.iter().map(|x| x.resumed).sum(),
                sessions_per_s: of(|x| x.sessions_per_s),
                p50_ms: of(|x| x.p50_ms),
                p99_ms: of(|x| x.p99_ms),
                middle_cpu_s: (!cpu.is_empty()).then(|| crate::median(cpu)),
                sessions_per_middle_cpu_s: (!per_cpu.is_empty()).then(|| crate::median(per_cpu)),
                ..r.clone()
            });
        }
        Self {
            rounds,
            runs,
            medians,
        }
    }
}

/// One session: connect (TLS, and the session request on the proxy path), one byte echoed,
/// close. Returns whether the TLS handshake was a resumption.
async fn one_session(
    target: &Target,
    cfg: Arc<rustls::ClientConfig>,
    i: usize,
) -> anyhow::Result<bool> {
    let mut tls = client_stream_with(target, cfg, i, "echo").await?;
    let kind = tls.get_ref().1.handshake_kind();
    tls.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await?;
    let _ = tls.shutdown().await;
    Ok(kind == Some(rustls::HandshakeKind::Resumed))
}

/// New sessions back to back from `concurrency` workers for `duration`. With `resumption`,
/// every session of the run shares one client TLS config, as one long-running client
/// (`gsh proxy tcp`) does, and resumes where the server sent a ticket; without it, each
/// session is a new client with a full handshake.
pub async fn sessions(
    target: &Target,
    ca: &str,
    concurrency: usize,
    duration: Duration,
    middle_pid: Option<u32>,
    resumption: bool,
) -> anyhow::Result<SessionsReport> {
    let path = target.path;
    let shared = if resumption {
        Some(crate::throughput::client_config(target, ca)?)
    } else {
        None
    };
    // One session first, so the timed ones start with a ticket in hand.
    if let Some(cfg) = &shared {
        one_session(target, Arc::clone(cfg), 0).await?;
    }
    let cpu0 = middle_pid.and_then(crate::procstat::cpu_seconds);
    let label = if resumption { " (resumed)" } else { "" };
    let _bar = crate::progress::timed(&format!("sessions {}{label}", path.name()), duration);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (target, ca, shared) = (target.clone(), ca.to_owned(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut errors, mut resumed) = (0u64, 0u64);
            let mut i = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                let one = async {
                    let cfg = match &shared {
                        Some(cfg) => Arc::clone(cfg),
                        None => crate::throughput::client_config(&target, &ca)?,
                    };
                    one_session(&target, cfg, i).await
                };
                match one.await {
                    Ok(r) => {
                        hist.record(t.elapsed().as_micros() as u64).ok();
                        resumed += u64::from(r);
                    }
                    Err(_) => errors += 1,
                }
                i += concurrency;
            }
            Ok::<_, anyhow::Error>((hist, errors, resumed))
        }));
    }
    let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut errors, mut resumed) = (0, 0);
    for t in tasks {
        let (h, e, r) = t.await??;
        hist.add(h).map_err(|e| anyhow::anyhow!("{e}"))?;
        errors += e;
        resumed += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu0, middle_pid.and_then(crate::procstat::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(SessionsReport {
        scenario: "sessions",
        path,
        concurrency,
        sessions: hist.len(),
        errors,
        sessions_per_s: hist.len() as f64 / elapsed,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        middle_cpu_s: cpu,
        sessions_per_middle_cpu_s: cpu.filter(|c| *c > 0.0).map(|c| hist.len() as f64 / c),
        resumption,
        resumed,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn schedule(sessions: usize, interval_ms: u64, run_ms: u64) -> Schedule {
        let start = Instant::now() + Duration::from_millis(20);
        Schedule {
            start,
            end: start + Duration::from_millis(run_ms),
            interval: Duration::from_millis(interval_ms),
            sessions,
        }
    }

    #[test]
    fn slots_are_evenly_spaced_in_session_order_and_end_with_the_run() {
        let s = schedule(4, 8, 40);
        let mut all = Vec::new();
        for n in 0..10 {
            for i in 0..4 {
                if let Some(t) = s.slot(i, n) {
                    all.push(t);
                }
            }
        }
        // 40 ms at one slot per 2 ms, both ends included.
        assert_eq!(all.len(), 21);
        for w in all.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(2));
        }
        assert!(all.iter().all(|t| *t <= s.end));
        assert_eq!(s.slot(1, 5), None);
    }

    #[tokio::test]
    async fn the_pacer_fires_every_slot() {
        let s = schedule(3, 3, 30);
        let pacer = Pacer::start(s).unwrap();
        let mut tasks = Vec::new();
        for (i, fire) in pacer.fire.clone().into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut fired = 0;
                let mut n = 0;
                while let Some(t) = s.slot(i, n) {
                    while Instant::now() < t {
                        tokio::time::timeout(Duration::from_secs(5), fire.notified())
                            .await
                            .unwrap();
                    }
                    fired += 1;
                    n += 1;
                }
                fired
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        pacer.join();
        assert_eq!(total, 31);
    }
}
