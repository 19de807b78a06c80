//! Test support: a throwaway PostgreSQL server on loopback (Debian's `initdb` and `pg_ctl` on a
//! temporary directory and an ephemeral port), stopped when dropped. Run as root, the server
//! runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL server for one test; `url()` names a fresh database on it.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    next_db: std::sync::atomic::AtomicU32,
}

/// Where `initdb` and `pg_ctl` are: on `PATH`, or Debian's `/usr/lib/postgresql/N/bin`.
fn pg_bin() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").is_file() && d.join("pg_ctl").is_file() {
                return Ok(d);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "PostgreSQL is not installed (apt-get install postgresql)".to_owned())?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql (apt-get install postgresql)".into())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl PgServer {
    /// initdb and start a server (fsync off: a test's data need not survive a crash).
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// initdb and start a server; `durable`: fsync on (PostgreSQL's default), for benchmarks
    /// whose figures claim durability.
    pub fn start_with(durable: bool) -> Result<Self, String> {
        let bin = pg_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?
                .success();
            if !ok {
                return Err("cannot give the test directory to the postgres user".into());
            }
        }
        let port = free_port()?;
        let server = Self {
            dir,
            bin,
            port,
            as_postgres,
            next_db: Default::default(),
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync={} -c max_connections=200",
            path_str(server.dir.path())?,
            if durable { "on" } else { "off" }
        );
        let log = server.dir.path().join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            Err(format!(
                "{tool} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the server's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A new, empty database on the server; its URL.
    pub async fn fresh_db(&self) -> Result<String, String> {
        let n = self
            .next_db
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("gatehouse_{n}");
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&self.admin_url())
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
        pool.close().await;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    /// Stop the server now (fast shutdown), as an outage would.
    pub fn stop(&self) -> Result<(), String> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "fast", "-w", "stop"],
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        if let Some(d) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", d, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

/// Whether this process runs as root (read from /proc, no libc call).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
