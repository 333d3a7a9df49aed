//! Control plane of the actrix appliance: the Key Server (KS), the Actor Identity Service
//! (AIS), TURN identity verification, and the HTTP server they share, all on one control thread.
//!
//! What this crate is:
//! - [`spawn`] / [`ControlBuilder`]: one OS thread (optionally pinned) running a current-thread
//!   tokio runtime with one axum HTTP(S) server: `/ks/*` (wire reference sections 3 and 4),
//!   `/ais/*` (section 5; actr 0.4 clients in [`ais::v4`], control/WIRE-0.4.md), `/healthz`,
//!   plus any routes the appliance merges in (signaling, `/metrics`); and, on
//!   `ks.grpc_listen`, the KS as the gRPC service `ks.v1.KeyServer` ([`ks::grpc`]).
//! - [`IdentityVerifier`]: turns a TURN USERNAME into the long-term key (section 6.3). The data
//!   plane asks for it by message (an `IdentityRequest` on the channel given to
//!   [`ControlBuilder::identity`], answered on the asking shard's channel) and never waits on
//!   the control thread.
//! - [`KsClient`]: the signed KS client, working the same against the local and a remote KS.
//! - [`ais::proto`]: the one place the 0.1.7 identity messages and `RegisterRequest` (generated
//!   by `actrix-wire`) are taken from; the signaling crate re-exports them.
//! - [`ais::signing`]: the AIS's Ed25519 signing keys, sealed with the KEK and crash-safe like
//!   the KS's keys.
//! - Config sections and secret bootstrap ([`ControlConfig`]).
//!
//! What it is not: it has no STUN/TURN code and touches no data-plane socket; it does not rate
//! limit ECIES decryptions for TURN (the data plane does, before asking); it hosts no signaling
//! logic (the signaling crate mounts its routes here); it does not parse the appliance's TOML
//! file or detect unknown keys.
//!
//! Architecture invariants:
//! - The HTTP event loop never blocks on the disk or the network: SQLite writes (fsync) and
//!   remote KS calls run on the runtime's blocking pool.
//! - Every acknowledged key and every accepted nonce is committed (`synchronous=FULL`) before the
//!   response leaves.
//! - Secrets are never logged: secret keys, the shared key and the KEK live in types whose
//!   `Debug` prints nothing of them.
//! - Time comes from an injectable [`Clock`]. A function that takes the time takes it as its
//!   first parameter, named for its clock: `now_unix` (Unix seconds), `now_unix_ms` (Unix
//!   milliseconds), `now` only for a monotonic `Instant`.

pub mod ais;
pub mod clock;
pub mod config;
pub mod crypto;
mod db;
pub mod error;
pub mod http_stats;
pub mod identity;
pub mod ks;
pub mod nonce_auth;
pub mod ratelimit;
pub mod realms;
pub mod server;
#[doc(hidden)]
pub mod testing;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::{AisConfig, ControlConfig, HttpConfig, KsConfig, SecretString, ServicesConfig};
pub use db::private_file;
pub use error::ControlError;
pub use identity::{IdentityError, IdentityStats, IdentityVerifier, TurnIdentity};

pub use ks::client::{KsClient, KsClientError};
pub use ks::store::KeyStore;
pub use ks::KeySource;
pub use realms::{provision_realm, Realm, RealmStatus, RealmStore};
pub use server::{
    spawn, spawn_with_routes, ControlBuilder, ControlContext, ControlHandle, IDENTITY_QUEUE,
};
