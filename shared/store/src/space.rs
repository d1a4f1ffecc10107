//! Creating a space, once for every store: the id check, the source id
//! and the three credentials. An adapter stores a [`SpaceDraft`] (all of
//! it or none) and hands back its [`SpaceDraft::credentials`].

use kindred_domain::{IdentitySettings, Millis};

use crate::ports::NewSpace;
use crate::token::{mint, random_base62, NewToken, TokenKind};
use crate::{now_millis, valid_space_id, Result, StoreError};

/// A new space as it is stored: tokens hashed, secrets kept only to be
/// shown once.
pub struct SpaceDraft {
    pub space_id: String,
    /// `src_` and 20 random characters: the `source_id` of its events.
    pub source_id: String,
    /// Default identity settings, as stored JSON.
    pub settings: String,
    pub created_at: Millis,
    /// A write key, an access token and an admin token.
    pub tokens: [(TokenKind, NewToken); 3],
}

impl SpaceDraft {
    /// Checks the id and mints the credentials.
    pub fn new(space_id: &str) -> Result<Self> {
        if !valid_space_id(space_id) {
            return Err(StoreError::Invalid(
                "a space id is 1-64 characters of letters, digits, '_' and '-'".into(),
            ));
        }
        Ok(Self {
            space_id: space_id.to_string(),
            source_id: format!("src_{}", random_base62(20)),
            settings: serde_json::to_string(&IdentitySettings::default())?,
            created_at: now_millis(),
            tokens: [TokenKind::WriteKey, TokenKind::Access, TokenKind::Admin]
                .map(|kind| (kind, mint(kind))),
        })
    }

    /// The secrets, for the one response that shows them.
    pub fn credentials(self) -> NewSpace {
        let [(_, write_key), (_, access_token), (_, admin_token)] = self.tokens;
        NewSpace {
            space_id: self.space_id,
            write_key: write_key.secret.into_exposed(),
            access_token: access_token.secret.into_exposed(),
            admin_token: admin_token.secret.into_exposed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::token_id;

    #[test]
    fn a_draft_has_a_valid_id_and_three_kinds_of_token() {
        assert!(matches!(
            SpaceDraft::new("a b"),
            Err(StoreError::Invalid(_))
        ));
        assert!(SpaceDraft::new(&"x".repeat(65)).is_err());
        let draft = SpaceDraft::new("acme_prod-1").unwrap();
        assert!(draft.source_id.starts_with("src_") && draft.source_id.len() == 24);
        let ids: Vec<String> = draft
            .tokens
            .iter()
            .map(|(_, t)| t.token_id.clone())
            .collect();
        let space = draft.credentials();
        for (secret, id) in [&space.write_key, &space.access_token, &space.admin_token]
            .into_iter()
            .zip(&ids)
        {
            assert_eq!(token_id(secret), Some(id.as_str()));
        }
        assert!(space.write_key.starts_with(TokenKind::WriteKey.prefix()));
        assert!(space.admin_token.starts_with(TokenKind::Admin.prefix()));
    }
}
