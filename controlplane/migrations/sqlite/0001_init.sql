-- Cluster-wide settings (cluster name, creation time).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- The three certificate authorities. Private keys never leave Auth.
CREATE TABLE cert_authorities (
    kind        TEXT PRIMARY KEY NOT NULL,
    public_pem  TEXT NOT NULL,
    private_pem TEXT NOT NULL,
    created     INTEGER NOT NULL
);

CREATE TABLE users (
    name          TEXT PRIMARY KEY NOT NULL,
    spec          TEXT NOT NULL,
    password_hash TEXT,
    created       INTEGER NOT NULL,
    updated       INTEGER NOT NULL
);

CREATE TABLE roles (
    name    TEXT PRIMARY KEY NOT NULL,
    spec    TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL
);

-- Join tokens are stored as SHA-256 hashes; `id` is a public handle derived from the hash.
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    expires    INTEGER NOT NULL,
    max_uses   INTEGER NOT NULL,
    uses       INTEGER NOT NULL DEFAULT 0,
    created    INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    bot_name   TEXT NOT NULL DEFAULT '',
    labels     TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE nodes (
    host_id TEXT PRIMARY KEY NOT NULL,
    spec    TEXT NOT NULL,
    expires INTEGER NOT NULL
);

-- Audit log: `id` is monotonically increasing and never reused (AUTOINCREMENT);
-- `event_id` is chosen by the emitter so that retries are deduplicated.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    time_nanos  INTEGER NOT NULL,
    type        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    source_addr TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    data        TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time_nanos);
CREATE INDEX audit_events_type_time ON audit_events (type, time_nanos);
