//! Join tokens: created with a random secret shown once and stored as a hash, listed without
//! it, deleted by public id or by the secret itself.

use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::{DEFAULT_TOKEN_TTL, now_secs, store_status, ttl_from};
use crate::audit::types;
use crate::proto;
use crate::resources;
use crate::storage::TokenRecord;

const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// How a token is stored: the SHA-256 of its secret.
pub(super) fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A token's public id, derived from its secret.
fn token_id(secret: &str) -> String {
    let digest = hex::encode(Sha256::digest(
        format!("gatehouse-token-id:{secret}").as_bytes(),
    ));
    digest.get(..16).unwrap_or_default().to_owned()
}

fn token_proto(t: &TokenRecord) -> proto::Token {
    proto::Token {
        id: t.id.clone(),
        r#type: t.token_type.clone(),
        expires: t.expires,
        max_uses: t.max_uses,
        uses: t.uses,
        created: t.created,
        created_by: t.created_by.clone(),
        bot_name: t.bot_name.clone(),
    }
}

pub(super) async fn create(
    call: Call,
    r: proto::CreateTokenRequest,
) -> Result<Done<proto::CreateTokenResponse>, Failure> {
    let caller = call.caller()?;
    if !matches!(
        r.r#type.as_str(),
        "node" | "proxy" | "bot" | "trusted_cluster"
    ) {
        return Err(Status::invalid_argument(format!(
            "type: unknown token type `{}`; expected node, proxy, bot or trusted_cluster",
            r.r#type
        ))
        .into());
    }
    if r.r#type == "bot" {
        resources::validate_name(&r.bot_name)
            .map_err(|m| Status::invalid_argument(format!("bot_name: {m}")))?;
    }
    if r.r#type == "bot"
        && call
            .state
            .store
            .get_bot(&r.bot_name)
            .await
            .map_err(store_status)?
            .is_none()
    {
        return Err(Status::failed_precondition(format!(
            "bot `{}` does not exist; add it with `gctl bots add {} --roles …`",
            r.bot_name, r.bot_name
        ))
        .into());
    }
    let ttl = ttl_from(r.ttl_seconds, DEFAULT_TOKEN_TTL);
    let (secret, record) = insert_new(
        &call.state,
        NewToken {
            token_type: &r.r#type,
            ttl,
            max_uses: r.max_uses,
            bot_name: &r.bot_name,
            labels: &r.labels,
            created_by: &caller.identity.name,
        },
    )
    .await?;
    let audit = Audit::one(
        types::TOKEN_CREATE,
        &caller.identity.name,
        json!({ "token_id": record.id, "type": record.token_type, "expires": record.expires, "max_uses": record.max_uses }),
    );
    Ok(Done::audited(
        proto::CreateTokenResponse {
            token: secret,
            info: Some(token_proto(&record)),
        },
        audit,
    ))
}

/// What a new token is for.
pub(super) struct NewToken<'a> {
    pub(super) token_type: &'a str,
    pub(super) ttl: std::time::Duration,
    pub(super) max_uses: u32,
    pub(super) bot_name: &'a str,
    pub(super) labels: &'a [String],
    pub(super) created_by: &'a str,
}

/// Make a token with a random secret and store its hash; returns the secret (shown once).
pub(super) async fn insert_new(
    state: &super::AuthState,
    t: NewToken<'_>,
) -> Result<(String, TokenRecord), Status> {
    if t.ttl > MAX_TOKEN_TTL {
        return Err(Status::invalid_argument("ttl: at most 365 days"));
    }
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let secret = hex::encode(secret);
    let now = now_secs();
    let record = TokenRecord {
        id: token_id(&secret),
        hash: token_hash(&secret),
        token_type: t.token_type.to_owned(),
        expires: now + t.ttl.as_secs() as i64,
        max_uses: t.max_uses,
        uses: 0,
        created: now,
        created_by: t.created_by.to_owned(),
        bot_name: t.bot_name.to_owned(),
        labels: t.labels.to_vec(),
    };
    state
        .store
        .insert_token(&record)
        .await
        .map_err(store_status)?;
    Ok((secret, record))
}

pub(super) async fn list(
    call: Call,
    _r: proto::ListTokensRequest,
) -> Result<Done<proto::ListTokensResponse>, Failure> {
    let tokens = call.state.store.list_tokens().await.map_err(store_status)?;
    Ok(Done::read(proto::ListTokensResponse {
        tokens: tokens.iter().map(token_proto).collect(),
    }))
}

pub(super) async fn delete(
    call: Call,
    r: proto::DeleteTokenRequest,
) -> Result<Done<proto::DeleteTokenResponse>, Failure> {
    let caller = call.caller()?;
    let id = r.id;
    // Accept the public id or the secret itself.
    let (by_id, by_hash) = if id.len() == 16 {
        (id.clone(), String::new())
    } else {
        (token_id(&id), token_hash(&id))
    };
    call.state
        .store
        .delete_token(&by_id, &by_hash)
        .await
        .map_err(store_status)?;
    Ok(Done::audited(
        proto::DeleteTokenResponse {},
        Audit::one(
            types::TOKEN_DELETE,
            &caller.identity.name,
            json!({ "token_id": by_id }),
        ),
    ))
}
