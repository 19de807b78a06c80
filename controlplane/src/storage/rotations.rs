//! CA rotations: the key a CA had before its last rotation, trusted until the grace period
//! ends. A rotation and a rollback each swap keys in one transaction, so two Auths never see a
//! CA with no key or with two signers, and every Auth hears of it (`Change::CertAuthority`).

use sqlx::Row as _;

use super::{Change, Store, StoreError};

/// A CA's previous key and how long it stays trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub previous_public: String,
    pub previous_private: String,
    pub trusted_until: i64,
    pub started: i64,
    pub rolled_back: bool,
}

impl Store {
    /// The CA `kind`'s last rotation, if it ever rotated.
    pub async fn get_rotation(&self, kind: &str) -> Result<Option<Rotation>, StoreError> {
        let row = sqlx::query("SELECT previous_public, previous_private, trusted_until, started, rolled_back FROM ca_rotations WHERE kind = $1")
            .bind(kind)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Rotation {
            previous_public: r.get(0),
            previous_private: r.get(1),
            trusted_until: r.get(2),
            started: r.get(3),
            rolled_back: r.get::<i64, _>(4) != 0,
        }))
    }

    /// Make (`public`, `private`) the CA's key; the one it replaces stays trusted until
    /// `until`. With `expect_public`, only if that is the key in force (a rollback's check).
    pub async fn swap_ca(
        &self,
        kind: &str,
        public: &str,
        private: &str,
        until: i64,
        now: i64,
        rolled_back: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Write first: SQLite then takes the write lock at once (a read first would make the
        // later write fail with SQLITE_BUSY if another writer committed in between), and
        // PostgreSQL locks the row, so two rotations at once run one after the other.
        sqlx::query("UPDATE cert_authorities SET created = created WHERE kind = $1")
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        let current =
            sqlx::query("SELECT public_pem, private_pem FROM cert_authorities WHERE kind = $1")
                .bind(kind)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "cert authority",
                    name: kind.to_owned(),
                })?;
        let (old_public, old_private): (String, String) = (current.get(0), current.get(1));
        sqlx::query("INSERT INTO ca_rotations (kind, previous_public, previous_private, trusted_until, started, rolled_back) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT(kind) DO UPDATE SET previous_public = excluded.previous_public, previous_private = excluded.previous_private, trusted_until = excluded.trusted_until, started = excluded.started, rolled_back = excluded.rolled_back")
            .bind(kind)
            .bind(&old_public)
            .bind(&old_private)
            .bind(until)
            .bind(now)
            .bind(i64::from(rolled_back))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE cert_authorities SET public_pem = $1, private_pem = $2, created = $3 WHERE kind = $4")
            .bind(public)
            .bind(private)
            .bind(now)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.announce(Change::CertAuthority(kind.to_owned())).await
    }
}
