//! `audit`: audit events at fleet scale. A throwaway Auth on SQLite (its data dir) or on a
//! PostgreSQL this scenario starts; E emitters, each on its own mutual-TLS connection, send
//! batches of B events back to back through the real `EmitEvents` RPC (validated, attributed,
//! deduplicated, written by Auth's group commit: an answer means the batch is durable).
//! PostgreSQL runs with fsync on (its default). Reported: events per second durably stored, batch latency, Auth's CPU; then the stored rows
//! are counted in the database itself, and one actor's events of the last hour are searched
//! for through `SearchEvents` (the `(actor, time)` index), timed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_controlplane::proto;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub emitters: usize,
    pub batch: usize,
    pub duration: Duration,
    /// Stop once this many events were stored (0: run for `duration`).
    pub events: u64,
    pub postgres: bool,
    /// Distinct actors the events name.
    pub actors: usize,
    pub searches: usize,
}

#[derive(Debug, Serialize)]
pub struct AuditReport {
    pub scenario: &'static str,
    pub storage: &'static str,
    pub emitters: usize,
    pub batch: usize,
    pub duration_s: f64,
    pub events_stored: u64,
    pub events_per_s: f64,
    pub errors: u64,
    pub batch_p50_ms: f64,
    pub batch_p99_ms: f64,
    pub auth_cpu_s: Option<f64>,
    pub events_per_auth_cpu_s: Option<f64>,
    pub generator_cpu_s: Option<f64>,
    /// Rows of this scenario's type counted in the database after the run.
    pub rows_in_database: i64,
    /// All audit rows in the database when the searches ran.
    pub rows_total: i64,
    pub searches: usize,
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
    pub search_max_ms: f64,
    /// Events the searches found (each: one actor, the last hour, at most 1000).
    pub search_hits: u64,
}

const EVENT_TYPE: &str = "loadgen.audit";

/// splitmix64's finaliser: event numbers spread evenly over the actors.
fn spread(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn now_nanos() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

/// Count this scenario's rows and all rows, in the database itself.
async fn count_rows(url: &str) -> anyhow::Result<(i64, i64)> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.context("counting rows")?;
    let mine: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE type = $1")
        .bind(EVENT_TYPE)
        .fetch_one(&pool)
        .await?;
    let all: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok((mine, all))
}

pub async fn run(cfg: AuditConfig) -> anyhow::Result<AuditReport> {
    // PostgreSQL (when asked) lives as long as this run.
    let pg = if cfg.postgres {
        Some(
            gatehouse_controlplane::testing::PgServer::start_with(true)
                .map_err(|e| anyhow::anyhow!(e))?,
        )
    } else {
        None
    };
    let pg_url = match &pg {
        Some(pg) => Some(pg.fresh_db().await.map_err(|e| anyhow::anyhow!(e))?),
        None => None,
    };
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("gatehouse.toml");
    let mut extra: Vec<String> = Vec::new();
    if let Some(url) = &pg_url {
        std::fs::write(&config, format!("[auth]\nstorage = \"{url}\"\n"))?;
        extra = vec!["--config".into(), config.display().to_string()];
    }
    let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let cluster = crate::spawn::start_with("127.0.0.1", &extra_refs)?;
    let db_url = pg_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=ro",
            cluster.data.join("gatehouse.db").display()
        )
    });
    eprintln!(
        "audit: {} emitters × {} events per batch on {}",
        cfg.emitters,
        cfg.batch,
        if cfg.postgres { "PostgreSQL" } else { "SQLite" }
    );
    let mut clients = Vec::with_capacity(cfg.emitters);
    for _ in 0..cfg.emitters {
        clients.push(cluster.admin_client().await?);
    }
    let stored = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let cpu = cluster.cpu_clock();
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for (e, mut client) in clients.into_iter().enumerate() {
        let (stored, errors) = (Arc::clone(&stored), Arc::clone(&errors));
        let cfg = cfg.clone();
        let run_id = run_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut seq: u64 = 0;
            loop {
                let enough = cfg.events > 0 && stored.load(Ordering::Relaxed) >= cfg.events;
                if enough || (cfg.events == 0 && Instant::now() >= deadline) {
                    break;
                }
                let now = now_nanos();
                let events: Vec<proto::AuditEvent> = (0..cfg.batch)
                    .map(|i| {
                        seq += 1;
                        let actor = spread(((e as u64) << 40) | seq) % cfg.actors.max(1) as u64;
                        proto::AuditEvent {
                            event_id: format!("{run_id}-{e}-{seq}"),
                            r#type: EVENT_TYPE.into(),
                            time_nanos: now,
                            actor: format!("user-{actor}"),
                            source_addr: format!("10.1.{}.{}", e % 250, i % 250),
                            data_json: format!(
                                "{{\"login\":\"root\",\"node\":\"web-{}\",\"bytes\":{}}}",
                                seq % 500,
                                seq * 13 % 100_000
                            ),
                            ..Default::default()
                        }
                    })
                    .collect();
                let t0 = Instant::now();
                match client
                    .emit_events(proto::EmitEventsRequest { events })
                    .await
                {
                    Ok(r) => {
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                        stored.fetch_add(u64::from(r.into_inner().accepted), Ordering::Relaxed);
                    }
                    Err(status) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("audit: emitter {e}: {}", status.message());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (auth_cpu, gen_cpu) = cpu.used();
    let events_stored = stored.load(Ordering::Relaxed);
    let (rows_mine, rows_total) = count_rows(&db_url).await?;

    // One actor's events of the last hour, for actors picked across the range.
    let mut client = cluster.admin_client().await?;
    let mut search = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut hits = 0u64;
    let hour_ago = now_nanos() - 3600 * 1_000_000_000;
    for k in 0..cfg.searches {
        let actor = format!("user-{}", (k * 104_729) % cfg.actors.max(1));
        let t0 = Instant::now();
        let found = client
            .search_events(proto::SearchEventsRequest {
                from_nanos: hour_ago,
                actor,
                limit: 1000,
                ..Default::default()
            })
            .await
            .context("SearchEvents")?
            .into_inner()
            .events
            .len();
        let _ = search.record(t0.elapsed().as_micros() as u64);
        hits += found as u64;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    drop(cluster);
    drop(pg);
    Ok(AuditReport {
        scenario: "audit",
        storage: if cfg.postgres { "postgres" } else { "sqlite" },
        emitters: cfg.emitters,
        batch: cfg.batch,
        duration_s: elapsed,
        events_stored,
        events_per_s: events_stored as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
        batch_p50_ms: ms(&hist, 0.5),
        batch_p99_ms: ms(&hist, 0.99),
        auth_cpu_s: auth_cpu,
        events_per_auth_cpu_s: auth_cpu.map(|c| events_stored as f64 / c.max(1e-9)),
        generator_cpu_s: gen_cpu,
        rows_in_database: rows_mine,
        rows_total,
        searches: cfg.searches,
        search_p50_ms: ms(&search, 0.5),
        search_p99_ms: ms(&search, 0.99),
        search_max_ms: search.max() as f64 / 1000.0,
        search_hits: hits,
    })
}

pub fn print(r: &AuditReport) {
    println!(
        "audit ({}): {} emitters × {}, {:.1} s: {} events stored ({:.0}/s), {} errors; batch p50 {:.2} ms, p99 {:.2} ms",
        r.storage,
        r.emitters,
        r.batch,
        r.duration_s,
        r.events_stored,
        r.events_per_s,
        r.errors,
        r.batch_p50_ms,
        r.batch_p99_ms
    );
    if let (Some(cpu), Some(per)) = (r.auth_cpu_s, r.events_per_auth_cpu_s) {
        println!(
            "  Auth CPU {cpu:.2} s ({:.0} % of a core): {per:.0} events per Auth CPU-second; generator CPU {:.2} s",
            100.0 * cpu / r.duration_s,
            r.generator_cpu_s.unwrap_or(0.0)
        );
    }
    println!(
        "  rows in the database: {} of this run ({} answered as stored), {} in all",
        r.rows_in_database, r.events_stored, r.rows_total
    );
    println!(
        "  {} searches for one actor's events of the last hour: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} events found)",
        r.searches, r.search_p50_ms, r.search_p99_ms, r.search_max_ms, r.search_hits
    );
}
