//! Second factor: TOTP devices (RFC 6238, [`crate::otp`]). [`add_device`] enrolls one with the
//! user's password (public, limited like Login: a user enrolls before the first login that
//! needs it; replacing a device also needs a code of the current one). [`check_login`] is
//! Login's second step once the password matched.

use std::time::Instant;

use serde_json::json;
use tonic::Status;

use super::call::{Call, Done, Event, Failure};
use super::{AuthState, internal, now_secs, store_status};
use crate::audit::{self, types};
use crate::otp::{self, OtpError};
use crate::proto;
use crate::rbac::RoleSet;
use crate::role::SecondFactor;

/// Smallest secret accepted from a client (bytes).
const MIN_SECRET: usize = 16;

/// How a login proved who it is, for the audit event.
pub(super) enum Method {
    Password,
    PasswordOtp,
}

impl Method {
    pub(super) fn as_str(&self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::PasswordOtp => "password+otp",
        }
    }
}

/// Why a login's second step failed.
pub(super) enum SecondStep {
    /// Required and not given: the client asks for it (not a failed attempt).
    Missing(Status),
    /// Given and wrong, replayed, or required without a device: a failed attempt.
    Refused(Status, &'static str),
}

/// Whether the second factor lets this login through: required by the cluster or a role, or
/// given anyway by a user who has a device.
pub(super) async fn check_login(
    state: &AuthState,
    user: &str,
    roles: &RoleSet,
    code: &str,
) -> Result<Result<Method, SecondStep>, Status> {
    let required = state.second_factor == SecondFactor::Otp || roles.require_mfa();
    if !required && code.is_empty() {
        return Ok(Ok(Method::Password));
    }
    let device = state
        .store
        .get_mfa_device(user)
        .await
        .map_err(store_status)?;
    let Some(device) = device else {
        return Ok(Err(SecondStep::Refused(
            Status::failed_precondition(
                "a second factor is required and none is enrolled: enroll one with `gsh mfa add`",
            ),
            "no second factor enrolled",
        )));
    };
    if code.is_empty() {
        return Ok(Err(SecondStep::Missing(Status::failed_precondition(
            "one-time code required",
        ))));
    }
    match use_code(state, user, &device, code).await? {
        Ok(()) => Ok(Ok(Method::PasswordOtp)),
        Err(e) => Ok(Err(SecondStep::Refused(
            Status::unauthenticated(e.to_string()),
            match e {
                OtpError::Replayed => "one-time code replayed",
                _ => "wrong one-time code",
            },
        ))),
    }
}

/// Check `code` against the device and mark its step used (once, across Auths).
async fn use_code(
    state: &AuthState,
    user: &str,
    device: &crate::storage::MfaDevice,
    code: &str,
) -> Result<Result<(), OtpError>, Status> {
    let secret = otp::base32_decode(&device.secret).map_err(internal)?;
    let now = u64::try_from(now_secs()).unwrap_or(0);
    let step = match otp::verify(&secret, code, now, device.last_step) {
        Ok(step) => step,
        Err(e) => return Ok(Err(e)),
    };
    if state
        .store
        .use_mfa_step(user, step)
        .await
        .map_err(store_status)?
    {
        Ok(Ok(()))
    } else {
        Ok(Err(OtpError::Replayed))
    }
}

pub(super) async fn add_device(
    call: Call,
    r: proto::AddMfaDeviceRequest,
) -> Result<Done<proto::AddMfaDeviceResponse>, Failure> {
    let state = &call.state;
    let addr = call.addr.as_str();
    if r.user.is_empty()
        || r.user.len() > 128
        || r.password.len() > crate::password::MAX_PASSWORD_LEN
        || r.secret.len() > 256
    {
        return Err(Status::invalid_argument(
            "user name must be 1-128 characters, password at most 1024 bytes",
        )
        .into());
    }
    let secret = otp::base32_decode(&r.secret)
        .map_err(|e| Status::invalid_argument(format!("secret: {e}")))?;
    if secret.len() < MIN_SECRET {
        return Err(
            Status::invalid_argument(format!("secret: at least {} bits", MIN_SECRET * 8)).into(),
        );
    }
    let now_instant = Instant::now();
    if let Err(retry) = state
        .limiter
        .lock()
        .map_err(internal)?
        .check(&r.user, addr, now_instant)
    {
        return Err(Status::resource_exhausted(format!(
            "too many failed attempts; try again in {}s",
            retry.as_secs().max(1)
        ))
        .into());
    }
    let fail = |status: Status, reason: &str| {
        if let Ok(mut l) = state.limiter.lock() {
            l.record_failure(&r.user, addr, now_instant);
        }
        Failure::audited(
            status,
            Event::new(
                types::MFA_ADD,
                &r.user,
                audit::failure(reason, json!({ "user": r.user })),
            ),
        )
    };
    let stored = state.store.get_user(&r.user).await.map_err(store_status)?;
    let hash = stored.as_ref().and_then(|(_, h)| h.clone());
    if !state.verify_password(r.password.clone(), hash).await? || stored.is_none() {
        return Err(fail(
            Status::unauthenticated("invalid user name or password"),
            "invalid user name or password",
        ));
    }
    let current = state
        .store
        .get_mfa_device(&r.user)
        .await
        .map_err(store_status)?;
    let replacing = current.is_some();
    if let Some(device) = &current {
        if r.current_code.is_empty() {
            return Err(Status::failed_precondition(
                "a device is enrolled: give a code of it to replace it",
            )
            .into());
        }
        if let Err(e) = use_code(state, &r.user, device, &r.current_code).await? {
            return Err(fail(
                Status::unauthenticated(format!("current device: {e}")),
                "wrong code of the current device",
            ));
        }
    }
    let now = u64::try_from(now_secs()).unwrap_or(0);
    let step = match otp::verify(&secret, &r.code, now, 0) {
        Ok(step) => step,
        Err(e) => {
            return Err(fail(
                Status::invalid_argument(format!("new device: {e}")),
                "wrong code of the new device",
            ));
        }
    };
    state
        .store
        .put_mfa_device(&r.user, &otp::base32_encode(&secret), step, now_secs())
        .await
        .map_err(store_status)?;
    if let Ok(mut l) = state.limiter.lock() {
        l.record_success(&r.user);
    }
    Ok(Done::audited(
        proto::AddMfaDeviceResponse {},
        super::call::Audit::Events(vec![Event::new(
            types::MFA_ADD,
            &r.user,
            audit::success(json!({ "user": r.user, "type": "totp", "replaced": replacing })),
        )]),
    ))
}
