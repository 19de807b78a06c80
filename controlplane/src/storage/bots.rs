//! Machine ID bots: their roles, and the current instance and generation of their identity.
//! Renewals are written in batches (one transaction, one fsync for many renewals and their
//! audit events): see `server::bots`.

use sqlx::Row;

use super::{Store, StoreError, StoredEvent};

/// One bot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotRow {
    pub name: String,
    pub roles: Vec<String>,
    pub created: i64,
    pub created_by: String,
    /// The current join's instance id (empty before the first join).
    pub instance: String,
    pub generation: i64,
    pub last_seen: i64,
    pub last_addr: String,
    pub locked: bool,
    pub lock_reason: String,
}

/// A renewal to write: the bot's identity as presented (name, instance, generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewOp {
    pub name: String,
    pub instance: String,
    pub generation: i64,
    pub addr: String,
    pub now: i64,
}

/// What became of a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Written: the identity's new generation.
    Renewed(i64),
    /// The bot no longer exists.
    NoBot,
    /// The bot is locked (by an earlier theft detection); the reason.
    Locked(String),
    /// The identity belongs to an earlier join of the bot.
    Superseded,
    /// An older (or unknown) generation of the current instance: the identity was copied. The
    /// bot is now locked; the address of the last good renewal and its generation.
    Stolen { last_addr: String, current: i64 },
}

const COLUMNS: &str = "name, roles, created, created_by, instance, generation, last_seen, last_addr, locked, lock_reason";

fn row(r: &sqlx::sqlite::SqliteRow) -> BotRow {
    let roles: String = r.get(1);
    BotRow {
        name: r.get(0),
        roles: serde_json::from_str(&roles).unwrap_or_default(),
        created: r.get(2),
        created_by: r.get(3),
        instance: r.get(4),
        generation: r.get(5),
        last_seen: r.get(6),
        last_addr: r.get(7),
        locked: r.get::<i64, _>(8) != 0,
        lock_reason: r.get(9),
    }
}

impl Store {
    pub async fn create_bot(&self, b: &BotRow) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO bots (name, roles, created, created_by) VALUES (?, ?, ?, ?)",
        )
        .bind(&b.name)
        .bind(serde_json::to_string(&b.roles).unwrap_or_else(|_| "[]".into()))
        .bind(b.created)
        .bind(&b.created_by)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists {
                kind: "bot",
                name: b.name.clone(),
            });
        }
        Ok(())
    }

    pub async fn get_bot(&self, name: &str) -> Result<Option<BotRow>, StoreError> {
        let r = sqlx::query(&format!("SELECT {COLUMNS} FROM bots WHERE name = ?"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(row))
    }

    pub async fn list_bots(&self) -> Result<Vec<BotRow>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM bots ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(row).collect())
    }

    /// Delete a bot and its unused join tokens.
    pub async fn delete_bot(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM bots WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "bot",
                name: name.to_owned(),
            });
        }
        sqlx::query("DELETE FROM tokens WHERE type = 'bot' AND bot_name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A join: a new instance at generation 1 (the lock, if any, stays until an admin lifts it).
    pub async fn join_bot(
        &self,
        name: &str,
        instance: &str,
        now: i64,
        addr: &str,
    ) -> Result<BotRow, StoreError> {
        let r = sqlx::query(&format!(
            "UPDATE bots SET instance = ?, generation = 1, last_seen = ?, last_addr = ? WHERE name = ? RETURNING {COLUMNS}"
        ))
        .bind(instance)
        .bind(now)
        .bind(addr)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(row).ok_or_else(|| StoreError::NotFound {
            kind: "bot",
            name: name.to_owned(),
        })
    }

    /// Lift a bot's lock. Returns whether it was locked.
    pub async fn unlock_bot(&self, name: &str) -> Result<bool, StoreError> {
        let Some(b) = self.get_bot(name).await? else {
            return Err(StoreError::NotFound {
                kind: "bot",
                name: name.to_owned(),
            });
        };
        sqlx::query("UPDATE bots SET locked = 0, lock_reason = '' WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(b.locked)
    }

    /// Write a batch of renewals in one transaction, with the audit events `events` makes of
    /// their outcomes: all durable, or none.
    pub async fn renew_bots(
        &self,
        ops: &[RenewOp],
        mut events: impl FnMut(&RenewOp, &RenewOutcome) -> Vec<StoredEvent>,
    ) -> Result<Vec<RenewOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut audit = Vec::new();
        for op in ops {
            let renewed: Option<i64> = sqlx::query_scalar(
                "UPDATE bots SET generation = generation + 1, last_seen = ?, last_addr = ? WHERE name = ? AND instance = ? AND generation = ? AND locked = 0 RETURNING generation",
            )
            .bind(op.now)
            .bind(&op.addr)
            .bind(&op.name)
            .bind(&op.instance)
            .bind(op.generation)
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = match renewed {
                Some(g) => RenewOutcome::Renewed(g),
                None => {
                    let current =
                        sqlx::query(&format!("SELECT {COLUMNS} FROM bots WHERE name = ?"))
                            .bind(&op.name)
                            .fetch_optional(&mut *tx)
                            .await?
                            .as_ref()
                            .map(row);
                    match current {
                        None => RenewOutcome::NoBot,
                        Some(b) if b.instance != op.instance => RenewOutcome::Superseded,
                        Some(b) if b.locked => RenewOutcome::Locked(b.lock_reason),
                        Some(b) => {
                            let reason = format!(
                                "generation {} was presented from {} after generation {} was issued to {}: the identity was copied",
                                op.generation, op.addr, b.generation, b.last_addr
                            );
                            sqlx::query(
                                "UPDATE bots SET locked = 1, lock_reason = ? WHERE name = ?",
                            )
                            .bind(&reason)
                            .bind(&op.name)
                            .execute(&mut *tx)
                            .await?;
                            RenewOutcome::Stolen {
                                last_addr: b.last_addr,
                                current: b.generation,
                            }
                        }
                    }
                }
            };
            audit.extend(events(op, &outcome));
            outcomes.push(outcome);
        }
        for e in &audit {
            super::insert_event(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}
