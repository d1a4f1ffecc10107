//! Destination secrets at rest (webhook signing secrets, Segment write
//! keys). Kindred must present them to the destination, so they cannot be
//! hashed: they are sealed with ChaCha20-Poly1305 under a key that lives
//! apart from the database (locally a `secrets.key` file in the data
//! directory, readable by its owner only), bound to the destination they
//! belong to, and never returned by the API or logged.

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use rand::RngCore;

use crate::{Result, StoreError};

/// A secret value in memory (a destination's signing secret or write
/// key, a freshly minted token): it never prints (`Debug` shows
/// `[redacted]`, and there is no `Display`), so no log line or error can
/// carry it; [`Secret::expose`] hands it to the one place that sends,
/// seals or shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_exposed(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_string())
    }
}

const NONCE: usize = 12;
const KEY: usize = 32;

/// Seals and opens secrets under one key.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn from_key(key: &[u8; KEY]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// The key in `path`, created (random, mode 0600) if there is none.
    /// Two processes creating it at once agree on the first one written.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| {
            StoreError::Config(format!("the secrets key {}: {e}", path.display()))
        };
        if !path.exists() {
            let mut key = [0u8; KEY];
            rand::rng().fill_bytes(&mut key);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            match opts.open(path) {
                Ok(mut f) => {
                    f.write_all(&key).map_err(io)?;
                    f.sync_all().map_err(io)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let key: [u8; KEY] = bytes.as_slice().try_into().map_err(|_| {
            StoreError::Config(format!(
                "the secrets key {} is not {KEY} bytes",
                path.display()
            ))
        })?;
        Ok(Self::from_key(&key))
    }

    /// `nonce || ciphertext`, authenticated together with `context` (what
    /// the secret belongs to: a sealed secret moved to another
    /// destination does not open).
    pub fn seal(&self, secret: &str, context: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("sealing a short secret cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, sealed: &[u8], context: &str) -> Result<String> {
        let broken = || StoreError::Undecodable("a sealed secret does not open".into());
        if sealed.len() < NONCE {
            return Err(broken());
        }
        let (nonce, body) = sealed.split_at(NONCE);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| broken())?;
        String::from_utf8(plain).map_err(|_| broken())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("whsec_plain");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret([redacted]))");
        assert_eq!(s.expose(), "whsec_plain");
    }

    #[test]
    fn secrets_open_only_with_their_key_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let a = Sealer::load_or_create(&path).unwrap();
        let sealed = a.seal("whsec_abc", "sp/d1");
        assert!(
            !sealed.windows(9).any(|w| w == b"whsec_abc"),
            "not in the clear"
        );
        assert_ne!(
            sealed,
            a.seal("whsec_abc", "sp/d1"),
            "a fresh nonce each time"
        );
        // The same file gives the same key.
        let b = Sealer::load_or_create(&path).unwrap();
        assert_eq!(b.open(&sealed, "sp/d1").unwrap(), "whsec_abc");
        assert!(b.open(&sealed, "sp/d2").is_err());
        assert!(Sealer::from_key(&[7; KEY]).open(&sealed, "sp/d1").is_err());
        assert!(b.open(&sealed[..5], "sp/d1").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
