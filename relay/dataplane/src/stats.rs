//! Per-shard counters published for readers on other threads (metrics, shutdown).
//!
//! The shard keeps plain integers in its core and copies them here with relaxed stores once per
//! round: readers never contend with the data plane and never stall it. The TURN core's
//! counters come from the one list in `actrix_proto::with_turn_counters!`.

use actrix_proto::turn::{Counters, Server, AUTH_FAILURE_REASONS, N_DROP_REASONS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! shard_stats {
    ($($field:ident),* $(,)?) => {
        #[derive(Default, Debug)]
        pub struct ShardStats {
            $(pub $field: AtomicU64,)*
            pub drops: [AtomicU64; N_DROP_REASONS],
            pub auth_failures_by_reason: [AtomicU64; AUTH_FAILURE_REASONS.len()],
            pub allocations_active: AtomicU64,
            /// Timer-wheel entries and EVEN-PORT reservations held (gauges, for soaks).
            pub timers: AtomicU64,
            pub reservations: AtomicU64,
            /// Identity lookups queued toward the control thread (gauge).
            pub identity_queue: AtomicU64,
            /// Datagrams larger than a receive slot (cut by the kernel, dropped).
            pub truncated: AtomicU64,
            pub sent: AtomicU64,
            pub send_errors: AtomicU64,
            pub send_syscalls: AtomicU64,
            /// Rounds of the shard loop (returns from the backend's wait).
            pub wakeups: AtomicU64,
            /// Rounds that slept out the coalescing period first (`io.coalesce_us`).
            pub coalesce_pauses: AtomicU64,
            pub relay_bind_errors: AtomicU64,
            /// Identity lookups that could not be queued for the control thread.
            pub identity_queue_full: AtomicU64,
            /// Stream connections, by transport (TCP, TLS): open now, accepted, closed or
            /// refused by reason, relayed datagrams dropped for a full send buffer.
            pub streams_open: [AtomicU64; 2],
            pub streams_accepted: [AtomicU64; 2],
            pub streams_closed: [[AtomicU64; crate::streams::N_CLOSE_REASONS]; 2],
            pub streams_send_overflow: [AtomicU64; 2],
            /// RFC 6062 (see [`crate::streams::TcpRelayCounters`]): peer data connections open
            /// now and TCP allocations' listening sockets.
            pub tcp_peer_connections_open: AtomicU64,
            pub tcp_relay_listeners: AtomicU64,
            pub tcp_peer_connected: AtomicU64,
            pub tcp_peer_accepted: AtomicU64,
            pub tcp_peer_closed: AtomicU64,
            pub tcp_bytes_to_peer: AtomicU64,
            pub tcp_bytes_to_client: AtomicU64,
            pub tcp_moved_out: AtomicU64,
            pub tcp_moved_in: AtomicU64,
            /// DTLS associations (see [`crate::dtls::DtlsCounters`]): open now, handshakes
            /// completed and failed, stateless HelloVerifyRequests, stray datagrams, closes
            /// and refusals by reason.
            pub dtls_open: AtomicU64,
            pub dtls_handshakes_completed: AtomicU64,
            pub dtls_handshakes_failed: AtomicU64,
            pub dtls_cookies_sent: AtomicU64,
            pub dtls_stray: AtomicU64,
            pub dtls_closed: [AtomicU64; crate::streams::N_CLOSE_REASONS],
        }

        impl ShardStats {
            /// Copy the core's counters (once per round).
            pub fn publish(&self, server: &Server, bind_errors: u64) {
                let c: &Counters = &server.counters;
                $(self.$field.store(c.$field, Relaxed);)*
                for (d, v) in self.drops.iter().zip(c.drops.iter()) {
                    d.store(*v, Relaxed);
                }
                for (d, v) in self
                    .auth_failures_by_reason
                    .iter()
                    .zip(c.auth_failures_by_reason.iter())
                {
                    d.store(*v, Relaxed);
                }
                self.allocations_active
                    .store(server.allocation_count() as u64, Relaxed);
                self.timers.store(server.timer_count() as u64, Relaxed);
                self.reservations
                    .store(server.reservation_count() as u64, Relaxed);
                self.relay_bind_errors.store(bind_errors, Relaxed);
            }

            /// Copy a shard's stream counters.
            pub fn publish_streams(&self, s: &crate::streams::Streams) {
                let open = s.open_by_transport();
                for t in 0..2 {
                    self.streams_open[t].store(open[t], Relaxed);
                    self.streams_accepted[t].store(s.accepted[t], Relaxed);
                    self.streams_send_overflow[t].store(s.send_overflow[t], Relaxed);
                    for (d, v) in self.streams_closed[t].iter().zip(s.closed[t].iter()) {
                        d.store(*v, Relaxed);
                    }
                }
                let tcp = &s.tcp;
                self.tcp_peer_connections_open.store(s.peer_connections(), Relaxed);
                self.tcp_relay_listeners.store(s.relay_listener_count(), Relaxed);
                self.tcp_peer_connected.store(tcp.connected, Relaxed);
                self.tcp_peer_accepted.store(tcp.accepted, Relaxed);
                self.tcp_peer_closed.store(tcp.closed, Relaxed);
                self.tcp_bytes_to_peer.store(tcp.bytes_to_peer, Relaxed);
                self.tcp_bytes_to_client.store(tcp.bytes_to_client, Relaxed);
                self.tcp_moved_out.store(tcp.moved_out, Relaxed);
                self.tcp_moved_in.store(tcp.moved_in, Relaxed);
            }

            /// Copy a shard's DTLS counters.
            pub fn publish_dtls(&self, d: &crate::dtls::DtlsSide) {
                let c = &d.counters;
                self.dtls_open.store(d.open() as u64, Relaxed);
                self.dtls_handshakes_completed.store(c.handshakes_completed, Relaxed);
                self.dtls_handshakes_failed.store(c.handshakes_failed, Relaxed);
                self.dtls_cookies_sent.store(c.cookies_sent, Relaxed);
                self.dtls_stray.store(c.stray, Relaxed);
                for (d, v) in self.dtls_closed.iter().zip(c.closed.iter()) {
                    d.store(*v, Relaxed);
                }
            }

            /// Name/value pairs of the core's plain counters, for exposition.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Relaxed)),)*]
            }
        }
    };
}

actrix_proto::with_turn_counters!(shard_stats);
