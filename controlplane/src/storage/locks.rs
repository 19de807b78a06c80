//! Locks, by name: the JSON of [`crate::locks::Lock`] and its expiry. Every change is announced
//! (`Change::Lock`) so watchers on every Auth hear it at once.

use sqlx::Row as _;

use super::{Change, Store, StoreError};

impl Store {
    /// Create or replace a lock.
    pub async fn put_lock(&self, name: &str, spec: &str, expires: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO locks (name, spec, expires) VALUES ($1, $2, $3) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, expires = excluded.expires")
            .bind(name)
            .bind(spec)
            .bind(expires)
            .execute(&self.pool)
            .await?;
        self.announce(Change::Lock(name.to_owned())).await
    }

    /// Remove a lock; false if there was none of that name.
    pub async fn delete_lock(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM locks WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.announce(Change::Lock(name.to_owned())).await?;
        Ok(done.rows_affected() > 0)
    }

    /// A lock in force at `now`.
    pub async fn get_lock(&self, name: &str, now: i64) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT spec FROM locks WHERE name = $1 AND (expires = 0 OR expires > $2)")
                .bind(name)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Every lock in force at `now`, by name.
    pub async fn list_locks(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query("SELECT spec FROM locks WHERE expires = 0 OR expires > $1 ORDER BY name")
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
