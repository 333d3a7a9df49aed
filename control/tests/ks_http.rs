//! Key Server over real HTTP (wire reference sections 3 and 4; checklist 7.4).

mod common;

use actrix_control::crypto;
use actrix_control::{KsClient, KsClientError, ManualClock};
use base64::Engine as _;
use common::*;

const T0: u64 = 1_767_225_600;

#[test]
fn key_lifecycle_generate_fetch_and_derive_public() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);

    let (st, g) = generate(&base, &cred(now(), &nonce_auth_nonce(), "generate_key"));
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["key_id"], 1);
    assert_eq!(g["tolerance_seconds"], 3600);
    let exp = g["expires_at"].as_u64().unwrap();
    assert!(exp >= now() + 3590 && exp <= now() + 3610);
    let pk = base64::engine::general_purpose::STANDARD
        .decode(g["public_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(pk.len(), 33);
    assert!(pk[0] == 2 || pk[0] == 3);

    let (st, s) = secret(
        &base,
        1,
        &cred(now(), &nonce_auth_nonce(), "get_secret_key:1"),
    );
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["key_id"], 1);
    assert_eq!(s["expires_at"].as_u64(), Some(exp));
    assert_eq!(s["tolerance_seconds"], 3600);
    let sk = base64::engine::general_purpose::STANDARD
        .decode(s["secret_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(sk.len(), 32);
    assert_eq!(crypto::public_from_secret(&sk).unwrap().to_vec(), pk);

    // Ids auto-increment.
    let (_, g2) = generate(&base, &cred(now(), &nonce_auth_nonce(), "generate_key"));
    assert_eq!(g2["key_id"], 2);

    let (st, health) = get(&base, "/ks/health");
    assert_eq!(st, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service"], "ks");
    assert_eq!(health["backend"], "sqlite");
    assert_eq!(health["key_count"], 2);
    assert!(health["timestamp"].as_u64().unwrap() >= now() - 5);
    h.shutdown().unwrap();
}

fn nonce_auth_nonce() -> String {
    actrix_control::nonce_auth::new_nonce()
}

#[test]
fn client_works_against_local_server() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let client = KsClient::new(&base(&h), SHARED_KEY);
    let info = client.generate_key().unwrap();
    let sec = client.get_secret_key(info.key.key_id).unwrap();
    assert_eq!(
        crypto::public_from_secret(&sec.secret_key[..]).unwrap(),
        info.key.public_key
    );
    assert_eq!(
        client.get_secret_key(999).unwrap_err(),
        KsClientError::NotFound
    );
    let wrong = KsClient::new(&base(&h), "another-shared-key-0123456789");
    assert!(matches!(
        wrong.generate_key(),
        Err(KsClientError::Rejected { status: 401, .. })
    ));
    assert!(client.health().is_ok());
}

#[test]
fn bad_signature_is_401_and_does_not_consume_the_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);
    let ts = now();
    let good = cred(ts, "n-1", "generate_key");

    // Differ at the first and at the last character of the signature.
    for pos in [0usize, 42] {
        let mut bad = good.clone();
        let mut bytes = bad.signature.into_bytes();
        bytes[pos] = if bytes[pos] == b'A' { b'B' } else { b'A' };
        bad.signature = String::from_utf8(bytes).unwrap();
        let (st, body) = generate(&base, &bad);
        assert_eq!(st, 401);
        assert_eq!(
            body,
            serde_json::json!({"error": "Authentication failed", "code": 401})
        );
    }
    // Signed for another payload.
    let (st, _) = generate(&base, &cred(ts, "n-1", "get_secret_key:1"));
    assert_eq!(st, 401);
    // The nonce was not consumed by the failures.
    let (st, _) = generate(&base, &good);
    assert_eq!(st, 200);
}

#[test]
fn replay_is_403_also_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cred(now(), "replayed-nonce", "generate_key");
    {
        let h = start(ks_config(dir.path()));
        let base = base(&h);
        assert_eq!(generate(&base, &c).0, 200);
        let (st, body) = generate(&base, &c);
        assert_eq!(st, 403);
        assert_eq!(
            body,
            serde_json::json!({"error": "Request rejected", "code": 403})
        );
        // The same nonce for another payload in the same context is refused too.
        let c2 = cred(c.timestamp, "replayed-nonce", "get_secret_key:1");
        assert_eq!(secret(&base, 1, &c2).0, 403);
        h.shutdown().unwrap();
    }
    let h = start(ks_config(dir.path()));
    assert_eq!(generate(&base(&h), &c).0, 403, "replay after restart");
}

#[test]
fn timestamp_window_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(ks_config(dir.path()), &clock);
    let base = base(&h);
    for (i, ts) in [T0 - 60, T0 + 60, T0].into_iter().enumerate() {
        let (st, body) = generate(&base, &cred(ts, &format!("ok-{i}"), "generate_key"));
        assert_eq!(st, 200, "ts offset {} {body}", ts as i64 - T0 as i64);
    }
    for (i, ts) in [T0 - 61, T0 + 61, T0 - 301, T0 + 6 + 60]
        .into_iter()
        .enumerate()
    {
        let (st, body) = generate(&base, &cred(ts, &format!("bad-{i}"), "generate_key"));
        assert_eq!(st, 401, "ts offset {}", ts as i64 - T0 as i64);
        assert_eq!(body["error"], "Authentication failed");
    }
}

/// A KS-only config whose keys live 100 s with 50 s of tolerance.
fn short_lived_keys(dir: &std::path::Path) -> actrix_control::ControlConfig {
    let mut cfg = ks_config(dir);
    cfg.ks.key_ttl_seconds = 100;
    cfg.ks.tolerance_seconds = 50;
    cfg.ais.key_refresh_ahead_secs = 10;
    cfg.ais.token_ttl_secs = 60;
    cfg
}

#[test]
fn unknown_key_and_expired_beyond_tolerance_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(short_lived_keys(dir.path()), &clock);
    let base = base(&h);
    let mut n = 0;
    let mut fresh = |payload: &str| {
        n += 1;
        cred(clock_now(&clock), &format!("nonce-{n}"), payload)
    };
    let (st, g) = generate(&base, &fresh("generate_key"));
    assert_eq!(st, 200);
    assert_eq!(g["expires_at"].as_u64(), Some(T0 + 100));

    let (st, body) = secret(&base, 42, &fresh("get_secret_key:42"));
    assert_eq!(st, 404);
    assert_eq!(
        body,
        serde_json::json!({"error": "Resource not found", "code": 404})
    );

    // In tolerance: still served, at exactly expires_at + tolerance too.
    clock.set(T0 + 120);
    assert_eq!(secret(&base, 1, &fresh("get_secret_key:1")).0, 200);
    clock.set(T0 + 150);
    assert_eq!(secret(&base, 1, &fresh("get_secret_key:1")).0, 200);
    clock.set(T0 + 151);
    assert_eq!(secret(&base, 1, &fresh("get_secret_key:1")).0, 404);

    // The lazy purge (first generate of each hundred) keeps keys in tolerance: generate a
    // second key while key 1 is expired but inside tolerance would have deleted it in Actrix.
    let dir2 = tempfile::tempdir().unwrap();
    let clock2 = ManualClock::new(T0);
    let h2 = start_with_clock(short_lived_keys(dir2.path()), &clock2);
    let b2 = common::base(&h2);
    assert_eq!(generate(&b2, &cred(T0, "p1", "generate_key")).0, 200);
    clock2.set(T0 + 120);
    // Restart so the purge counter starts at zero again and this generate triggers a purge.
    h2.shutdown().unwrap();
    let h3 = start_with_clock(short_lived_keys(dir2.path()), &clock2);
    let b3 = common::base(&h3);
    assert_eq!(generate(&b3, &cred(T0 + 120, "p2", "generate_key")).0, 200);
    assert_eq!(
        secret(&b3, 1, &cred(T0 + 120, "p3", "get_secret_key:1")).0,
        200
    );
}

fn clock_now(c: &ManualClock) -> u64 {
    use actrix_control::Clock;
    c.now_unix()
}

#[test]
fn malformed_requests_get_the_documented_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);
    let a = agent();

    // Wrong content type: 415.
    let (st, body) = read_json(
        a.post(format!("{base}/ks/generate"))
            .header("content-type", "text/plain")
            .send("{}"),
    );
    assert_eq!(st, 415);
    assert_eq!(body["code"], 415);
    // Malformed JSON: 400.
    let (st, body) = post_json(&base, "/ks/generate", "{\"credential\": ");
    assert_eq!(st, 400);
    assert_eq!(
        body,
        serde_json::json!({"error": "Invalid request parameters", "code": 400})
    );
    // Missing field: 422.
    let (st, body) = post_json(
        &base,
        "/ks/generate",
        "{\"credential\": {\"timestamp\": 1}}",
    );
    assert_eq!(st, 422);
    assert_eq!(body["code"], 422);
    // Oversized body: 413.
    let big = format!("{{\"credential\": \"{}\"}}", "x".repeat(100_000));
    assert_eq!(post_json(&base, "/ks/generate", &big).0, 413);

    let c = cred(now(), "q-1", "get_secret_key:1");
    let cj = serde_json::to_string(&c).unwrap();
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    // key_id missing, mismatched, not a number; path not a number.
    for pq in [
        format!("/ks/secret/1?credential={}", enc(&cj)),
        format!("/ks/secret/1?key_id=2&credential={}", enc(&cj)),
        format!("/ks/secret/1?key_id=one&credential={}", enc(&cj)),
        format!("/ks/secret/abc?key_id=1&credential={}", enc(&cj)),
        format!(
            "/ks/secret/99999999999?key_id=99999999999&credential={}",
            enc(&cj)
        ),
        "/ks/secret/1?key_id=1".to_string(),
        "/ks/secret/1?key_id=1&credential=%7Bnot-json".to_string(),
        "/ks/secret/1?key_id=1&credential.timestamp=1&credential.nonce=x".to_string(),
        "/ks/secret/1?key_id=1&credential.timestamp=soon&credential.nonce=x&credential.signature=y"
            .to_string(),
    ] {
        let (st, body) = get(&base, &pq);
        assert_eq!(st, 400, "{pq}");
        assert_eq!(body["error"], "Invalid request parameters", "{pq}");
    }
    // The key_id check happens before authentication: a mismatch with a bad signature is 400.
    let (st, _) = get(
        &base,
        "/ks/secret/1?key_id=2&credential.timestamp=1&credential.nonce=x&credential.signature=y",
    );
    assert_eq!(st, 400);
    // Unknown path: framework 404.
    assert_eq!(get(&base, "/ks/nope").0, 404);
}

#[test]
fn three_credential_forms_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);
    assert_eq!(generate(&base, &cred(now(), "g", "generate_key")).0, 200);
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();

    let c = cred(now(), "form-2", "get_secret_key:1");
    let pq = format!(
        "/ks/secret/1?key_id=1&credential.timestamp={}&credential.nonce={}&credential.signature={}",
        c.timestamp,
        enc(&c.nonce),
        enc(&c.signature)
    );
    assert_eq!(get(&base, &pq).0, 200);

    let c = cred(now(), "form-3", "get_secret_key:1");
    let pq = format!(
        "/ks/secret/1?key_id=1&{}={}&{}={}&{}={}",
        enc("credential[timestamp]"),
        c.timestamp,
        enc("credential[nonce]"),
        enc(&c.nonce),
        enc("credential[signature]"),
        enc(&c.signature)
    );
    assert_eq!(get(&base, &pq).0, 200);

    // Mixed forms per field.
    let c = cred(now(), "form-mixed", "get_secret_key:1");
    let pq = format!(
        "/ks/secret/1?key_id=1&credential.timestamp={}&{}={}&credential.signature={}",
        c.timestamp,
        enc("credential[nonce]"),
        enc(&c.nonce),
        enc(&c.signature)
    );
    assert_eq!(get(&base, &pq).0, 200);
}

#[test]
fn sql_metacharacters_and_oversized_values_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);
    for (i, nonce) in [
        "'; DROP TABLE nonces; --",
        "\" OR 1=1 --",
        "nul\0byte",
        "%' AND '1'='1",
        "😀 unicode ✓",
    ]
    .into_iter()
    .enumerate()
    {
        let (st, body) = generate(&base, &cred(now(), nonce, "generate_key"));
        assert_eq!(st, 200, "{nonce:?}: {body}");
        assert_eq!(body["key_id"], i as u64 + 1);
        // Stored literally: the exact same nonce is a replay.
        assert_eq!(generate(&base, &cred(now(), nonce, "generate_key")).0, 403);
    }
    // Over-long nonce: a parameter problem, never an SQL error.
    let long = "n".repeat(10_000);
    let (st, body) = generate(&base, &cred(now(), &long, "generate_key"));
    assert_eq!(st, 400);
    assert_eq!(body["error"], "Invalid request parameters");
    // Over-long signature and metacharacters in the key id.
    let mut c = cred(now(), "sig", "generate_key");
    c.signature = "A".repeat(5000);
    assert_eq!(generate(&base, &c).0, 401);
    let (st, _) = get(&base, "/ks/secret/1%27%20OR%201=1?key_id=1%27%20OR%201=1");
    assert_eq!(st, 400);
    // The tables are intact.
    let (st, health) = get(&base, "/ks/health");
    assert_eq!(st, 200);
    assert_eq!(health["key_count"], 5);
}

#[test]
fn no_plaintext_secret_in_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let base = base(&h);
    assert_eq!(generate(&base, &cred(now(), "k", "generate_key")).0, 200);
    let (_, s) = secret(&base, 1, &cred(now(), "s", "get_secret_key:1"));
    let b64 = s["secret_key"].as_str().unwrap().to_owned();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&b64)
        .unwrap();
    h.shutdown().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(raw.len()).any(|w| w == &raw[..]),
            "raw secret found in {}",
            path.display()
        );
        assert!(
            !bytes.windows(b64.len()).any(|w| w == b64.as_bytes()),
            "base64 secret found in {}",
            path.display()
        );
    }
}

#[test]
fn a_clock_step_of_an_hour_fails_safe_and_recovers() {
    // Reliability checklist C5 for the signed HTTP API: the server's clock steps an hour
    // either way while clients keep true time. Requests are refused (never accepted) while
    // the clocks disagree, a replay stays refused throughout, and requests are accepted again
    // once the clock is corrected.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let h = start_with_clock(ks_config(dir.path()), &clock);
    let base = base(&h);
    let first = cred(T0, "before-the-step", "generate_key");
    assert_eq!(generate(&base, &first).0, 200);
    // +1 h: a true-time request looks an hour old.
    clock.set(T0 + 3600);
    assert_eq!(
        generate(&base, &cred(T0 + 1, "ahead-1", "generate_key")).0,
        401
    );
    assert_ne!(generate(&base, &first).0, 200, "a replay is never accepted");
    // -1 h from true time: a true-time request looks an hour early; the replay too.
    clock.set(T0 - 3600);
    assert_eq!(
        generate(&base, &cred(T0 + 2, "behind-1", "generate_key")).0,
        401
    );
    assert_ne!(generate(&base, &first).0, 200);
    // Corrected: accepted again, and the replay is still refused (its nonce is remembered
    // and its timestamp is out of the window).
    clock.set(T0 + 3);
    assert_eq!(
        generate(&base, &cred(T0 + 3, "after-1", "generate_key")).0,
        200
    );
    assert_eq!(generate(&base, &first).0, 403);
}
