//! Cluster state and audit log, on SQLite (one Auth; WAL, `synchronous=FULL`: an event Auth
//! acknowledged survives a crash or power loss) or PostgreSQL (several Auths on one database).
//! One set of queries serves both (sqlx's `Any` driver): numbered parameters (`$1`), `ON
//! CONFLICT DO NOTHING`, `UPDATE … FROM`, `RETURNING`, integers as 64-bit; each backend has its
//! own versioned migrations (`migrations/sqlite`, `migrations/postgres`).

use std::path::Path;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use crate::resources::{Role, User};

mod bots;
mod changes;
mod locks;
mod mfa;
mod nodes;
mod proxies;
mod recordings;
mod role_cache;
mod rotations;
mod trust;
pub use bots::{BotRow, RenewOp, RenewOutcome};
pub use changes::Change;
pub use mfa::MfaDevice;
pub use recordings::{RecordingFilter, RecordingRow};
pub use rotations::Rotation;
pub use trust::TrustRow;

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
    #[error("{0}")]
    Url(String),
    #[error(
        "the database's schema is newer than this binary (migration {0} is unknown here): run a newer Gatehouse"
    )]
    SchemaNewer(i64),
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
    #[error("a token of another type")]
    WrongType,
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
    /// Only this actor's events (indexed with the time).
    pub actor: Option<String>,
    pub after_id: i64,
    pub limit: u32,
    /// The newest `limit` events (descending), instead of the oldest after `after_id`.
    pub newest_first: bool,
}

/// The tables that hold named JSON documents.
#[derive(Debug, Clone, Copy)]
enum Table {
    Users,
    Roles,
}

/// `url` with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => {
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            if auth.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_owned(),
    }
}

/// Which database a [`Store`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub(crate) type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    roles: std::sync::Arc<role_cache::RoleCache>,
    /// Announcements of changes, this Auth's and (on PostgreSQL) other Auths'.
    changes: tokio::sync::broadcast::Sender<Change>,
}

/// SQLite settings every connection gets: WAL, fsync on commit, foreign keys, and waiting (not
/// failing) while another connection writes.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;";

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
        Self::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Connect to `url` (`sqlite://PATH` or `postgres://…`) and migrate the schema. A schema
    /// newer than this binary (migrations it does not know) is refused.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Url(
                "storage must be sqlite://PATH or postgres://USER@HOST:PORT/DB".into(),
            ));
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(5));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(conn, SQLITE_PRAGMAS).await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await?;
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        match migrator.run(&pool).await {
            Ok(()) => {}
            Err(sqlx::migrate::MigrateError::VersionMissing(v)) => {
                return Err(StoreError::SchemaNewer(v));
            }
            Err(e) => return Err(e.into()),
        }
        let roles = std::sync::Arc::new(role_cache::RoleCache::default());
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        if backend == Backend::Postgres {
            tokio::spawn(changes::listen_postgres(
                url.to_owned(),
                std::sync::Arc::downgrade(&roles),
                changes.clone(),
            ));
        }
        Ok(Self {
            pool,
            backend,
            roles,
            changes,
        })
    }

    /// Changes announced from now on, by this Auth and by others on the same database.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Announce `change`: this process's caches drop what it touches at once; other Auths on
    /// the same PostgreSQL hear it through `NOTIFY`.
    pub(crate) async fn announce(&self, change: Change) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(changes::CHANNEL)
                .bind(change.payload())
                .execute(&self.pool)
                .await?;
        }
        changes::apply(&self.roles, &self.changes, change);
        Ok(())
    }

    /// The database this store is on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Set `key` unless it is set; returns the value in force.
    pub async fn init_meta(&self, key: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
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
            sqlx::query("SELECT public_pem, private_pem FROM cert_authorities WHERE kind = $1")
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
        sqlx::query("INSERT INTO cert_authorities (kind, public_pem, private_pem, created) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
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
        let done = sqlx::query("INSERT INTO users (name, spec, password_hash, created, updated) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
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
        let row = sqlx::query("SELECT spec, password_hash FROM users WHERE name = $1")
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
        let done = sqlx::query("UPDATE users SET password_hash = $1, updated = $2 WHERE name = $3")
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
            "user" => "DELETE FROM users WHERE name = $1",
            "role" => "DELETE FROM roles WHERE name = $1",
            "node" => "DELETE FROM nodes WHERE host_id = $1",
            _ => {
                return Err(StoreError::NotFound {
                    kind,
                    name: name.to_owned(),
                });
            }
        };
        let done = sqlx::query(sql).bind(name).execute(&self.pool).await;
        if kind == "user" {
            self.delete_mfa_device(name).await?;
        }
        if kind == "role" {
            self.announce(Change::Role(name.to_owned())).await?;
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
        self.announce(Change::Role(role.metadata.name.clone()))
            .await?;
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
                "INSERT INTO users (name, spec, password_hash, created, updated) VALUES ($1, $2, NULL, $3, $4) ON CONFLICT DO NOTHING",
                "UPDATE users SET spec = $1, updated = $2 WHERE name = $3",
                "user",
            ),
            Table::Roles => (
                "INSERT INTO roles (name, spec, created, updated) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                "UPDATE roles SET spec = $1, updated = $2 WHERE name = $3",
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
        let spec: Option<String> = sqlx::query_scalar("SELECT spec FROM roles WHERE name = $1")
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
        sqlx::query("INSERT INTO tokens (id, hash, type, expires, max_uses, uses, created, created_by, bot_name, labels) VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9)")
            .bind(&t.id)
            .bind(&t.hash)
            .bind(&t.token_type)
            .bind(t.expires)
            .bind(i64::from(t.max_uses))
            .bind(t.created)
            .bind(&t.created_by)
            .bind(&t.bot_name)
            .bind(serde_json::to_string(&t.labels).unwrap_or_else(|_| "[]".into()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn token_from_row(r: &sqlx::any::AnyRow) -> TokenRecord {
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
        let done = sqlx::query("DELETE FROM tokens WHERE id = $1 OR hash = $2")
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

    /// Atomically use a token of one of `types`: one statement checks type, expiry and remaining
    /// uses and counts the use, so concurrent joins can never exceed `max_uses`. A refused token
    /// (another type included) is left untouched.
    pub async fn consume_token(
        &self,
        hash: &str,
        types: &[&str],
        now: i64,
    ) -> Result<Result<TokenRecord, TokenRejection>, StoreError> {
        let mut n = 2;
        let sql = format!(
            "UPDATE tokens SET uses = uses + 1 WHERE hash = $1 AND expires > $2 AND (max_uses = 0 OR uses < max_uses) AND type IN ({}) RETURNING *",
            params(&mut n, types.len().max(1))
        );
        let mut q = sqlx::query(&sql).bind(hash).bind(now);
        if types.is_empty() {
            q = q.bind("");
        }
        for t in types {
            q = q.bind(*t);
        }
        let row = q.fetch_optional(&self.pool).await?;
        if let Some(row) = row {
            return Ok(Ok(Self::token_from_row(&row)));
        }
        let row = sqlx::query("SELECT * FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(Err(match row.map(|r| Self::token_from_row(&r)) {
            None => TokenRejection::NotFound,
            Some(t) if !types.contains(&t.token_type.as_str()) => TokenRejection::WrongType,
            Some(t) if t.expires <= now => TokenRejection::Expired,
            Some(_) => TokenRejection::UsedUp,
        }))
    }

    /// Remove tokens that expired more than `grace` seconds ago.
    pub async fn reap_tokens(&self, now: i64, grace: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM tokens WHERE expires < $1")
            .bind(now - grace)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    // ---- audit ----

    /// Append events in one transaction; duplicates (same `event_id`) are ignored.
    /// Returns (accepted, duplicates).
    pub async fn append_events(&self, events: &[StoredEvent]) -> Result<(u32, u32), StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut accepted = 0u32;
        for chunk in events.chunks(EVENT_CHUNK) {
            accepted += insert_events(&mut tx, self.backend, chunk).await? as u32;
        }
        tx.commit().await?;
        Ok((accepted, events.len() as u32 - accepted))
    }

    /// Append several callers' batches in one transaction; each batch's (accepted, duplicates).
    pub async fn append_event_groups(
        &self,
        groups: &[Vec<StoredEvent>],
    ) -> Result<Vec<(u32, u32)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut counts = Vec::with_capacity(groups.len());
        for events in groups {
            let mut accepted = 0u32;
            for chunk in events.chunks(EVENT_CHUNK) {
                accepted += insert_events(&mut tx, self.backend, chunk).await? as u32;
            }
            counts.push((accepted, events.len() as u32 - accepted));
        }
        tx.commit().await?;
        Ok(counts)
    }

    pub async fn search_events(&self, f: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        let mut sql = String::from(
            "SELECT id, event_id, time_nanos, type, actor, source_addr, cluster, data FROM audit_events WHERE id > $1 AND time_nanos >= $2 AND time_nanos <= $3",
        );
        let mut n = 3;
        if !f.types.is_empty() {
            sql.push_str(" AND type IN (");
            sql.push_str(&params(&mut n, f.types.len()));
            sql.push(')');
        }
        if f.actor.is_some() {
            n += 1;
            sql.push_str(&format!(" AND actor = ${n}"));
        }
        let order = if f.newest_first { "DESC" } else { "ASC" };
        sql.push_str(&format!(" ORDER BY id {order} LIMIT ${}", n + 1));
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
        if let Some(actor) = &f.actor {
            q = q.bind(actor);
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

/// Insert `events` (at most [`EVENT_CHUNK`]) in one statement; how many were new. On
/// PostgreSQL the transaction first takes the audit log's advisory lock, so that event ids
/// become visible in the order they were given (readers page by `id > last`).
pub(crate) async fn insert_events(
    tx: &mut Tx<'_>,
    backend: Backend,
    events: &[StoredEvent],
) -> Result<u64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7301)")
            .execute(&mut **tx)
            .await?;
    }
    let mut sql = String::from(
        "INSERT INTO audit_events (event_id, time_nanos, type, actor, source_addr, cluster, data) VALUES ",
    );
    values(&mut sql, events.len(), 7, backend);
    sql.push_str(" ON CONFLICT DO NOTHING");
    let mut q = sqlx::query(&sql);
    for e in events {
        q = q
            .bind(&e.event_id)
            .bind(e.time_nanos)
            .bind(&e.event_type)
            .bind(&e.actor)
            .bind(&e.source_addr)
            .bind(&e.cluster)
            .bind(&e.data);
    }
    Ok(q.execute(&mut **tx).await?.rows_affected())
}

/// `count` placeholders after the `n` already used (`$n+1, $n+2, …`); moves `n` on.
pub(crate) fn params(n: &mut usize, count: usize) -> String {
    let list: Vec<String> = (*n + 1..=*n + count).map(|i| format!("${i}")).collect();
    *n += count;
    list.join(", ")
}

/// `rows` parenthesised groups of `width` placeholders, comma-separated: numbered (`$1`) on
/// PostgreSQL, anonymous (`?`) on SQLite, whose lookup of a numbered parameter's name is a
/// linear scan (a 3,500-parameter statement spent two thirds of Auth's time binding).
pub(crate) fn values(sql: &mut String, rows: usize, width: usize, backend: Backend) {
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        match backend {
            Backend::Postgres => sql.push_str(&params(&mut n, width)),
            Backend::Sqlite => {
                for i in 0..width {
                    sql.push_str(if i == 0 { "?" } else { ", ?" });
                }
            }
        }
        sql.push(')');
    }
}

#[cfg(test)]
mod tests;
