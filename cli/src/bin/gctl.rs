//! `gctl`: cluster administration. Authenticates with the admin identity in the Auth data dir
//! (`<data-dir>/admin/`), an identity dir given with `--identity`, or the `gsh login` profile.

// serde_json::Value's Index returns Null on a miss and cannot panic; gctl only indexes JSON
// that its own Auth server produced, to print it.
#![allow(clippy::indexing_slicing)]

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use gatehouse_cli::{
    Profile, RunAddresses, connect, fmt_time, identity_endpoint, init_logging, print_table,
    profile_dir, rpc_error,
};
use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::resources::{self, Resource};

#[derive(Parser, Debug)]
#[command(name = "gctl", version, about = "Administer a Gatehouse cluster")]
struct Cli {
    /// Auth API address. Default: from the data dir, else the gsh profile, else 127.0.0.1:3025.
    #[arg(long, global = true, env = "GATEHOUSE_AUTH")]
    auth: Option<String>,
    /// Auth data dir whose admin identity to use.
    #[arg(
        long,
        global = true,
        default_value = "gatehouse-data",
        env = "GATEHOUSE_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Identity directory (tls.crt, tls.key, ca.pem) to use instead of the admin identity.
    #[arg(long, global = true)]
    identity: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Create or update resources from a TOML or JSON file.
    Create {
        /// Resource file (TOML or JSON).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Overwrite the resource if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Show resources: roles, users, tokens, nodes.
    Get {
        /// roles | users | tokens | nodes, optionally KIND/NAME.
        what: String,
        /// text, json or toml.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Delete a resource: role/NAME, user/NAME, token/ID, node/HOST_ID, trusted_cluster/NAME
    /// (on a leaf: stop trusting the root; on the root: forget the leaf).
    Rm { target: String },
    /// Manage join tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Machine ID bots: add (prints the join token), ls, rm, unlock.
    #[command(subcommand)]
    Bots(gatehouse_cli::bot::admin::BotsCmd),
    /// Lock a user, bot, node or role now: its calls are refused, its live sessions and
    /// tunnels end with the message, renewals are refused.
    Lock(gatehouse_cli::locks::LockArgs),
    /// The locks in force: ls, rm.
    #[command(subcommand)]
    Locks(gatehouse_cli::locks::LocksCmd),
    /// Certificate authorities.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Search the audit log.
    Events(EventsArgs),
    /// Session recordings: list, and verify one's chunks, digest and host signature.
    #[command(subcommand)]
    Recordings(RecordingsCmd),
    /// Show the cluster Auth serves and who gctl is.
    Status,
}

#[derive(Subcommand, Debug)]
enum UsersCmd {
    /// Add a user; prints a generated initial password once.
    Add {
        name: String,
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        logins: Vec<String>,
    },
    /// List users.
    Ls,
    /// Remove a user.
    Rm { name: String },
    /// Reset a user's password; prints the new one once.
    Reset { name: String },
}

#[derive(Subcommand, Debug)]
enum TokensCmd {
    /// Create a join token; prints the secret once.
    Add {
        /// node | bot | trusted_cluster
        #[arg(long = "type", default_value = "node")]
        token_type: String,
        /// Time to live, e.g. 30m, 2h.
        #[arg(long, default_value = "30m")]
        ttl: humantime::Duration,
        /// Joins it allows; 0 = unlimited until it expires.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// For bot tokens: the bot's name.
        #[arg(long, default_value = "")]
        bot_name: String,
    },
    /// List tokens (never their secrets).
    Ls,
    /// Remove a token by id (or by its secret).
    Rm { id: String },
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
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Check a recording: every chunk's checksum and sequence, the SHA-256 in its trailer, and
    /// the recording agent's signature against the cluster's host CA. Fails naming the chunk.
    Verify { id: String },
}

#[derive(Subcommand, Debug)]
enum AuthCmd {
    /// Export a CA's public key: user (sshd TrustedUserCAKeys line), host (known_hosts
    /// @cert-authority line) or tls (PEM).
    Export {
        #[arg(long = "type")]
        ca_type: String,
    },
    /// Rotate a CA: a new key signs from now on; the old one stays trusted (exports, agents,
    /// clients) for the grace period, then is dropped. --rollback, before the grace ends, makes
    /// the previous key the signer again.
    Rotate {
        /// user, host or tls (the X.509 CA: during the grace its certificates carry the new CA
        /// cross-signed by the old one, so parties that trust only the old CA go on working).
        #[arg(long = "type")]
        ca_type: String,
        /// How long the key replaced stays trusted.
        #[arg(long, default_value = "24h")]
        grace: humantime::Duration,
        #[arg(long)]
        rollback: bool,
    },
}

#[derive(clap::Args, Debug)]
struct EventsArgs {
    /// Events newer than this long ago (e.g. 1h, 7d). Ignored when --from is given.
    #[arg(long, default_value = "24h")]
    since: humantime::Duration,
    /// Start time, RFC 3339.
    #[arg(long)]
    from: Option<String>,
    /// End time, RFC 3339.
    #[arg(long)]
    to: Option<String>,
    /// Only these event types (repeatable), e.g. user.login.
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events of this actor (a user, bot or node name).
    #[arg(long, alias = "user")]
    actor: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// table or json (one JSON object per line).
    #[arg(long, default_value = "table")]
    format: String,
}

fn main() {
    init_logging("text", "warn");
    let cli = Cli::parse();
    gatehouse_cli::run_main("gctl", run(cli));
}

fn endpoint(cli: &Cli) -> anyhow::Result<AuthEndpoint> {
    let from_run = RunAddresses::load(&cli.data_dir).and_then(|r| r.auth);
    if let Some(dir) = &cli.identity {
        // A gbot or gsh identity knows where Auth is (through its proxy).
        let from_profile = Profile::load(dir).ok().map(|p| p.auth_addr);
        let addr = cli
            .auth
            .clone()
            .or(from_profile)
            .or(from_run)
            .unwrap_or_else(|| "127.0.0.1:3025".into());
        return identity_endpoint(dir, &addr);
    }
    let admin = cli.data_dir.join("admin");
    if admin.join("tls.crt").exists() {
        let addr = cli
            .auth
            .clone()
            .or(from_run)
            .unwrap_or_else(|| "127.0.0.1:3025".into());
        return identity_endpoint(&admin, &addr);
    }
    let dir = profile_dir()?;
    let profile = Profile::load(&dir).context(
        "no admin identity found (run gctl on the Auth host with --data-dir, or pass --identity) and no gsh login",
    )?;
    identity_endpoint(&dir, cli.auth.as_deref().unwrap_or(&profile.auth_addr))
}

fn parse_time(s: &str) -> anyhow::Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-24T10:00:00Z)"))?;
    Ok(t.unix_timestamp_nanos() as i64)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = connect(&endpoint(&cli)?).await?;
    match cli.command {
        Command::Users(cmd) => users(&mut client, cmd).await,
        Command::Create { file, force } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let resource = resources::parse_document(&text)
                .with_context(|| format!("{} is not a valid resource", file.display()))?;
            let kind = resource.kind().as_str();
            let req = proto::UpsertResourceRequest {
                kind: kind.into(),
                json: resource.to_json(),
                create_only: !force,
            };
            let created = client
                .upsert_resource(req)
                .await
                .map_err(rpc_error)?
                .into_inner()
                .created;
            println!(
                "{kind} \"{}\" has been {}",
                resource.name(),
                if created { "created" } else { "updated" }
            );
            Ok(())
        }
        Command::Get { what, format } => get(&mut client, &what, &format).await,
        Command::Rm { target } => {
            let (kind, name) = target
                .split_once('/')
                .context("expected KIND/NAME, e.g. role/dev or token/ID")?;
            match kind {
                "token" | "tokens" => {
                    client
                        .delete_token(proto::DeleteTokenRequest { id: name.into() })
                        .await
                        .map_err(rpc_error)?;
                }
                "role" | "roles" | "user" | "users" | "node" | "nodes" | "trusted_cluster"
                | "trusted_clusters" => {
                    let kind = kind.trim_end_matches('s');
                    client
                        .delete_resource(proto::DeleteResourceRequest {
                            kind: kind.into(),
                            name: name.into(),
                        })
                        .await
                        .map_err(rpc_error)?;
                }
                other => bail!(
                    "unknown kind `{other}`; expected role, user, token, node or trusted_cluster"
                ),
            }
            println!("{target} has been deleted");
            Ok(())
        }
        Command::Tokens(cmd) => tokens(&mut client, cmd).await,
        Command::Bots(cmd) => gatehouse_cli::bot::admin::run(&mut client, cmd).await,
        Command::Lock(args) => gatehouse_cli::locks::lock(&mut client, args).await,
        Command::Locks(cmd) => gatehouse_cli::locks::locks(&mut client, cmd).await,
        Command::Auth(AuthCmd::Export { ca_type }) => {
            let text = client
                .export_authorities(proto::ExportAuthoritiesRequest { r#type: ca_type })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .text;
            print!("{text}");
            Ok(())
        }
        Command::Auth(AuthCmd::Rotate {
            ca_type,
            grace,
            rollback,
        }) => {
            let resp = client
                .rotate_cert_authority(proto::RotateCertAuthorityRequest {
                    r#type: ca_type.clone(),
                    grace_seconds: grace.as_secs(),
                    rollback,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let what = if rollback { "rolled back" } else { "rotated" };
            println!(
                "The {ca_type} CA {what}. Signing with:\n  {}\nThe key it replaced stays trusted until {}.\nTrusted now (gctl auth export --type {ca_type}):",
                resp.trusted.first().map(String::as_str).unwrap_or(""),
                gatehouse_cli::fmt_time(resp.previous_trusted_until)
            );
            for key in &resp.trusted {
                println!("  {key}");
            }
            Ok(())
        }
        Command::Events(args) => events(&mut client, args).await,
        Command::Recordings(RecordingsCmd::Ls {
            user,
            node,
            since,
            format,
        }) => {
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
        Command::Recordings(RecordingsCmd::Verify { id }) => {
            gatehouse_cli::recordings::verify(&mut client, &id).await
        }
        Command::Status => {
            let ping = client
                .ping(proto::PingRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let me = client
                .who_am_i(proto::WhoAmIRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let me: serde_json::Value = serde_json::from_str(&me.identity_json).unwrap_or_default();
            println!(
                "Cluster:  {}\nVersion:  {}\nCA pin:   {}\nYou are:  {} ({})",
                ping.cluster_name,
                ping.server_version,
                ping.ca_pin,
                me["name"].as_str().unwrap_or("?"),
                me["kind"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

async fn users(client: &mut Client, cmd: UsersCmd) -> anyhow::Result<()> {
    match cmd {
        UsersCmd::Add {
            name,
            mut roles,
            mut logins,
        } => {
            roles.retain(|r| !r.is_empty());
            logins.retain(|l| !l.is_empty());
            let resp = client
                .create_user(proto::CreateUserRequest {
                    name: name.clone(),
                    roles,
                    logins,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            println!(
                "User \"{name}\" has been created.\nInitial password (shown once; change it with `gsh passwd`):\n{}",
                resp.initial_password
            );
        }
        UsersCmd::Ls => {
            let list = client
                .list_resources(proto::ListResourcesRequest {
                    kind: "user".into(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let rows = list
                .json
                .iter()
                .filter_map(|j| resources::parse_document(j).ok())
                .filter_map(|r| match r {
                    Resource::User(u) => Some(vec![
                        u.metadata.name.clone(),
                        u.spec.roles.join(","),
                        u.spec
                            .traits
                            .get("logins")
                            .map(|l| l.join(","))
                            .unwrap_or_default(),
                    ]),
                    _ => None,
                })
                .collect::<Vec<_>>();
            print_table(&["User", "Roles", "Logins"], &rows);
        }
        UsersCmd::Rm { name } => {
            client
                .delete_resource(proto::DeleteResourceRequest {
                    kind: "user".into(),
                    name: name.clone(),
                })
                .await
                .map_err(rpc_error)?;
            println!("User \"{name}\" has been deleted");
        }
        UsersCmd::Reset { name } => {
            let resp = client
                .reset_password(proto::ResetPasswordRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            println!(
                "Password of \"{name}\" has been reset.\nNew password (shown once):\n{}",
                resp.password
            );
        }
    }
    Ok(())
}

async fn tokens(client: &mut Client, cmd: TokensCmd) -> anyhow::Result<()> {
    match cmd {
        TokensCmd::Add {
            token_type,
            ttl,
            uses,
            bot_name,
        } => {
            let resp = client
                .create_token(proto::CreateTokenRequest {
                    r#type: token_type,
                    ttl_seconds: ttl.as_secs(),
                    max_uses: uses,
                    bot_name,
                    labels: vec![],
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let info = resp.info.unwrap_or_default();
            println!(
                "Join token (shown once): {}\nId: {}  Type: {}  Expires: {}  Uses: {}",
                resp.token,
                info.id,
                info.r#type,
                fmt_time(info.expires),
                if info.max_uses == 0 {
                    "unlimited".to_string()
                } else {
                    info.max_uses.to_string()
                }
            );
        }
        TokensCmd::Ls => print_tokens(client).await?,
        TokensCmd::Rm { id } => {
            client
                .delete_token(proto::DeleteTokenRequest { id: id.clone() })
                .await
                .map_err(rpc_error)?;
            println!("Token {id} has been deleted");
        }
    }
    Ok(())
}

async fn print_tokens(client: &mut Client) -> anyhow::Result<()> {
    let list = client
        .list_tokens(proto::ListTokensRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let rows = list
        .tokens
        .iter()
        .map(|t| {
            let state = if t.expires <= now {
                "expired"
            } else if t.max_uses != 0 && t.uses >= t.max_uses {
                "used up"
            } else {
                "active"
            };
            vec![
                t.id.clone(),
                t.r#type.clone(),
                fmt_time(t.expires),
                format!(
                    "{}/{}",
                    t.uses,
                    if t.max_uses == 0 {
                        "∞".into()
                    } else {
                        t.max_uses.to_string()
                    }
                ),
                state.into(),
                t.created_by.clone(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &["Id", "Type", "Expires", "Uses", "State", "Created by"],
        &rows,
    );
    Ok(())
}

async fn get(client: &mut Client, what: &str, format: &str) -> anyhow::Result<()> {
    let (kind, name) = match what.split_once('/') {
        Some((k, n)) => (k, Some(n)),
        None => (what, None),
    };
    let kind = kind.trim_end_matches('s');
    match kind {
        "role" | "user" | "trusted_cluster" => {
            let docs = match name {
                Some(n) => vec![
                    client
                        .get_resource(proto::GetResourceRequest {
                            kind: kind.into(),
                            name: n.into(),
                        })
                        .await
                        .map_err(rpc_error)?
                        .into_inner()
                        .json,
                ],
                None => {
                    client
                        .list_resources(proto::ListResourcesRequest { kind: kind.into() })
                        .await
                        .map_err(rpc_error)?
                        .into_inner()
                        .json
                }
            };
            let values: Vec<serde_json::Value> = docs
                .iter()
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect();
            match format {
                "json" => println!("{}", serde_json::to_string_pretty(&values)?),
                "toml" => {
                    for v in &values {
                        println!("{}", toml::to_string(v)?);
                    }
                }
                _ => {
                    let rows: Vec<Vec<String>> = values
                        .iter()
                        .map(|v| {
                            let name = v["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string();
                            if kind == "role" {
                                let logins = v["spec"]["allow"]["logins"]
                                    .as_array()
                                    .map(|a| {
                                        a.iter()
                                            .filter_map(|x| x.as_str())
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    })
                                    .unwrap_or_default();
                                vec![
                                    name,
                                    v["metadata"]["description"]
                                        .as_str()
                                        .unwrap_or_default()
                                        .into(),
                                    logins,
                                ]
                            } else {
                                let roles = v["spec"]["roles"]
                                    .as_array()
                                    .map(|a| {
                                        a.iter()
                                            .filter_map(|x| x.as_str())
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    })
                                    .unwrap_or_default();
                                vec![name, roles]
                            }
                        })
                        .collect();
                    if kind == "role" {
                        print_table(&["Role", "Description", "Allowed logins"], &rows);
                    } else {
                        print_table(&["User", "Roles"], &rows);
                    }
                }
            }
        }
        "token" => print_tokens(client).await?,
        "node" => {
            let nodes = client
                .list_nodes(proto::ListNodesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .nodes;
            if format == "json" {
                let v: Vec<_> = nodes.iter().map(|n| serde_json::json!({"host_id": n.host_id, "name": n.name, "labels": n.labels, "addresses": n.addresses, "services": n.services, "last_seen": n.last_seen})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        let labels = n
                            .labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        vec![
                            n.name.clone(),
                            n.host_id.clone(),
                            n.addresses.join(","),
                            labels,
                            fmt_time(n.last_seen),
                        ]
                    })
                    .collect();
                print_table(
                    &["Node", "Host id", "Addresses", "Labels", "Last seen"],
                    &rows,
                );
            }
        }
        other => bail!("unknown kind `{other}`; expected roles, users, tokens or nodes"),
    }
    Ok(())
}

async fn events(client: &mut Client, args: EventsArgs) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
    let from = match &args.from {
        Some(s) => parse_time(s)?,
        None => now - args.since.as_nanos() as i64,
    };
    let to = match &args.to {
        Some(s) => parse_time(s)?,
        None => 0,
    };
    let mut all = Vec::new();
    let mut after_id = 0;
    while (all.len() as u32) < args.limit {
        let page = (args.limit - all.len() as u32).min(1000);
        let resp = client
            .search_events(proto::SearchEventsRequest {
                from_nanos: from,
                to_nanos: to,
                types: args.types.clone(),
                limit: page,
                after_id,
                actor: args.actor.clone().unwrap_or_default(),
                newest_first: false,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        let n = resp.events.len();
        if let Some(last) = resp.events.last() {
            after_id = last.id;
        }
        all.extend(resp.events);
        if (n as u32) < page {
            break;
        }
    }
    if args.format == "json" {
        for e in &all {
            let data: serde_json::Value = serde_json::from_str(&e.data_json).unwrap_or_default();
            let line = serde_json::json!({
                "id": e.id, "event_id": e.event_id, "type": e.r#type,
                "time": fmt_time_nanos(e.time_nanos), "actor": e.actor, "source_addr": e.source_addr,
                "cluster": e.cluster, "data": data,
            });
            println!("{line}");
        }
    } else {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|e| {
                vec![
                    e.id.to_string(),
                    fmt_time_nanos(e.time_nanos),
                    e.r#type.clone(),
                    e.actor.clone(),
                    e.source_addr.clone(),
                    e.data_json.clone(),
                ]
            })
            .collect();
        print_table(&["Id", "Time", "Type", "Actor", "Source", "Details"], &rows);
    }
    Ok(())
}

fn fmt_time_nanos(n: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(n as i128)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| n.to_string())
}
