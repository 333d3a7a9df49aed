//! Per-shard counters published for readers on other threads (metrics, shutdown).
//!
//! The shard keeps plain integers in its core and copies them here with relaxed stores once per
//! loop iteration: readers never contend with the data plane and never stall it.

use crate::turn::{Counters, Server};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! stats {
    ($($field:ident),* $(,)?) => {
        #[derive(Default, Debug)]
        pub struct ShardStats {
            $(pub $field: AtomicU64,)*
            pub drops: [AtomicU64; crate::turn::N_DROP_REASONS],
            pub auth_failures_by_reason: [AtomicU64; 6],
            pub allocations_active: AtomicU64,
            pub truncated: AtomicU64,
            pub sent: AtomicU64,
            pub send_errors: AtomicU64,
            pub send_syscalls: AtomicU64,
            /// Rounds of the shard loop (returns from epoll_wait or io_uring_enter).
            pub wakeups: AtomicU64,
            /// Rounds that slept out the coalescing period first (`io.coalesce_us`).
            pub coalesce_pauses: AtomicU64,
            pub relay_bind_errors: AtomicU64,
        }

        impl ShardStats {
            pub fn publish(&self, server: &Server, bind_errors: u64) {
                let c: &Counters = &server.counters;
                $(self.$field.store(c.$field, Relaxed);)*
                for (d, v) in self.drops.iter().zip(c.drops.iter()) {
                    d.store(*v, Relaxed);
                }
                for (d, v) in self.auth_failures_by_reason.iter().zip(c.auth_failures_by_reason.iter()) {
                    d.store(*v, Relaxed);
                }
                self.allocations_active.store(server.allocation_count() as u64, Relaxed);
                self.relay_bind_errors.store(bind_errors, Relaxed);
            }

            /// Name/value pairs of the plain counters, for exposition.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Relaxed)),)*]
            }
        }
    };
}

stats!(
    client_packets,
    client_bytes,
    peer_packets,
    peer_bytes,
    relayed_to_peer,
    relayed_to_client,
    binding_requests,
    allocations_created,
    allocations_expired,
    allocations_deleted,
    allocations_refused_quota,
    allocations_refused_capacity,
    permissions_created,
    channels_bound,
    peers_denied,
    auth_challenges,
    auth_failures,
    stale_nonces,
    error_responses,
);
