//! `gctl lock` and `gctl locks`: stop a user, bot, node or role now (Auth refuses its calls,
//! proxies and agents end its sessions and tunnels), list the locks in force, remove one.

use anyhow::bail;
use clap::{Args, Subcommand};
use gatehouse_controlplane::client::Client;
use gatehouse_controlplane::locks::Lock;
use gatehouse_controlplane::proto;

use crate::{fmt_time, print_table, rpc_error};

/// What `gctl lock` stops: exactly one target.
#[derive(Args, Debug)]
pub struct LockArgs {
    #[arg(long, group = "target")]
    pub user: Option<String>,
    #[arg(long, group = "target")]
    pub bot: Option<String>,
    /// A node name or host id (agents and proxies).
    #[arg(long, group = "target")]
    pub node: Option<String>,
    /// Everyone holding this role.
    #[arg(long, group = "target")]
    pub role: Option<String>,
    /// Lift the lock by itself after this long (e.g. 1h); default: until `gctl locks rm`.
    #[arg(long)]
    pub ttl: Option<humantime::Duration>,
    /// What the locked party reads when its sessions end and its calls are refused.
    #[arg(long, default_value = "")]
    pub message: String,
}

#[derive(Subcommand, Debug)]
pub enum LocksCmd {
    /// The locks in force.
    Ls {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Remove a lock by name (`user:alice`, `node:web1`, …).
    Rm { name: String },
}

pub async fn lock(client: &mut Client, args: LockArgs) -> anyhow::Result<()> {
    let (kind, target) = match (args.user, args.bot, args.node, args.role) {
        (Some(t), None, None, None) => ("user", t),
        (None, Some(t), None, None) => ("bot", t),
        (None, None, Some(t), None) => ("node", t),
        (None, None, None, Some(t)) => ("role", t),
        _ => bail!("name one of --user, --bot, --node or --role"),
    };
    let resp = client
        .create_lock(proto::CreateLockRequest {
            kind: kind.into(),
            target,
            message: args.message,
            ttl_seconds: args.ttl.map(|d| d.as_secs()).unwrap_or(0),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let lock: Lock = serde_json::from_str(&resp.lock_json)?;
    let until = if lock.expires == 0 {
        "until removed".to_owned()
    } else {
        format!("until {}", fmt_time(lock.expires))
    };
    println!(
        "Locked {} `{}` ({until}); lock name `{}`. Remove it with: gctl locks rm {}",
        lock.kind.as_str(),
        lock.target,
        lock.name,
        lock.name
    );
    Ok(())
}

pub async fn locks(client: &mut Client, cmd: LocksCmd) -> anyhow::Result<()> {
    match cmd {
        LocksCmd::Ls { format } => {
            let resp = client
                .list_locks(proto::ListLocksRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let locks: Vec<Lock> = resp
                .locks_json
                .iter()
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect();
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&locks)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = locks
                .iter()
                .map(|l| {
                    vec![
                        l.name.clone(),
                        l.kind.as_str().to_owned(),
                        l.target.clone(),
                        if l.expires == 0 {
                            "never".into()
                        } else {
                            fmt_time(l.expires)
                        },
                        l.created_by.clone(),
                        l.message.clone(),
                    ]
                })
                .collect();
            print_table(
                &["Name", "Kind", "Target", "Expires", "By", "Message"],
                &rows,
            );
            Ok(())
        }
        LocksCmd::Rm { name } => {
            client
                .delete_lock(proto::DeleteLockRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?;
            println!("Lock `{name}` removed.");
            Ok(())
        }
    }
}
