//! The protobuf message types of the protocols the appliance serves, generated at build time
//! from the `.proto` files vendored under `proto/` (see `proto/SOURCES.md` for where each file
//! comes from and its license). Nothing here is written by hand: the build compiles the files
//! with protox (a protobuf compiler in Rust, so no system `protoc` is needed) and prost-build.
//!
//! - [`v1`]: the actr protocol of `actr-protocol` 0.1.7 clients, as the wire reference
//!   describes it (upstream revision 17688176, a wire-compatible superset of the `.proto` files
//!   shipped in the 0.1.7 crate).
//! - [`v4`]: the actr protocol of `actr-protocol` 0.4.21 clients (the files shipped in that
//!   crate, byte for byte). `control/WIRE-0.4.md` says what changed and how the appliance tells
//!   the two apart.
//! - [`ks`] (feature `grpc`): the Actrix Key Server's gRPC service `ks.v1.KeyServer`, from the
//!   upstream Actrix server's `keyserver.proto`.
//!
//! Each protocol keeps the package layout of its files (`actr`, `signaling`, `webrtc`), because
//! the generated code refers across packages with `super::`.
//!
//! One deliberate sharing: `v1` uses `v4::webrtc::SessionDescription` for
//! `webrtc.SessionDescription` (prost-build's `extern_path`). The 0.4 message is the 0.1.7 one
//! plus the optional `sdp_exchange_id` (field 3), so it encodes and decodes every 0.1.7 SDP
//! exactly as before (no 0.1.7 peer sends field 3), and a 0.4 SDP that the signaling hub
//! handles through the 0.1.7 types keeps its exchange id.
//!
//! What this crate is not: it holds no behaviour besides what prost derives, no I/O and no
//! conversion between the versions (the services do that where they need it).

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

/// The actr protocol of 0.1.7 clients (packages `actr`, `signaling`, `webrtc`).
pub mod v1 {
    /// Package `actr`.
    #[allow(missing_docs, clippy::all)]
    pub mod actr {
        include!(concat!(env!("OUT_DIR"), "/v1/actr.rs"));
    }
    /// Package `signaling`.
    #[allow(missing_docs, clippy::all)]
    pub mod signaling {
        include!(concat!(env!("OUT_DIR"), "/v1/signaling.rs"));
    }
    /// Package `webrtc` (`SessionDescription` is 0.4's, see the crate documentation).
    #[allow(missing_docs, clippy::all)]
    pub mod webrtc {
        include!(concat!(env!("OUT_DIR"), "/v1/webrtc.rs"));
        pub use crate::v4::webrtc::{session_description, SessionDescription};
    }
}

/// The actr protocol of 0.4.21 clients (packages `actr`, `signaling`, `webrtc`).
pub mod v4 {
    /// Package `actr`.
    #[allow(missing_docs, clippy::all)]
    pub mod actr {
        include!(concat!(env!("OUT_DIR"), "/v4/actr.rs"));
    }
    /// Package `signaling`.
    #[allow(missing_docs, clippy::all)]
    pub mod signaling {
        include!(concat!(env!("OUT_DIR"), "/v4/signaling.rs"));
    }
    /// Package `webrtc`.
    #[allow(missing_docs, clippy::all)]
    pub mod webrtc {
        include!(concat!(env!("OUT_DIR"), "/v4/webrtc.rs"));
    }
}

/// The Actrix Key Server's gRPC API (packages `ks.v1` and `supervisor.v1`).
#[cfg(feature = "grpc")]
pub mod ks {
    /// Package `ks.v1`: the `KeyServer` service and its messages.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/ks/ks.v1.rs"));
    }
}

/// Package `supervisor.v1` (`NonceCredential`, used by `ks.v1`).
#[cfg(feature = "grpc")]
pub mod supervisor {
    /// Package `supervisor.v1`.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/ks/supervisor.v1.rs"));
    }
}
