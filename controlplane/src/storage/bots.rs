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

fn row(r: &sqlx::any::AnyRow) -> BotRow {
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
            "INSERT INTO bots (name, roles, created, created_by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
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
        let r = sqlx::query(&format!("SELECT {COLUMNS} FROM bots WHERE name = $1"))
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
        let done = sqlx::query("DELETE FROM bots WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "bot",
                name: name.to_owned(),
            });
        }
        sqlx::query("DELETE FROM tokens WHERE type = 'bot' AND bot_name = $1")
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
            "UPDATE bots SET instance = $1, generation = 1, last_seen = $2, last_addr = $3 WHERE name = $4 RETURNING {COLUMNS}"
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
        sqlx::query("UPDATE bots SET locked = 0, lock_reason = '' WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(b.locked)
    }

    /// Write a batch of renewals in one transaction, with the audit events `events` makes of
    /// their outcomes: all durable, or none. The first renewal of each bot in the batch is
    /// written by one set-based `UPDATE … FROM` per chunk; the ones it did not renew (and any
    /// later renewal of the same bot in the batch) are then taken one by one, in order, as if
    /// the batch had been written a renewal at a time.
    pub async fn renew_bots(
        &self,
        ops: &[RenewOp],
        mut events: impl FnMut(&RenewOp, &RenewOutcome) -> Vec<StoredEvent>,
    ) -> Result<Vec<RenewOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut seen = std::collections::HashSet::with_capacity(ops.len());
        let first: Vec<bool> = ops.iter().map(|op| seen.insert(op.name.as_str())).collect();
        let firsts: Vec<&RenewOp> = ops
            .iter()
            .zip(&first)
            .filter_map(|(op, &f)| f.then_some(op))
            .collect();
        let mut renewed = std::collections::HashMap::with_capacity(firsts.len());
        for chunk in firsts.chunks(RENEW_CHUNK) {
            renewed.extend(renew_set(&mut tx, chunk, self.backend).await?);
        }
        let mut audit = Vec::new();
        let mut done = Vec::with_capacity(ops.len());
        for (op, &is_first) in ops.iter().zip(&first) {
            let outcome = match renewed.get(op.name.as_str()) {
                Some(&g) if is_first => RenewOutcome::Renewed(g),
                _ => renew_one(&mut tx, op, is_first).await?,
            };
            audit.extend(events(op, &outcome));
            done.push(outcome);
        }
        for chunk in audit.chunks(super::EVENT_CHUNK) {
            super::insert_events(&mut tx, self.backend, chunk).await?;
        }
        tx.commit().await?;
        Ok(done)
    }
}

/// Renewals per set-based statement (five parameters each; SQLite allows 32,766).
const RENEW_CHUNK: usize = 1000;

/// Renew the bots of `chunk` (distinct names) whose presented instance and generation are the
/// current ones and that are not locked; their new generations by name.
async fn renew_set(
    tx: &mut super::Tx<'_>,
    chunk: &[&RenewOp],
    backend: super::Backend,
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    let mut sql = String::from("WITH v (name, instance, generation, seen, addr) AS (VALUES ");
    super::values(&mut sql, chunk.len(), 5, backend);
    sql.push_str(
        ") UPDATE bots SET generation = bots.generation + 1, last_seen = v.seen, last_addr = v.addr \
         FROM v WHERE bots.name = v.name AND bots.instance = v.instance \
         AND bots.generation = v.generation AND bots.locked = 0 \
         RETURNING bots.name, bots.generation",
    );
    let mut q = sqlx::query(&sql);
    for op in chunk {
        q = q
            .bind(&op.name)
            .bind(&op.instance)
            .bind(op.generation)
            .bind(op.now)
            .bind(&op.addr);
    }
    let rows = q.fetch_all(&mut **tx).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect())
}

/// One renewal on its own: try it (unless the set-based statement already did, `tried`), and
/// if it was not current, say why (locking the bot when the identity was copied).
async fn renew_one(
    tx: &mut super::Tx<'_>,
    op: &RenewOp,
    tried: bool,
) -> Result<RenewOutcome, StoreError> {
    if !tried {
        let renewed: Option<i64> = sqlx::query_scalar(
            "UPDATE bots SET generation = generation + 1, last_seen = $1, last_addr = $2 WHERE name = $3 AND instance = $4 AND generation = $5 AND locked = 0 RETURNING generation",
        )
        .bind(op.now)
        .bind(&op.addr)
        .bind(&op.name)
        .bind(&op.instance)
        .bind(op.generation)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(g) = renewed {
            return Ok(RenewOutcome::Renewed(g));
        }
    }
    let current = sqlx::query(&format!("SELECT {COLUMNS} FROM bots WHERE name = $1"))
        .bind(&op.name)
        .fetch_optional(&mut **tx)
        .await?
        .as_ref()
        .map(row);
    Ok(match current {
        None => RenewOutcome::NoBot,
        Some(b) if b.instance != op.instance => RenewOutcome::Superseded,
        Some(b) if b.locked => RenewOutcome::Locked(b.lock_reason),
        Some(b) => {
            let reason = format!(
                "generation {} was presented from {} after generation {} was issued to {}: the identity was copied",
                op.generation, op.addr, b.generation, b.last_addr
            );
            sqlx::query("UPDATE bots SET locked = 1, lock_reason = $1 WHERE name = $2")
                .bind(&reason)
                .bind(&op.name)
                .execute(&mut **tx)
                .await?;
            RenewOutcome::Stolen {
                last_addr: b.last_addr,
                current: b.generation,
            }
        }
    })
}
