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
    created     BIGINT NOT NULL
);

CREATE TABLE users (
    name          TEXT PRIMARY KEY NOT NULL,
    spec          TEXT NOT NULL,
    password_hash TEXT,
    created       BIGINT NOT NULL,
    updated       BIGINT NOT NULL
);

CREATE TABLE roles (
    name    TEXT PRIMARY KEY NOT NULL,
    spec    TEXT NOT NULL,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL
);

-- Join tokens are stored as SHA-256 hashes; `id` is a public handle derived from the hash.
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    expires    BIGINT NOT NULL,
    max_uses   BIGINT NOT NULL,
    uses       BIGINT NOT NULL DEFAULT 0,
    created    BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    bot_name   TEXT NOT NULL DEFAULT '',
    labels     TEXT NOT NULL DEFAULT '[]'
);

CREATE TABLE nodes (
    host_id TEXT PRIMARY KEY NOT NULL,
    spec    TEXT NOT NULL,
    expires BIGINT NOT NULL
);

-- Audit log: `id` is monotonically increasing and never reused (an identity column; writers serialize on an advisory lock so ids appear in order);
-- `event_id` is chosen by the emitter so that retries are deduplicated.
CREATE TABLE audit_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    time_nanos  BIGINT NOT NULL,
    type        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    source_addr TEXT NOT NULL,
    cluster     TEXT NOT NULL,
    data        TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time_nanos);
CREATE INDEX audit_events_type_time ON audit_events (type, time_nanos);
