//! The recordings index: one row per recording, with the offset and sequence number Auth has
//! stored durably.

use sqlx::Row;

use super::{Store, StoreError};

/// One recording as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingRow {
    pub id: String,
    pub user: String,
    pub login: String,
    pub node: String,
    pub node_id: String,
    pub kind: String,
    pub command: String,
    pub started_ms: i64,
    pub updated_ms: i64,
    pub duration_ms: i64,
    /// `live`, `complete` or `incomplete`.
    pub state: String,
    pub next_offset: i64,
    pub next_seq: i64,
    pub reason: String,
}

/// Which recordings to list.
#[derive(Debug, Clone, Default)]
pub struct RecordingFilter {
    pub user: Option<String>,
    pub node: Option<String>,
    pub since_ms: i64,
    pub live_only: bool,
    pub limit: u32,
}

const COLUMNS: &str = "id, \"user\", login, node, node_id, kind, command, started_ms, updated_ms, duration_ms, state, next_offset, next_seq, reason";

fn row(r: &sqlx::any::AnyRow) -> RecordingRow {
    RecordingRow {
        id: r.get(0),
        user: r.get(1),
        login: r.get(2),
        node: r.get(3),
        node_id: r.get(4),
        kind: r.get(5),
        command: r.get(6),
        started_ms: r.get(7),
        updated_ms: r.get(8),
        duration_ms: r.get(9),
        state: r.get(10),
        next_offset: r.get(11),
        next_seq: r.get(12),
        reason: r.get(13),
    }
}

impl Store {
    pub async fn get_recording(&self, id: &str) -> Result<Option<RecordingRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM recordings WHERE id = $1");
        let r = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(row))
    }

    /// A new recording's row (its first chunk arrived). Fails if the id exists.
    pub async fn insert_recording(&self, r: &RecordingRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO recordings ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        );
        let done = sqlx::query(&sql)
            .bind(&r.id)
            .bind(&r.user)
            .bind(&r.login)
            .bind(&r.node)
            .bind(&r.node_id)
            .bind(&r.kind)
            .bind(&r.command)
            .bind(r.started_ms)
            .bind(r.updated_ms)
            .bind(r.duration_ms)
            .bind(&r.state)
            .bind(r.next_offset)
            .bind(r.next_seq)
            .bind(&r.reason)
            .execute(&self.pool)
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::AlreadyExists {
                    kind: "recording",
                    name: r.id.clone(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Chunks stored up to `next_offset` (only forward from `from_offset`, so two racing
    /// uploads cannot move it back).
    pub async fn advance_recording(
        &self,
        id: &str,
        from_offset: i64,
        next_offset: i64,
        next_seq: i64,
        duration_ms: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE recordings SET next_offset = $1, next_seq = $2, duration_ms = $3, updated_ms = $4 WHERE id = $5 AND next_offset = $6 AND state = 'live'")
            .bind(next_offset)
            .bind(next_seq)
            .bind(duration_ms)
            .bind(now_ms)
            .bind(id)
            .bind(from_offset)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The trailer arrived and verified: `complete` or `incomplete`, with why.
    pub async fn finish_recording(
        &self,
        id: &str,
        state: &str,
        duration_ms: i64,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE recordings SET state = $1, duration_ms = $2, reason = $3, updated_ms = $4 WHERE id = $5")
            .bind(state)
            .bind(duration_ms)
            .bind(reason)
            .bind(now_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Newest first.
    pub async fn list_recordings(
        &self,
        f: &RecordingFilter,
    ) -> Result<Vec<RecordingRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM recordings WHERE started_ms >= $1");
        let mut n = 1;
        if f.user.is_some() {
            n += 1;
            sql.push_str(&format!(" AND \"user\" = ${n}"));
        }
        if f.node.is_some() {
            n += 1;
            sql.push_str(&format!(" AND (node = ${n} OR node_id = ${n})"));
        }
        if f.live_only {
            sql.push_str(" AND state = 'live'");
        }
        sql.push_str(&format!(" ORDER BY started_ms DESC LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql).bind(f.since_ms);
        if let Some(u) = &f.user {
            q = q.bind(u);
        }
        if let Some(n) = &f.node {
            q = q.bind(n);
        }
        let limit = if f.limit == 0 {
            1000
        } else {
            f.limit.min(10_000)
        };
        let rows = q.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(row).collect())
    }
}
