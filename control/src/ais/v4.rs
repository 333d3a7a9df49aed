//! The AIS for actr 0.4 clients (`control/WIRE-0.4.md`): `POST /ais/register` answered with an
//! Ed25519-signed credential, a REST-style TURN credential and a renewal token, `POST
//! /ais/renew`, and the verification of those credentials for signaling.
//!
//! - Credential: `AIdCredential { key_id, claims = encode(IdentityClaims { realm_id, actor_id,
//!   expires_at }), signature = Ed25519(claims) }` under the current signing key
//!   ([`SigningKeys`]); `RegisterOk.signing_pubkey` / `signing_key_id` name that key.
//! - TURN: `TurnCredential { username = "<expires_at>:<actor_id>", password =
//!   base64(HMAC-SHA1(turn secret, username)), expires_at }`, the coturn `use-auth-secret`
//!   form. The secret is the first `turn.rest_secrets` entry the TURN server verifies with, so
//!   TURN authenticates a 0.4 client with one HMAC on the data plane and no control-thread
//!   round trip.
//! - Renewal token: `"R4" ‖ expires_at (u64 BE) ‖ nonce (16) ‖ HMAC-SHA256(renewal secret,
//!   "actrix-ais-renewal-v1" ‖ 0 ‖ actor_id ‖ 0 ‖ expires_at ‖ nonce)`, 58 bytes, bound to the
//!   ActrId by the MAC. Issuing one stores nothing (registration costs no disk write); using
//!   one consumes it durably (its SHA-256 goes into the consumed set before the answer leaves),
//!   and the answer carries its successor. A token is therefore good for one renewal: a replay
//!   is refused with 401, like an expired or forged one.
//!
//! Every function takes the time first (`now_unix`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use actrix_wire::v4::actr as p4;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use prost::Message as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::signing::{KeyInfo, SigningKeys, VerifyError};
use super::snowflake::Snowflake;
use crate::realms::RealmStore;

const RENEWAL_MAGIC: &[u8; 2] = b"R4";
const RENEWAL_LEN: usize = 2 + 8 + 16 + 32;
/// Most registrations kept for the signaling hub to pick up when the actor connects.
const MAX_PENDING: usize = 65_536;
/// Longest claims accepted for verification.
const MAX_CLAIMS_LEN: usize = 1024;

/// The settings of 0.4 issuance.
#[derive(Clone, Debug)]
pub struct V4Settings {
    /// Lifetime of credentials (and of their TURN credentials).
    pub token_ttl_secs: u64,
    /// Lifetime of a renewal token.
    pub renewal_ttl_secs: u64,
    /// `signaling_heartbeat_interval_secs`.
    pub heartbeat_interval_secs: u32,
}

/// A verified 0.4 credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedClaims {
    pub claims: p4::IdentityClaims,
    pub key: KeyInfo,
}

/// Why a 0.4 credential is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Key(#[from] VerifyError),
    /// `claims` is not an encoded IdentityClaims.
    #[error("invalid claims")]
    BadClaims,
    /// No signing keys on this node (0.4 disabled).
    #[error("0.4 credentials are not served")]
    Disabled,
}

/// What an issuance needs besides the request.
pub(crate) struct V4Issuer {
    pub(crate) keys: std::sync::Arc<SigningKeys>,
    turn_secret: zeroize::Zeroizing<Vec<u8>>,
    settings: V4Settings,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    map: HashMap<(u32, u64), p4::RegisterRequest>,
    order: VecDeque<(u32, u64)>,
}

fn error(code: u32, message: impl Into<String>) -> p4::ErrorResponse {
    p4::ErrorResponse {
        code,
        message: message.into(),
    }
}

/// `manufacturer:name:version` (0.4: the version is always present).
pub fn actr_type_string(t: &p4::ActrType) -> String {
    if t.version.is_empty() {
        format!("{}:{}", t.manufacturer, t.name)
    } else {
        format!("{}:{}:{}", t.manufacturer, t.name, t.version)
    }
}

/// `{serial hex}@{realm}/{type}`.
pub fn actr_id_string(id: &p4::ActrId) -> String {
    format!(
        "{:x}@{}/{}",
        id.serial_number,
        id.realm.realm_id,
        actr_type_string(&id.r#type)
    )
}

/// The TURN credential of `actor_id` until `expires_at` under `secret`.
pub fn turn_credential(secret: &[u8], actor_id: &str, expires_at: u64) -> p4::TurnCredential {
    let username = format!("{expires_at}:{actor_id}");
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret).expect("any key length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    p4::TurnCredential {
        username,
        password,
        expires_at,
    }
}

fn renewal_mac(secret: &[u8; 32], actor_id: &str, expires_at: u64, nonce: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    mac.update(b"actrix-ais-renewal-v1\0");
    mac.update(actor_id.as_bytes());
    mac.update(b"\0");
    mac.update(&expires_at.to_be_bytes());
    mac.update(nonce);
    mac.finalize().into_bytes().into()
}

/// A renewal token for `actor_id` until `expires_at`.
pub(crate) fn renewal_token(secret: &[u8; 32], actor_id: &str, expires_at: u64) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut t = Vec::with_capacity(RENEWAL_LEN);
    t.extend_from_slice(RENEWAL_MAGIC);
    t.extend_from_slice(&expires_at.to_be_bytes());
    t.extend_from_slice(&nonce);
    t.extend_from_slice(&renewal_mac(secret, actor_id, expires_at, &nonce));
    t
}

/// The expiry of a renewal token that `actor_id` may use, if its MAC is good (constant time).
fn open_renewal_token(secret: &[u8; 32], actor_id: &str, token: &[u8]) -> Option<u64> {
    if token.len() != RENEWAL_LEN || &token[..2] != RENEWAL_MAGIC {
        return None;
    }
    let expires_at = u64::from_be_bytes(token[2..10].try_into().ok()?);
    let want = renewal_mac(secret, actor_id, expires_at, &token[10..26]);
    bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &token[26..])).then_some(expires_at)
}

/// The Name rule of wire section 7.
fn name_rule(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= 32
        && first.is_alphabetic()
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.chars().last().is_some_and(char::is_alphanumeric)
}

impl V4Issuer {
    pub(crate) fn new(
        keys: std::sync::Arc<SigningKeys>,
        turn_secret: &[u8],
        settings: V4Settings,
    ) -> Self {
        V4Issuer {
            keys,
            turn_secret: zeroize::Zeroizing::new(turn_secret.to_vec()),
            settings,
            pending: Mutex::new(Pending::default()),
        }
    }

    /// A fresh credential set for `actr_id` at `now_unix`.
    fn issue(
        &self,
        now_unix: u64,
        actr_id: p4::ActrId,
    ) -> Result<p4::register_response::RegisterOk, p4::ErrorResponse> {
        let key = self.keys.current_or_rotate(now_unix).map_err(|e| {
            tracing::error!(error = %e, "AIS: no signing key");
            error(503, "Signing key unavailable")
        })?;
        let actor_id = actr_id_string(&actr_id);
        // Never past the instant verifiers stop accepting the key's signatures.
        let expires_at = now_unix
            .saturating_add(self.settings.token_ttl_secs)
            .min(key.verifiable_until());
        let claims = p4::IdentityClaims {
            realm_id: actr_id.realm.realm_id,
            actor_id: actor_id.clone(),
            expires_at,
        }
        .encode_to_vec();
        let signature = self
            .keys
            .sign(key.key_id, &claims)
            .ok_or_else(|| error(503, "Signing key unavailable"))?;
        let renewal_expires_at = now_unix.saturating_add(self.settings.renewal_ttl_secs);
        let renewal = renewal_token(self.keys.renewal_secret(), &actor_id, renewal_expires_at);
        let ts = |s: u64| prost_types::Timestamp {
            seconds: i64::try_from(s).unwrap_or(i64::MAX),
            nanos: 0,
        };
        Ok(p4::register_response::RegisterOk {
            turn_credential: turn_credential(&self.turn_secret, &actor_id, expires_at),
            actr_id,
            credential: p4::AIdCredential {
                key_id: key.key_id,
                claims,
                signature: signature.to_vec(),
            },
            credential_expires_at: Some(ts(expires_at)),
            signaling_heartbeat_interval_secs: self.settings.heartbeat_interval_secs,
            signing_pubkey: key.verifying_key.to_vec(),
            signing_key_id: key.key_id,
            renewal_token: Some(renewal),
            renewal_token_expires_at: Some(ts(renewal_expires_at)),
        })
    }

    /// `POST /ais/register` for a 0.4 client. Blocking (a key rotation, when due, commits).
    pub(crate) fn register(
        &self,
        now_unix: u64,
        now_unix_ms: u64,
        snowflake: &Snowflake,
        realms: &RealmStore,
        body: &[u8],
    ) -> p4::RegisterResponse {
        let result = self.register_inner(now_unix, now_unix_ms, snowflake, realms, body);
        p4::RegisterResponse {
            result: Some(match result {
                Ok(ok) => p4::register_response::Result::Success(ok),
                Err(e) => p4::register_response::Result::Error(e),
            }),
        }
    }

    fn register_inner(
        &self,
        now_unix: u64,
        now_unix_ms: u64,
        snowflake: &Snowflake,
        realms: &RealmStore,
        body: &[u8],
    ) -> Result<p4::register_response::RegisterOk, p4::ErrorResponse> {
        let mut req = p4::RegisterRequest::decode(body)
            .map_err(|e| error(400, format!("Invalid protobuf: {e}")))?;
        let t = &req.actr_type;
        if !name_rule(&t.manufacturer) || !name_rule(&t.name) {
            return Err(error(
                400,
                "Invalid actor type: manufacturer and name must follow the Name rule",
            ));
        }
        if t.version.trim().is_empty() || t.version.contains(':') {
            return Err(error(
                400,
                "Invalid actor type: version is required and must not contain ':'",
            ));
        }
        realms
            .check(now_unix, req.realm.realm_id)
            .map_err(|e| error(403, format!("Realm validation failed: {e}")))?;
        let actr_id = p4::ActrId {
            realm: req.realm,
            serial_number: snowflake.next(now_unix_ms),
            r#type: req.actr_type.clone(),
        };
        let ok = self.issue(now_unix, actr_id)?;
        // What signaling needs when the actor connects: its ACL, spec and direct address
        // (the package proofs are of no use there).
        req.manifest_raw = None;
        req.mfr_signature = None;
        req.manufacturer_auth_signature = None;
        req.manufacturer_auth_nonce = None;
        self.remember(&ok.actr_id, req);
        Ok(ok)
    }

    fn remember(&self, id: &p4::ActrId, req: p4::RegisterRequest) {
        let key = (id.realm.realm_id, id.serial_number);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while p.map.len() >= MAX_PENDING {
            match p.order.pop_front() {
                Some(old) => {
                    p.map.remove(&old);
                }
                None => break,
            }
        }
        if p.map.insert(key, req).is_none() {
            p.order.push_back(key);
        }
    }

    /// The registration of `(realm, serial)`, for the signaling hub (taken once).
    pub(crate) fn take_pending(&self, realm: u32, serial: u64) -> Option<p4::RegisterRequest> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // The order queue keeps the key; it is skipped when it comes up for eviction.
        p.map.remove(&(realm, serial))
    }

    /// `POST /ais/renew`. Blocking (the consumed token commits).
    pub(crate) fn renew(
        &self,
        now_unix: u64,
        realms: &RealmStore,
        body: &[u8],
    ) -> p4::RenewCredentialResponse {
        let result = self.renew_inner(now_unix, realms, body);
        if let Err(e) = &result {
            tracing::debug!(code = e.code, message = %e.message, "AIS renew refused");
        }
        p4::RenewCredentialResponse {
            result: Some(match result {
                Ok(ok) => p4::renew_credential_response::Result::Success(ok),
                Err(e) => p4::renew_credential_response::Result::Error(e),
            }),
        }
    }

    fn renew_inner(
        &self,
        now_unix: u64,
        realms: &RealmStore,
        body: &[u8],
    ) -> Result<p4::register_response::RegisterOk, p4::ErrorResponse> {
        let req = p4::RenewCredentialRequest::decode(body)
            .map_err(|e| error(400, format!("Invalid protobuf: {e}")))?;
        let actor_id = actr_id_string(&req.actr_id);
        let expires_at =
            open_renewal_token(self.keys.renewal_secret(), &actor_id, &req.renewal_token)
                .ok_or_else(|| error(401, "Renewal token rejected"))?;
        if now_unix >= expires_at {
            return Err(error(401, "Renewal token expired"));
        }
        realms
            .check(now_unix, req.actr_id.realm.realm_id)
            .map_err(|e| error(403, format!("Realm validation failed: {e}")))?;
        let hash: [u8; 32] = Sha256::digest(&req.renewal_token).into();
        match self.keys.consume_renewal(&hash, expires_at) {
            Ok(true) => {}
            Ok(false) => return Err(error(401, "Renewal token already used")),
            Err(e) => {
                tracing::error!(error = %e, "AIS renew: cannot record the token");
                return Err(error(503, "Renewal unavailable"));
            }
        }
        self.issue(now_unix, req.actr_id)
    }

    /// Check a 0.4 credential's signature and decode its claims. Expiry, realm and identity
    /// are the caller's to check (it knows the claimed source). Never blocks.
    pub(crate) fn verify(
        &self,
        now_unix: u64,
        cred: &p4::AIdCredential,
    ) -> Result<VerifiedClaims, CredentialError> {
        if cred.claims.len() > MAX_CLAIMS_LEN {
            return Err(CredentialError::BadClaims);
        }
        let key = self
            .keys
            .verify(now_unix, cred.key_id, &cred.claims, &cred.signature)?;
        let claims =
            p4::IdentityClaims::decode(&cred.claims[..]).map_err(|_| CredentialError::BadClaims)?;
        Ok(VerifiedClaims { claims, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_tokens_are_bound_to_the_actor() {
        let secret = [9u8; 32];
        let t = renewal_token(&secret, "1@1/a:b:1", 1000);
        assert_eq!(t.len(), RENEWAL_LEN);
        assert_eq!(open_renewal_token(&secret, "1@1/a:b:1", &t), Some(1000));
        assert_eq!(open_renewal_token(&secret, "2@1/a:b:1", &t), None);
        assert_eq!(open_renewal_token(&[8u8; 32], "1@1/a:b:1", &t), None);
        let mut forged = t.clone();
        forged[9] ^= 1; // a later expiry
        assert_eq!(open_renewal_token(&secret, "1@1/a:b:1", &forged), None);
    }

    #[test]
    fn turn_credential_is_the_coturn_rest_form() {
        // The TURN side's own derivation accepts it.
        let c = turn_credential(
            b"0123456789abcdef-rest",
            "2c1873c000503@101/acme:echo:1.0.0",
            1_767_229_200,
        );
        assert_eq!(c.username, "1767229200:2c1873c000503@101/acme:echo:1.0.0");
        assert_eq!(
            c.password,
            actrix_proto::auth::rest_password(b"0123456789abcdef-rest", c.username.as_bytes())
        );
        assert_eq!(
            actrix_proto::auth::rest_expiry(c.username.as_bytes()),
            Some(1_767_229_200)
        );
    }
}
