//! A browser's login: the proxy makes fresh keys, asks Auth for the user's certificates with
//! the password and one-time code (Auth checks both, and applies its own limits), and keeps them
//! in a web session whose cookie the browser gets. Failed attempts are also limited here per
//! user and per browser address, with Auth's own limits (Auth sees the proxy's address).

use std::sync::Arc;
use std::time::Instant;

use gatehouse_controlplane::proto;
use serde::Deserialize;

use crate::api::ApiError;
use crate::sessions::{WebSession, new_token};
use crate::ssh::UserIdentity;
use crate::{App, Creds, now_secs};

/// The login form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    pub(crate) user: String,
    pub(crate) password: String,
    #[serde(default)]
    pub(crate) otp: String,
}

/// What a login gives the page (the cookie goes in a header).
pub(crate) struct LoggedIn {
    pub(crate) token: String,
    pub(crate) session: Arc<crate::Session>,
}

pub(crate) async fn login(app: &App, body: LoginBody, addr: &str) -> Result<LoggedIn, ApiError> {
    if body.user.is_empty()
        || body.user.len() > 128
        || body.password.len() > 1024
        || body.otp.len() > 16
    {
        return Err(ApiError::bad_request(
            "user must be 1-128 characters, password at most 1024 bytes, code at most 16",
        ));
    }
    let now = Instant::now();
    let limited = app
        .limiter
        .lock()
        .map_err(|_| ApiError::internal("login limiter"))?
        .check(&body.user, addr, now);
    if let Err(retry) = limited {
        return Err(ApiError::too_many(format!(
            "too many failed login attempts; try again in {}s",
            retry.as_secs().max(1)
        )));
    }
    let ssh_key = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| ApiError::internal(format!("ssh key: {e}")))?;
    // The same key as russh's type (russh uses a newer ssh-key).
    let ssh_key_pem = ssh_key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| ApiError::internal(format!("ssh key: {e}")))?;
    let russh_key = russh::keys::PrivateKey::from_openssh(ssh_key_pem.as_bytes())
        .map_err(|e| ApiError::internal(format!("ssh key: {e}")))?;
    let tls_key = gatehouse_controlplane::ca::generate_leaf_key()
        .map_err(|e| ApiError::internal(format!("tls key: {e}")))?;
    let mut auth = app
        .public_client(addr)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot reach Auth: {e}")))?;
    let reply = auth
        .login(proto::LoginRequest {
            user: body.user.clone(),
            password: body.password,
            ssh_public_key: ssh_key
                .public_key()
                .to_openssh()
                .map_err(|e| ApiError::internal(e.to_string()))?,
            tls_public_key: rcgen::PublicKeyData::subject_public_key_info(&tls_key),
            ttl_seconds: 0,
            otp: body.otp,
            via: "web".into(),
        })
        .await;
    let resp = match reply {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let failed = matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
            ) && status.message() != "one-time code required";
            if failed && let Ok(mut l) = app.limiter.lock() {
                l.record_failure(&body.user, addr, now);
            }
            return Err(ApiError::from_login_status(&status));
        }
    };
    if let Ok(mut l) = app.limiter.lock() {
        l.record_success(&body.user);
    }
    let creds = resp
        .credentials
        .ok_or_else(|| ApiError::internal("Auth sent no credentials"))?;
    let ssh_cert = russh::keys::Certificate::from_openssh(&creds.ssh_cert)
        .map_err(|e| ApiError::internal(format!("the SSH certificate from Auth: {e}")))?;
    let host_cas = creds
        .ssh_host_ca
        .iter()
        .filter_map(|k| russh::keys::PublicKey::from_openssh(k).ok())
        .collect();
    let session = WebSession {
        user: body.user,
        roles: resp.roles,
        logins: resp.logins,
        expires: creds.expires,
        csrf: new_token(),
        creds: Creds::new(UserIdentity {
            ca_pem: creds.tls_ca.clone(),
            tls_cert: creds.tls_cert,
            tls_key: gatehouse_controlplane::tls::key_pem_for_tools(&tls_key),
            ssh_key: Arc::new(russh_key),
            ssh_cert,
            host_cas,
        }),
    };
    let token = app
        .sessions
        .lock()
        .map_err(|_| ApiError::internal("web sessions"))?
        .insert(session, now_secs())
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let session = app
        .sessions
        .lock()
        .map_err(|_| ApiError::internal("web sessions"))?
        .get(&token, now_secs())
        .ok_or_else(|| {
            ApiError::unauthorized("the certificates Auth issued have already expired")
        })?;
    Ok(LoggedIn { token, session })
}
