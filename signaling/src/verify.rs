//! Credential verification and re-issue for the I/O layer (wire section 5.4). Everything here
//! is blocking (KS lookups, ECIES) and runs on the runtime's blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actrix_control::ais::{AisService, IdentityClaims};
use actrix_control::crypto;
use actrix_control::ks::store::SecretRecord;
use actrix_control::ks::{KeySource, KeySourceError};
use prost::Message as _;
use zeroize::Zeroizing;

use crate::hub::{CredentialVerdict, VerifiedCredential};
use crate::proto::{
    actr_id_string, register_response, AIdCredential, ActrId, ActrType, Realm, RegisterRequest,
};

/// Longest token accepted for decryption (Actrix tokens are about 250-420 bytes).
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// How long an unknown key id is remembered, seconds.
const NEGATIVE_TTL_SECS: u64 = 10;
/// Most key ids remembered (positive or negative).
const MAX_KEYS: usize = 1024;

/// KS secret keys by id, fetched on demand from the [`KeySource`] and kept while fresh (like
/// the TURN identity verifier: until `expires_at`, after which the KS is asked again).
#[derive(Debug)]
pub(crate) struct KeyCache {
    keys: KeySource,
    inner: Mutex<KeyCacheInner>,
}

#[derive(Default)]
struct KeyCacheInner {
    secrets: HashMap<u32, SecretRecord>,
    unknown: HashMap<u32, u64>,
}

impl std::fmt::Debug for KeyCacheInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCacheInner")
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    pub(crate) fn new(keys: KeySource) -> Arc<Self> {
        Arc::new(KeyCache {
            keys,
            inner: Mutex::new(KeyCacheInner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyCacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The secret key `key_id` at `now_unix` (Unix seconds). Blocking on a miss.
    pub(crate) fn secret(&self, now_unix: u64, key_id: u32) -> Result<SecretRecord, String> {
        {
            let g = self.lock();
            if let Some(r) = g.secrets.get(&key_id) {
                if r.expires_at == 0 || now_unix < r.expires_at {
                    return Ok(r.clone());
                }
            }
            if g.unknown
                .get(&key_id)
                .is_some_and(|&until| now_unix < until)
            {
                return Err("unknown key".into());
            }
        }
        match self.keys.secret(key_id) {
            Ok(rec) => {
                let mut g = self.lock();
                if g.secrets.len() >= MAX_KEYS {
                    g.secrets.clear();
                }
                g.unknown.remove(&key_id);
                g.secrets.insert(key_id, rec.clone());
                Ok(rec)
            }
            Err(KeySourceError::NotFound) => {
                let mut g = self.lock();
                if g.unknown.len() >= MAX_KEYS {
                    g.unknown.clear();
                }
                g.secrets.remove(&key_id);
                g.unknown
                    .insert(key_id, now_unix.saturating_add(NEGATIVE_TTL_SECS));
                Err("unknown key".into())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Decrypt and parse a credential (wire section 5.4 steps 1-3). Expiry, realm and identity are
/// checked by the hub, which knows the time and the claimed source. Blocking.
pub(crate) fn verify_blocking(
    now_unix: u64,
    keys: &KeyCache,
    cred: &AIdCredential,
) -> CredentialVerdict {
    if cred.encrypted_token.is_empty() || cred.encrypted_token.len() > MAX_TOKEN_LEN {
        return CredentialVerdict::Invalid("invalid token".into());
    }
    let rec = match keys.secret(now_unix, cred.token_key_id) {
        Ok(r) => r,
        Err(e) => return CredentialVerdict::Invalid(e),
    };
    let Ok(plain) = crypto::ecies_decrypt(&rec.secret_key[..], &cred.encrypted_token) else {
        return CredentialVerdict::Invalid("invalid token".into());
    };
    let Ok(claims) = serde_json::from_slice::<IdentityClaims>(&plain) else {
        return CredentialVerdict::Invalid("invalid token".into());
    };
    CredentialVerdict::Valid(Arc::new(VerifiedCredential {
        actor_id: claims.actor_id.clone(),
        realm_id: claims.realm_id,
        expr_time: claims.expr_time,
        key_expires_at: rec.expires_at,
        key_tolerance: rec.tolerance_seconds,
    }))
}

/// Verify an actr 0.4 credential (Ed25519 signature under an AIS signing key, then the claims
/// decode). Expiry, realm and identity are the hub's to check, as for 0.1.7. Never blocks.
pub(crate) fn verify_v4(
    now_unix: u64,
    ais: Option<&AisService>,
    cred: &actrix_wire::v4::actr::AIdCredential,
) -> CredentialVerdict {
    let Some(ais) = ais else {
        return CredentialVerdict::Invalid("AIS not configured".into());
    };
    match ais.verify_v4(now_unix, cred) {
        Ok(v) => CredentialVerdict::Valid(Arc::new(VerifiedCredential {
            actor_id: v.claims.actor_id,
            realm_id: v.claims.realm_id,
            expr_time: v.claims.expires_at,
            key_expires_at: v.key.expires_at,
            key_tolerance: v.key.tolerance_seconds,
        })),
        Err(e) => CredentialVerdict::Invalid(e.to_string()),
    }
}

/// The body of the AIS call of a registration: a new RegisterRequest holding only the type and
/// the realm (wire section 8.3), whatever else the client's request carried; the hub keeps the
/// rest (spec, ACL, address).
pub(crate) fn ais_register_body(actr_type: &ActrType, realm: &Realm) -> Vec<u8> {
    RegisterRequest {
        actr_type: actr_type.clone(),
        realm: *realm,
        ..RegisterRequest::default()
    }
    .encode_to_vec()
}

/// Credential update for the SAME ActrId (wire section 9.8). The AIS only issues for new
/// serials, so this asks it for a fresh credential (same key, TTL, PSK rules), then re-encrypts
/// the claims with `actor_id` set to `source` under the same KS key. Blocking.
pub(crate) fn reissue_blocking(
    now_unix: u64,
    ais: &AisService,
    keys: &KeyCache,
    source: &ActrId,
) -> Result<register_response::RegisterOk, String> {
    let body = ais_register_body(&source.r#type, &source.realm);
    let mut ok = match ais.register(&body).result {
        Some(register_response::Result::Success(ok)) => ok,
        Some(register_response::Result::Error(e)) => return Err(e.message),
        None => return Err("empty AIS response".into()),
    };
    let rec = keys.secret(now_unix, ok.credential.token_key_id)?;
    let plain = crypto::ecies_decrypt(&rec.secret_key[..], &ok.credential.encrypted_token)
        .map_err(|_| "cannot open the issued token".to_owned())?;
    let mut claims: IdentityClaims =
        serde_json::from_slice(&plain).map_err(|e| format!("issued claims: {e}"))?;
    claims.actor_id = actr_id_string(source);
    claims.realm_id = source.realm.realm_id;
    let json = Zeroizing::new(serde_json::to_vec(&claims).map_err(|e| e.to_string())?);
    let public =
        crypto::public_from_secret(&rec.secret_key[..]).map_err(|_| "bad key".to_owned())?;
    ok.credential.encrypted_token =
        crypto::ecies_encrypt(&public, &json).map_err(|_| "encryption failed".to_owned())?;
    ok.actr_id = source.clone();
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Acl, ServiceSpec};

    #[test]
    fn the_ais_is_asked_with_type_and_realm_only() {
        let req = RegisterRequest {
            actr_type: ActrType {
                manufacturer: "acme".into(),
                name: "echo".into(),
                version: Some("1.0.0".into()),
            },
            realm: Realm { realm_id: 101 },
            service_spec: Some(ServiceSpec::default()),
            acl: Some(Acl::default()),
            service: Some("echo".into()),
            ws_address: Some("ws://a".into()),
        };
        let body = ais_register_body(&req.actr_type, &req.realm);
        let sent = RegisterRequest::decode(&body[..]).unwrap();
        assert_eq!(
            sent,
            RegisterRequest {
                actr_type: req.actr_type.clone(),
                realm: req.realm,
                ..RegisterRequest::default()
            }
        );
    }
}
