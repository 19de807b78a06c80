//! Nodes as heartbeats leave them: one row per host with its JSON spec and an expiry; a proxy
//! writes its batch in a few multi-row statements.

use super::{Store, StoreError, values};

impl Store {
    /// Insert or refresh nodes (host id, JSON spec), valid until `expires`: a few statements of
    /// many rows in one transaction (a proxy's batch of heartbeats). A host id given twice keeps
    /// its last spec.
    pub async fn upsert_nodes(
        &self,
        nodes: &[(String, String)],
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut last: std::collections::HashMap<&str, &str> =
            std::collections::HashMap::with_capacity(nodes.len());
        for (host_id, spec) in nodes {
            last.insert(host_id, spec);
        }
        let rows: Vec<(&str, &str)> = last.into_iter().collect();
        let mut tx = self.pool.begin().await?;
        for batch in rows.chunks(500) {
            let mut sql = String::from("INSERT INTO nodes (host_id, spec, expires) VALUES ");
            values(&mut sql, batch.len(), 3, self.backend);
            sql.push_str(
                " ON CONFLICT(host_id) DO UPDATE SET spec = excluded.spec, expires = excluded.expires",
            );
            let mut q = sqlx::query(&sql);
            for (host_id, spec) in batch {
                q = q.bind(*host_id).bind(*spec).bind(expires);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Nodes whose heartbeat has not expired, as stored JSON.
    pub async fn list_nodes(&self, now: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT spec FROM nodes WHERE expires > $1 ORDER BY host_id")
                .bind(now)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
