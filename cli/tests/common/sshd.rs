//! A real OpenSSH `sshd` on loopback trusting a user CA file, and the real `ssh` client with a
//! gsh profile's key and certificate.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Output, run};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub child: Child,
    pub port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn start_sshd(dir: &Path, user_ca: &str) -> Sshd {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: scripts/test installs openssh-server"
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("ssh_host_ed25519_key");
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key);
    run(cmd, None).ok();
    std::fs::write(dir.join("user_ca.pub"), user_ca).unwrap();
    for _ in 0..5 {
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {dir}/sshd.pid\nTrustedUserCAKeys {dir}/user_ca.pub\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
            hk = host_key.display(),
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return sshd;
            }
            if let Ok(Some(_)) = sshd.child.try_wait() {
                break; // port taken meanwhile: try another
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(sshd);
    }
    panic!(
        "sshd did not start; log:\n{}",
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
}

pub fn ssh(home: &Path, port: u16, login: &str, command: &str) -> Output {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args([
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
    ])
    .arg("-o")
    .arg(format!(
        "IdentityFile={}",
        home.join("id_ed25519").display()
    ))
    .arg("-o")
    .arg(format!(
        "CertificateFile={}",
        home.join("id_ed25519-cert.pub").display()
    ))
    .args(["-p", &port.to_string()])
    .arg(format!("{login}@127.0.0.1"))
    .arg(command);
    run(cmd, None)
}
