//! Long-term credential authentication for TURN (RFC 8489 §9.2, RFC 8656 §5).
//!
//! Three sources of credentials, tried in this order:
//! 1. static users from the configuration (keys derived once at load);
//! 2. TURN REST ephemeral credentials: username `expiry:user`, password
//!    base64(HMAC-SHA1(secret, username)), with several secrets accepted during rotation;
//! 3. Actrix identity credentials, resolved off the shard by the control thread
//!    ([`Lookup::Pending`] here; the answer arrives by message and fills the cache).
//!
//! Nonces are stateless: the RFC 8489 §9.2 nonce cookie (`obMatJos2` + the security feature
//! set this server announced) + hex(timestamp) + hex(MAC(features, timestamp, client address)).
//! Nothing is stored per source before a client authenticates; the MAC makes the announced
//! features part of the nonce, so a client's PASSWORD-ALGORITHMS can be checked against what
//! the response carrying this nonce offered (bid-down detection) without remembering it.
//!
//! USERHASH (RFC 8489 §14.4) is resolved for static users, whose names the server knows: the
//! hash of each is computed once when the cache is built. REST and identity usernames cannot
//! be recovered from a hash, so username anonymity is announced only when static users are the
//! only credentials; a USERHASH that matches no static user is refused like an unknown
//! username.
//!
//! The derived-key cache is owned by one shard (no sharing, no lock) and every hit re-checks
//! the credential's expiry against `now`.

use crate::stun::{long_term_key_md5, long_term_key_sha256};
use ahash::AHashMap;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// RFC 8489 §9.2: a nonce that starts with this cookie announces security features: the
/// 24-bit feature set follows in base64 (4 characters).
const NONCE_COOKIE: &[u8; 9] = b"obMatJos2";
/// Cookie and feature set.
const COOKIE_LEN: usize = NONCE_COOKIE.len() + 4;
pub const NONCE_LEN: usize = COOKIE_LEN + 16 + 24;

/// The STUN Security Features (RFC 8489 §18.1). Bits are numbered from the least significant
/// side (erratum 6290; the RFC's Appendix B.1 vector, whose nonce says "AAAC" and which uses
/// USERHASH, agrees), so "Password algorithms" is 0x000001 and "Username anonymity" 0x000002.
pub mod features {
    /// The server sends PASSWORD-ALGORITHMS and checks what comes back (§9.2.4).
    pub const PASSWORD_ALGORITHMS: u32 = 0x00_0001;
    /// The client may send USERHASH instead of USERNAME.
    pub const USERNAME_ANONYMITY: u32 = 0x00_0002;
}

/// The PASSWORD-ALGORITHMS value every 401 and 438 carries (RFC 8489 §14.11): SHA-256 first
/// (the server's preference), then MD5, each with no parameters.
pub const PASSWORD_ALGORITHMS_VALUE: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

/// The nonce cookie for `features`.
fn cookie(features: u32) -> [u8; COOKIE_LEN] {
    let mut out = [0u8; COOKIE_LEN];
    out[..9].copy_from_slice(NONCE_COOKIE);
    let bits = (features & 0xFF_FFFF).to_be_bytes();
    base64::engine::general_purpose::STANDARD
        .encode_slice(&bits[1..], &mut out[9..])
        .expect("3 bytes encode to 4");
    out
}

/// The security features a nonce claims to announce, if it starts with the nonce cookie. Only
/// a claim: [`check_nonce`] verifies it (the features are covered by the nonce's MAC).
pub fn nonce_features(nonce: &[u8]) -> Option<u32> {
    if nonce.len() < COOKIE_LEN || &nonce[..9] != NONCE_COOKIE {
        return None;
    }
    let mut bits = [0u8; 3];
    match base64::engine::general_purpose::STANDARD.decode_slice(&nonce[9..COOKIE_LEN], &mut bits) {
        Ok(3) => Some(u32::from_be_bytes([0, bits[0], bits[1], bits[2]])),
        _ => None,
    }
}

/// SHA-256(username ":" realm), the USERHASH of RFC 8489 §14.4. Usernames and realms are
/// used as configured (bytes); OpaqueString processing is the operator's to apply.
pub fn userhash(username: &[u8], realm: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.finalize().into()
}

/// The fewest bytes an Actrix identity username decodes to: realm id and key id (4 bytes
/// each), the ECIES envelope of the token (65-byte ephemeral key, 16-byte nonce, 16-byte tag)
/// and claims that hold at least a 32-byte PSK.
pub const IDENTITY_USERNAME_MIN_DECODED: usize = 8 + 97 + 32;

/// Whether `username` could be an Actrix identity credential at all: base122 of at least
/// [`IDENTITY_USERNAME_MIN_DECODED`] bytes. Only such usernames are worth a resolution on the
/// control thread; every other unknown username is refused at once, exactly as a known user
/// with a wrong password is. Allocates nothing.
pub fn could_be_identity(username: &[u8]) -> bool {
    crate::base122::decoded_len(username).is_ok_and(|n| n >= IDENTITY_USERNAME_MIN_DECODED)
}

/// Key material of one user: the MD5 long-term key and, when the password is known, the
/// SHA-256 one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserKey {
    pub md5: [u8; 16],
    pub sha256: Option<[u8; 32]>,
}

impl UserKey {
    pub fn from_password(username: &[u8], realm: &[u8], password: &[u8]) -> Self {
        UserKey {
            md5: long_term_key_md5(username, realm, password),
            sha256: Some(long_term_key_sha256(username, realm, password)),
        }
    }
}

/// Password algorithm for key derivation (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordAlgorithm {
    Md5,
    Sha256,
}

/// Configuration of authentication, shared (immutable) by all shards.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub realm: String,
    /// Static users: name → key material.
    pub users: AHashMap<Box<[u8]>, UserKey>,
    /// TURN REST shared secrets, all accepted (rotation).
    pub rest_secrets: Vec<Box<[u8]>>,
    /// Whether unknown usernames are sent to the control thread as Actrix identities.
    pub identities: bool,
    pub nonce_key: [u8; 32],
    /// Seconds a nonce stays valid. Accepted at exactly this age, refused one second later.
    pub nonce_lifetime: u64,
}

impl AuthConfig {
    pub fn new(realm: &str, nonce_key: [u8; 32]) -> Self {
        AuthConfig {
            realm: realm.to_string(),
            users: AHashMap::default(),
            rest_secrets: Vec::new(),
            identities: false,
            nonce_key,
            nonce_lifetime: 600,
        }
    }

    pub fn add_user(&mut self, name: &str, password: &str) {
        let key =
            UserKey::from_password(name.as_bytes(), self.realm.as_bytes(), password.as_bytes());
        self.users.insert(name.as_bytes().into(), key);
    }

    /// The security features this configuration announces in its nonces. Password
    /// algorithms always (MD5 and SHA-256 keys are known for every credential); username
    /// anonymity only when static users are the only credentials, since a REST or identity
    /// username cannot be found from its hash and a client told it may hash would fail.
    pub fn features(&self) -> u32 {
        let mut f = features::PASSWORD_ALGORITHMS;
        if self.rest_secrets.is_empty() && !self.identities && !self.users.is_empty() {
            f |= features::USERNAME_ANONYMITY;
        }
        f
    }
}

/// Result of checking a NONCE attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Ours, correctly authenticated, but older than the lifetime: answer 438.
    Stale,
    /// Not ours or tampered: answer 401 with a fresh nonce.
    Invalid,
}

fn nonce_mac(key: &[u8; 32], features: u32, ts: u64, client: SocketAddr) -> [u8; 12] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(&features.to_be_bytes());
    mac.update(&ts.to_be_bytes());
    match client.ip() {
        IpAddr::V4(v4) => mac.update(&v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => mac.update(&v6.octets()),
    }
    mac.update(&client.port().to_be_bytes());
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; 12];
    out.copy_from_slice(&full[..12]);
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(src: &[u8], dst: &mut [u8]) {
    for (i, b) in src.iter().enumerate() {
        dst[2 * i] = HEX[(b >> 4) as usize];
        dst[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

/// Lowercase-only hex decode; uppercase or other characters fail (reliability checklist A2).
fn unhex_into(src: &[u8], dst: &mut [u8]) -> bool {
    if src.len() != dst.len() * 2 {
        return false;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for i in 0..dst.len() {
        match (nib(src[2 * i]), nib(src[2 * i + 1])) {
            (Some(h), Some(l)) => dst[i] = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// Make a nonce for `client` at `now_unix` that announces `features` ([`features`]).
pub fn make_nonce(
    now_unix: u64,
    key: &[u8; 32],
    features: u32,
    client: SocketAddr,
) -> [u8; NONCE_LEN] {
    let features = features & 0xFF_FFFF;
    let mut out = [0u8; NONCE_LEN];
    out[..COOKIE_LEN].copy_from_slice(&cookie(features));
    hex_into(
        &now_unix.to_be_bytes(),
        &mut out[COOKIE_LEN..COOKIE_LEN + 16],
    );
    hex_into(
        &nonce_mac(key, features, now_unix, client),
        &mut out[COOKIE_LEN + 16..],
    );
    out
}

/// Check a nonce presented by `client`: ours (its MAC covers the features it announces, the
/// time and the client's address) and fresh. A nonce from the future by more than 5 s is
/// invalid. The features it announced are [`nonce_features`].
pub fn check_nonce(
    now_unix: u64,
    key: &[u8; 32],
    lifetime: u64,
    nonce: &[u8],
    client: SocketAddr,
) -> NonceCheck {
    if nonce.len() != NONCE_LEN {
        return NonceCheck::Invalid;
    }
    let Some(features) = nonce_features(nonce) else {
        return NonceCheck::Invalid;
    };
    // The cookie must be the canonical encoding (base64 has more than one spelling of some
    // bit patterns only with padding bits, which 3 bytes do not have, but compare anyway).
    if nonce[..COOKIE_LEN] != cookie(features) {
        return NonceCheck::Invalid;
    }
    let mut ts = [0u8; 8];
    let mut mac = [0u8; 12];
    if !unhex_into(&nonce[COOKIE_LEN..COOKIE_LEN + 16], &mut ts)
        || !unhex_into(&nonce[COOKIE_LEN + 16..], &mut mac)
    {
        return NonceCheck::Invalid;
    }
    let ts = u64::from_be_bytes(ts);
    let want = nonce_mac(key, features, ts, client);
    if !bool::from(want.ct_eq(&mac)) {
        return NonceCheck::Invalid;
    }
    if ts > now_unix.saturating_add(5) {
        return NonceCheck::Invalid;
    }
    if now_unix.saturating_sub(ts) > lifetime {
        return NonceCheck::Stale;
    }
    NonceCheck::Valid
}

/// Where a credential came from; decides quota accounting and cache expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Static,
    Rest,
    Identity,
}

/// A resolved credential.
#[derive(Debug, Clone)]
pub struct Credential {
    pub key: UserKey,
    /// Unix seconds after which the credential is refused; `u64::MAX` for static users.
    pub expires_at: u64,
    pub kind: CredentialKind,
    /// For identity credentials: the actor behind them (see [`IdentityKey::quota_key`]).
    pub identity: Option<[u8; 16]>,
}

/// Outcome of a key lookup.
#[derive(Debug)]
pub enum Lookup {
    /// The key (a small value: no heap). REST credentials derived on a miss are not cached
    /// yet; call [`KeyCache::remember`] once the request's MESSAGE-INTEGRITY verified, so a
    /// flood of bad credentials allocates nothing.
    Found(Credential),
    /// Unknown user, expired credential or malformed REST username: 401.
    Refused,
    /// Resolution is in progress elsewhere (identity): drop; the client will retransmit.
    Pending,
}

/// A shard's request to the control thread: resolve this identity username. Plain data over a
/// channel; the answer goes back to the shard named here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRequest {
    pub shard: crate::plan::ShardId,
    pub username: Box<[u8]>,
}

/// Answer from the control thread for an identity username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAnswer {
    pub username: Box<[u8]>,
    pub outcome: Result<IdentityKey, IdentityRefusal>,
}

/// A verified identity credential: its long-term keys, when it stops being valid, and whose
/// it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityKey {
    /// MD5(username ":" realm ":" password), as for any long-term credential.
    pub key_md5: [u8; 16],
    /// SHA-256(username ":" realm ":" password), for PASSWORD-ALGORITHM SHA-256.
    pub key_sha256: [u8; 32],
    /// Unix seconds.
    pub expires_at: u64,
    /// The actor behind the credential, as an opaque digest of its realm and actor id (the
    /// control thread knows them from the verified claims). Allocation quotas are counted
    /// by it, so a re-issued credential of the same actor (a new username) shares the
    /// actor's quota.
    pub quota_key: [u8; 16],
}

/// Why the control thread did not verify an identity username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityRefusal {
    /// For logs and tests ("invalid token", "key server unavailable", ...).
    pub reason: &'static str,
    /// Asking again later may succeed (the key server was unreachable, the control thread
    /// overloaded): the refusal is not remembered and the client's next retransmission asks
    /// again. Otherwise (tampered, expired, unknown key, bad realm) the username is refused
    /// for a while.
    pub retryable: bool,
}

/// Per-shard cache of derived keys for REST and identity credentials. Bounded: when full, the
/// whole cache is cleared (cheap and keeps memory flat under a flood of distinct usernames;
/// legitimate clients re-derive on their next request).
pub struct KeyCache {
    config: Arc<AuthConfig>,
    entries: AHashMap<Box<[u8]>, Credential>,
    /// Identity usernames refused recently, so a flood of the same bad credential costs one
    /// resolution, not one per packet.
    negative: AHashMap<Box<[u8]>, u64>,
    pending: AHashMap<Box<[u8]>, u64>,
    capacity: usize,
    static_creds: AHashMap<Box<[u8]>, Credential>,
    /// USERHASH of each static user → its name.
    static_by_hash: AHashMap<[u8; 32], Box<[u8]>>,
}

impl KeyCache {
    pub fn new(config: Arc<AuthConfig>, capacity: usize) -> Self {
        let static_creds = config
            .users
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Credential {
                        key: v.clone(),
                        expires_at: u64::MAX,
                        kind: CredentialKind::Static,
                        identity: None,
                    },
                )
            })
            .collect();
        let realm = config.realm.as_bytes();
        let static_by_hash = config
            .users
            .keys()
            .map(|name| (userhash(name, realm), name.clone()))
            .collect();
        KeyCache {
            config,
            entries: AHashMap::default(),
            negative: AHashMap::default(),
            pending: AHashMap::default(),
            capacity,
            static_creds,
            static_by_hash,
        }
    }

    /// The static user whose USERHASH is `hash`.
    pub fn user_of_hash(&self, hash: &[u8]) -> Option<&[u8]> {
        let hash: &[u8; 32] = hash.try_into().ok()?;
        self.static_by_hash.get(hash).map(|n| &n[..])
    }

    /// The credential of the static user whose USERHASH is `hash` (no allocation).
    pub fn lookup_userhash(&self, hash: &[u8]) -> Option<Credential> {
        self.static_creds.get(self.user_of_hash(hash)?).cloned()
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Replace the configuration (live reload). Cached entries derived from the old secrets
    /// are dropped.
    pub fn reconfigure(&mut self, config: Arc<AuthConfig>) {
        *self = KeyCache::new(config, self.capacity);
    }

    fn make_room(&mut self) {
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        if self.negative.len() >= self.capacity {
            self.negative.clear();
        }
    }

    /// Find the key for `username` at `now_unix`. REST credentials are derived on a miss;
    /// identity credentials return `Pending` the first time and are resolved by
    /// [`KeyCache::handle_identity_answer`].
    pub fn lookup(&mut self, now_unix: u64, username: &[u8]) -> Lookup {
        if let Some(c) = self.static_creds.get(username) {
            return Lookup::Found(c.clone());
        }
        // Expiry is re-checked on every hit: a cached credential never outlives its expiry.
        let hit = match self.entries.get(username) {
            Some(c) if c.expires_at >= now_unix => true,
            Some(_) => {
                self.entries.remove(username);
                return Lookup::Refused;
            }
            None => false,
        };
        if hit {
            return Lookup::Found(self.entries[username].clone());
        }
        if let Some(cred) = self.derive_rest(now_unix, username) {
            return Lookup::Found(cred);
        }
        // Only a username that could be an identity credential goes to the control thread;
        // anything else is refused now, as fast as a wrong password for a static user, so the
        // answer's timing says nothing about which static users exist.
        if !self.config.identities || looks_like_rest(username) || !could_be_identity(username) {
            return Lookup::Refused;
        }
        if let Some(&until) = self.negative.get(username) {
            if until >= now_unix {
                return Lookup::Refused;
            }
            self.negative.remove(username);
        }
        Lookup::Pending
    }

    /// Record that a resolution for `username` was requested at `now_unix`; returns false when
    /// one is already outstanding (so the caller does not ask twice).
    pub fn mark_pending(&mut self, now_unix: u64, username: &[u8]) -> bool {
        if let Some(&t) = self.pending.get(username) {
            if now_unix.saturating_sub(t) < 5 {
                return false;
            }
        }
        if self.pending.len() >= 1024 {
            self.pending.retain(|_, t| now_unix.saturating_sub(*t) < 5);
            if self.pending.len() >= 1024 {
                return false;
            }
        }
        self.pending.insert(username.into(), now_unix);
        true
    }

    pub fn handle_identity_answer(&mut self, now_unix: u64, a: IdentityAnswer) {
        self.pending.remove(&a.username);
        self.make_room();
        match a.outcome {
            Ok(k) if k.expires_at >= now_unix => {
                self.entries.insert(
                    a.username,
                    Credential {
                        key: UserKey {
                            md5: k.key_md5,
                            sha256: Some(k.key_sha256),
                        },
                        expires_at: k.expires_at,
                        kind: CredentialKind::Identity,
                        identity: Some(k.quota_key),
                    },
                );
            }
            Err(r) if r.retryable => {}
            _ => {
                self.negative.insert(a.username, now_unix + 30);
            }
        }
    }

    fn derive_rest(&self, now_unix: u64, username: &[u8]) -> Option<Credential> {
        if self.config.rest_secrets.is_empty() {
            return None;
        }
        let expiry = rest_expiry(username)?;
        if expiry < now_unix {
            return None;
        }
        // With several secrets we cannot know which one the client used without trying the
        // MAC; the first secret is the current one and the usual match. Derive for the first
        // here; `rest_keys` gives the others to the verifier.
        let key = rest_key(
            &self.config.rest_secrets[0],
            username,
            self.config.realm.as_bytes(),
        );
        Some(Credential {
            key,
            expires_at: expiry,
            kind: CredentialKind::Rest,
            identity: None,
        })
    }

    /// Keys of a REST username under every configured secret after the first (rotation).
    pub fn rest_alternates<'a>(&'a self, username: &'a [u8]) -> impl Iterator<Item = UserKey> + 'a {
        let realm = self.config.realm.as_bytes();
        self.config
            .rest_secrets
            .iter()
            .skip(1)
            .map(move |s| rest_key(s, username, realm))
    }

    /// Cache a REST credential whose MESSAGE-INTEGRITY verified (with whichever secret
    /// matched), so later requests skip the derivation.
    pub fn remember(&mut self, username: &[u8], cred: &Credential) {
        if cred.kind != CredentialKind::Rest {
            return;
        }
        match self.entries.get_mut(username) {
            Some(c) => c.key = cred.key.clone(),
            None => {
                self.make_room();
                self.entries.insert(username.into(), cred.clone());
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A REST username is `<unix expiry>:<user>` (coturn convention); `None` if not that shape.
pub fn rest_expiry(username: &[u8]) -> Option<u64> {
    let colon = username.iter().position(|&c| c == b':')?;
    let ts = &username[..colon];
    if ts.is_empty() || ts.len() > 20 || !ts.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(ts).ok()?.parse().ok()
}

fn looks_like_rest(username: &[u8]) -> bool {
    rest_expiry(username).is_some()
}

/// The name of a REST username `<expiry>:<name>`: who the credential was issued to. Quotas
/// count by it, so rotating the expiry does not give a fresh quota.
pub fn rest_name(username: &[u8]) -> Option<&[u8]> {
    rest_expiry(username)?;
    let colon = username.iter().position(|&c| c == b':')?;
    Some(&username[colon + 1..])
}

/// The REST password: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &[u8]) -> String {
    let mut out = [0u8; 28];
    String::from_utf8_lossy(rest_password_into(secret, username, &mut out)).into_owned()
}

/// As [`rest_password`], into a caller buffer (no allocation: it runs per request).
fn rest_password_into<'a>(secret: &[u8], username: &[u8], out: &'a mut [u8; 28]) -> &'a [u8] {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("any key length");
    mac.update(username);
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(mac.finalize().into_bytes(), &mut out[..])
        .expect("20 bytes encode to 28");
    &out[..n]
}

fn rest_key(secret: &[u8], username: &[u8], realm: &[u8]) -> UserKey {
    let mut buf = [0u8; 28];
    let pw = rest_password_into(secret, username, &mut buf);
    UserKey::from_password(username, realm, pw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> SocketAddr {
        "192.0.2.10:5000".parse().unwrap()
    }

    #[test]
    fn nonce_roundtrip_and_boundaries() {
        let key = [7u8; 32];
        let n = make_nonce(1000, &key, features::PASSWORD_ALGORITHMS, client());
        assert_eq!(
            check_nonce(1000, &key, 600, &n, client()),
            NonceCheck::Valid
        );
        assert_eq!(
            check_nonce(1600, &key, 600, &n, client()),
            NonceCheck::Valid,
            "at exactly the lifetime"
        );
        assert_eq!(
            check_nonce(1601, &key, 600, &n, client()),
            NonceCheck::Stale,
            "one second later"
        );
        assert_eq!(
            check_nonce(995, &key, 600, &n, client()),
            NonceCheck::Valid,
            "5 s skew"
        );
        assert_eq!(
            check_nonce(994, &key, 600, &n, client()),
            NonceCheck::Invalid,
            "from the future"
        );
        let other_port: SocketAddr = "192.0.2.10:5001".parse().unwrap();
        let other_ip: SocketAddr = "192.0.2.11:5000".parse().unwrap();
        assert_eq!(
            check_nonce(1000, &key, 600, &n, other_port),
            NonceCheck::Invalid
        );
        assert_eq!(
            check_nonce(1000, &key, 600, &n, other_ip),
            NonceCheck::Invalid
        );
        assert_eq!(
            check_nonce(1000, &[8u8; 32], 600, &n, client()),
            NonceCheck::Invalid
        );
        // One character tampered, uppercase, too short, too long.
        let mut t = n;
        t[40] = if t[40] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            check_nonce(1000, &key, 600, &t, client()),
            NonceCheck::Invalid
        );
        let upper: Vec<u8> = n.iter().map(|c| c.to_ascii_uppercase()).collect();
        assert_eq!(
            check_nonce(1000, &key, 600, &upper, client()),
            NonceCheck::Invalid
        );
        assert_eq!(
            check_nonce(1000, &key, 600, &n[..NONCE_LEN - 1], client()),
            NonceCheck::Invalid
        );
        let mut long = n.to_vec();
        long.push(b'0');
        assert_eq!(
            check_nonce(1000, &key, 600, &long, client()),
            NonceCheck::Invalid
        );
        // Tampered timestamp (to make an old nonce look fresh) breaks the MAC.
        let stale = make_nonce(100, &key, features::PASSWORD_ALGORITHMS, client());
        let mut forged = stale;
        forged[13..29].copy_from_slice(&n[13..29]);
        assert_eq!(
            check_nonce(1000, &key, 600, &forged, client()),
            NonceCheck::Invalid
        );
    }

    #[test]
    fn nonce_cookie_announces_the_features_and_the_mac_covers_them() {
        let key = [7u8; 32];
        // RFC 8489 §9.2 with erratum 6290: bit 0 (password algorithms) is the rightmost.
        let n = make_nonce(1000, &key, features::PASSWORD_ALGORITHMS, client());
        assert_eq!(&n[..13], b"obMatJos2AAAB");
        assert_eq!(nonce_features(&n), Some(features::PASSWORD_ALGORITHMS));
        let both = features::PASSWORD_ALGORITHMS | features::USERNAME_ANONYMITY;
        let m = make_nonce(1000, &key, both, client());
        assert_eq!(&m[..13], b"obMatJos2AAAD");
        assert_eq!(
            check_nonce(1000, &key, 600, &m, client()),
            NonceCheck::Valid
        );
        // The nonce of RFC 8489 Appendix B.1 (a USERHASH request) announces username
        // anonymity only.
        assert_eq!(
            nonce_features(b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"),
            Some(features::USERNAME_ANONYMITY)
        );
        assert_eq!(nonce_features(b"obMatJos"), None);
        assert_eq!(nonce_features(b"xbMatJos2AAAB"), None);
        // Rewriting the announced features (a bid-down: "no password algorithms") breaks the
        // MAC.
        let mut t = n;
        t[9..13].copy_from_slice(b"AAAA");
        assert_eq!(nonce_features(&t), Some(0));
        assert_eq!(
            check_nonce(1000, &key, 600, &t, client()),
            NonceCheck::Invalid
        );
    }

    #[test]
    fn identity_shaped_usernames_and_userhash() {
        assert!(!could_be_identity(b"alice"));
        assert!(!could_be_identity(b"1700000000:alice"));
        let short = crate::base122::encode(&[7u8; IDENTITY_USERNAME_MIN_DECODED - 1]);
        assert!(!could_be_identity(&short));
        let long = crate::base122::encode(&[7u8; IDENTITY_USERNAME_MIN_DECODED]);
        assert!(could_be_identity(&long));
        let mut broken = long.clone();
        broken.push(0xFF);
        assert!(!could_be_identity(&broken), "not base122");
        // RFC 8489 Appendix B.1: the userhash of the username "<U+30DE><U+30C8><U+30EA>
        // <U+30C3><U+30AF><U+30B9>" in realm "example.org".
        let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
        assert_eq!(
            hex::encode(userhash(user.as_bytes(), b"example.org")),
            "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
        );
        let mut cfg = AuthConfig::new("example.org", [1; 32]);
        cfg.add_user(user, "TheMatrIX");
        assert_eq!(
            cfg.features(),
            features::PASSWORD_ALGORITHMS | features::USERNAME_ANONYMITY,
            "static users only: anonymity announced"
        );
        let cache = KeyCache::new(Arc::new(cfg.clone()), 4);
        assert_eq!(
            cache.user_of_hash(&userhash(user.as_bytes(), b"example.org")),
            Some(user.as_bytes())
        );
        assert_eq!(cache.user_of_hash(&[0; 32]), None);
        assert_eq!(cache.user_of_hash(&[0; 31]), None);
        cfg.identities = true;
        assert_eq!(cfg.features(), features::PASSWORD_ALGORITHMS);
        assert_eq!(rest_name(b"1700000000:alice"), Some(&b"alice"[..]));
        assert_eq!(rest_name(b"alice"), None);
    }

    #[test]
    fn rest_credentials_with_rotation_and_expiry() {
        let mut cfg = AuthConfig::new("example.org", [1; 32]);
        cfg.rest_secrets = vec![b"new-secret".to_vec().into(), b"old-secret".to_vec().into()];
        let mut cache = KeyCache::new(Arc::new(cfg), 16);
        let user = b"2000:alice";
        let pw_new = rest_password(b"new-secret", user);
        let want = UserKey::from_password(user, b"example.org", pw_new.as_bytes());
        match cache.lookup(1500, user) {
            Lookup::Found(c) => assert_eq!(c.key, want),
            other => panic!("{other:?}"),
        }
        let pw_old = rest_password(b"old-secret", user);
        let alt: Vec<_> = cache.rest_alternates(user).collect();
        assert_eq!(
            alt,
            vec![UserKey::from_password(
                user,
                b"example.org",
                pw_old.as_bytes()
            )]
        );
        // Expired usernames are refused, also on a cache hit.
        assert!(matches!(cache.lookup(2001, user), Lookup::Refused));
        assert!(matches!(cache.lookup(1500, b"1000:bob"), Lookup::Refused));
        assert!(matches!(cache.lookup(1500, b"notrest"), Lookup::Refused));
    }

    #[test]
    fn identity_answers_fill_the_cache_and_expire() {
        let mut cfg = AuthConfig::new("r", [1; 32]);
        cfg.identities = true;
        let mut cache = KeyCache::new(Arc::new(cfg), 16);
        // A name that cannot be an identity credential is refused at once.
        assert!(matches!(cache.lookup(100, b"opaque"), Lookup::Refused));
        let opaque = crate::base122::encode(&[5u8; IDENTITY_USERNAME_MIN_DECODED]);
        let later = crate::base122::encode(&[6u8; IDENTITY_USERNAME_MIN_DECODED]);
        let bad = crate::base122::encode(&[8u8; IDENTITY_USERNAME_MIN_DECODED]);
        let (opaque, later, bad) = (&opaque[..], &later[..], &bad[..]);
        assert!(matches!(cache.lookup(100, opaque), Lookup::Pending));
        assert!(cache.mark_pending(100, opaque));
        assert!(
            !cache.mark_pending(101, opaque),
            "one outstanding request per username"
        );
        cache.handle_identity_answer(
            100,
            IdentityAnswer {
                username: opaque.to_vec().into(),
                outcome: Ok(IdentityKey {
                    key_md5: [9; 16],
                    key_sha256: [9; 32],
                    expires_at: 200,
                    quota_key: [1; 16],
                }),
            },
        );
        assert!(matches!(cache.lookup(200, opaque), Lookup::Found(_)));
        assert!(
            matches!(cache.lookup(201, opaque), Lookup::Refused),
            "expiry re-checked on hit"
        );
        cache.handle_identity_answer(
            100,
            IdentityAnswer {
                username: bad.to_vec().into(),
                outcome: Err(IdentityRefusal {
                    reason: "invalid token",
                    retryable: false,
                }),
            },
        );
        assert!(
            matches!(cache.lookup(110, bad), Lookup::Refused),
            "negative cache"
        );
        // A retryable refusal (key server unreachable) is not remembered: the next request
        // asks again.
        assert!(matches!(cache.lookup(100, later), Lookup::Pending));
        assert!(cache.mark_pending(100, later));
        cache.handle_identity_answer(
            100,
            IdentityAnswer {
                username: later.to_vec().into(),
                outcome: Err(IdentityRefusal {
                    reason: "key server unavailable",
                    retryable: true,
                }),
            },
        );
        assert!(matches!(cache.lookup(101, later), Lookup::Pending));
        assert!(cache.mark_pending(101, later), "asked again at once");
    }

    #[test]
    fn cache_is_bounded() {
        let mut cfg = AuthConfig::new("r", [1; 32]);
        cfg.rest_secrets = vec![b"s".to_vec().into()];
        let mut cache = KeyCache::new(Arc::new(cfg), 8);
        for i in 0..100 {
            let u = format!("9999:user{i}");
            assert!(matches!(cache.lookup(1, u.as_bytes()), Lookup::Found(_)));
        }
        assert!(cache.len() <= 8);
    }
}

/// Per-source rate limits with fixed memory: a hashed table of one-second counters.
///
/// Used where an unauthenticated source can make the shard work or answer (401/438 challenges,
/// identity resolutions). Two sources that share a slot reset each other's counter, which errs
/// on the side of letting traffic through; spoofing many sources cannot grow memory.
pub struct RateTable {
    slots: Box<[(u64, u64, u32)]>,
    limit: u32,
    hasher: ahash::RandomState,
}

impl RateTable {
    /// `seed` keys the slot hash, so which sources share a slot is not predictable from
    /// outside.
    pub fn new(slots: usize, per_second: u32, seed: u64) -> Self {
        RateTable {
            slots: vec![(0, u64::MAX, 0); slots.max(1)].into_boxed_slice(),
            limit: per_second,
            hasher: ahash::RandomState::with_seeds(
                seed,
                seed ^ 0x9E37_79B9_7F4A_7C15,
                seed.rotate_left(29),
                !seed,
            ),
        }
    }

    /// Change the limit (live reload); counts in progress carry over.
    pub fn set_limit(&mut self, per_second: u32) {
        self.limit = per_second;
    }

    /// Count one event from `ip` in second `now_unix`; false when over the limit.
    pub fn allow(&mut self, now_unix: u64, ip: IpAddr) -> bool {
        let key = self.hasher.hash_one(ip);
        let n = self.slots.len();
        let slot = &mut self.slots[(key % n as u64) as usize];
        if slot.0 != key || slot.1 != now_unix {
            *slot = (key, now_unix, 1);
            return true;
        }
        slot.2 = slot.2.saturating_add(1);
        slot.2 <= self.limit
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn per_source_per_second() {
        let mut t = RateTable::new(64, 3, 7);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| t.allow(10, a)));
        assert!(!t.allow(10, a));
        assert!(
            t.allow(10, b) || t.allow(10, b),
            "another source is not throttled by a"
        );
        assert!(t.allow(11, a), "a new second");
    }
}
