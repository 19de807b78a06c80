//! `link`: an emulated wide-area link between the simulated agents and the Proxy, for measuring
//! the agents' tunnel transports (TLS over TCP, QUIC) where packets are late and get lost. This
//! kernel has no `netem`, so the link is a TUN device with the impairment in user space.
//!
//! The device holds two addresses' worth of a subnet: `local` (10.201.0.1 for `loadgen link`,
//! the device's own) and `peer` (10.201.0.2, routed into the device). The Proxy listens on `local`; an agent bound
//! to `local` dials the Proxy at `peer`. Every IPv4 packet the kernel routes into the device is
//! turned around: its source and destination addresses swap (which changes neither the IP nor
//! the TCP/UDP checksum, since both sum the two addresses), so `local:a → peer:b` comes back as
//! `peer:a → local:b`. The agent's packets reach the Proxy from `peer`, the Proxy's replies go
//! back into the device and reach the agent from `peer`: both ends talk over the link, with
//! ports unchanged, and no other traffic crosses it.
//!
//! The impairment ([`Emulator`], sans-IO) is per direction, like a real link's: random loss
//! (each packet independently, as `netem loss` does), a serialization rate with a drop-tail
//! queue bounded in time, and a fixed one-way delay. A direction is told by the Proxy's ports
//! ([`Link::add_server_port`]): a packet to one goes up (agent → Proxy), from one goes down.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// What the link does to every packet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Impairment {
    /// One-way delay, each direction (the round trip is twice this).
    pub delay: Duration,
    /// Probability that a packet is lost (0.0–1.0), each packet independently.
    pub loss: f64,
    /// Serialization rate in bits per second, each direction; 0 for none.
    pub rate_bps: u64,
    /// The longest a packet may wait behind others for the rate before it is dropped (a
    /// drop-tail queue measured in time, as a router's buffer is sized).
    pub queue: Duration,
}

/// What one direction of the link did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirStats {
    /// Packets that entered the link.
    pub packets: u64,
    pub bytes: u64,
    /// Packets the random loss took.
    pub lost: u64,
    /// Packets dropped at the tail of a full queue.
    pub dropped: u64,
}

/// Both directions: `up` is toward the Proxy's ports, `down` from them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    pub up: DirStats,
    pub down: DirStats,
}

impl LinkStats {
    /// The counts since `earlier`.
    pub fn since(&self, earlier: &LinkStats) -> LinkStats {
        let d = |a: DirStats, b: DirStats| DirStats {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
            lost: a.lost.saturating_sub(b.lost),
            dropped: a.dropped.saturating_sub(b.dropped),
        };
        LinkStats {
            up: d(self.up, earlier.up),
            down: d(self.down, earlier.down),
        }
    }
}

/// What became of a packet handed to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Queued; delivered at its time.
    Queued,
    /// Taken by the random loss.
    Lost,
    /// Dropped: the queue ahead of it was longer than [`Impairment::queue`].
    Dropped,
    /// Not an IPv4 packet (the kernel's IPv6 chatter on a new device): not forwarded.
    Ignored,
}

#[derive(Debug, Default)]
struct Queue {
    /// Packets in the order they leave, each with its delivery time.
    packets: VecDeque<(Instant, Vec<u8>)>,
    /// When the link finishes serializing what it holds.
    free_at: Option<Instant>,
    stats: DirStats,
}

/// The link's behaviour, without I/O: packets and `now` in, packets and deadlines out.
#[derive(Debug)]
pub struct Emulator {
    imp: Impairment,
    server_ports: Vec<u16>,
    rng: u64,
    up: Queue,
    down: Queue,
}

impl Emulator {
    pub fn new(imp: Impairment, seed: u64) -> Self {
        Self {
            imp,
            server_ports: Vec::new(),
            rng: seed,
            up: Queue::default(),
            down: Queue::default(),
        }
    }

    pub fn set_impairment(&mut self, imp: Impairment) {
        self.imp = imp;
    }

    /// A Proxy's port: packets from it go down, all others up.
    pub fn add_server_port(&mut self, port: u16) {
        self.server_ports.push(port);
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.up.stats,
            down: self.down.stats,
        }
    }

    /// A uniform draw in [0, 1) (SplitMix64: deterministic for a seed, good enough for loss).
    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A packet the kernel routed into the link at `now`.
    pub fn input(&mut self, now: Instant, mut packet: Vec<u8>) -> Fate {
        let Some(ports) = turn_around(&mut packet) else {
            return Fate::Ignored;
        };
        let imp = self.imp;
        let down = ports.is_some_and(|(src, _)| self.server_ports.contains(&src));
        let lost = imp.loss > 0.0 && self.draw() < imp.loss;
        let q = if down { &mut self.down } else { &mut self.up };
        q.stats.packets += 1;
        q.stats.bytes += packet.len() as u64;
        if lost {
            q.stats.lost += 1;
            return Fate::Lost;
        }
        let leaves = if imp.rate_bps > 0 {
            let start = q.free_at.map_or(now, |f| f.max(now));
            if start.duration_since(now) > imp.queue {
                q.stats.dropped += 1;
                return Fate::Dropped;
            }
            let nanos = packet.len() as u128 * 8 * 1_000_000_000 / u128::from(imp.rate_bps);
            let serialize = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            let done = start + serialize;
            q.free_at = Some(done);
            done
        } else {
            now
        };
        // A change of delay between packets must not reorder them.
        let due = q.packets.back().map_or(leaves + imp.delay, |(last, _)| {
            (leaves + imp.delay).max(*last)
        });
        q.packets.push_back((due, packet));
        Fate::Queued
    }

    /// When the next packet is due, if any is queued.
    pub fn next_due(&self) -> Option<Instant> {
        let first = |q: &Queue| q.packets.front().map(|(t, _)| *t);
        match (first(&self.up), first(&self.down)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A packet whose time has come at `now`, turned around, to hand back to the kernel.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        for q in [&mut self.up, &mut self.down] {
            if q.packets.front().is_some_and(|(t, _)| *t <= now) {
                return q.packets.pop_front().map(|(_, p)| p);
            }
        }
        None
    }
}

/// Swap an IPv4 packet's source and destination addresses in place. Returns its TCP or UDP
/// ports (source, destination) if it has them, `None` inside if it is another protocol, and
/// `None` for anything that is not IPv4.
fn turn_around(packet: &mut [u8]) -> Option<Option<(u16, u16)>> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || header_len < 20 || packet.len() < header_len {
        return None;
    }
    let (src, rest) = packet.get_mut(12..20)?.split_at_mut(4);
    src.swap_with_slice(rest);
    let proto = *packet.get(9)?;
    let ports = match proto {
        6 | 17 => match packet.get(header_len..header_len + 4) {
            Some(&[a, b, c, d]) => Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))),
            _ => None,
        },
        _ => None,
    };
    Some(ports)
}

/// A running link: the TUN device and the thread that moves its packets. Dropping it stops the
/// thread and removes the device.
pub struct Link {
    pub name: String,
    /// The device's address: the Proxy listens here, the agents bind here.
    pub local: Ipv4Addr,
    /// The far end: agents dial the Proxy at this address.
    pub peer: Ipv4Addr,
    shared: Arc<Mutex<Emulator>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

/// The link's MTU: an Ethernet path's, so TCP segments and QUIC packets have their usual sizes.
const MTU: usize = 1500;

impl Link {
    /// Create the device (needs root, or CAP_NET_ADMIN, and `/dev/net/tun`) on 10.201.`net`.0/24
    /// and start moving packets through `imp`.
    pub fn start(imp: Impairment, net: u8) -> anyhow::Result<Self> {
        let local = Ipv4Addr::new(10, 201, net, 1);
        let peer = Ipv4Addr::new(10, 201, net, 2);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun (the link scenario needs root and a TUN device)")?;
        let name = sys::attach_tun(&file, "ghlink%d").context("creating the TUN device")?;
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .context("running `ip` (iproute2)")?;
            if !out.status.success() {
                bail!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        // No IPv6 on the device: its router solicitations would only be dropped.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["addr", "add", &format!("{local}/24"), "dev", &name])?;
        ip(&["link", "set", "dev", &name, "mtu", &MTU.to_string(), "up"])?;
        let seed = crate::procstat::unix_micros();
        let shared = Arc::new(Mutex::new(Emulator::new(imp, seed)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("link".into())
                .spawn(move || drive(file, &shared, &stop))?
        };
        Ok(Self {
            name,
            local,
            peer,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// A Proxy's port: packets from it go down the link, all others up.
    pub fn add_server_port(&self, port: u16) {
        if let Ok(mut e) = self.shared.lock() {
            e.add_server_port(port);
        }
    }

    /// Change the impairment from the next packet on.
    pub fn set_impairment(&self, imp: Impairment) {
        if let Ok(mut e) = self.shared.lock() {
            e.set_impairment(imp);
        }
    }

    pub fn stats(&self) -> LinkStats {
        self.shared.lock().map(|e| e.stats()).unwrap_or_default()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The link's thread: read what the kernel routes into the device, write back what is due.
fn drive(mut tun: std::fs::File, shared: &Mutex<Emulator>, stop: &AtomicBool) {
    // Packets leave on time: the default timer slack would hold each up to 50 µs.
    crate::latency::precise_sleeps();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let next = shared.lock().ok().and_then(|e| e.next_due());
        let wait = next.map_or(Duration::from_millis(50), |t| {
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50))
        });
        if let Err(e) = sys::wait_readable(tun.as_raw_fd(), wait) {
            eprintln!("loadgen: link: poll: {e}");
            return;
        }
        loop {
            match tun.read(&mut buf) {
                Ok(n) => {
                    let packet = buf.get(..n).unwrap_or_default().to_vec();
                    if let Ok(mut e) = shared.lock() {
                        e.input(Instant::now(), packet);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("loadgen: link: read: {e}");
                    return;
                }
            }
        }
        let now = Instant::now();
        while let Some(packet) = shared.lock().ok().and_then(|mut e| e.pop_due(now)) {
            // A full device queue loses the packet, as a real link would.
            let _ = tun.write(&packet);
        }
    }
}

/// The system calls std has no wrapper for.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};
    use std::time::Duration;

    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_NO_PI: libc::c_short = 0x1000;

    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    /// Make `tun` (an open `/dev/net/tun`) a new TUN device named from `pattern` (`%d` for
    /// the kernel's number); returns the name. The device lives as long as the descriptor.
    pub fn attach_tun(tun: &std::fs::File, pattern: &str) -> io::Result<String> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        let bytes = pattern.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(io::Error::other("interface name too long"));
        }
        for (d, s) in req.name.iter_mut().zip(bytes) {
            *d = *s;
        }
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out (name,
        // then the flags at the start of the 24-byte union); the buffer outlives the call.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(String::from_utf8_lossy(req.name.get(..len).unwrap_or_default()).into_owned())
    }

    /// Wait until `fd` is readable or `timeout` passes (to the nanosecond: `poll`'s
    /// milliseconds would hold every packet up to 1 ms late).
    pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: one valid pollfd and a timespec that outlive the call; no signal mask.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 packet `len` bytes long from `src:sport` to `dst:dport` (UDP).
    fn packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(28)];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn imp(delay_ms: u64, loss: f64, rate_bps: u64, queue_ms: u64) -> Impairment {
        Impairment {
            delay: Duration::from_millis(delay_ms),
            loss,
            rate_bps,
            queue: Duration::from_millis(queue_ms),
        }
    }

    #[test]
    fn turns_packets_around_and_keeps_them_until_due() {
        let mut e = Emulator::new(imp(20, 0.0, 0, 0), 1);
        e.add_server_port(4433);
        let t0 = Instant::now();
        let p = packet([10, 201, 0, 1], 50000, [10, 201, 0, 2], 4433, 100);
        assert_eq!(e.input(t0, p.clone()), Fate::Queued);
        assert_eq!(e.next_due(), Some(t0 + Duration::from_millis(20)));
        assert!(e.pop_due(t0 + Duration::from_millis(19)).is_none());
        let out = e.pop_due(t0 + Duration::from_millis(20)).unwrap();
        assert_eq!(out[12..16], [10, 201, 0, 2]);
        assert_eq!(out[16..20], [10, 201, 0, 1]);
        assert_eq!(out[20..], p[20..], "ports and payload untouched");
        assert_eq!(e.stats().up.packets, 1);
        assert_eq!(e.stats().down.packets, 0);
        // From the server's port: the other direction.
        e.input(
            t0,
            packet([10, 201, 0, 1], 4433, [10, 201, 0, 2], 50000, 100),
        );
        assert_eq!(e.stats().down.packets, 1);
    }

    #[test]
    fn ignores_what_is_not_ipv4() {
        let mut e = Emulator::new(imp(0, 0.0, 0, 0), 1);
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        assert_eq!(e.input(Instant::now(), v6), Fate::Ignored);
        assert_eq!(e.input(Instant::now(), vec![0x45; 10]), Fate::Ignored);
        assert_eq!(e.input(Instant::now(), Vec::new()), Fate::Ignored);
        assert_eq!(e.next_due(), None);
    }

    #[test]
    fn loses_about_the_configured_share() {
        let mut e = Emulator::new(imp(0, 0.02, 0, 0), 7);
        let t0 = Instant::now();
        for _ in 0..100_000 {
            e.input(t0, packet([10, 201, 0, 1], 1, [10, 201, 0, 2], 2, 40));
        }
        let lost = e.stats().up.lost;
        assert!(
            (1_800..2_200).contains(&lost),
            "lost {lost} of 100,000 at 2 %"
        );
        let mut delivered = 0;
        while e.pop_due(t0).is_some() {
            delivered += 1;
        }
        assert_eq!(delivered + lost, 100_000);
    }

    #[test]
    fn serializes_at_the_rate_and_drops_past_the_queue() {
        // 1,000 bytes at 8 Mbit/s take 1 ms; the queue holds 5 ms of them.
        let mut e = Emulator::new(imp(10, 0.0, 8_000_000, 5), 1);
        let t0 = Instant::now();
        let mut fates = Vec::new();
        for _ in 0..10 {
            fates.push(e.input(t0, packet([10, 201, 0, 1], 1, [10, 201, 0, 2], 2, 1000)));
        }
        // Starts at 0, 1, ..., 5 ms are within the queue; 6 ms and later are not.
        assert_eq!(fates.iter().filter(|f| **f == Fate::Queued).count(), 6);
        assert_eq!(e.stats().up.dropped, 4);
        for i in 1..=6u64 {
            let due = t0 + Duration::from_millis(10 + i);
            assert_eq!(e.next_due(), Some(due));
            assert!(e.pop_due(due).is_some());
        }
        assert_eq!(e.next_due(), None);
    }

    /// The device end to end, through the kernel: a TCP connection to `peer` reaches a listener
    /// on `local` from `peer`, and its handshake and echo take the link's round trip.
    #[test]
    fn a_tcp_connection_crosses_the_real_device_with_its_delay() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: a TUN device needs root (scripts/test runs as root)");
            return;
        }
        let delay = Duration::from_millis(15);
        // Its own subnet, so a `loadgen link` running meanwhile (10.201.0.0/24) is not in the way.
        let link = Link::start(imp(15, 0.0, 0, 0), 77).unwrap();
        let listener = std::net::TcpListener::bind((link.local, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        link.add_server_port(port);
        let server = std::thread::spawn(move || {
            let (mut s, from) = listener.accept().unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
            from
        });
        let t0 = Instant::now();
        let mut c = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((link.peer, port)),
            Duration::from_secs(5),
        )
        .unwrap();
        let connected = t0.elapsed();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(c.local_addr().unwrap().ip(), link.local);
        let t1 = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        let echoed = t1.elapsed();
        assert_eq!(&b, b"ping");
        let from = server.join().unwrap();
        assert_eq!(from.ip(), link.peer, "the listener sees the far end");
        assert!(connected >= delay * 2, "handshake in {connected:?}");
        assert!(echoed >= delay * 2, "echo in {echoed:?}");
        assert!(echoed < Duration::from_secs(2), "echo in {echoed:?}");
        let stats = link.stats();
        assert!(
            stats.up.packets >= 3 && stats.down.packets >= 2,
            "{stats:?}"
        );
    }

    #[test]
    fn directions_do_not_queue_behind_each_other() {
        let mut e = Emulator::new(imp(0, 0.0, 8_000_000, 100), 1);
        e.add_server_port(4433);
        let t0 = Instant::now();
        for _ in 0..5 {
            e.input(t0, packet([10, 201, 0, 1], 9, [10, 201, 0, 2], 4433, 1000));
        }
        e.input(t0, packet([10, 201, 0, 1], 4433, [10, 201, 0, 2], 9, 1000));
        // The down packet serializes in 1 ms although five up packets went in first.
        assert!(e.pop_due(t0 + Duration::from_millis(1)).is_some());
        assert!(e.pop_due(t0 + Duration::from_millis(1)).is_some());
        assert!(e.pop_due(t0 + Duration::from_millis(1)).is_none());
        assert_eq!(e.stats().down.packets, 1);
    }
}
