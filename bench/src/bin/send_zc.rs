//! Does io_uring's zero-copy send (`SEND_ZC`) pay here? One TCP connection on loopback, a
//! sender thread keeping `--inflight` sends of `--chunk-kib` each in flight through an io_uring
//! (`SEND` or `SEND_ZC`, alternating rounds), a receiver thread reading it with `read`. Reports
//! GB/s and GB per CPU-second of the sender thread and of both threads together (on loopback
//! the receiving socket's TCP work runs in the sender's context, and the copy into the reader's
//! buffer in the receiver's).
//!
//! `cargo run --release -p gatehouse-bench --bin send-zc -- --rounds 3`

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use io_uring::{IoUring, cqueue, opcode, types};

#[derive(Parser)]
#[command(about = "SEND against SEND_ZC through io_uring on a loopback TCP connection")]
struct Args {
    /// Bytes per send, in KiB.
    #[arg(long, default_value_t = 64)]
    chunk_kib: usize,
    /// Sends in flight at once (each with its own buffer).
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds; each runs SEND then SEND_ZC.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the medians as JSON to this file too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

struct Run {
    bytes: u64,
    wall: Duration,
    sender_cpu: Duration,
    receiver_cpu: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.chunk_kib == 0 || args.inflight == 0 || args.inflight > 64 || args.seconds <= 0.0 {
        bail!("--chunk-kib and --seconds must be positive, --inflight 1 to 64");
    }
    let chunk = args.chunk_kib * 1024;
    let dur = Duration::from_secs_f64(args.seconds);
    let mut results: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        for (slot, zc) in [false, true].into_iter().enumerate() {
            let r = run(zc, chunk, args.inflight, dur)?;
            let gb = r.bytes as f64 / 1e9;
            let row = (
                gb / r.wall.as_secs_f64(),
                gb / r.sender_cpu.as_secs_f64().max(1e-9),
                gb / (r.sender_cpu + r.receiver_cpu).as_secs_f64().max(1e-9),
            );
            println!(
                "round {round} {:<8} {:>6.3} GB/s  {:>5.2} GB per sender CPU-s  {:>5.2} GB per CPU-s (both threads)",
                name(zc),
                row.0,
                row.1,
                row.2
            );
            if let Some(v) = results.get_mut(slot) {
                v.push(row);
            }
        }
    }
    let mut medians = Vec::new();
    for (slot, zc) in [false, true].into_iter().enumerate() {
        let Some(rows) = results.get(slot) else {
            continue;
        };
        let med = |f: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = rows.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        println!(
            "median   {:<8} {:>6.3} GB/s  {:>5.2} GB per sender CPU-s  {:>5.2} GB per CPU-s (both threads)",
            name(zc),
            med(|r| r.0),
            med(|r| r.1),
            med(|r| r.2)
        );
        medians.push(format!(
            "{{\"op\":\"{}\",\"chunk_kib\":{},\"inflight\":{},\"rounds\":{},\"gb_per_s\":{:.4},\"gb_per_sender_cpu_s\":{:.4},\"gb_per_cpu_s\":{:.4}}}",
            name(zc),
            args.chunk_kib,
            args.inflight,
            args.rounds,
            med(|r| r.0),
            med(|r| r.1),
            med(|r| r.2)
        ));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, format!("[{}]\n", medians.join(",")))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn name(zc: bool) -> &'static str {
    if zc { "SEND_ZC" } else { "SEND" }
}

fn run(zc: bool, chunk: usize, inflight: usize, dur: Duration) -> anyhow::Result<Run> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let tx = TcpStream::connect(listener.local_addr()?)?;
    let (mut rx, _) = listener.accept()?;
    tx.set_nodelay(true)?;
    let receiver = std::thread::spawn(move || -> std::io::Result<Duration> {
        let cpu0 = thread_cpu();
        let mut buf = vec![0u8; 256 * 1024];
        while rx.read(&mut buf)? > 0 {}
        Ok(thread_cpu().saturating_sub(cpu0))
    });

    let mut ring = IoUring::new(64).context("io_uring_setup")?;
    let bufs: Vec<Vec<u8>> = (0..inflight).map(|i| vec![i as u8; chunk]).collect();
    // Per buffer: the send's result still to come, and (SEND_ZC) the kernel's release of it.
    let mut pending = vec![(false, false); inflight];
    let fd = types::Fd(tx.as_raw_fd());
    let len = u32::try_from(chunk).context("--chunk-kib too large")?;
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut bytes = 0u64;
    loop {
        if start.elapsed() < dur {
            for (i, (buf, p)) in bufs.iter().zip(pending.iter_mut()).enumerate() {
                if p.0 || p.1 {
                    continue;
                }
                let entry = if zc {
                    opcode::SendZc::new(fd, buf.as_ptr(), len).build()
                } else {
                    opcode::Send::new(fd, buf.as_ptr(), len).build()
                };
                // SAFETY: the buffer lives in `bufs` until every completion naming it (the result
                // and, for SEND_ZC, the notification) has been reaped below.
                #[allow(unsafe_code)]
                unsafe {
                    ring.submission()
                        .push(&entry.user_data(i as u64))
                        .context("submission queue full")?;
                }
                *p = (true, zc);
            }
        }
        if !pending.iter().any(|p| p.0 || p.1) {
            break;
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            let Some(p) = pending.get_mut(cqe.user_data() as usize) else {
                continue;
            };
            if cqueue::notif(cqe.flags()) {
                p.1 = false;
                continue;
            }
            p.0 = false;
            if !cqueue::more(cqe.flags()) {
                // No notification follows (plain SEND, or a SEND_ZC that failed).
                p.1 = false;
            }
            let n = cqe.result();
            if n < 0 {
                bail!(
                    "{} failed: {}",
                    name(zc),
                    std::io::Error::from_raw_os_error(-n)
                );
            }
            bytes += n as u64;
        }
    }
    let wall = start.elapsed();
    let sender_cpu = thread_cpu().saturating_sub(cpu0);
    drop(tx);
    let receiver_cpu = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    Ok(Run {
        bytes,
        wall,
        sender_cpu,
        receiver_cpu,
    })
}

/// CPU time of the calling thread.
#[allow(unsafe_code)]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}
