//! The KS gRPC API `ks.v1.KeyServer` (wire reference section 3.3) with an upstream-style
//! client: tonic's generated `KeyServerClient` from upstream Actrix's own `keyserver.proto`
//! over a real HTTP/2 connection, requests signed with nonce-auth as upstream AIS, signaling
//! and TURN sign them. Replays are refused, over gRPC and across gRPC and HTTP.

mod common;

use actrix_control::crypto;
use actrix_control::nonce_auth;
use actrix_wire::ks::v1 as pb;
use actrix_wire::ks::v1::key_server_client::KeyServerClient;
use actrix_wire::supervisor::v1::NonceCredential;
use base64::Engine as _;
use common::*;
use tonic::Code;

fn signed(payload: &str) -> NonceCredential {
    let ts = now();
    let nonce = nonce_auth::new_nonce();
    NonceCredential {
        timestamp: ts,
        signature: nonce_auth::sign(SHARED_KEY.as_bytes(), ts, &nonce, payload),
        nonce,
    }
}

async fn client(addr: std::net::SocketAddr) -> KeyServerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("gRPC connection");
    KeyServerClient::new(channel)
}

fn start_grpc(dir: &std::path::Path) -> actrix_control::ControlHandle {
    let mut cfg = ks_config(dir);
    cfg.ks.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    start(cfg)
}

#[tokio::test(flavor = "current_thread")]
async fn generate_and_fetch_keys_with_signed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_grpc(dir.path());
    let mut ks = client(h.ks_grpc_addr().expect("gRPC listening")).await;

    let gen = ks
        .generate_key(pb::GenerateKeyRequest {
            credential: signed("generate_key"),
        })
        .await
        .expect("generated")
        .into_inner();
    assert!(gen.key_id >= 1);
    let public = base64::engine::general_purpose::STANDARD
        .decode(&gen.public_key)
        .unwrap();
    assert_eq!(public.len(), 33);
    assert_eq!(gen.tolerance_seconds, 3600);

    let cred = signed(&format!("get_secret_key:{}", gen.key_id));
    let secret = ks
        .get_secret_key(pb::GetSecretKeyRequest {
            key_id: gen.key_id,
            credential: cred.clone(),
        })
        .await
        .expect("the secret")
        .into_inner();
    assert_eq!(secret.key_id, gen.key_id);
    assert_eq!(secret.expires_at, gen.expires_at);
    let scalar = base64::engine::general_purpose::STANDARD
        .decode(&secret.secret_key)
        .unwrap();
    assert_eq!(crypto::public_from_secret(&scalar).unwrap()[..], public[..]);

    // The same signed request again: a replay, refused as upstream does (UNAUTHENTICATED).
    let replay = ks
        .get_secret_key(pb::GetSecretKeyRequest {
            key_id: gen.key_id,
            credential: cred,
        })
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated, "{replay:?}");

    // A signature over another payload (another key id): refused.
    let wrong = ks
        .get_secret_key(pb::GetSecretKeyRequest {
            key_id: gen.key_id,
            credential: signed("get_secret_key:999"),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    // A stale timestamp: refused.
    let mut stale = signed("generate_key");
    stale.timestamp -= 120;
    stale.signature = nonce_auth::sign(
        SHARED_KEY.as_bytes(),
        stale.timestamp,
        &stale.nonce,
        "generate_key",
    );
    let e = ks
        .generate_key(pb::GenerateKeyRequest { credential: stale })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // An unknown key: NOT_FOUND.
    let e = ks
        .get_secret_key(pb::GetSecretKeyRequest {
            key_id: 999,
            credential: signed("get_secret_key:999"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let health = ks
        .health_check(pb::HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            health.status.as_str(),
            health.service.as_str(),
            health.key_count
        ),
        ("healthy", "ks", 1)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn one_nonce_space_for_grpc_and_http() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_grpc(dir.path());
    let mut ks = client(h.ks_grpc_addr().unwrap()).await;
    let cred = signed("generate_key");
    ks.generate_key(pb::GenerateKeyRequest {
        credential: cred.clone(),
    })
    .await
    .expect("generated over gRPC");
    // The same credential over HTTP: the replay answer of the HTTP API (403).
    let base = base(&h);
    let http_cred = actrix_control::nonce_auth::NonceCredential {
        timestamp: cred.timestamp,
        nonce: cred.nonce.clone(),
        signature: cred.signature.clone(),
    };
    let (st, body) = tokio::task::spawn_blocking(move || generate(&base, &http_cred))
        .await
        .unwrap();
    assert_eq!(st, 403, "{body}");
}
