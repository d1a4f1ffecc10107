//! Spaces and their credentials on the embedded store.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kindred_domain::{IdentitySettings, Millis};
use rusqlite::{params, OptionalExtension};

use super::{lock, SqliteStore};
use kindred_store::ports::{
    check_label, NewSpace, Revoked, SpaceAuth, Spaces, TokenRecord, MAX_LIVE_TOKENS,
};
use kindred_store::token::{hash_secret, mint, token_id, verify, TokenKind};

/// How long a verified token is trusted without a lookup (revocation
/// takes effect within this time).
const AUTH_CACHE_TTL: Duration = Duration::from_secs(10);
const AUTH_CACHE_ENTRIES: usize = 10_000;
use kindred_store::space::SpaceDraft;
use kindred_store::{now_millis, Result, StoreError};

impl SqliteStore {
    /// Creates a space with default identity settings and fresh
    /// credentials; the secrets are returned once and stored hashed.
    pub fn create_space(&self, space_id: &str) -> Result<NewSpace> {
        let draft = SpaceDraft::new(space_id)?;
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let inserted = tx.execute(
            "INSERT INTO spaces (space_id, source_id, settings, settings_version, created_at)
             VALUES (?1, ?2, ?3, 1, ?4) ON CONFLICT DO NOTHING",
            params![
                draft.space_id,
                draft.source_id,
                draft.settings,
                draft.created_at
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists);
        }
        for (kind, token) in &draft.tokens {
            tx.execute(
                "INSERT INTO tokens (token_id, hash, space_id, kind, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    token.token_id,
                    token.hash.as_slice(),
                    draft.space_id,
                    kind.as_str(),
                    draft.created_at
                ],
            )?;
        }
        tx.commit()?;
        Ok(draft.credentials())
    }

    fn create_token_now(
        &self,
        space_id: &str,
        kind: TokenKind,
        label: Option<String>,
    ) -> Result<(TokenRecord, String)> {
        check_label(label.as_deref())?;
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM spaces WHERE space_id = ?1)",
            [space_id],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(StoreError::NotFound);
        }
        let live: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tokens WHERE space_id = ?1 AND revoked_at IS NULL",
            [space_id],
            |r| r.get(0),
        )?;
        if live as usize >= MAX_LIVE_TOKENS {
            return Err(kindred_store::ports::too_many_tokens());
        }
        let token = mint(kind);
        let now = now_millis();
        tx.execute(
            "INSERT INTO tokens (token_id, hash, space_id, kind, created_at, label)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.token_id,
                token.hash.as_slice(),
                space_id,
                kind.as_str(),
                now,
                label
            ],
        )?;
        tx.commit()?;
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

    fn revoke_token_now(&self, space_id: &str, token_id: &str) -> Result<Revoked> {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let kind: Option<String> = tx
            .query_row(
                "SELECT kind FROM tokens
                 WHERE token_id = ?1 AND space_id = ?2 AND revoked_at IS NULL",
                [token_id, space_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(kind) = kind else {
            return Ok(Revoked::NotFound);
        };
        if TokenKind::parse(&kind) == Some(TokenKind::Admin) {
            let admins: i64 = tx.query_row(
                "SELECT COUNT(*) FROM tokens
                 WHERE space_id = ?1 AND kind = ?2 AND revoked_at IS NULL",
                [space_id, &kind],
                |r| r.get(0),
            )?;
            if admins <= 1 {
                return Ok(Revoked::LastAdmin);
            }
        }
        tx.execute(
            "UPDATE tokens SET revoked_at = ?3 WHERE token_id = ?1 AND space_id = ?2",
            params![token_id, space_id, now_millis()],
        )?;
        tx.commit()?;
        // Locally a revoked token stops working at once.
        self.forget_verified_tokens();
        Ok(Revoked::Revoked)
    }

    /// Empties the authentication cache, so that every token is looked up
    /// again; lookups already under way do not refill it.
    fn forget_verified_tokens(&self) {
        let mut cache = lock(&self.auth_cache);
        self.auth_generation.fetch_add(1, Ordering::SeqCst);
        cache.clear();
    }

    pub fn space_count(&self) -> Result<u64> {
        Ok(self
            .reader()?
            .query_row("SELECT COUNT(*) FROM spaces", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    fn authenticate_now(&self, secret: &str, kind: TokenKind) -> Result<Option<SpaceAuth>> {
        let Some(id) = token_id(secret) else {
            return Ok(None);
        };
        // A token verified in the last few seconds is not looked up again.
        // The cache is keyed by the secret's hash, so finding an entry
        // reveals nothing an attacker could use to forge a token.
        let key = hash_secret(secret);
        let generation = {
            let cache = lock(&self.auth_cache);
            if let Some((auth, at)) = cache.get(&key) {
                if at.elapsed() < AUTH_CACHE_TTL && auth.kind == kind {
                    return Ok(Some(auth.clone()));
                }
            }
            self.auth_generation.load(Ordering::SeqCst)
        };
        let row = self
            .reader()?
            .prepare_cached(
                "SELECT t.hash, t.space_id, t.kind, s.source_id, s.settings FROM tokens t
                 JOIN spaces s ON s.space_id = t.space_id
                 WHERE t.token_id = ?1 AND t.revoked_at IS NULL",
            )?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?;
        let Some((hash, space_id, stored_kind, source_id, settings)) = row else {
            return Ok(None);
        };
        // Verify the secret before looking at anything else it unlocks.
        if !verify(secret, &hash) || TokenKind::parse(&stored_kind) != Some(kind) {
            return Ok(None);
        }
        let settings: IdentitySettings = serde_json::from_str(&settings)?;
        let auth = Some(SpaceAuth::new(space_id, source_id, kind, &settings));
        if let Some(auth) = &auth {
            let mut cache = lock(&self.auth_cache);
            // A revocation or settings change since the read above: the
            // answer may be stale, so it is not remembered.
            if self.auth_generation.load(Ordering::SeqCst) != generation {
                return Ok(Some(auth.clone()));
            }
            if cache.len() >= AUTH_CACHE_ENTRIES {
                cache.retain(|_, (_, at)| at.elapsed() < AUTH_CACHE_TTL);
            }
            if cache.len() < AUTH_CACHE_ENTRIES {
                cache.insert(key, (auth.clone(), Instant::now()));
            }
        }
        Ok(auth)
    }
}

#[async_trait]
impl Spaces for SqliteStore {
    async fn authenticate(&self, secret: &str, kind: TokenKind) -> Result<Option<SpaceAuth>> {
        let secret = secret.to_string();
        self.blocking(move |s| s.authenticate_now(&secret, kind))
            .await
    }

    async fn identity_settings(&self, space_id: &str) -> Result<IdentitySettings> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let json: Option<String> = s
                .reader()?
                .query_row(
                    "SELECT settings FROM spaces WHERE space_id = ?1",
                    [&space_id],
                    |r| r.get(0),
                )
                .optional()?;
            let json = json.ok_or(StoreError::NotFound)?;
            Ok(serde_json::from_str(&json)?)
        })
        .await
    }

    async fn create_token(
        &self,
        space_id: &str,
        kind: TokenKind,
        label: Option<String>,
    ) -> Result<(TokenRecord, String)> {
        let space_id = space_id.to_string();
        self.blocking(move |s| s.create_token_now(&space_id, kind, label))
            .await
    }

    async fn tokens(&self, space_id: &str) -> Result<Vec<TokenRecord>> {
        let space_id = space_id.to_string();
        self.blocking(move |s| {
            let conn = s.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT token_id, kind, label, created_at, revoked_at FROM tokens
                 WHERE space_id = ?1 ORDER BY created_at, token_id",
            )?;
            let rows = stmt.query_map([&space_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (token_id, kind, label, created_at, revoked_at) = row?;
                let kind = TokenKind::parse(&kind)
                    .ok_or_else(|| StoreError::Undecodable(format!("token kind {kind:?}")))?;
                out.push(TokenRecord {
                    token_id,
                    kind,
                    label,
                    created_at,
                    revoked_at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn revoke_token(&self, space_id: &str, token_id: &str) -> Result<Revoked> {
        let (space_id, token_id) = (space_id.to_string(), token_id.to_string());
        self.blocking(move |s| s.revoke_token_now(&space_id, &token_id))
            .await
    }

    async fn put_identity_settings(
        &self,
        space_id: &str,
        settings: &IdentitySettings,
    ) -> Result<()> {
        let space_id = space_id.to_string();
        let json = serde_json::to_string(settings)?;
        self.blocking(move |s| {
            let changed = s.writer().execute(
                "UPDATE spaces SET settings = ?2, settings_version = settings_version + 1
                 WHERE space_id = ?1",
                params![space_id, json],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            // Verified tokens carry the space's settings.
            s.forget_verified_tokens();
            Ok(())
        })
        .await
    }

    async fn start_session(
        &self,
        session_hash: [u8; 32],
        token_id: &str,
        kind: TokenKind,
        expires_at: Millis,
    ) -> Result<()> {
        let token_id = token_id.to_string();
        self.blocking(move |s| {
            let conn = s.writer();
            // Expired sessions go as new ones come.
            conn.execute(
                "DELETE FROM ui_sessions WHERE expires_at <= ?1",
                [now_millis()],
            )?;
            conn.execute(
                "INSERT INTO ui_sessions (id_hash, token_id, kind, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![&session_hash[..], token_id, kind.as_str(), expires_at],
            )?;
            Ok(())
        })
        .await
    }

    async fn session_auth(&self, session_hash: [u8; 32], now: Millis) -> Result<Option<SpaceAuth>> {
        self.blocking(move |s| {
            let row = s
                .reader()?
                .prepare_cached(
                    "SELECT t.space_id, t.kind, sp.source_id, sp.settings FROM ui_sessions u
                     JOIN tokens t ON t.token_id = u.token_id AND t.kind = u.kind
                     JOIN spaces sp ON sp.space_id = t.space_id
                     WHERE u.id_hash = ?1 AND u.expires_at > ?2 AND t.revoked_at IS NULL",
                )?
                .query_row(params![&session_hash[..], now], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .optional()?;
            let Some((space_id, kind, source_id, settings)) = row else {
                return Ok(None);
            };
            let Some(kind) = TokenKind::parse(&kind) else {
                return Ok(None);
            };
            let settings: IdentitySettings = serde_json::from_str(&settings)?;
            Ok(Some(SpaceAuth::new(space_id, source_id, kind, &settings)))
        })
        .await
    }

    async fn end_session(&self, session_hash: [u8; 32]) -> Result<()> {
        self.blocking(move |s| {
            s.writer().execute(
                "DELETE FROM ui_sessions WHERE id_hash = ?1",
                [&session_hash[..]],
            )?;
            Ok(())
        })
        .await
    }
}
