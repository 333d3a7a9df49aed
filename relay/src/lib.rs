//! actrix: the appliance around the data plane: the configuration file (schema, embedded
//! default, validation that lists every error), the data plane as configured ([`plane`]),
//! Prometheus exposition ([`metrics`]), the diagnostics page ([`diag`]) and privilege
//! handling; `main.rs` is the `actrix` command (`run`, `check`, `tune`).
//!
//! The protocol lives in `actrix-proto` (sans-IO), the shards in `actrix-dataplane`, the
//! system calls in `actrix-udp`, the control plane in `actrix-control` and signaling in
//! `actrix-signaling`.

pub mod admin;
pub mod config;
pub mod diag;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod plane;
pub mod privileges;
pub mod tls;
