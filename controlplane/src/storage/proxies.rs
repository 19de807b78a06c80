//! The proxies of the cluster: each announces itself every few seconds with the address agents
//! dial; an entry not renewed expires. Every announcement is also a [`Change::Proxy`], so the
//! watch stream carries the new expiry to proxies, which tell their agents.

use super::{Change, Store, StoreError};

impl Store {
    /// Insert or renew the proxy `name` (its JSON `spec`), valid until `expires`.
    pub async fn upsert_proxy(
        &self,
        name: &str,
        spec: &str,
        expires: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO proxies (name, spec, expires) VALUES ($1, $2, $3) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, expires = excluded.expires")
            .bind(name)
            .bind(spec)
            .bind(expires)
            .execute(&self.pool)
            .await?;
        self.announce(Change::Proxy(name.to_owned())).await
    }

    /// Remove the proxy `name` (it is stopping). Nothing if it was not there.
    pub async fn delete_proxy(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM proxies WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.announce(Change::Proxy(name.to_owned())).await
    }

    /// The proxy `name`'s JSON spec, if it has not expired at `now`.
    pub async fn get_proxy(&self, name: &str, now: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT spec FROM proxies WHERE name = $1 AND expires > $2")
                .bind(name)
                .bind(now)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Proxies that have not expired at `now`: (name, JSON spec), by name.
    pub async fn list_proxies(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, spec FROM proxies WHERE expires > $1 ORDER BY name")
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }
}
