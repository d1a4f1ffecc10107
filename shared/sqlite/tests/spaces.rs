//! Spaces and credentials on the embedded store.

use std::sync::{Arc, Barrier};

use kindred_sqlite::SqliteStore;
use kindred_store::token::TokenKind;
use kindred_store::{Spaces, StoreError};

#[test]
fn racing_creations_of_one_space_id_make_exactly_one_space() {
    let dir = tempfile::tempdir().unwrap();
    SqliteStore::open(dir.path()).unwrap();
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = dir.path().to_path_buf();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                // Separate connections, like separate `kindred space create` processes.
                let store = SqliteStore::open(&path);
                barrier.wait();
                store?.create_space("contested")
            })
        })
        .collect();
    let handles: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let created = handles.iter().filter(|r| r.is_ok()).count();
    let refused = handles
        .iter()
        .filter(|r| matches!(r, Err(StoreError::AlreadyExists)))
        .count();
    assert_eq!((created, refused), (1, 7));
    assert_eq!(
        SqliteStore::open(dir.path())
            .unwrap()
            .space_count()
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn tokens_authenticate_only_their_kind_and_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let a = store.create_space("a").unwrap();
    let b = store.create_space("b").unwrap();
    let auth = store
        .authenticate(&a.access_token, TokenKind::Access)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.space_id, "a");
    assert!(auth.source_id.starts_with("src_"));
    assert_eq!(
        store
            .authenticate(&b.write_key, TokenKind::WriteKey)
            .await
            .unwrap()
            .unwrap()
            .space_id,
        "b"
    );
    // A token is only good for its own kind, and a forged secret with a
    // real token id is refused.
    assert!(store
        .authenticate(&a.access_token, TokenKind::Admin)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .authenticate(&a.write_key, TokenKind::Access)
        .await
        .unwrap()
        .is_none());
    let last = if a.admin_token.ends_with('x') {
        'y'
    } else {
        'x'
    };
    let forged = format!("{}{last}", &a.admin_token[..a.admin_token.len() - 1]);
    assert!(store
        .authenticate(&forged, TokenKind::Admin)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .authenticate("garbage", TokenKind::Admin)
        .await
        .unwrap()
        .is_none());
    // Secrets are not stored: the database holds no token in clear.
    let mut bytes = std::fs::read(dir.path().join("store.db")).unwrap();
    bytes.extend(std::fs::read(dir.path().join("store.db-wal")).unwrap_or_default());
    let text = String::from_utf8_lossy(&bytes);
    for secret in [&a.write_key, &a.access_token, &a.admin_token] {
        assert!(!text.contains(secret.as_str()));
    }
    assert!(matches!(
        store.create_space("bad id!"),
        Err(StoreError::Invalid(_))
    ));
}
