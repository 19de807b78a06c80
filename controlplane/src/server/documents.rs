//! Roles and users as whole resource documents (`gctl create -f`, `gctl get`, `gctl rm`). The
//! rule depends on the request: the kind it names, and for an upsert whether the resource exists
//! (create or update), so each handler authorizes before it acts.

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{now_secs, store_status};
use crate::audit::types;
use crate::proto;
use crate::resources::{self, Resource, ResourceKind, Verb};

fn kind_of(name: &str) -> Result<ResourceKind, Status> {
    ResourceKind::parse(name).ok_or_else(|| Status::invalid_argument("unknown kind"))
}

pub(super) async fn upsert(
    call: Call,
    r: proto::UpsertResourceRequest,
) -> Result<Done<proto::UpsertResourceResponse>, Failure> {
    let state = &call.state;
    let value: serde_json::Value = serde_json::from_str(&r.json)
        .map_err(|e| Status::invalid_argument(format!("resource is not valid JSON: {e}")))?;
    let resource =
        resources::parse_value(value).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let kind = resource.kind();
    let exists = match &resource {
        Resource::Role(role) => state
            .store
            .get_role(&role.metadata.name)
            .await
            .map_err(store_status)?
            .is_some(),
        Resource::User(user) => state
            .store
            .get_user(&user.metadata.name)
            .await
            .map_err(store_status)?
            .is_some(),
        Resource::TrustedCluster(tc) => state
            .store
            .get_trust(&tc.metadata.name)
            .await
            .map_err(store_status)?
            .is_some(),
    };
    let verb = if exists { Verb::Update } else { Verb::Create };
    let caller = call.authorize(kind, verb)?;
    let now = now_secs();
    let (created, event_type) = match &resource {
        Resource::Role(role) => {
            let created = state
                .store
                .upsert_role(role, r.create_only, now)
                .await
                .map_err(store_status)?;
            let event = if created {
                types::ROLE_CREATE
            } else {
                types::ROLE_UPDATE
            };
            (created, event)
        }
        Resource::User(user) => {
            state.check_roles_exist(&user.spec.roles).await?;
            let created = state
                .store
                .upsert_user(user, r.create_only, now)
                .await
                .map_err(store_status)?;
            let event = if created {
                types::USER_CREATE
            } else {
                types::USER_UPDATE
            };
            (created, event)
        }
        Resource::TrustedCluster(tc) => {
            if exists && r.create_only {
                return Err(Status::already_exists(format!(
                    "trusted_cluster `{}` exists; remove it first or update it",
                    tc.metadata.name
                ))
                .into());
            }
            let doc = super::trust::establish(state, tc).await?;
            let spec = serde_json::to_string(&doc).map_err(super::internal)?;
            state
                .store
                .put_trust(
                    &crate::storage::TrustRow {
                        name: tc.metadata.name.clone(),
                        side: super::trust::ROOT.into(),
                        spec,
                    },
                    now,
                )
                .await
                .map_err(store_status)?;
            let event = if exists {
                types::TRUSTED_CLUSTER_UPDATE
            } else {
                types::TRUSTED_CLUSTER_CREATE
            };
            (!exists, event)
        }
    };
    Ok(Done::audited(
        proto::UpsertResourceResponse { created },
        Audit::one(
            event_type,
            &caller.identity.name,
            json!({ "kind": kind.as_str(), "name": resource.name() }),
        ),
    ))
}

pub(super) async fn get(
    call: Call,
    r: proto::GetResourceRequest,
) -> Result<Done<proto::GetResourceResponse>, Failure> {
    let kind = kind_of(&r.kind)?;
    call.authorize(kind, Verb::Read)?;
    let store = &call.state.store;
    let name = &r.name;
    let json = match kind {
        ResourceKind::Role => store
            .get_role(name)
            .await
            .map_err(store_status)?
            .map(|r| Resource::Role(r).to_json()),
        ResourceKind::User => store
            .get_user(name)
            .await
            .map_err(store_status)?
            .map(|(u, _)| Resource::User(u).to_json()),
        ResourceKind::TrustedCluster => match store.get_trust(name).await.map_err(store_status)? {
            Some(row) if row.side == super::trust::LEAF => {
                return Err(Status::not_found(format!(
                    "`{name}` is a leaf of this cluster, not a cluster it trusts (gsh clusters lists both)"
                ))
                .into());
            }
            Some(row) => {
                super::trust::as_resource(&row).map(|t| Resource::TrustedCluster(t).to_json())
            }
            None => None,
        },
        _ => {
            return Err(
                Status::invalid_argument(format!("get is not supported for {kind}")).into(),
            );
        }
    };
    let json = json.ok_or_else(|| Status::not_found(format!("{kind} `{name}` not found")))?;
    Ok(Done::read(proto::GetResourceResponse { json }))
}

pub(super) async fn list(
    call: Call,
    r: proto::ListResourcesRequest,
) -> Result<Done<proto::ListResourcesResponse>, Failure> {
    let kind = kind_of(&r.kind)?;
    call.authorize(kind, Verb::List)?;
    let store = &call.state.store;
    let json = match kind {
        ResourceKind::Role => store
            .list_roles()
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|r| Resource::Role(r).to_json())
            .collect(),
        ResourceKind::User => store
            .list_users()
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|u| Resource::User(u).to_json())
            .collect(),
        ResourceKind::TrustedCluster => store
            .list_trust()
            .await
            .map_err(store_status)?
            .iter()
            .filter_map(super::trust::as_resource)
            .map(|t| Resource::TrustedCluster(t).to_json())
            .collect(),
        _ => {
            return Err(Status::invalid_argument(format!(
                "list is not supported for {kind}; use the kind's own call"
            ))
            .into());
        }
    };
    Ok(Done::read(proto::ListResourcesResponse { json }))
}

pub(super) async fn delete(
    call: Call,
    r: proto::DeleteResourceRequest,
) -> Result<Done<proto::DeleteResourceResponse>, Failure> {
    let kind = kind_of(&r.kind)?;
    let caller = call.authorize(kind, Verb::Delete)?;
    if kind == ResourceKind::TrustedCluster {
        // Either side: the root forgets a leaf, a leaf stops trusting its root.
        let removed = call
            .state
            .store
            .delete_trust(&r.name)
            .await
            .map_err(store_status)?;
        if !removed {
            return Err(
                Status::not_found(format!("trusted_cluster `{}` not found", r.name)).into(),
            );
        }
        return Ok(Done::audited(
            proto::DeleteResourceResponse {},
            Audit::one(
                types::TRUSTED_CLUSTER_DELETE,
                &caller.identity.name,
                json!({ "kind": kind.as_str(), "name": r.name }),
            ),
        ));
    }
    let (table, event_type) = match kind {
        ResourceKind::Role => ("role", types::ROLE_DELETE),
        ResourceKind::User => ("user", types::USER_DELETE),
        ResourceKind::Node => ("node", types::NODE_DELETE),
        _ => {
            return Err(
                Status::invalid_argument(format!("delete is not supported for {kind}")).into(),
            );
        }
    };
    call.state
        .store
        .delete(table, &r.name)
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::DeleteResourceResponse {},
        Audit::one(
            event_type,
            &caller.identity.name,
            json!({ "kind": kind.as_str(), "name": r.name }),
        ),
    ))
}
