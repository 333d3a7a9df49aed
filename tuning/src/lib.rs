//! Host tuning for actrix edge nodes: the library behind `actrix tune`.
//!
//! The appliance runs one pinned data-plane shard per core, each with its own
//! SO_REUSEPORT socket, plus one control thread on a core of its own. How well that
//! performs depends on the host around it: which CPUs are SMT siblings, which NUMA
//! node the NIC hangs off, where its queue IRQs land, and a handful of socket and
//! port sysctls. This crate turns that into something an operator can read and
//! apply:
//!
//! 1. [`observe`] reads the host under a root directory (`/`, or a recorded fixture
//!    tree in tests) into a plain [`Host`]. It never fails: what it cannot read
//!    becomes a note.
//! 2. [`plan()`] is a pure function from a [`Host`] and a [`PlanInput`] to a [`Plan`]:
//!    the shard and control CPUs, IRQ affinities, sysctl floors, limits and governor,
//!    each line with a reason. It renders as a table, a `[cores]` config snippet and
//!    a sysctl drop-in.
//! 3. [`apply()`] writes a plan to the host; [`check()`] lists where a host differs.
//! 4. [`run_cli`] with [`TuneArgs`] is the `actrix tune` subcommand.
//!
//! What it is not: it does not pin threads or configure the appliance (the operator
//! pastes the config snippet; the appliance pins itself), it does not change NIC
//! queue counts or offloads (`ethtool` settings are printed as hints, because they
//! are driver-specific and reset the link), it does not manage irqbalance or
//! systemd beyond writing drop-in files, and it only ever raises sysctls and
//! limits, never lowers what an operator already set higher.

pub mod addrs;
pub mod apply;
pub mod cli;
pub mod cpulist;
pub mod observe;
pub mod plan;
pub mod render;

pub use addrs::{fixture_addresses, live_addresses, InterfaceAddrs};
pub use apply::{apply, check, Difference, Fix};
pub use cli::{run_cli, PortRange, TuneArgs};
pub use observe::{observe, Host};
pub use plan::{plan, Action, Plan, PlanInput, PlanItem};
pub use render::render_differences;
