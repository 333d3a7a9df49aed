//! actrix-proto: the STUN/TURN protocol of the actrix appliance, sans-IO.
//!
//! What is here:
//! - [`stun`]: the STUN/ChannelData codec: borrowing decode with one validating pass, an
//!   encoder into caller buffers, and in-place framing of relayed data (ChannelData and Data
//!   indication headers written into the headroom before a payload);
//! - [`turn`]: the TURN server core of one shard ([`turn::Server`]): every method of RFC 8656
//!   over UDP plus RFC 8489 Binding, fed `(now, datagram)` and answering with a
//!   [`turn::Reply`] (send these bytes there, bind this relay port, or drop for a reason);
//! - [`auth`]: long-term credentials (static users, TURN REST, identity answers), stateless
//!   nonces, the per-shard key cache, per-source rate tables;
//! - [`policy`]: which peer addresses a client may relay to;
//! - [`wheel`]: the hashed timer wheel behind lifetimes;
//! - [`plan`]: the sharding plan: which shard owns a relay port or a client address.
//!
//! What is deliberately not here: sockets, threads, clocks, async, logging, metrics. Time is a
//! parameter (always the first one, `now`), randomness a seed, side effects (opening or closing
//! a relay socket, asking the control thread about an identity) are returned as data for the
//! I/O layer (`actrix-dataplane`) to carry out. `clippy.toml` in this crate forbids reading
//! clocks and unseeded randomness; the dependency list has no runtime.

pub mod auth;
pub mod base122;
pub mod plan;
pub mod policy;
pub mod stun;
pub mod turn;
pub mod wheel;

#[doc(hidden)]
pub mod fuzzing;
