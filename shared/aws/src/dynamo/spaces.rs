//! Spaces and their hashed credentials on DynamoDB.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnConsumedCapacity, TransactWriteItem};
use kindred_domain::{IdentityRules, IdentitySettings};
use kindred_store::ports::{NewSpace, SpaceAuth, Spaces};
use kindred_store::token::{hash_secret, mint, random_base62, token_id, verify, TokenKind};
use kindred_store::{now_millis, valid_space_id, Result, StoreError};

use super::{get_s, key, lock, n, s, service, space_key, token_key, DynamoStore, Item, META};

/// How long a verified token or a space's rules are used without a read
/// (a revocation or settings change takes effect within this time).
const CACHE_TTL: Duration = Duration::from_secs(10);
const MAX_CACHED: usize = 10_000;

impl DynamoStore {
    /// Creates a space with default identity settings and fresh
    /// credentials in one transaction; the secrets are returned once.
    pub async fn create_space(&self, space_id: &str) -> Result<NewSpace> {
        if !valid_space_id(space_id) {
            return Err(StoreError::Invalid(
                "a space id is 1-64 characters of letters, digits, '_' and '-'".into(),
            ));
        }
        let now = now_millis();
        let mut space = key(space_key(space_id), META);
        space.insert("space_id".into(), s(space_id));
        space.insert("source_id".into(), s(format!("src_{}", random_base62(20))));
        space.insert(
            "settings".into(),
            s(serde_json::to_string(&IdentitySettings::default())?),
        );
        space.insert("settings_version".into(), n(1));
        space.insert("created_at".into(), n(now));
        let put = |item: Item| -> Result<TransactWriteItem> {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(service)?;
            Ok(TransactWriteItem::builder().put(put).build())
        };
        let mut items = vec![put(space)?];
        let mut secrets = Vec::new();
        for kind in [TokenKind::WriteKey, TokenKind::Access, TokenKind::Admin] {
            let token = mint(kind);
            let mut item = key(token_key(&token.token_id), META);
            item.insert("hash".into(), AttributeValue::B(token.hash.to_vec().into()));
            item.insert("space_id".into(), s(space_id));
            item.insert("kind".into(), s(kind.as_str()));
            item.insert("created_at".into(), n(now));
            items.push(put(item)?);
            secrets.push(token.secret);
        }
        let out = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match out {
            Ok(out) => self.usage.write(out.consumed_capacity()),
            Err(e) => {
                if let Some(TransactWriteItemsError::TransactionCanceledException(c)) =
                    e.as_service_error()
                {
                    if c.cancellation_reasons().first().and_then(|r| r.code())
                        == Some("ConditionalCheckFailed")
                    {
                        return Err(StoreError::AlreadyExists);
                    }
                }
                return Err(service(e));
            }
        }
        let [write_key, access_token, admin_token] =
            <[String; 3]>::try_from(secrets).expect("three tokens minted");
        Ok(NewSpace {
            space_id: space_id.to_string(),
            write_key,
            access_token,
            admin_token,
        })
    }

    /// The identity rules of a space, cached for a few seconds (new
    /// settings apply to events processed after that).
    pub async fn identity_rules(&self, space_id: &str) -> Result<IdentityRules> {
        if let Some((rules, at)) = lock(&self.caches).rules.get(space_id) {
            if at.elapsed() < CACHE_TTL {
                return Ok(rules.clone());
            }
        }
        let settings = self.identity_settings(space_id).await?;
        let rules = IdentityRules::new(settings).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut caches = lock(&self.caches);
        if caches.rules.len() >= MAX_CACHED {
            caches.rules.clear();
        }
        caches
            .rules
            .insert(space_id.to_string(), (rules.clone(), Instant::now()));
        Ok(rules)
    }
}

#[async_trait]
impl Spaces for DynamoStore {
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
        let auth = SpaceAuth {
            space_id,
            source_id: get_s(&space, "source_id")?.to_string(),
            kind,
            future_tolerance: settings.future_tolerance(),
        };
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
}
