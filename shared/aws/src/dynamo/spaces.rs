//! Spaces and their hashed credentials on DynamoDB.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnConsumedCapacity, TransactWriteItem, Update,
};
use kindred_domain::{IdentityRules, IdentitySettings, Millis};
use kindred_store::ports::{
    check_label, NewSpace, Revoked, SpaceAuth, Spaces, TokenRecord, MAX_LIVE_TOKENS,
};
use kindred_store::space::SpaceDraft;
use kindred_store::token::{hash_secret, mint, token_id, verify, NewToken, TokenKind};
use kindred_store::{now_millis, Result, StoreError};

use super::{
    get_n, get_s, key, lock, n, opt_s, s, service, space_key, token_key, DynamoStore, Item,
    EXPIRES_AT, META,
};

/// An explorer session, keyed by the hash of its id.
fn session_key(session_hash: &[u8; 32]) -> String {
    let hex: String = session_hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("UISESSION#{hex}")
}

/// A space's list entry of one of its tokens (the token item itself is
/// keyed by its public id, for authentication).
fn token_ref_sort(token_id: &str) -> String {
    format!("TOKEN#{token_id}")
}

/// How long a verified token or a space's rules are used without a read
/// (a revocation or settings change takes effect within this time).
const CACHE_TTL: Duration = Duration::from_secs(10);
const MAX_CACHED: usize = 10_000;

impl DynamoStore {
    /// Creates a space with default identity settings and fresh
    /// credentials in one transaction; the secrets are returned once.
    pub async fn create_space(&self, space_id: &str) -> Result<NewSpace> {
        let draft = SpaceDraft::new(space_id)?;
        let (space_id, now) = (draft.space_id.as_str(), draft.created_at);
        let mut space = key(space_key(space_id), META);
        space.insert("space_id".into(), s(space_id));
        space.insert("source_id".into(), s(&draft.source_id));
        space.insert("settings".into(), s(&draft.settings));
        space.insert("settings_version".into(), n(1));
        space.insert("created_at".into(), n(now));
        // Live tokens, and live admin tokens (the last one cannot be revoked).
        space.insert("live_tokens".into(), n(3));
        space.insert("admin_tokens".into(), n(1));
        let mut items = vec![self.put_new(space)?];
        for (kind, token) in &draft.tokens {
            items.push(self.put_new(token_item(space_id, token, *kind, now))?);
            items.push(self.put_new(token_ref(space_id, &token.token_id, *kind, None, now))?);
        }
        if self.transact_conditional(items).await?.is_err() {
            return Err(StoreError::AlreadyExists);
        }
        Ok(draft.credentials())
    }

    /// The identity rules of a space, cached for a few seconds (new
    /// settings apply to events processed after that).
    pub async fn identity_rules(&self, space_id: &str) -> Result<IdentityRules> {
        Ok(self.space_rules(space_id).await?.0)
    }

    /// Whether the space has a suppression list (cached with the rules:
    /// a regulation waits out the cache before it deletes).
    pub(crate) async fn space_suppressing(&self, space_id: &str) -> Result<bool> {
        Ok(self.space_rules(space_id).await?.1)
    }

    async fn space_rules(&self, space_id: &str) -> Result<(IdentityRules, bool)> {
        if let Some((rules, suppressing, at)) = lock(&self.caches).rules.get(space_id) {
            if at.elapsed() < CACHE_TTL {
                return Ok((rules.clone(), *suppressing));
            }
        }
        let space = self
            .get(space_key(space_id), true)
            .await?
            .ok_or(StoreError::NotFound)?;
        let settings: IdentitySettings = serde_json::from_str(get_s(&space, "settings")?)?;
        let suppressing = matches!(space.get("suppressing"), Some(AttributeValue::Bool(true)));
        let rules =
            IdentityRules::new(settings).map_err(|e| StoreError::Undecodable(e.to_string()))?;
        let mut caches = lock(&self.caches);
        if caches.rules.len() >= MAX_CACHED {
            caches.rules.clear();
        }
        caches.rules.insert(
            space_id.to_string(),
            (rules.clone(), suppressing, Instant::now()),
        );
        Ok((rules, suppressing))
    }
}

/// A token's own item (found by its public id when it is presented).
fn token_item(space_id: &str, token: &NewToken, kind: TokenKind, now: i64) -> Item {
    let mut item = key(token_key(&token.token_id), META);
    item.insert("hash".into(), AttributeValue::B(token.hash.to_vec().into()));
    item.insert("space_id".into(), s(space_id));
    item.insert("kind".into(), s(kind.as_str()));
    item.insert("created_at".into(), n(now));
    item
}

impl DynamoStore {
    /// A transaction action that creates `item`, only if its key is free.
    fn put_new(&self, item: Item) -> Result<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(service)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }
}

fn token_ref(
    space_id: &str,
    token_id: &str,
    kind: TokenKind,
    label: Option<&str>,
    now: i64,
) -> Item {
    let mut item = key(space_key(space_id), &token_ref_sort(token_id));
    item.insert("token_id".into(), s(token_id));
    item.insert("kind".into(), s(kind.as_str()));
    item.insert("created_at".into(), n(now));
    if let Some(label) = label {
        item.insert("label".into(), s(label));
    }
    item
}

#[async_trait]
impl Spaces for DynamoStore {
    /// One transaction: the token item (for authentication), the space's
    /// list entry, and the space's live-token counts, conditioned on the
    /// space existing and on the limit.
    async fn create_token(
        &self,
        space_id: &str,
        kind: TokenKind,
        label: Option<String>,
    ) -> Result<(TokenRecord, String)> {
        check_label(label.as_deref())?;
        let now = now_millis();
        let token = mint(kind);
        let count = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), META)))
            .update_expression(if kind == TokenKind::Admin {
                "ADD live_tokens :one, admin_tokens :one"
            } else {
                "ADD live_tokens :one"
            })
            .condition_expression(
                "attribute_exists(pk) AND (attribute_not_exists(live_tokens) OR live_tokens < :max)",
            )
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":max", n(MAX_LIVE_TOKENS))
            .build()
            .map_err(service)?;
        let items = vec![
            self.put_new(token_item(space_id, &token, kind, now))?,
            self.put_new(token_ref(
                space_id,
                &token.token_id,
                kind,
                label.as_deref(),
                now,
            ))?,
            TransactWriteItem::builder().update(count).build(),
        ];
        if let Err(cancelled) = self.transact_conditional(items).await? {
            return Err(if !cancelled.failed(2) {
                StoreError::Service("a new token's id was taken".into())
            } else if self.get(space_key(space_id), true).await?.is_none() {
                StoreError::NotFound
            } else {
                kindred_store::ports::too_many_tokens()
            });
        }
        Ok((
            TokenRecord {
                token_id: token.token_id,
                kind,
                label,
                created_at: now,
                revoked_at: None,
            },
            token.secret.into_exposed(),
        ))
    }

    async fn tokens(&self, space_id: &str) -> Result<Vec<TokenRecord>> {
        let mut out = Vec::new();
        for item in self
            .items_with_prefix(space_key(space_id), &token_ref_sort(""), true)
            .await?
        {
            let kind = get_s(&item, "kind")?;
            out.push(TokenRecord {
                token_id: get_s(&item, "token_id")?.to_string(),
                kind: TokenKind::parse(kind)
                    .ok_or_else(|| StoreError::Undecodable(format!("token kind {kind:?}")))?,
                label: opt_s(&item, "label").map(str::to_string),
                created_at: get_n(&item, "created_at")?,
                revoked_at: get_n(&item, "revoked_at").ok(),
            });
        }
        out.sort_by(|a, b| (a.created_at, &a.token_id).cmp(&(b.created_at, &b.token_id)));
        Ok(out)
    }

    /// One transaction: the token item and the list entry marked revoked
    /// (only if still live and of this space) and the space's counts
    /// lowered; revoking an admin token is conditioned on another live
    /// one, so two racing revocations cannot remove the last two.
    async fn revoke_token(&self, space_id: &str, token_id: &str) -> Result<Revoked> {
        let Some(token) = self.get(token_key(token_id), true).await? else {
            return Ok(Revoked::NotFound);
        };
        if opt_s(&token, "space_id") != Some(space_id) || token.contains_key("revoked_at") {
            return Ok(Revoked::NotFound);
        }
        let admin = TokenKind::parse(get_s(&token, "kind")?) == Some(TokenKind::Admin);
        let now = now_millis();
        let token_update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(token_key(token_id), META)))
            .update_expression("SET revoked_at = :now")
            .condition_expression(
                "attribute_exists(pk) AND attribute_not_exists(revoked_at) AND space_id = :space",
            )
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":space", s(space_id))
            .build()
            .map_err(service)?;
        // A token from before token listing has no list entry yet: the
        // update writes a whole one.
        let ref_update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), &token_ref_sort(token_id))))
            .update_expression(
                "SET revoked_at = :now, token_id = :id, kind = :kind, \
                 created_at = if_not_exists(created_at, :created)",
            )
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":id", s(token_id))
            .expression_attribute_values(":kind", s(get_s(&token, "kind")?))
            .expression_attribute_values(":created", n(get_n(&token, "created_at")?))
            .build()
            .map_err(service)?;
        let mut count = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), META)))
            .update_expression(if admin {
                "ADD live_tokens :minus_one, admin_tokens :minus_one"
            } else {
                "ADD live_tokens :minus_one"
            })
            .expression_attribute_values(":minus_one", n(-1));
        if admin {
            // A space from before token management has no count: its
            // admin tokens cannot be revoked until new ones are counted
            // (never a lock-out).
            count = count
                .condition_expression("admin_tokens > :one")
                .expression_attribute_values(":one", n(1));
        }
        let items = vec![
            TransactWriteItem::builder().update(token_update).build(),
            TransactWriteItem::builder().update(ref_update).build(),
            TransactWriteItem::builder()
                .update(count.build().map_err(service)?)
                .build(),
        ];
        match self.transact_conditional(items).await? {
            Ok(()) => {
                // This instance stops accepting it now; others within
                // their cache time (10 s).
                lock(&self.caches).auth.clear();
                Ok(Revoked::Revoked)
            }
            // Revoked meanwhile (or never this space's).
            Err(c) if c.failed(0) => Ok(Revoked::NotFound),
            Err(c) if c.failed(2) => Ok(Revoked::LastAdmin),
            Err(_) => Err(StoreError::Invariant(
                "a revocation failed a condition it does not have",
            )),
        }
    }

    async fn authenticate(&self, secret: &str, kind: TokenKind) -> Result<Option<SpaceAuth>> {
        let Some(id) = token_id(secret) else {
            return Ok(None);
        };
        let cache_key = hash_secret(secret);
        if let Some((auth, at)) = lock(&self.caches).auth.get(&cache_key) {
            if at.elapsed() < CACHE_TTL && auth.kind == kind {
                return Ok(Some(auth.clone()));
            }
        }
        let Some(token) = self.get(token_key(id), true).await? else {
            return Ok(None);
        };
        let Some(AttributeValue::B(hash)) = token.get("hash") else {
            return Ok(None);
        };
        // Verify the secret before looking at anything else it unlocks.
        if !verify(secret, hash.as_ref())
            || token.contains_key("revoked_at")
            || TokenKind::parse(get_s(&token, "kind")?) != Some(kind)
        {
            return Ok(None);
        }
        let space_id = get_s(&token, "space_id")?.to_string();
        let Some(space) = self.get(space_key(&space_id), true).await? else {
            return Ok(None);
        };
        let settings: IdentitySettings = serde_json::from_str(get_s(&space, "settings")?)?;
        let source_id = get_s(&space, "source_id")?.to_string();
        let auth = SpaceAuth::new(space_id, source_id, kind, &settings);
        let mut caches = lock(&self.caches);
        if caches.auth.len() >= MAX_CACHED {
            caches.auth.clear();
        }
        caches
            .auth
            .insert(cache_key, (auth.clone(), Instant::now()));
        Ok(Some(auth))
    }

    async fn identity_settings(&self, space_id: &str) -> Result<IdentitySettings> {
        let space = self
            .get(space_key(space_id), true)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(serde_json::from_str(get_s(&space, "settings")?)?)
    }

    async fn put_identity_settings(
        &self,
        space_id: &str,
        settings: &IdentitySettings,
    ) -> Result<()> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(space_key(space_id), META)))
            .update_expression("SET settings = :s, settings_version = settings_version + :one")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":s", s(serde_json::to_string(settings)?))
            .expression_attribute_values(":one", n(1))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => {
                self.usage.write(out.consumed_capacity());
                lock(&self.caches).rules.remove(space_id);
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::NotFound)
            }
            Err(e) => Err(service(e)),
        }
    }
    async fn start_session(
        &self,
        session_hash: [u8; 32],
        token_id: &str,
        kind: TokenKind,
        expires_at: Millis,
    ) -> Result<()> {
        let mut item = key(session_key(&session_hash), META);
        item.insert("token_id".into(), s(token_id));
        item.insert("kind".into(), s(kind.as_str()));
        item.insert("until".into(), n(expires_at));
        // Gone from the table by itself (TTL) a little after it expires.
        item.insert(EXPIRES_AT.into(), n(expires_at / 1000 + 3_600));
        if self.put_if_absent(item).await? {
            Ok(())
        } else {
            Err(StoreError::Invariant("a new session's id is taken"))
        }
    }

    async fn session_auth(&self, session_hash: [u8; 32], now: Millis) -> Result<Option<SpaceAuth>> {
        let Some(session) = self.get(session_key(&session_hash), true).await? else {
            return Ok(None);
        };
        if get_n(&session, "until")? <= now {
            return Ok(None);
        }
        let kind = TokenKind::parse(get_s(&session, "kind")?);
        let Some(token) = self
            .get(token_key(get_s(&session, "token_id")?), true)
            .await?
        else {
            return Ok(None);
        };
        if token.contains_key("revoked_at") || TokenKind::parse(get_s(&token, "kind")?) != kind {
            return Ok(None);
        }
        let Some(kind) = kind else {
            return Ok(None);
        };
        let space_id = get_s(&token, "space_id")?.to_string();
        let Some(space) = self.get(space_key(&space_id), true).await? else {
            return Ok(None);
        };
        let settings: IdentitySettings = serde_json::from_str(get_s(&space, "settings")?)?;
        let source_id = get_s(&space, "source_id")?.to_string();
        Ok(Some(SpaceAuth::new(space_id, source_id, kind, &settings)))
    }

    async fn end_session(&self, session_hash: [u8; 32]) -> Result<()> {
        self.delete_keys(vec![key(session_key(&session_hash), META)])
            .await
    }
}
