-- Trust between clusters. side = 'root': this cluster is a leaf of the named root (its CAs,
-- proxy address and role map); side = 'leaf': this cluster is the root of the named leaf (its
-- CAs). `spec` is JSON.
CREATE TABLE trusted_clusters (
    name TEXT PRIMARY KEY,
    side TEXT NOT NULL,
    spec TEXT NOT NULL,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL
);
