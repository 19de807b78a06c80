//! `loadgen ssh`: real SSH on three paths, in interleaved rounds — through the Proxy to a real
//! agent, through a jump sshd to a target sshd (the bastion Gatehouse replaces), and straight to
//! that sshd — first with the russh client (`ssh.rs`: sessions per second, one channel's bulk),
//! then with OpenSSH's own `scp` (`scp.rs`). The report holds every run and each path's medians.

use std::path::PathBuf;
use std::time::Duration;

use crate::scp::{ScpReport, ScpSetup};
use crate::ssh::{self, Part, Parts, SshPath, SshReport, SshTarget};
use crate::{fleet, median, openssh, write_json};

/// `loadgen ssh`'s settings.
pub(crate) struct SshRun {
    pub(crate) concurrency: usize,
    pub(crate) duration: Duration,
    pub(crate) workers: usize,
    pub(crate) runs: usize,
    /// The file `scp` copies.
    pub(crate) scp_bytes: u64,
    pub(crate) paths: Vec<SshPath>,
    pub(crate) parts: Vec<Part>,
}

#[derive(Debug, serde::Serialize)]
struct SshSummary {
    rounds: usize,
    runs: Vec<SshReport>,
    scp_runs: Vec<ScpReport>,
    /// Per path, each figure the median over the rounds (`round` = the number of rounds).
    medians: Vec<SshReport>,
    scp_medians: Vec<ScpReport>,
    /// Paths that could not be measured here, with the reason.
    skipped: Vec<Skipped>,
}

#[derive(Debug, serde::Serialize)]
struct Skipped {
    path: SshPath,
    reason: String,
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    median(v.collect())
}

fn med_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

fn ssh_median(runs: &[&SshReport]) -> Option<SshReport> {
    let first = (*runs.first()?).clone();
    let it = || runs.iter().copied();
    Some(SshReport {
        round: runs.len(),
        sessions: it().map(|r| r.sessions).sum(),
        errors: it().map(|r| r.errors).sum(),
        first_error: it().find_map(|r| r.first_error.clone()),
        sessions_per_s: med(it().map(|r| r.sessions_per_s)),
        p50_ms: med(it().map(|r| r.p50_ms)),
        p99_ms: med(it().map(|r| r.p99_ms)),
        server_cpu_s: med_opt(it().map(|r| r.server_cpu_s)),
        sessions_per_server_cpu_s: med_opt(it().map(|r| r.sessions_per_server_cpu_s)),
        bulk_gb_per_s: med(it().map(|r| r.bulk_gb_per_s)),
        bulk_gb_per_server_cpu_s: med_opt(it().map(|r| r.bulk_gb_per_server_cpu_s)),
        generator_cpu_s: med(it().map(|r| r.generator_cpu_s)),
        ..first
    })
}

fn scp_median(runs: &[&ScpReport]) -> Option<ScpReport> {
    let first = (*runs.first()?).clone();
    let it = || runs.iter().copied();
    Some(ScpReport {
        round: runs.len(),
        seconds: med(it().map(|r| r.seconds)),
        gb_per_s: med(it().map(|r| r.gb_per_s)),
        server_cpu_s: med_opt(it().map(|r| r.server_cpu_s)),
        gb_per_server_cpu_s: med_opt(it().map(|r| r.gb_per_server_cpu_s)),
        client_cpu_s: med_opt(it().map(|r| r.client_cpu_s)),
        ..first
    })
}

/// A loopback sshd trusting the cluster's user CA, or why there is none.
fn sshd(ip: &str, user: &fleet::UserCreds) -> Result<openssh::Sshd, String> {
    openssh::Sshd::start(ip, Some(&user.ssh_user_ca.join("\n"))).map_err(|e| format!("{e:#}"))
}

pub(crate) async fn ssh_cmd(cfg: &SshRun, json: Option<PathBuf>) -> anyhow::Result<()> {
    let login = openssh::current_login()?;
    let fleet = fleet::Fleet::spawn("127.0.0.2", cfg.workers).await?;
    let user = fleet.user("sshbench", &login).await?;
    let agent = fleet.start_agent("bench-node", "127.0.0.6")?;
    let gatehouse = SshTarget {
        path: SshPath::Gatehouse,
        addr: fleet.proxy_addr.clone(),
        jump: None,
        node: "bench-node".into(),
        login: login.clone(),
        user: user.clone(),
    };
    ssh::wait_ready(&gatehouse, Duration::from_secs(30)).await?;

    // The target sshd serves the direct path and, behind the jump sshd, the ProxyJump path.
    let mut skipped = Vec::new();
    let mut paths = Vec::new();
    if cfg.paths.contains(&SshPath::Gatehouse) {
        paths.push((gatehouse.clone(), vec![fleet.proxy.pid(), agent.pid()]));
    }
    let want_jump = cfg.paths.contains(&SshPath::Proxyjump);
    let want_direct = cfg.paths.contains(&SshPath::Openssh);
    let target = (want_jump || want_direct).then(|| sshd("127.0.0.4", &user));
    let jump = want_jump.then(|| sshd("127.0.0.5", &user));
    match (&target, &jump) {
        (Some(Err(e)), _) | (_, Some(Err(e))) => {
            println!("ssh openssh and proxyjump skipped: {e}");
            for path in [SshPath::Proxyjump, SshPath::Openssh] {
                if cfg.paths.contains(&path) {
                    skipped.push(Skipped {
                        path,
                        reason: e.clone(),
                    });
                }
            }
        }
        (Some(Ok(t)), j) => {
            let direct = SshTarget {
                path: SshPath::Openssh,
                addr: t.addr.to_string(),
                ..gatehouse.clone()
            };
            if let Some(Ok(j)) = j {
                let via_jump = SshTarget {
                    path: SshPath::Proxyjump,
                    jump: Some(j.addr.to_string()),
                    ..direct.clone()
                };
                ssh::wait_ready(&via_jump, Duration::from_secs(10)).await?;
                paths.push((via_jump, vec![j.pid(), t.pid()]));
            }
            if want_direct {
                ssh::wait_ready(&direct, Duration::from_secs(10)).await?;
                paths.push((direct, vec![t.pid()]));
            }
        }
        (None, _) => {}
    }
    let parts = Parts {
        sessions: cfg.parts.contains(&Part::Sessions),
        bulk: cfg.parts.contains(&Part::Bulk),
    };
    let scp = if cfg.parts.contains(&Part::Scp) {
        Some(ScpSetup::new(&user, &fleet.proxy_addr, &fleet.pin, cfg.scp_bytes).await?)
    } else {
        None
    };

    let (mut runs, mut scp_runs) = (Vec::new(), Vec::new());
    for round in 0..cfg.runs {
        if cfg.runs > 1 {
            println!("round {}/{}", round + 1, cfg.runs);
        }
        if parts.sessions || parts.bulk {
            for (target, pids) in &paths {
                let mut r = ssh::run(target, cfg.concurrency, cfg.duration, pids, parts).await?;
                r.round = round;
                ssh::print(&r);
                runs.push(r);
            }
        }
        if let Some(scp) = &scp {
            for (target, pids) in &paths {
                let mut r = scp.run(target, pids).await?;
                r.round = round;
                crate::scp::print(&r);
                scp_runs.push(r);
            }
        }
    }

    let mut medians = Vec::new();
    let mut scp_medians = Vec::new();
    for (target, _) in &paths {
        let of: Vec<&SshReport> = runs.iter().filter(|r| r.path == target.path).collect();
        medians.extend(ssh_median(&of));
        let of: Vec<&ScpReport> = scp_runs.iter().filter(|r| r.path == target.path).collect();
        scp_medians.extend(scp_median(&of));
    }
    if cfg.runs > 1 {
        println!("medians of {} rounds:", cfg.runs);
        medians.iter().for_each(ssh::print);
        scp_medians.iter().for_each(crate::scp::print);
    }
    drop(agent);
    write_json(
        json.as_deref(),
        &SshSummary {
            rounds: cfg.runs,
            runs,
            scp_runs,
            medians,
            scp_medians,
            skipped,
        },
    )
}
