//! Random ids and secrets: profile ids, write keys, access and admin
//! tokens. Secrets are stored as SHA-256 hashes and compared in constant
//! time; a token starts with a public id used to find its record.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` random base62 characters.
pub fn random_base62(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect()
}

/// A new profile id, `prf_` + 27 base62 characters (~160 bits).
pub fn new_profile_id() -> String {
    format!("prf_{}", random_base62(27))
}

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Sends events (Tracking API).
    WriteKey,
    /// Reads profiles (Profile API).
    Access,
    /// Manages the space (settings, definitions).
    Admin,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            Self::WriteKey => "wk",
            Self::Access => "at",
            Self::Admin => "adm",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WriteKey => "write_key",
            Self::Access => "access_token",
            Self::Admin => "admin_token",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::WriteKey, Self::Access, Self::Admin]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Length of the public id that starts every token's random part.
pub const TOKEN_ID_LEN: usize = 12;

/// Whether `id` has the shape of a token's public id.
pub fn valid_token_id(id: &str) -> bool {
    id.len() == TOKEN_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A freshly minted token: the secret is shown once, only the hash is kept.
pub struct NewToken {
    pub secret: crate::secret::Secret,
    pub token_id: String,
    pub hash: [u8; 32],
}

pub fn mint(kind: TokenKind) -> NewToken {
    let token_id = random_base62(TOKEN_ID_LEN);
    let secret = format!("{}_{}{}", kind.prefix(), token_id, random_base62(32));
    let hash = hash_secret(&secret);
    NewToken {
        secret: secret.into(),
        token_id,
        hash,
    }
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The public id of a presented token, if it has the right shape.
pub fn token_id(secret: &str) -> Option<&str> {
    let (_, rest) = secret.split_once('_')?;
    rest.get(..TOKEN_ID_LEN)
        .filter(|id| id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Constant-time comparison of a presented token with a stored hash.
pub fn verify(secret: &str, stored_hash: &[u8]) -> bool {
    hash_secret(secret).ct_eq(stored_hash).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let t = mint(TokenKind::Access);
        let secret = t.secret.expose();
        assert!(secret.starts_with("at_"));
        assert_eq!(token_id(secret), Some(t.token_id.as_str()));
        assert!(verify(secret, &t.hash));
        let mut wrong = secret.to_string();
        wrong.pop();
        wrong.push('!');
        assert!(!verify(&wrong, &t.hash));
        assert_eq!(token_id("nope"), None);
        assert_eq!(new_profile_id().len(), 31);
    }
}
