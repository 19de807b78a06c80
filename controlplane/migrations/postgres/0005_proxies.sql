-- The proxies of the cluster, as each announces itself (HeartbeatProxy): agents tunnel to
-- every one that has not expired.
CREATE TABLE proxies (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    expires BIGINT NOT NULL
);
