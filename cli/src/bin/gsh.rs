//! `gsh`: the user's client. `gsh login` verifies Auth against the pinned CA, sends fresh public
//! keys with the password, and keeps the short-lived certificates under `~/.gatehouse/` (0600).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use gatehouse_cli::{
    Profile, SSH_CERT_FILE, SSH_KEY_FILE, connect, fmt_time, identity_endpoint, init_logging,
    profile_dir, read_stdin_line, rpc_error,
};
use gatehouse_controlplane::ca::{NO_LOGIN_PRINTCIPAL, spki_pin, ssh_ext};
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::files::{create_private_dir, write_private};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::{Trust, certs_from_pem};

#[derive(Parser, Debug)]
#[command(
    name = "gsh",
    version,
    about = "Gatehouse client: log in and reach your nodes"
)]
struct Cli {
    /// Use this identity directory (a `gbot` output, or another profile) instead of
    /// `$GATEHOUSE_HOME` / `~/.gatehouse`.
    #[arg(long, global = true)]
    identity: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Log in and get short-lived SSH and X.509 certificates.
    Login {
        /// The cluster's Proxy (host:port): Auth is reached through it, and so are the nodes.
        #[arg(long, env = "GATEHOUSE_PROXY", conflicts_with = "auth")]
        proxy: Option<String>,
        /// Auth API address (host:port), when logging in without a Proxy.
        #[arg(long, env = "GATEHOUSE_AUTH")]
        auth: Option<String>,
        /// User name. Default: the profile's, else $USER.
        #[arg(long)]
        user: Option<String>,
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// The cluster CA pin (sha256:…), printed by `gatehouse start`. Needed on first login.
        #[arg(long, env = "GATEHOUSE_CA_PIN")]
        ca_pin: Option<String>,
        /// Requested certificate lifetime (e.g. 8h); capped by your roles. Default 12h.
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// The one-time code of your device, when the cluster asks for one (else prompted).
        #[arg(long, env = "GATEHOUSE_OTP")]
        otp: Option<String>,
    },
    /// Second factor: enroll a TOTP device (an authenticator app).
    #[command(subcommand)]
    Mfa(MfaCmd),
    /// Show who you are logged in as, your roles, logins and when the certificates expire.
    Status,
    /// Remove the keys and certificates of the current profile.
    Logout,
    /// Change your password (prompts; with --stdin reads current then new from two lines).
    Passwd {
        #[arg(long)]
        stdin: bool,
    },
    /// List the nodes you can see, optionally filtered by labels (k=v ...); with --apps, the
    /// TCP apps your roles reach, filtered by the apps' labels.
    Ls {
        labels: Vec<String>,
        /// List apps instead of nodes.
        #[arg(long)]
        apps: bool,
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
        /// A leaf cluster's nodes (through this cluster's proxy).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// SSH to a node through the Proxy: `gsh ssh [login@]node [command...]`. Uses the OpenSSH
    /// client with your Gatehouse certificate; the remote exit code becomes gsh's.
    Ssh {
        /// [login@]node (a node name, host id, or labels like env=prod).
        target: String,
        /// Command to run; an interactive shell when empty.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Force a terminal even for a command (ssh -t).
        #[arg(short = 't')]
        tty: bool,
        /// A leaf cluster the node is in (reached through this cluster's proxy).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Copy files to and from nodes with OpenSSH's `scp`, through the Proxy: the same arguments
    /// as `scp` (`[login@]node:path` for remote files), no ssh config needed.
    Scp {
        /// scp's options and files, as for `scp` itself.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Proxy helpers.
    #[command(subcommand)]
    Proxy(ProxyCmd),
    /// Print an OpenSSH config block so that plain `ssh node.CLUSTER` goes through the Proxy.
    Config,
    /// This cluster and the clusters it trusts or is trusted by (leaves online or not).
    Clusters {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Session recordings you may see (your own; every one for auditors).
    #[command(subcommand)]
    Recordings(RecordingsCmd),
    /// Replay a recorded session in the terminal with its timing.
    Play {
        id: String,
        /// 2 plays twice as fast.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Shorten every pause to half a second.
        #[arg(long)]
        skip_idle: bool,
        /// Start this far in (e.g. 5m): what came before is printed at once.
        #[arg(long)]
        from: Option<humantime::Duration>,
    },
    /// Active sessions you may watch.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Watch a live session read-only (its output as it happens).
    Join { id: String },
}

#[derive(Subcommand, Debug)]
enum RecordingsCmd {
    /// List recordings, newest first.
    Ls {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        node: Option<String>,
        /// Only those started in this window (e.g. 24h).
        #[arg(long)]
        since: Option<humantime::Duration>,
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Write a recording as asciicast v2 (asciinema plays it) or as plain text.
    Export {
        id: String,
        #[arg(long, default_value = "asciicast")]
        format: String,
        /// Write here instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum MfaCmd {
    /// Enroll (or replace) your TOTP device: shows a QR code and its otpauth URI, then asks
    /// for your password and a code the device shows. Works before your first login.
    Add {
        #[arg(long, env = "GATEHOUSE_PROXY", conflicts_with = "auth")]
        proxy: Option<String>,
        #[arg(long, env = "GATEHOUSE_AUTH")]
        auth: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Read the password, then the device's code (after the URI is printed), then a code of
        /// the device being replaced if any, each from a line of stdin.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long, env = "GATEHOUSE_CA_PIN")]
        ca_pin: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SessionsCmd {
    /// List active sessions.
    Ls {
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProxyCmd {
    /// Bridge stdin/stdout to a node's SSH service (for OpenSSH's ProxyCommand `gsh proxy ssh %r@%h:%p`).
    Ssh {
        spec: String,
        /// A leaf cluster the node is in.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Listen locally and forward each connection to a TCP app behind the Proxy.
    Tcp {
        /// APP or APP@NODE.
        app: String,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() {
    init_logging("text", "warn");
    let cli = Cli::parse();
    gatehouse_cli::run_main("gsh", run(cli));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = match &cli.identity {
        Some(d) => d.clone(),
        None => profile_dir()?,
    };
    match cli.command {
        Command::Login {
            proxy,
            auth,
            user,
            password_stdin,
            ca_pin,
            ttl,
            otp,
        } => {
            let target = Target::resolve(&dir, proxy, auth, user, ca_pin)?;
            login(&dir, target, password_stdin, ttl, otp).await
        }
        Command::Mfa(MfaCmd::Add {
            proxy,
            auth,
            user,
            password_stdin,
            ca_pin,
        }) => {
            let target = Target::resolve(&dir, proxy, auth, user, ca_pin)?;
            let password = read_password(&target.user, password_stdin)?;
            let mut client = connect(&target.endpoint()).await?;
            let cluster = client
                .ping(proto::PingRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .cluster_name;
            gatehouse_cli::mfa::enroll(
                &mut client,
                &cluster,
                &target.user,
                password,
                &mut LinePrompts {
                    stdin: password_stdin,
                },
            )
            .await
        }
        Command::Ls {
            labels,
            apps,
            format,
            cluster,
        } => {
            let what = if apps {
                gatehouse_cli::access::Listing::Apps
            } else {
                gatehouse_cli::access::Listing::Nodes
            };
            gatehouse_cli::access::ls(&dir, &labels, what, &format, cluster.as_deref()).await
        }
        Command::Ssh {
            target,
            command,
            tty,
            cluster,
        } => {
            let code = gatehouse_cli::access::ssh(&dir, &target, &command, tty, cluster.as_deref())
                .await?;
            std::process::exit(code);
        }
        Command::Scp { args } => {
            let code = gatehouse_cli::access::scp(&dir, &args).await?;
            std::process::exit(code);
        }
        Command::Proxy(ProxyCmd::Ssh { spec, cluster }) => {
            gatehouse_cli::access::proxy_ssh(&dir, &spec, cluster.as_deref()).await
        }
        Command::Proxy(ProxyCmd::Tcp { app, listen }) => {
            gatehouse_cli::access::proxy_tcp(&dir, &app, &listen).await
        }
        Command::Config => gatehouse_cli::access::config(&dir).await,
        Command::Clusters { format } => gatehouse_cli::clusters::clusters(&dir, &format).await,
        Command::Status => status(&dir),
        Command::Logout => logout(&dir),
        Command::Passwd { stdin } => passwd(&dir, stdin).await,
        Command::Recordings(cmd) => {
            let mut client = profile_client(&dir).await?;
            match cmd {
                RecordingsCmd::Ls {
                    user,
                    node,
                    since,
                    format,
                } => {
                    gatehouse_cli::recordings::ls(
                        &mut client,
                        user,
                        node,
                        since.map(Into::into),
                        false,
                        &format,
                    )
                    .await
                }
                RecordingsCmd::Export { id, format, output } => {
                    gatehouse_cli::recordings::export(&mut client, &id, &format, output.as_deref())
                        .await
                }
            }
        }
        Command::Play {
            id,
            speed,
            skip_idle,
            from,
        } => {
            let mut client = profile_client(&dir).await?;
            let opts = gatehouse_recording::play::PlayOptions {
                speed,
                skip_idle,
                from_ms: from.map_or(0, |d| {
                    u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX)
                }),
            };
            gatehouse_cli::recordings::play(&mut client, &id, opts).await
        }
        Command::Sessions(SessionsCmd::Ls { format }) => {
            let mut client = profile_client(&dir).await?;
            gatehouse_cli::recordings::ls(&mut client, None, None, None, true, &format).await
        }
        Command::Join { id } => {
            let mut client = profile_client(&dir).await?;
            gatehouse_cli::recordings::watch(&mut client, &id).await
        }
    }
}

/// Where a login (or an enrollment) goes and whom it is for, from flags and the last profile.
struct Target {
    proxy_addr: Option<String>,
    auth: String,
    user: String,
    trust: Trust,
    pin: String,
}

impl Target {
    fn resolve(
        dir: &Path,
        proxy: Option<String>,
        auth: Option<String>,
        user: Option<String>,
        ca_pin: Option<String>,
    ) -> anyhow::Result<Self> {
        let previous = Profile::load(dir).ok();
        let proxy_addr = proxy.clone().or_else(|| {
            if auth.is_none() {
                previous.as_ref().and_then(|p| p.proxy_addr.clone())
            } else {
                None
            }
        });
        let auth = proxy
            .or(auth)
            .or_else(|| previous.as_ref().map(|p| p.auth_addr.clone()))
            .context("pass --proxy HOST:PORT (printed by `gatehouse start`)")?;
        let user = user
            .or_else(|| previous.as_ref().map(|p| p.user.clone()))
            .or_else(|| std::env::var("USER").ok())
            .context("pass --user")?;
        // No trust on first use: the pin comes from the admin, or from the previous login's CA.
        let trust = match (&ca_pin, &previous) {
            (Some(pin), _) => {
                if !pin.starts_with("sha256:") || pin.len() != 71 {
                    bail!("--ca-pin must look like sha256:<64 hex digits>");
                }
                Trust::Pin(pin.clone())
            }
            // The CAs the last login stored (both during a TLS CA rotation, so a login after
            // its grace trusts the new one), else that login's pin.
            (None, Some(p)) if p.auth_addr == auth => {
                match std::fs::read_to_string(dir.join("ca.pem")) {
                    Ok(pem) if certs_from_pem(&pem).is_ok() => Trust::CaPem(pem),
                    _ => Trust::Pin(p.ca_pin.clone()),
                }
            }
            _ => bail!(
                "first login to {auth}: pass --ca-pin sha256:… (printed by `gatehouse start`, or `gctl status`)"
            ),
        };
        let pin = match &trust {
            Trust::Pin(p) => p.clone(),
            Trust::CaPem(_) => String::new(),
        };
        Ok(Self {
            proxy_addr,
            auth,
            user,
            trust,
            pin,
        })
    }

    /// Auth without a client identity (login and enrollment are public calls).
    fn endpoint(&self) -> AuthEndpoint {
        AuthEndpoint {
            addr: self.auth.clone(),
            trust: self.trust.clone(),
            identity: None,
        }
    }
}

fn read_password(user: &str, stdin: bool) -> anyhow::Result<String> {
    if stdin {
        read_stdin_line()
    } else {
        rpassword::prompt_password(format!("Password for {user}: ")).context("reading the password")
    }
}

/// A one-time code: the next line of stdin, or asked at the terminal.
fn read_code(prompt: &str, stdin: bool) -> anyhow::Result<String> {
    if !stdin {
        use std::io::Write as _;
        eprint!("{prompt}: ");
        std::io::stderr().flush().ok();
    }
    Ok(read_stdin_line()?.trim().to_owned())
}

struct LinePrompts {
    stdin: bool,
}

impl gatehouse_cli::mfa::Prompts for LinePrompts {
    fn new_code(&mut self) -> anyhow::Result<String> {
        read_code("Code shown by the new device", self.stdin)
    }
    fn current_code(&mut self) -> anyhow::Result<String> {
        read_code("Code of the device being replaced", self.stdin)
    }
}

async fn login(
    dir: &Path,
    target: Target,
    password_stdin: bool,
    ttl: Option<humantime::Duration>,
    otp: Option<String>,
) -> anyhow::Result<()> {
    let password = read_password(&target.user, password_stdin)?;
    let Target {
        proxy_addr,
        auth,
        user,
        trust,
        pin,
    } = target;

    let ssh_key = ssh_key::PrivateKey::random(&mut rand_core_rng(), ssh_key::Algorithm::Ed25519)?;
    let tls_key = gatehouse_controlplane::ca::generate_leaf_key()?;
    let pinned = matches!(trust, Trust::Pin(_));
    let endpoint = AuthEndpoint {
        addr: auth.clone(),
        trust,
        identity: None,
    };
    let mut client = connect(&endpoint).await?;
    let mut req = proto::LoginRequest {
        user: user.clone(),
        password,
        ssh_public_key: ssh_key.public_key().to_openssh()?,
        tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls_key),
        ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
        otp: otp.unwrap_or_default(),
        via: String::new(),
    };
    let resp = match client.login(req.clone()).await {
        Ok(r) => r,
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                && s.message() == "one-time code required"
                && req.otp.is_empty() =>
        {
            req.otp = read_code("One-time code", password_stdin)?;
            client.login(req).await.map_err(rpc_error)?
        }
        Err(s) => return Err(rpc_error(s)),
    }
    .into_inner();
    let creds = resp.credentials.context("Auth sent no credentials")?;
    // The CA Auth hands us must be the one we pinned (with stored CAs, TLS checked them).
    let ca_der = certs_from_pem(&creds.tls_ca)?;
    if pinned
        && !ca_der
            .iter()
            .any(|c| spki_pin(c).as_deref() == Some(pin.as_str()))
    {
        bail!("Auth returned a CA that does not match the pin {pin}; refusing to store it");
    }
    // What the next first contact pins: the CA that signs now.
    let pin = ca_der.first().and_then(|c| spki_pin(c)).unwrap_or(pin);

    create_private_dir(dir)?;
    write_private(
        &dir.join(SSH_KEY_FILE),
        ssh_key.to_openssh(ssh_key::LineEnding::LF)?.as_bytes(),
    )?;
    write_private(
        &dir.join(format!("{SSH_KEY_FILE}.pub")),
        format!("{}\n", ssh_key.public_key().to_openssh()?).as_bytes(),
    )?;
    write_private(
        &dir.join(SSH_CERT_FILE),
        format!("{}\n", creds.ssh_cert).as_bytes(),
    )?;
    write_private(&dir.join("tls.crt"), creds.tls_cert.as_bytes())?;
    write_private(
        &dir.join("tls.key"),
        gatehouse_controlplane::tls::key_pem_for_tools(&tls_key).as_bytes(),
    )?;
    write_private(&dir.join("ca.pem"), creds.tls_ca.as_bytes())?;
    let known_hosts: String = creds
        .ssh_host_ca
        .iter()
        .map(|k| format!("@cert-authority * {k} {} host CA\n", creds.cluster_name))
        .collect();
    write_private(&dir.join("known_hosts"), known_hosts.as_bytes())?;
    let profile = Profile {
        proxy_addr,
        auth_addr: auth,
        cluster: creds.cluster_name.clone(),
        user: user.clone(),
        ca_pin: pin,
        expires: creds.expires,
        roles: resp.roles.clone(),
        logins: resp.logins.clone(),
    };
    profile.save(dir)?;
    println!(
        "Logged in to cluster \"{}\" as {user}.\n  Roles:   {}\n  Logins:  {}\n  Valid until: {}\n  Keys:    {}",
        creds.cluster_name,
        resp.roles.join(", "),
        if resp.logins.is_empty() {
            "(none)".into()
        } else {
            resp.logins.join(", ")
        },
        fmt_time(creds.expires),
        dir.display()
    );
    Ok(())
}

fn rand_core_rng() -> impl ssh_key::rand_core::CryptoRngCore {
    ssh_key::rand_core::OsRng
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    let cert_path = dir.join(SSH_CERT_FILE);
    let line = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let cert = ssh_key::Certificate::from_openssh(line.trim())
        .context("the stored SSH certificate is unreadable; log in again")?;
    let logins: Vec<&str> = cert
        .valid_principals()
        .iter()
        .map(String::as_str)
        .filter(|p| *p != NO_LOGIN_PRINTCIPAL)
        .collect();
    let roles: Vec<String> = cert
        .extensions()
        .get(ssh_ext::ROLES)
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expires = cert.valid_before() as i64;
    let validity = if expires > now {
        format!(
            "valid for {}",
            humantime::format_duration(std::time::Duration::from_secs((expires - now) as u64))
        )
    } else {
        "EXPIRED: run gsh login".to_string()
    };
    let extensions: Vec<&str> = cert
        .extensions()
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("permit-"))
        .collect();
    println!(
        "> Profile:   {}\n  Auth:      {}\n  Cluster:   {}\n  User:      {}\n  Roles:     {}\n  Logins:    {}\n  Permits:   {}\n  Expires:   {} ({validity})",
        dir.display(),
        profile.auth_addr,
        profile.cluster,
        cert.key_id(),
        roles.join(", "),
        if logins.is_empty() {
            "(none)".into()
        } else {
            logins.join(", ")
        },
        extensions.join(", "),
        fmt_time(expires),
    );
    if expires <= now {
        std::process::exit(1);
    }
    Ok(())
}

fn logout(dir: &Path) -> anyhow::Result<()> {
    let mut removed = 0;
    for f in [
        SSH_KEY_FILE,
        &format!("{SSH_KEY_FILE}.pub"),
        SSH_CERT_FILE,
        "tls.crt",
        "tls.key",
        "known_hosts",
        "profile.toml",
        "ca.pem",
    ] {
        if std::fs::remove_file(dir.join(f)).is_ok() {
            removed += 1;
        }
    }
    if removed == 0 {
        println!("Not logged in.");
    } else {
        println!(
            "Logged out: keys and certificates removed from {}",
            dir.display()
        );
    }
    Ok(())
}

/// An Auth client with the logged-in profile's identity.
async fn profile_client(dir: &Path) -> anyhow::Result<gatehouse_controlplane::client::Client> {
    let profile = Profile::load(dir)?;
    connect(&identity_endpoint(dir, &profile.auth_addr)?).await
}

async fn passwd(dir: &Path, stdin: bool) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    let (old, new) = if stdin {
        (read_stdin_line()?, read_stdin_line()?)
    } else {
        let old = rpassword::prompt_password("Current password: ")?;
        let new = rpassword::prompt_password("New password: ")?;
        let again = rpassword::prompt_password("New password again: ")?;
        if new != again {
            bail!("the new passwords do not match");
        }
        (old, new)
    };
    let endpoint = identity_endpoint(dir, &profile.auth_addr)?;
    let mut client = connect(&endpoint).await?;
    client
        .change_password(proto::ChangePasswordRequest {
            old_password: old,
            new_password: new,
        })
        .await
        .map_err(rpc_error)?;
    println!("Password changed.");
    Ok(())
}
