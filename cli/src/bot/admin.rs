//! `gctl bots`: add a bot (its roles are ordinary roles; its single-use join token is printed
//! once), list, remove, and unlock one that theft detection locked.

use clap::Subcommand;
use gatehouse_controlplane::client::Client;
use gatehouse_controlplane::proto;

use crate::{fmt_time, print_table, rpc_error};

#[derive(Subcommand, Debug)]
pub enum BotsCmd {
    /// Add a bot with these roles; prints its single-use join token once.
    Add {
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// How long the join token stays usable.
        #[arg(long, default_value = "1h")]
        token_ttl: humantime::Duration,
    },
    /// List bots: roles, generation, last renewal, lock.
    Ls {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Remove a bot (its identity can no longer renew; unused tokens go too).
    Rm { name: String },
    /// Lift the lock a copied identity put on a bot (after joining it again with a new token:
    /// `gctl tokens add --type bot --bot-name NAME`).
    Unlock { name: String },
}

pub async fn run(client: &mut Client, cmd: BotsCmd) -> anyhow::Result<()> {
    match cmd {
        BotsCmd::Add {
            name,
            roles,
            token_ttl,
        } => {
            let resp = client
                .create_bot(proto::CreateBotRequest {
                    name: name.clone(),
                    roles: roles.clone(),
                    token_ttl_seconds: token_ttl.as_secs(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let pin = client
                .ping(proto::PingRequest {})
                .await
                .map(|r| r.into_inner().ca_pin)
                .unwrap_or_else(|_| "sha256:…".into());
            println!(
                "Bot \"{name}\" added with roles {}.\n\
                 Its join token (single use, valid for {token_ttl}), shown only now:\n\n  {}\n\n\
                 Start it on its machine with:\n\n  gbot start --proxy PROXY_HOST:3080 --token {} --ca-pin {pin} \\\n      \
                 --data-dir /var/lib/gbot --destination /opt/machine-id",
                roles.join(", "),
                resp.token,
                resp.token
            );
        }
        BotsCmd::Ls { format } => {
            let bots = client
                .list_bots(proto::ListBotsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .bots;
            if format == "json" {
                let v: Vec<_> = bots
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "name": b.name, "roles": b.roles, "generation": b.generation,
                            "last_seen": b.last_seen, "last_addr": b.last_addr,
                            "locked": b.locked, "lock_reason": b.lock_reason,
                            "created": b.created, "created_by": b.created_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = bots
                .iter()
                .map(|b| {
                    vec![
                        b.name.clone(),
                        b.roles.join(","),
                        b.generation.to_string(),
                        if b.last_seen == 0 {
                            "never joined".into()
                        } else {
                            format!("{} from {}", fmt_time(b.last_seen), b.last_addr)
                        },
                        if b.locked {
                            format!("LOCKED: {}", b.lock_reason)
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            print_table(
                &["Bot", "Roles", "Generation", "Last renewal", "Lock"],
                &rows,
            );
        }
        BotsCmd::Rm { name } => {
            client
                .delete_bot(proto::DeleteBotRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?;
            println!("bot \"{name}\" has been removed");
        }
        BotsCmd::Unlock { name } => {
            let was = client
                .unlock_bot(proto::UnlockBotRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .was_locked;
            if was {
                println!("bot \"{name}\" is unlocked");
            } else {
                println!("bot \"{name}\" was not locked");
            }
        }
    }
    Ok(())
}
