-- Machine ID bots. A bot's roles are ordinary roles. Each join starts a new `instance`
-- (generation 1); each renewal adds one to `generation`, so a renewal that presents an older
-- generation of the current instance is a copied identity: the bot is locked.
CREATE TABLE bots (
    name         TEXT PRIMARY KEY NOT NULL,
    roles        TEXT NOT NULL,
    created      BIGINT NOT NULL,
    created_by   TEXT NOT NULL,
    instance     TEXT NOT NULL DEFAULT '',
    generation   BIGINT NOT NULL DEFAULT 0,
    -- Unix seconds of the last join or renewal, and the address it came from.
    last_seen    BIGINT NOT NULL DEFAULT 0,
    last_addr    TEXT NOT NULL DEFAULT '',
    locked       BIGINT NOT NULL DEFAULT 0,
    lock_reason  TEXT NOT NULL DEFAULT ''
);
