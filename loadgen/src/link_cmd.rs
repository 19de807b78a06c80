//! `loadgen link`: the agents' tunnels over an emulated lossy link, per loss rate and transport,
//! in rounds: a download's rate and request latency through the tunnel (and, with `--loaded`,
//! the requests again beside a download). The link itself is `link.rs`.

use std::path::PathBuf;

use crate::{fleet, latency, link, median, median_int, proxy_fleet_at, throughput, write_json};

/// `loadgen link`'s settings.
pub(crate) struct LinkRun {
    /// The link's impairment but for the loss, which `losses` sets in turn.
    pub(crate) imp: link::Impairment,
    /// In percent.
    pub(crate) losses: Vec<f64>,
    pub(crate) transports: Vec<gatehouse_dataplane::io::quic::TunnelTransport>,
    pub(crate) streams: usize,
    pub(crate) sessions: usize,
    pub(crate) rate: f64,
    pub(crate) duration: std::time::Duration,
    /// The download before each loss rate's rounds, not measured.
    pub(crate) settle: std::time::Duration,
    /// Also measure the requests while a download shares their tunnel.
    pub(crate) loaded: bool,
    pub(crate) runs: usize,
    pub(crate) workers: usize,
}

/// One loss rate and transport of one round of `loadgen link`.
#[derive(Debug, serde::Serialize)]
struct LinkMeasure {
    round: usize,
    loss_pct: f64,
    transport: gatehouse_dataplane::io::quic::TunnelTransport,
    /// The download through the tunnel: agent → link → proxy → client.
    download_mbit_per_s: f64,
    download_link: link::LinkStats,
    latency: latency::LatencyReport,
    latency_link: link::LinkStats,
    /// With `--loaded`: the requests again while a download shares their tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded: Option<LoadedMeasure>,
}

#[derive(Debug, serde::Serialize)]
struct LoadedMeasure {
    download_mbit_per_s: f64,
    latency: latency::LatencyReport,
}

pub(crate) async fn link_cmd(cfg: &LinkRun, json: Option<PathBuf>) -> anyhow::Result<()> {
    use gatehouse_dataplane::io::quic::TunnelTransport;
    let link = link::Link::start(cfg.imp, 0)?;
    println!(
        "link {}: agents at {} reach proxies at {} via {}; one-way delay {:?}, {}, queue {:?}",
        link.name,
        link.local,
        link.local,
        link.peer,
        cfg.imp.delay,
        if cfg.imp.rate_bps > 0 {
            format!("{:.0} Mbit/s", cfg.imp.rate_bps as f64 / 1e6)
        } else {
            "no rate limit".into()
        },
        cfg.imp.queue
    );
    let mut fleets = Vec::new();
    for &t in &cfg.transports {
        let fleet = proxy_fleet_at(cfg.workers, &[], t, Some(&link)).await?;
        fleets.push((t, fleet));
    }
    let target = |transport: &TunnelTransport, fleet: &fleet::Fleet| throughput::Target {
        path: match transport {
            TunnelTransport::Tls => throughput::Path::Proxy,
            TunnelTransport::Quic => throughput::Path::ProxyQuic,
        },
        addr: fleet.proxy_addr.clone(),
        user: Some(fleet.user.clone()),
        jump: None,
    };
    // The tunnels live through the whole run, and a congestion controller carries its state from
    // one loss rate to the next (cubic takes many seconds to regrow a window that 2 % loss cut).
    // So the loss rates go in rising order, each after a download that lets every tunnel settle
    // to it; the rounds of one loss rate then interleave the transports.
    let download = async |target: &throughput::Target, how_long| {
        let d = throughput::Direction::Download;
        throughput::run(target, "", cfg.streams, how_long, d, None).await
    };
    let requests = async |target: &throughput::Target| {
        latency::latency(target, "", cfg.sessions, cfg.rate, cfg.duration, true).await
    };
    // Between parts the link goes quiet: a download's tail (its last window in flight, what the
    // agent's socket still held) would otherwise meet the next part's first requests. Quiet is
    // fewer than 4 packets in 100 ms, both ways (heartbeats and keep-alives); at most 5 s.
    let quiet = async || {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut before = link.stats();
        while std::time::Instant::now() < give_up {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = link.stats();
            let d = now.since(&before);
            if d.up.packets + d.down.packets < 4 {
                break;
            }
            before = now;
        }
    };
    let mut losses = cfg.losses.clone();
    losses.sort_by(f64::total_cmp);
    losses.dedup();
    let mut all: Vec<LinkMeasure> = Vec::new();
    for &loss in &losses {
        link.set_impairment(link::Impairment {
            loss: loss / 100.0,
            ..cfg.imp
        });
        for (transport, (fleet, _)) in &fleets {
            let settle = download(&target(transport, fleet), cfg.settle).await?;
            println!(
                "link settling at {loss}% loss: {transport} {:.1} Mbit/s",
                settle.gb_per_s * 8000.0
            );
        }
        for round in 1..=cfg.runs {
            for (transport, (fleet, _)) in &fleets {
                let target = target(transport, fleet);
                let s0 = link.stats();
                let bulk = download(&target, cfg.duration).await?;
                quiet().await;
                let s1 = link.stats();
                let lat = requests(&target).await?;
                let s2 = link.stats();
                // The same requests while a download shares their tunnel: what an interactive
                // session feels while a transfer runs through the same agent.
                let loaded = if cfg.loaded {
                    quiet().await;
                    let (bulk, lat) = tokio::join!(
                        download(&target, cfg.duration + std::time::Duration::from_secs(1)),
                        async {
                            // The download first fills the path.
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            requests(&target).await
                        }
                    );
                    Some(LoadedMeasure {
                        download_mbit_per_s: bulk?.gb_per_s * 8000.0,
                        latency: lat?,
                    })
                } else {
                    None
                };
                let m = LinkMeasure {
                    round,
                    loss_pct: loss,
                    transport: *transport,
                    download_mbit_per_s: bulk.gb_per_s * 8000.0,
                    download_link: s1.since(&s0),
                    latency: lat,
                    latency_link: s2.since(&s1),
                    loaded,
                };
                print_link(&m);
                all.push(m);
            }
        }
    }
    drop(fleets);
    println!("medians of {} round(s):", cfg.runs);
    let mut medians = Vec::new();
    for &loss in &losses {
        for &t in &cfg.transports {
            let of = || {
                all.iter()
                    .filter(move |m| m.loss_pct == loss && m.transport == t)
            };
            let row = serde_json::json!({
                "loss_pct": loss,
                "transport": t,
                "download_mbit_per_s": median(of().map(|m| m.download_mbit_per_s).collect()),
                "p50_us": median_int(of().map(|m| m.latency.p50_us).collect()),
                "p99_us": median_int(of().map(|m| m.latency.p99_us).collect()),
                "p999_us": median_int(of().map(|m| m.latency.p999_us).collect()),
                "max_us": median_int(of().map(|m| m.latency.max_us).collect()),
            });
            let loaded: Vec<&LoadedMeasure> = of().filter_map(|m| m.loaded.as_ref()).collect();
            let row = if loaded.is_empty() {
                row
            } else {
                let med = |f: fn(&LoadedMeasure) -> u64| {
                    median_int(loaded.iter().map(|l| f(l)).collect())
                };
                let mut row = row;
                if let Some(o) = row.as_object_mut() {
                    o.insert(
                        "loaded".into(),
                        serde_json::json!({
                            "download_mbit_per_s": median(loaded.iter().map(|l| l.download_mbit_per_s).collect()),
                            "p50_us": med(|l| l.latency.p50_us),
                            "p99_us": med(|l| l.latency.p99_us),
                            "p999_us": med(|l| l.latency.p999_us),
                            "max_us": med(|l| l.latency.max_us),
                        }),
                    );
                }
                row
            };
            println!("  {row}");
            medians.push(row);
        }
    }
    write_json(
        json.as_deref(),
        &serde_json::json!({
            "scenario": "link",
            "impairment": cfg.imp,
            "streams": cfg.streams,
            "sessions": cfg.sessions,
            "rate_per_s": cfg.rate,
            "runs": all,
            "medians": medians,
        }),
    )
}

fn print_link(m: &LinkMeasure) {
    let share = |d: &link::DirStats| 100.0 * d.lost as f64 / d.packets.max(1) as f64;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "link round {} loss {:>4}% {:<4}  download {:>7.1} Mbit/s (up {} packets, {:.2} % lost, {} dropped at the queue)  latency p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms ({} requests)",
        m.round,
        m.loss_pct,
        m.transport,
        m.download_mbit_per_s,
        m.download_link.up.packets,
        share(&m.download_link.up),
        m.download_link.up.dropped,
        ms(m.latency.p50_us),
        ms(m.latency.p99_us),
        ms(m.latency.p999_us),
        ms(m.latency.max_us),
        m.latency.requests,
    );
    if let Some(l) = &m.loaded {
        println!(
            "link round {} loss {:>4}% {:<4}  with a download beside ({:.1} Mbit/s): latency p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms",
            m.round,
            m.loss_pct,
            m.transport,
            l.download_mbit_per_s,
            ms(l.latency.p50_us),
            ms(l.latency.p99_us),
            ms(l.latency.p999_us),
            ms(l.latency.max_us),
        );
    }
}
