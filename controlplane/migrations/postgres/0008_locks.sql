-- Locks: the JSON of `crate::locks::Lock` by name; `expires` (unix seconds, 0: until removed)
-- beside it so expired locks are skipped and swept in SQL.
CREATE TABLE locks (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    expires BIGINT NOT NULL
);
