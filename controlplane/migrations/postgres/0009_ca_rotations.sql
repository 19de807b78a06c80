-- CA rotation: the key a CA had before its last rotation (or rollback), trusted beside the one
-- in `cert_authorities` until `trusted_until` (unix seconds); `rolled_back` = 1 after a rollback.
CREATE TABLE ca_rotations (
    kind TEXT PRIMARY KEY,
    previous_public TEXT NOT NULL,
    previous_private TEXT NOT NULL,
    trusted_until BIGINT NOT NULL,
    started BIGINT NOT NULL,
    rolled_back BIGINT NOT NULL
);
