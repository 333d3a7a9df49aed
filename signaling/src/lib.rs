//! The Actrix WebSocket signaling hub, served on the control thread (wire reference section 8).
//!
//! What it is: `GET /signaling/ws` (binary frames, one protobuf `SignalingEnvelope` each) and
//! `GET /signaling/health`, mounted into the control thread's axum server with
//! [`router`] / [`Signaling::router`]. Existing actr clients work unchanged: registration
//! through the in-process AIS, Ping/Pong, credential update, discovery, route candidates,
//! service specs, ActrUp presence, and relay of SDP, ICE, role negotiation and ICE restart
//! between actors of one realm, with the fixes of wire section 9 (source bound to the
//! credential, URL identities validated, credentials never forwarded, default-deny ACL).
//!
//! Code map:
//! - [`proto`]: the protobuf messages, written by hand from wire section 1 (no `protoc`); the
//!   identity types and `RegisterRequest` are the control crate's.
//! - [`hub`]: the sans-IO routing core ([`Hub`]), fed `(now, connection events, envelopes)`,
//!   drained with [`Hub::poll_output`]; one file per concern (registry, ACL, presence,
//!   discovery, relay).
//! - `server`: the WebSocket I/O layer (admission, timers, queues, blocking work).
//! - `store`: `<data_dir>/signaling.db` (ACL, registry rows, specs) behind a writer thread.
//! - [`config`]: `[signaling]` ([`SignalingConfig`]); [`stats`]: counters ([`SignalingStats`]).
//!
//! What it is not: it does not issue credentials (the AIS does), it does not provision realms,
//! and it does not route between nodes (scale-out will use a message bus).
//!
//! Architecture invariants:
//! - `hub` depends on nothing that does I/O or reads a clock; `server` is the only module that
//!   knows about sockets and tasks, `store` the only one that knows SQL.
//! - The control thread never blocks on the network or the disk: AIS calls, KS lookups and
//!   ECIES run on the blocking pool, SQLite writes on the writer thread (the realms table is
//!   read through a 1 s cache).
//! - Every connection's outgoing queue is bounded; a full queue disconnects that connection.

pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;

pub mod proto;
mod server;
pub mod stats;
mod store;
mod v4;
mod verify;

pub use config::SignalingConfig;
pub use hub::Hub;
pub use server::{router, router_with_stats, Signaling, SignalingError, SignalingHandle};
pub use stats::SignalingStats;
pub use store::SIGNALING_DB_FILE;
