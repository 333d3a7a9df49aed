//! Key store at rest, nonce table bounds, configuration and secret bootstrap.

mod common;

use std::os::unix::fs::PermissionsExt;

use actrix_control::config::{CONTROL_DB_FILE, KEK_FILE, KS_DB_FILE, SHARED_KEY_FILE};
use actrix_control::crypto::{self, Kek};
use actrix_control::ks::store::StoreError;
use actrix_control::nonce_auth::{AuthError, NonceStore};
use actrix_control::{ControlConfig, ControlError, KeyStore, SecretString};
use common::*;

fn kek(b: u8) -> Kek {
    Kek::from_bytes([b; 32])
}

#[test]
fn wrong_or_missing_kek_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KS_DB_FILE);
    {
        let s = KeyStore::open(&path, Some(&kek(1)), 3600, 3600).unwrap();
        s.generate(1000).unwrap();
    }
    let err = KeyStore::open(&path, Some(&kek(2)), 3600, 3600).unwrap_err();
    assert!(matches!(err, ControlError::Kek { .. }), "{err}");
    assert!(err.to_string().contains("not the one"), "{err}");
    let err = KeyStore::open(&path, None, 3600, 3600).unwrap_err();
    assert!(err.to_string().contains("no KEK"), "{err}");
    // The right KEK still works.
    let s = KeyStore::open(&path, Some(&kek(1)), 3600, 3600).unwrap();
    assert!(s.get_secret(1000, 1).is_ok());
}

#[test]
fn swapped_or_tampered_rows_fail_to_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KS_DB_FILE);
    let store = KeyStore::open(&path, Some(&kek(7)), 0, 0).unwrap();
    let a = store.generate(1000).unwrap();
    let b = store.generate(1000).unwrap();
    let sa = store.get_secret(1000, a.key_id).unwrap();
    assert_eq!(
        crypto::public_from_secret(&sa.secret_key[..]).unwrap(),
        a.public_key
    );
    assert_eq!(sa.expires_at, 0, "TTL 0 never expires");
    drop(store);

    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "UPDATE ks_keys SET secret_sealed = (SELECT secret_sealed FROM ks_keys WHERE key_id = 2)
             WHERE key_id = 1;",
    )
    .unwrap();
    let store = KeyStore::open(&path, Some(&kek(7)), 0, 0).unwrap();
    assert_eq!(
        store.get_secret(1000, a.key_id).unwrap_err(),
        StoreError::Corrupt
    );
    assert!(store.get_secret(1000, b.key_id).is_ok());
    drop(store);

    // Flip one byte of key 2's ciphertext (tag region at the end).
    let sealed: Vec<u8> = conn
        .query_row(
            "SELECT secret_sealed FROM ks_keys WHERE key_id = 2",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut flipped = sealed.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    conn.execute(
        "UPDATE ks_keys SET secret_sealed = ?1 WHERE key_id = 2",
        rusqlite::params![flipped],
    )
    .unwrap();
    let store = KeyStore::open(&path, Some(&kek(7)), 0, 0).unwrap();
    assert_eq!(
        store.get_secret(1000, b.key_id).unwrap_err(),
        StoreError::Corrupt
    );
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[test]
fn spawn_refuses_wrong_kek_and_resolve_refuses_missing_kek_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ks_config(dir.path());
    cfg.ks.kek = None;
    cfg.ks.shared_key = None;
    let notes = cfg.resolve_secrets().unwrap();
    assert!(notes
        .iter()
        .any(|n| n.contains("generated a new shared key")));
    assert!(notes
        .iter()
        .any(|n| n.contains("generated a new key-encryption key")));
    for f in [SHARED_KEY_FILE, KEK_FILE] {
        let meta = std::fs::metadata(dir.path().join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    // The notes never contain the secrets.
    let key = cfg.ks.shared_key.clone().unwrap();
    let kek_text = cfg.ks.kek.clone().unwrap();
    for n in &notes {
        assert!(!n.contains(key.expose()) && !n.contains(kek_text.expose()));
    }
    assert!(!format!("{cfg:?}").contains(key.expose()));
    let h = start(cfg.clone());
    h.shutdown().unwrap();

    // Same files again: loaded, not regenerated.
    let mut again = ks_config(dir.path());
    again.ks.kek = None;
    again.ks.shared_key = None;
    let notes = again.resolve_secrets().unwrap();
    assert!(notes.iter().any(|n| n.contains("loaded from")));
    assert_eq!(again.ks.shared_key, cfg.ks.shared_key);
    assert_eq!(again.ks.kek, cfg.ks.kek);

    // A different KEK: spawn fails with a clear error instead of serving.
    let mut wrong = ks_config(dir.path());
    wrong.ks.kek = Some(SecretString::from("ff".repeat(32).as_str()));
    let err = actrix_control::spawn(wrong, None).unwrap_err();
    assert!(matches!(err, ControlError::Kek { .. }), "{err}");

    // The KEK file deleted: resolve refuses to generate a new one.
    std::fs::remove_file(dir.path().join(KEK_FILE)).unwrap();
    let mut missing = ks_config(dir.path());
    missing.ks.kek = None;
    let err = missing.resolve_secrets().unwrap_err();
    assert!(err.to_string().contains("KEK is missing"), "{err}");
    assert!(!dir.path().join(KEK_FILE).exists());
}

#[test]
fn kek_priority_file_over_env_over_direct() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kek-file");
    std::fs::write(&file, format!("{}\n", "aa".repeat(32))).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let var = "ACTRIX_CONTROL_TEST_KEK_PRIORITY";
    std::env::set_var(var, "bb".repeat(32));
    let mut cfg = ks_config(&dir.path().join("data"));
    cfg.ks.kek = Some(SecretString::from("cc".repeat(32).as_str()));
    cfg.ks.kek_env = Some(var.into());
    cfg.ks.kek_file = Some(file.clone());
    cfg.resolve_secrets().unwrap();
    assert_eq!(cfg.ks.kek.as_ref().unwrap().expose(), "aa".repeat(32));

    let mut cfg = ks_config(&dir.path().join("data2"));
    cfg.ks.kek = Some(SecretString::from("cc".repeat(32).as_str()));
    cfg.ks.kek_env = Some(var.into());
    cfg.resolve_secrets().unwrap();
    assert_eq!(cfg.ks.kek.as_ref().unwrap().expose(), "bb".repeat(32));

    let mut cfg = ks_config(&dir.path().join("data3"));
    cfg.ks.kek_env = Some("ACTRIX_CONTROL_TEST_UNSET_VARIABLE".into());
    assert!(cfg.resolve_secrets().is_err());
}

#[test]
fn validate_reports_every_problem_with_its_key() {
    let mut cfg = ControlConfig::default();
    cfg.ks.shared_key = Some(SecretString::from("short"));
    cfg.ks.kek = Some(SecretString::from("not-a-kek"));
    cfg.ais.token_ttl_secs = 10_000;
    cfg.http.tls_cert = Some("/tmp/cert.pem".into());
    cfg.services.enable = Some(64);
    let problems = cfg.validate();
    for key in [
        "ks.shared_key:",
        "ks.kek:",
        "ais.token_ttl_secs:",
        "http.tls_key:",
        "services.enable:",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(key)),
            "{key} missing from {problems:?}"
        );
    }
    let mut cfg = ControlConfig::default();
    cfg.ks.shared_key = Some(SecretString::from("please-change-me-now-000"));
    assert!(cfg.validate()[0].starts_with("ks.shared_key:"));
    cfg.ks.shared_key = Some(SecretString::from("a-default-key-0000000000"));
    assert_eq!(cfg.validate().len(), 1);
    cfg.ks.shared_key = Some(SecretString::from("a-good-key-0000000000"));
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    assert!(ControlConfig::default().validate().is_empty());

    // Remote KS without a shared key; AIS without any KS.
    let mut cfg = ControlConfig::default();
    cfg.ks.remote_url = Some("ftp://ks".into());
    let p = cfg.validate();
    assert!(p.iter().any(|p| p.starts_with("ks.remote_url:")), "{p:?}");
    assert!(p.iter().any(|p| p.starts_with("ks.shared_key:")), "{p:?}");
    let mut cfg = ControlConfig::default();
    cfg.services.enable = Some(8);
    assert!(cfg
        .validate()
        .iter()
        .any(|p| p.starts_with("services.ais:")));
    assert!(!cfg.services.ks_enabled() && cfg.services.ais_enabled());
    assert!(!cfg.services.signaling_enabled());

    // TOML with defaults and unknown keys tolerated.
    let cfg: ControlConfig = toml_like(
        r#"{"node_id": "n1", "http": {"listen": "0.0.0.0:9000"}, "services": {"ks": false},
            "ks": {"key_ttl_seconds": 0}, "unknown": 1}"#,
    );
    assert_eq!(cfg.http.listen.port(), 9000);
    assert!(!cfg.services.ks_enabled());
    assert_eq!(cfg.ks.tolerance_seconds, 3600);
    assert_eq!(cfg.turn_realm, "actor-rtc.local");
    assert_eq!(cfg.ais.heartbeat_interval_secs, 30);
}

fn toml_like(json: &str) -> ControlConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn nonce_flood_stays_bounded_and_accepts_valid_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONTROL_DB_FILE);
    let capacity = 500;
    let store = std::sync::Arc::new(NonceStore::open(&path, capacity).unwrap());
    let t = 1_767_225_600;
    for i in 0..2_000u64 {
        // Every unique nonce within the window is accepted: none is refused for capacity.
        store
            .check_and_store(t + i / 100, "", &format!("flood-{i}"), t + i / 100)
            .unwrap();
        assert!(store.len() <= capacity + 1, "len {} at {i}", store.len());
    }
    assert!(store.count_rows().unwrap() <= capacity);
    // Recent nonces are still remembered.
    assert_eq!(
        store.check_and_store(t + 19, "", "flood-1999", t + 19),
        Err(AuthError::DuplicateNonce)
    );
    // Contexts are separate.
    assert!(store
        .check_and_store(t + 19, "ais", "flood-1999", t + 19)
        .is_ok());
    // After the TTL a nonce may be used again, and expired rows are purged.
    assert!(store
        .check_and_store(t + 400, "", "flood-1999", t + 400)
        .is_ok());
    drop(store);
    let store = std::sync::Arc::new(NonceStore::open(&path, capacity).unwrap());
    assert_eq!(
        store.check_and_store(t + 401, "", "flood-1999", t + 401),
        Err(AuthError::DuplicateNonce),
        "remembered across reopen"
    );
}

#[test]
fn concurrent_nonces_are_committed_together_and_each_accepted_once() {
    // Group commit: 16 threads race on 200 nonces, each nonce offered by two threads. Every
    // nonce is accepted exactly once, every accepted one is on disk after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONTROL_DB_FILE);
    let store = std::sync::Arc::new(NonceStore::open(&path, 10_000).unwrap());
    let t = 1_767_225_600;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let duplicates = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..16)
        .map(|th| {
            let (store, accepted, duplicates) =
                (store.clone(), accepted.clone(), duplicates.clone());
            std::thread::spawn(move || {
                // Threads th and th^1 offer the same 25 nonces, in opposite orders.
                let group = th / 2;
                let mut ids: Vec<u64> = (0..25).map(|i| group * 25 + i).collect();
                if th % 2 == 1 {
                    ids.reverse();
                }
                for i in ids {
                    match store.check_and_store(t, "", &format!("race-{i}"), t) {
                        Ok(()) => accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        Err(AuthError::DuplicateNonce) => {
                            duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        }
                        Err(e) => panic!("unexpected {e}"),
                    };
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 200);
    assert_eq!(duplicates.load(std::sync::atomic::Ordering::Relaxed), 200);
    assert_eq!(store.len(), 200);
    drop(store);
    let store = std::sync::Arc::new(NonceStore::open(&path, 10_000).unwrap());
    assert_eq!(store.count_rows().unwrap(), 200);
    for i in 0..200 {
        assert_eq!(
            store.check_and_store(t + 1, "", &format!("race-{i}"), t + 1),
            Err(AuthError::DuplicateNonce)
        );
    }
}
