//! Trust between clusters: one row per other cluster, as its root (`side = root`: this cluster
//! is its leaf) or its leaf (`side = leaf`). Each write is announced as a
//! [`Change::TrustedCluster`], so proxies and agents hear of it through the watch stream.

use super::{Change, Store, StoreError};

/// One trust record: the other cluster's name, which side it is on, its JSON spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRow {
    pub name: String,
    pub side: String,
    pub spec: String,
}

impl Store {
    /// Insert or replace the record of cluster `name`.
    pub async fn put_trust(&self, row: &TrustRow, now: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO trusted_clusters (name, side, spec, created, updated) VALUES ($1, $2, $3, $4, $5) ON CONFLICT(name) DO UPDATE SET side = excluded.side, spec = excluded.spec, updated = excluded.updated")
            .bind(&row.name)
            .bind(&row.side)
            .bind(&row.spec)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?;
        self.announce(Change::TrustedCluster(row.name.clone()))
            .await
    }

    pub async fn get_trust(&self, name: &str) -> Result<Option<TrustRow>, StoreError> {
        let row: Option<(String, String, String)> =
            sqlx::query_as("SELECT name, side, spec FROM trusted_clusters WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(name, side, spec)| TrustRow { name, side, spec }))
    }

    /// Every record, by name.
    pub async fn list_trust(&self) -> Result<Vec<TrustRow>, StoreError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT name, side, spec FROM trusted_clusters ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(name, side, spec)| TrustRow { name, side, spec })
            .collect())
    }

    /// Remove the record of cluster `name`; false if there was none.
    pub async fn delete_trust(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM trusted_clusters WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.announce(Change::TrustedCluster(name.to_owned()))
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
