//! rathole (a Rust reverse-tunnel server, `cargo install rathole`) as a baseline: its server
//! takes the visitor's TCP connection and carries it to its client over a TLS data channel, and
//! the client connects to the sink. The same shape as Proxy → agent, one TLS leg instead of two.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The rathole binary: `$RATHOLE`, then `PATH`, then `~/.cargo/bin`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RATHOLE") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("rathole"))
        .find(|p| p.is_file())
}

/// A rathole server and client (both killed on drop).
pub struct Rathole {
    server: Child,
    client: Child,
    _dir: tempfile::TempDir,
    /// The service port visitors connect to (at the server).
    pub service: SocketAddr,
}

impl Rathole {
    pub fn server_pid(&self) -> u32 {
        self.server.id()
    }

    /// Start a server on `ip` and a client forwarding to `sink`; the server's TLS identity is
    /// the sink's certificate (name `sink.bench`), which the client trusts through `ca_pem`.
    pub fn start(
        ip: &str,
        sink: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> anyhow::Result<Self> {
        let exe = binary().context(
            "rathole is not installed (cargo install rathole, or set RATHOLE=/path/to/rathole)",
        )?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("cert.pem"), cert_pem)?;
        std::fs::write(d.join("key.pem"), key_pem)?;
        std::fs::write(d.join("ca.pem"), ca_pem)?;
        // rathole's native-tls transport takes a PKCS#12 identity.
        let status = Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
            .arg(d.join("identity.pfx"))
            .arg("-inkey")
            .arg(d.join("key.pem"))
            .arg("-in")
            .arg(d.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl pkcs12")?;
        anyhow::ensure!(status.success(), "openssl pkcs12 -export failed");
        let free = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
        };
        let (control, service) = (free()?, free()?);
        std::fs::write(
            d.join("server.toml"),
            format!(
                "[server]\nbind_addr = \"{ip}:{control}\"\n\
                 [server.transport]\ntype = \"tls\"\n\
                 [server.transport.tls]\npkcs12 = \"{p12}\"\npkcs12_password = \"bench\"\n\
                 [server.services.sink]\ntoken = \"bench\"\nbind_addr = \"{ip}:{service}\"\n",
                p12 = d.join("identity.pfx").display()
            ),
        )?;
        std::fs::write(
            d.join("client.toml"),
            format!(
                "[client]\nremote_addr = \"{ip}:{control}\"\n\
                 [client.transport]\ntype = \"tls\"\n\
                 [client.transport.tls]\ntrusted_root = \"{ca}\"\nhostname = \"sink.bench\"\n\
                 [client.services.sink]\ntoken = \"bench\"\nlocal_addr = \"{sink}\"\n",
                ca = d.join("ca.pem").display()
            ),
        )?;
        let spawn = |role: &str| -> anyhow::Result<Child> {
            Command::new(&exe)
                .arg(format!("--{role}"))
                .arg(d.join(format!("{role}.toml")))
                .env("RUST_LOG", "warn")
                .stdout(std::fs::File::create(d.join(format!("{role}.log")))?)
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {} --{role}", exe.display()))
        };
        let server = spawn("server")?;
        let client = spawn("client")?;
        let service: SocketAddr = format!("{ip}:{service}").parse()?;
        let mut this = Self {
            server,
            client,
            _dir: dir,
            service,
        };
        // The server binds the service port once the client's control channel is up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::net::TcpStream::connect(service).is_err() {
            if std::time::Instant::now() > deadline
                || matches!(this.server.try_wait(), Ok(Some(_)))
                || matches!(this.client.try_wait(), Ok(Some(_)))
            {
                // The last lines say why (it retries the same failure every second).
                let log = |r: &str| {
                    let text = std::fs::read_to_string(this._dir.path().join(format!("{r}.log")))
                        .unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines
                        .get(lines.len().saturating_sub(2)..)
                        .unwrap_or_default()
                        .join("\n")
                };
                bail!(
                    "rathole did not come up (server {:?}, client {:?}); server log:\n{}\nclient log:\n{}",
                    this.server.try_wait(),
                    this.client.try_wait(),
                    log("server"),
                    log("client")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(this)
    }
}

impl Drop for Rathole {
    fn drop(&mut self) {
        for c in [&mut self.server, &mut self.client] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
