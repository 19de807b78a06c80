//! Users' second-factor devices: one TOTP secret per user and the last step a code of it was
//! accepted at. Codes are checked in [`crate::otp`]; here the step only moves forward, in one
//! conditional `UPDATE`, so two Auths on one database never accept the same code twice.

use sqlx::Row as _;

use super::{Store, StoreError};

/// A user's TOTP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaDevice {
    /// The secret, base32.
    pub secret: String,
    pub last_step: u64,
}

impl Store {
    /// The user's device, if one is enrolled.
    pub async fn get_mfa_device(&self, user: &str) -> Result<Option<MfaDevice>, StoreError> {
        let row = sqlx::query("SELECT secret, last_step FROM mfa_devices WHERE user_name = $1")
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| MfaDevice {
            secret: r.get(0),
            last_step: u64::try_from(r.get::<i64, _>(1)).unwrap_or(0),
        }))
    }

    /// Enroll (or replace) the user's device; `step` is the step its confirming code matched.
    pub async fn put_mfa_device(
        &self,
        user: &str,
        secret: &str,
        step: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO mfa_devices (user_name, secret, last_step, created) VALUES ($1, $2, $3, $4) ON CONFLICT(user_name) DO UPDATE SET secret = excluded.secret, last_step = excluded.last_step, created = excluded.created")
            .bind(user)
            .bind(secret)
            .bind(i64::try_from(step).unwrap_or(i64::MAX))
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Mark `step` used: true if it was later than any step used before (the code counts),
    /// false if this or a later step was already used (a replay, maybe through another Auth).
    pub async fn use_mfa_step(&self, user: &str, step: u64) -> Result<bool, StoreError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "UPDATE mfa_devices SET last_step = $1 WHERE user_name = $2 AND last_step < $1",
        )
        .bind(step)
        .bind(user)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Remove the user's device (`gctl users rm-mfa`, or with the user).
    pub async fn delete_mfa_device(&self, user: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM mfa_devices WHERE user_name = $1")
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
