-- Session recordings: the index. The bytes are objects (files under the data dir or S3);
-- while a recording arrives they are appended to a staging file, acknowledged by offset.
CREATE TABLE recordings (
    id          TEXT PRIMARY KEY NOT NULL,
    user        TEXT NOT NULL,
    login       TEXT NOT NULL,
    node        TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    command     TEXT NOT NULL DEFAULT '',
    started_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    -- live | complete | incomplete
    state       TEXT NOT NULL,
    next_offset INTEGER NOT NULL DEFAULT 0,
    next_seq    INTEGER NOT NULL DEFAULT 0,
    reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX recordings_started ON recordings (started_ms);
CREATE INDEX recordings_user ON recordings (user, started_ms);
