//! Cluster state and audit log on SQLite (WAL, `synchronous=FULL`: an event Auth acknowledged
//! survives a crash or power loss). All queries are plain runtime queries so a PostgreSQL backend
//! can follow the same shape.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::resources::{Role, User};

mod bots;
mod recordings;
mod role_cache;
pub use bots::{BotRow, RenewOp, RenewOutcome};
pub use recordings::{RecordingFilter, RecordingRow};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} `{name}` not found")]
    NotFound { kind: &'static str, name: String },
    #[error("stored {0} is corrupt: {1}")]
    Corrupt(&'static str, String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A join token as stored (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub hash: String,
    pub token_type: String,
    pub expires: i64,
    pub max_uses: u32,
    pub uses: u32,
    pub created: i64,
    pub created_by: String,
    pub bot_name: String,
    pub labels: Vec<String>,
}

/// Why a join token was refused. The caller maps all of these to one answer for the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRejection {
    #[error("token not found")]
    NotFound,
    #[error("token expired")]
    Expired,
    #[error("token used up")]
    UsedUp,
}

/// One audit event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: i64,
    pub event_id: String,
    pub time_nanos: i64,
    pub event_type: String,
    pub actor: String,
    pub source_addr: String,
    pub cluster: String,
    pub data: String,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub from_nanos: i64,
    pub to_nanos: i64,
    pub types: Vec<String>,
    pub after_id: i64,
    pub limit: u32,
}

/// The tables that hold named JSON documents.
#[derive(Debug, Clone, Copy)]
enum Table {
    Users,
    Roles,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    roles: std::sync::Arc<role_cache::RoleCache>,
}

impl Store {
    /// Open (creating if needed) the database at `path`, file mode 0600, and migrate it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            match opts.open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            roles: Default::default(),
        })
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Set `key` unless it is set; returns the value in force.
    pub async fn init_meta(&self, key: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        self.get_meta(key)
            .await?
            .ok_or_else(|| StoreError::Corrupt("meta", key.to_owned()))
    }

    pub async fn get_ca(&self, kind: &str) -> Result<Option<(String, String)>, StoreError> {
        let row =
            sqlx::query("SELECT public_pem, private_pem FROM cert_authorities WHERE kind = ?")
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Store a CA unless one of this kind exists; returns the one in force (first writer wins).
    pub async fn init_ca(
        &self,
        kind: &str,
        public: &str,
        private: &str,
        now: i64,
    ) -> Result<(String, String), StoreError> {
        sqlx::query("INSERT OR IGNORE INTO cert_authorities (kind, public_pem, private_pem, created) VALUES (?, ?, ?, ?)")
            .bind(kind)
            .bind(public)
            .bind(private)
            .bind(now)
            .execute(&self.pool)
            .await?;
        self.get_ca(kind)
            .await?
            .ok_or_else(|| StoreError::Corrupt("cert authority", kind.to_owned()))
    }

    // ---- users ----

    pub async fn create_user(
        &self,
        user: &User,
        password_hash: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let spec =
            serde_json::to_string(user).map_err(|e| StoreError::Corrupt("user", e.to_string()))?;
        let done = sqlx::query("INSERT OR IGNORE INTO users (name, spec, password_hash, created, updated) VALUES (?, ?, ?, ?, ?)")
            .bind(&user.metadata.name)
            .bind(spec)
            .bind(password_hash)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists {
                kind: "user",
                name: user.metadata.name.clone(),
            });
        }
        Ok(())
    }

    /// Create or update a user document, keeping any password hash. Returns true if created.
    pub async fn upsert_user(
        &self,
        user: &User,
        create_only: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        let spec =
            serde_json::to_string(user).map_err(|e| StoreError::Corrupt("user", e.to_string()))?;
        self.upsert_document(Table::Users, &user.metadata.name, &spec, create_only, now)
            .await
    }

    pub async fn get_user(&self, name: &str) -> Result<Option<(User, Option<String>)>, StoreError> {
        let row = sqlx::query("SELECT spec, password_hash FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let spec: String = r.get(0);
            let user = serde_json::from_str(&spec)
                .map_err(|e| StoreError::Corrupt("user", e.to_string()))?;
            Ok((user, r.get(1)))
        })
        .transpose()
    }

    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT spec FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| StoreError::Corrupt("user", e.to_string()))
            })
            .collect()
    }

    pub async fn set_password_hash(
        &self,
        name: &str,
        hash: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE users SET password_hash = ?, updated = ? WHERE name = ?")
            .bind(hash)
            .bind(now)
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "user",
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    pub async fn delete(&self, kind: &'static str, name: &str) -> Result<(), StoreError> {
        let sql = match kind {
            "user" => "DELETE FROM users WHERE name = ?",
            "role" => "DELETE FROM roles WHERE name = ?",
            "node" => "DELETE FROM nodes WHERE host_id = ?",
            _ => {
                return Err(StoreError::NotFound {
                    kind,
                    name: name.to_owned(),
                });
            }
        };
        let done = sqlx::query(sql).bind(name).execute(&self.pool).await;
        if kind == "role" {
            self.roles.invalidate();
        }
        if done?.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind,
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    // ---- roles ----

    /// Create or update a role. Returns true if it was created.
    pub async fn upsert_role(
        &self,
        role: &Role,
        create_only: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        let spec =
            serde_json::to_string(role).map_err(|e| StoreError::Corrupt("role", e.to_string()))?;
        let done = self
            .upsert_document(Table::Roles, &role.metadata.name, &spec, create_only, now)
            .await;
        self.roles.invalidate();
        done
    }

    /// Insert a document unless its name exists; else update it (or refuse with `create_only`).
    /// Returns true if it was created. Users keep their password hash either way.
    async fn upsert_document(
        &self,
        table: Table,
        name: &str,
        spec: &str,
        create_only: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (insert, update, kind) = match table {
            Table::Users => (
                "INSERT OR IGNORE INTO users (name, spec, password_hash, created, updated) VALUES (?, ?, NULL, ?, ?)",
                "UPDATE users SET spec = ?, updated = ? WHERE name = ?",
                "user",
            ),
            Table::Roles => (
                "INSERT OR IGNORE INTO roles (name, spec, created, updated) VALUES (?, ?, ?, ?)",
                "UPDATE roles SET spec = ?, updated = ? WHERE name = ?",
                "role",
            ),
        };
        let created = sqlx::query(insert)
            .bind(name)
            .bind(spec)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        if !created {
            if create_only {
                return Err(StoreError::AlreadyExists {
                    kind,
                    name: name.to_owned(),
                });
            }
            sqlx::query(update)
                .bind(spec)
                .bind(now)
                .bind(name)
                .execute(&self.pool)
                .await?;
        }
        Ok(created)
    }

    /// A role by name, from memory when this `Store` read it since the last role write.
    pub async fn get_role(&self, name: &str) -> Result<Option<Role>, StoreError> {
        let epoch = match self.roles.get(name) {
            Ok(hit) => return Ok(hit.map(|r| Role::clone(&r))),
            Err(epoch) => epoch,
        };
        let role = self.read_role(name).await?;
        self.roles
            .store(epoch, name, role.clone().map(std::sync::Arc::new));
        Ok(role)
    }

    async fn read_role(&self, name: &str) -> Result<Option<Role>, StoreError> {
        let spec: Option<String> = sqlx::query_scalar("SELECT spec FROM roles WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        spec.map(|s| {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt("role", e.to_string()))
        })
        .transpose()
    }

    pub async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT spec FROM roles ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| StoreError::Corrupt("role", e.to_string()))
            })
            .collect()
    }

    // ---- tokens ----

    pub async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tokens (id, hash, type, expires, max_uses, uses, created, created_by, bot_name, labels) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)")
            .bind(&t.id)
            .bind(&t.hash)
            .bind(&t.token_type)
            .bind(t.expires)
            .bind(t.max_uses)
            .bind(t.created)
            .bind(&t.created_by)
            .bind(&t.bot_name)
            .bind(serde_json::to_string(&t.labels).unwrap_or_else(|_| "[]".into()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> TokenRecord {
        let labels: String = r.get("labels");
        TokenRecord {
            id: r.get("id"),
            hash: r.get("hash"),
            token_type: r.get("type"),
            expires: r.get("expires"),
            max_uses: r.get::<i64, _>("max_uses").clamp(0, u32::MAX as i64) as u32,
            uses: r.get::<i64, _>("uses").clamp(0, u32::MAX as i64) as u32,
            created: r.get("created"),
            created_by: r.get("created_by"),
            bot_name: r.get("bot_name"),
            labels: serde_json::from_str(&labels).unwrap_or_default(),
        }
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::token_from_row).collect())
    }

    /// Delete by public id or by hash of the secret.
    pub async fn delete_token(&self, id: &str, hash: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM tokens WHERE id = ? OR hash = ?")
            .bind(id)
            .bind(hash)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                kind: "token",
                name: id.to_owned(),
            });
        }
        Ok(())
    }

    /// Atomically use a token: one statement checks expiry and remaining uses and counts the use,
    /// so concurrent joins can never exceed `max_uses`. A refused token is left untouched.
    pub async fn consume_token(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        let row = sqlx::query(
            "UPDATE tokens SET uses = uses + 1 WHERE hash = ? AND expires > ? AND (max_uses = 0 OR uses < max_uses) RETURNING *",
        )
        .bind(hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(Ok(Self::token_from_row(&row)));
        }
        let row = sqlx::query("SELECT * FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(Err(match row.map(|r| Self::token_from_row(&r)) {
            None => TokenRejection::NotFound,
            Some(t) if t.expires <= now => TokenRejection::Expired,
            Some(_) => TokenRejection::UsedUp,
        }))
    }

    /// Remove tokens that expired more than `grace` seconds ago.
    pub async fn reap_tokens(&self, now: i64, grace: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM tokens WHERE expires < ?")
            .bind(now - grace)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    // ---- nodes ----

    pub async fn upsert_nodes(
        &self,
        nodes: &[(String, String)],
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (host_id, spec) in nodes {
            sqlx::query("INSERT INTO nodes (host_id, spec, expires) VALUES (?, ?, ?) ON CONFLICT(host_id) DO UPDATE SET spec = excluded.spec, expires = excluded.expires")
                .bind(host_id)
                .bind(spec)
                .bind(expires)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Nodes whose heartbeat has not expired, as stored JSON.
    pub async fn list_nodes(&self, now: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT spec FROM nodes WHERE expires > ? ORDER BY host_id")
                .bind(now)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    // ---- audit ----

    /// Append events in one transaction; duplicates (same `event_id`) are ignored.
    /// Returns (accepted, duplicates).
    pub async fn append_events(&self, events: &[StoredEvent]) -> Result<(u32, u32), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut accepted = 0u32;
        for chunk in events.chunks(EVENT_CHUNK) {
            accepted += insert_events(&mut tx, chunk).await? as u32;
        }
        tx.commit().await?;
        Ok((accepted, events.len() as u32 - accepted))
    }

    pub async fn search_events(&self, f: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        let mut sql = String::from(
            "SELECT id, event_id, time_nanos, type, actor, source_addr, cluster, data FROM audit_events WHERE id > ? AND time_nanos >= ? AND time_nanos <= ?",
        );
        if !f.types.is_empty() {
            sql.push_str(" AND type IN (");
            sql.push_str(&vec!["?"; f.types.len()].join(","));
            sql.push(')');
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        let to = if f.to_nanos <= 0 {
            i64::MAX
        } else {
            f.to_nanos
        };
        let mut q = sqlx::query(&sql)
            .bind(f.after_id)
            .bind(f.from_nanos)
            .bind(to);
        for t in &f.types {
            q = q.bind(t);
        }
        let limit = if f.limit == 0 {
            1000
        } else {
            f.limit.min(10_000)
        };
        let rows = q.bind(limit as i64).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| StoredEvent {
                id: r.get(0),
                event_id: r.get(1),
                time_nanos: r.get(2),
                event_type: r.get(3),
                actor: r.get(4),
                source_addr: r.get(5),
                cluster: r.get(6),
                data: r.get(7),
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Audit events per multi-row `INSERT` (seven parameters each; SQLite allows 32,766).
pub(crate) const EVENT_CHUNK: usize = 1000;

/// Insert `events` (at most [`EVENT_CHUNK`]) in one statement; how many were new.
pub(crate) async fn insert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    events: &[StoredEvent],
) -> Result<u64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT OR IGNORE INTO audit_events (event_id, time_nanos, type, actor, source_addr, cluster, data) ",
    );
    q.push_values(events, |mut b, e| {
        b.push_bind(&e.event_id)
            .push_bind(e.time_nanos)
            .push_bind(&e.event_type)
            .push_bind(&e.actor)
            .push_bind(&e.source_addr)
            .push_bind(&e.cluster)
            .push_bind(&e.data);
    });
    Ok(q.build().execute(&mut **tx).await?.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        (dir, s)
    }

    fn token(hash: &str, expires: i64, max_uses: u32) -> TokenRecord {
        TokenRecord {
            id: format!("id-{hash}"),
            hash: hash.into(),
            token_type: "node".into(),
            expires,
            max_uses,
            uses: 0,
            created: 0,
            created_by: "test".into(),
            bot_name: String::new(),
            labels: vec![],
        }
    }

    #[tokio::test]
    async fn token_single_use_expired_and_unknown() {
        let (_d, s) = store().await;
        s.insert_token(&token("a", 100, 1)).await.unwrap();
        s.insert_token(&token("b", 100, 0)).await.unwrap();
        assert!(s.consume_token("a", 50).await.unwrap().is_ok());
        assert_eq!(
            s.consume_token("a", 50).await.unwrap(),
            Err(TokenRejection::UsedUp)
        );
        assert!(s.consume_token("b", 50).await.unwrap().is_ok());
        assert!(s.consume_token("b", 51).await.unwrap().is_ok());
        assert_eq!(
            s.consume_token("b", 100).await.unwrap(),
            Err(TokenRejection::Expired)
        );
        assert_eq!(
            s.consume_token("zzz", 1).await.unwrap(),
            Err(TokenRejection::NotFound)
        );
        let uses: Vec<u32> = s
            .list_tokens()
            .await
            .unwrap()
            .iter()
            .map(|t| t.uses)
            .collect();
        assert_eq!(uses, [1, 2]);
    }

    #[tokio::test]
    async fn events_are_ordered_and_deduplicated() {
        let (_d, s) = store().await;
        let ev = |id: &str, t: i64, ty: &str| StoredEvent {
            id: 0,
            event_id: id.into(),
            time_nanos: t,
            event_type: ty.into(),
            actor: "a".into(),
            source_addr: "127.0.0.1".into(),
            cluster: "c".into(),
            data: "{}".into(),
        };
        assert_eq!(
            s.append_events(&[ev("1", 10, "x"), ev("2", 20, "y")])
                .await
                .unwrap(),
            (2, 0)
        );
        assert_eq!(
            s.append_events(&[ev("2", 20, "y"), ev("3", 30, "x")])
                .await
                .unwrap(),
            (1, 1)
        );
        let all = s.search_events(&EventFilter::default()).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let xs = s
            .search_events(&EventFilter {
                types: vec!["x".into()],
                from_nanos: 15,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(xs.len(), 1);
        assert_eq!(xs[0].event_id, "3");
    }
}
