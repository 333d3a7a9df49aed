//! actrix: a thread-per-core STUN/TURN relay appliance for WebRTC.
//!
//! The crate holds the data plane and the appliance around it:
//! - [`stun`]: the STUN/ChannelData codec (borrowing decode, in-place encode);
//! - [`auth`], [`policy`], [`turn`], [`wheel`]: the sans-IO TURN core and what it consults;
//! - [`config`]: the TOML configuration, its validation and the embedded default;
//! - [`dataplane`]: pinned shard threads with batched UDP I/O that drive the core.
//!
//! The control plane (Key Server, identity service, HTTP) lives in `actrix-control` and talks
//! to the shards by message only.

pub mod auth;
pub mod config;
pub mod dataplane;
pub mod diag;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod policy;
pub mod privileges;
pub mod stun;
pub mod turn;
pub mod wheel;
