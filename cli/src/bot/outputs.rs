//! What `gbot` writes for the programs on its machine, each output in a directory of its own:
//!
//! - `identity`: everything a Gatehouse client needs — SSH key and certificate, X.509 key,
//!   certificate and CA, `known_hosts`, `ssh_config` and `profile.toml` — so `gsh` (with
//!   `GATEHOUSE_HOME=DIR`), `gctl --identity DIR` and `ssh -F DIR/ssh_config` act as the bot;
//! - `ssh`: the same files (the `ssh_config`'s ProxyCommand uses the TLS ones);
//! - `tls`: `tls.crt`, `tls.key` (PKCS#8 v1: OpenSSL 3.0, curl and Python's `ssl` load it) and
//!   `ca.pem`, for clients of TCP apps.
//!
//! Every file is written atomically (temporary file, fsync, rename) and 0600, in a 0700
//! directory; keys before certificates. The keys stay the same from one renewal to the next
//! (a new pair comes with a new join), so a reader that opens the key and the certificate at
//! any moment gets a matching pair: two files cannot be replaced in one step, one of them
//! unchanged can.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gatehouse_controlplane::files::{create_private_dir, write_private};
use serde::{Deserialize, Serialize};

use super::BotIdentity;
use crate::{Profile, SSH_CERT_FILE, SSH_KEY_FILE};

/// One output of `gbot.toml` (`[[outputs]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Output {
    Identity {
        destination: PathBuf,
    },
    Ssh {
        destination: PathBuf,
    },
    Tls {
        destination: PathBuf,
    },
    /// A local listener forwarding to TCP app `app` through the proxy, on fresh certificates.
    App {
        app: String,
        listen: String,
        /// Where its credentials are kept (default: `<data-dir>/app-<name>`).
        #[serde(default)]
        destination: Option<PathBuf>,
    },
}

impl Output {
    pub fn destination(&self, data_dir: &Path) -> PathBuf {
        match self {
            Output::Identity { destination }
            | Output::Ssh { destination }
            | Output::Tls { destination } => destination.clone(),
            Output::App {
                app, destination, ..
            } => destination
                .clone()
                .unwrap_or_else(|| data_dir.join(format!("app-{app}"))),
        }
    }
}

/// Refuse a destination gbot must not write to: a symbolic link (which would send the
/// credentials elsewhere), something that is not a directory, or a directory this user cannot
/// write. A missing one is created 0700. Checked before anything is written.
pub fn check_destination(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            let to = std::fs::read_link(dir)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            bail!(
                "destination {} is a symbolic link (to {to}); refusing to write credentials through it: give the real directory",
                dir.display()
            )
        }
        Ok(m) if !m.is_dir() => bail!("destination {} is not a directory", dir.display()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_private_dir(dir)
                .with_context(|| format!("cannot create destination {}", dir.display()))?;
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create destination {}", dir.display()));
        }
    }
    // Writable? Try the way every write is made.
    let probe = dir.join(".gbot-probe");
    write_private(&probe, b"")
        .with_context(|| format!("destination {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn write(dir: &Path, name: &str, data: &str) -> anyhow::Result<()> {
    write_private(&dir.join(name), data.as_bytes())
        .with_context(|| format!("writing {}", dir.join(name).display()))
}

/// The TLS files: key, then certificate, then CA.
fn write_tls(dir: &Path, id: &BotIdentity) -> anyhow::Result<()> {
    write(dir, "tls.key", &id.tls_key)?;
    write(dir, "tls.crt", &id.tls_cert)?;
    write(dir, "ca.pem", &id.ca_pem)
}

/// `known_hosts`: the cluster's host CA for every host name.
pub fn known_hosts(cluster: &str, host_ca: &[String]) -> String {
    host_ca
        .iter()
        .map(|k| format!("@cert-authority * {k} {cluster} host CA\n"))
        .collect()
}

/// An OpenSSH config for `*.CLUSTER` through the proxy with this directory's credentials.
fn ssh_config(dir: &Path, cluster: &str) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "gbot".into());
    let d = dir.display();
    format!(
        "# Written by gbot for cluster {cluster}; rewritten at every renewal.\n\
         Host *.{cluster}\n    \
         ProxyCommand \"{exe}\" proxy ssh --destination \"{d}\" %r@%h:%p\n    \
         UserKnownHostsFile \"{d}/known_hosts\"\n    \
         IdentityFile \"{d}/{SSH_KEY_FILE}\"\n    \
         CertificateFile \"{d}/{SSH_CERT_FILE}\"\n    \
         IdentitiesOnly yes\n    \
         StrictHostKeyChecking yes\n    \
         BatchMode yes\n    \
         Ciphers {}\n",
        crate::access::CIPHERS
    )
}

/// Write the whole client identity into `dir`.
fn write_identity(dir: &Path, id: &BotIdentity) -> anyhow::Result<()> {
    write(dir, SSH_KEY_FILE, &id.ssh_key)?;
    write(dir, "tls.key", &id.tls_key)?;
    write(dir, SSH_CERT_FILE, &format!("{}\n", id.ssh_cert.trim()))?;
    write(dir, "tls.crt", &id.tls_cert)?;
    write(dir, "ca.pem", &id.ca_pem)?;
    write(
        dir,
        "known_hosts",
        &known_hosts(&id.cluster, &id.ssh_host_ca),
    )?;
    let profile = Profile {
        proxy_addr: Some(id.proxy_addr.clone()),
        auth_addr: id.proxy_addr.clone(),
        cluster: id.cluster.clone(),
        user: id.bot.clone(),
        ca_pin: id.ca_pin.clone(),
        expires: id.expires,
        roles: id.roles.clone(),
        logins: id.logins.clone(),
    };
    let text = toml::to_string(&profile)?;
    write(dir, "profile.toml", &text)?;
    write(dir, "ssh_config", &ssh_config(dir, &id.cluster))
}

/// Write one output's files for `id`.
pub fn write_output(output: &Output, data_dir: &Path, id: &BotIdentity) -> anyhow::Result<()> {
    let dir = output.destination(data_dir);
    match output {
        Output::Identity { .. } | Output::Ssh { .. } | Output::App { .. } => {
            write_identity(&dir, id)
        }
        Output::Tls { .. } => write_tls(&dir, id),
    }
}
