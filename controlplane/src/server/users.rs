//! Users by name: create one (with a generated initial password, shown once) and reset a
//! password. Roles and users as whole documents are in `documents`.

use std::collections::BTreeMap;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{internal, now_secs, store_status};
use crate::audit::types;
use crate::password;
use crate::proto;
use crate::resources::{self, Metadata, User, UserSpec};

pub(super) async fn create(
    call: Call,
    r: proto::CreateUserRequest,
) -> Result<Done<proto::CreateUserResponse>, Failure> {
    let caller = call.caller()?;
    let state = &call.state;
    let mut traits = BTreeMap::new();
    if !r.logins.is_empty() {
        traits.insert("logins".to_string(), r.logins.clone());
    }
    let user = User {
        kind: "user".into(),
        version: "v1".into(),
        metadata: Metadata {
            name: r.name.clone(),
            ..Default::default()
        },
        spec: UserSpec {
            roles: r.roles.clone(),
            traits,
        },
    };
    let value = serde_json::to_value(&user).map_err(internal)?;
    resources::parse_value(value).map_err(|e| Status::invalid_argument(e.to_string()))?;
    state.check_roles_exist(&user.spec.roles).await?;
    let initial = password::generate();
    let hash = state.hash_password(initial.clone()).await?;
    state
        .store
        .create_user(&user, &hash, now_secs())
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::CreateUserResponse {
            initial_password: initial,
        },
        Audit::one(
            types::USER_CREATE,
            &caller.identity.name,
            json!({ "user": user.metadata.name, "roles": user.spec.roles, "logins": r.logins }),
        ),
    ))
}

pub(super) async fn reset_password(
    call: Call,
    r: proto::ResetPasswordRequest,
) -> Result<Done<proto::ResetPasswordResponse>, Failure> {
    let caller = call.caller()?;
    let state = &call.state;
    let name = r.name;
    if state
        .store
        .get_user(&name)
        .await
        .map_err(store_status)?
        .is_none()
    {
        return Err(Status::not_found(format!("user `{name}` not found")).into());
    }
    let new_password = password::generate();
    let hash = state.hash_password(new_password.clone()).await?;
    state
        .store
        .set_password_hash(&name, &hash, now_secs())
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::ResetPasswordResponse {
            password: new_password,
        },
        Audit::one(
            types::USER_PASSWORD_RESET,
            &caller.identity.name,
            json!({ "user": name }),
        ),
    ))
}
