-- Second factor: one TOTP device per user (RFC 6238 secret, raw bytes as base32), and the last
-- 30-second step a code of it was accepted at, so a code is never accepted twice (across Auths:
-- the step only moves forward, in one conditional UPDATE).
CREATE TABLE mfa_devices (
    user_name TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    last_step BIGINT NOT NULL,
    created BIGINT NOT NULL
);
