//! Prometheus exposition of the appliance's figures (`GET /metrics` on the control server).
//!
//! Shards publish their counters into [`ShardStats`] atomics; a scrape reads those with
//! relaxed loads and never touches a shard, so it cannot stall the data plane. Labels carry only
//! bounded values (shard number, drop reason, direction); never a username or an address.

use actrix_dataplane::stats::ShardStats;
use actrix_proto::turn::{AUTH_FAILURE_REASONS, DROP_REASONS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Collects the data plane's per-shard figures and process figures at scrape time.
#[derive(Debug)]
pub struct DataPlaneCollector {
    pub shards: Vec<Arc<ShardStats>>,
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    if let [(labels, v)] = series {
        if labels.is_empty() {
            return ConstCounter::new(*v).encode(m);
        }
    }
    for (labels, v) in series {
        let f = m.encode_family(labels)?;
        ConstCounter::new(*v).encode(f)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0i64);
    let mut m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    if let [(labels, v)] = series {
        if labels.is_empty() {
            return ConstGauge::new(*v).encode(m);
        }
    }
    for (labels, v) in series {
        let f = m.encode_family(labels)?;
        ConstGauge::new(*v).encode(f)?;
    }
    Ok(())
}

impl DataPlaneCollector {
    fn per_shard(&self, f: impl Fn(&ShardStats) -> u64) -> Vec<(Labels, u64)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![("shard", i.to_string())], f(s)))
            .collect()
    }
}

impl Collector for DataPlaneCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        let mut relayed = Vec::new();
        let mut drops = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            let sh = i.to_string();
            packets.push((
                vec![("shard", sh.clone()), ("side", "client".into())],
                s.client_packets.load(Relaxed),
            ));
            packets.push((
                vec![("shard", sh.clone()), ("side", "peer".into())],
                s.peer_packets.load(Relaxed),
            ));
            bytes.push((
                vec![("shard", sh.clone()), ("side", "client".into())],
                s.client_bytes.load(Relaxed),
            ));
            bytes.push((
                vec![("shard", sh.clone()), ("side", "peer".into())],
                s.peer_bytes.load(Relaxed),
            ));
            relayed.push((
                vec![("shard", sh.clone()), ("direction", "to_peer".into())],
                s.relayed_to_peer.load(Relaxed),
            ));
            relayed.push((
                vec![("shard", sh.clone()), ("direction", "to_client".into())],
                s.relayed_to_client.load(Relaxed),
            ));
            for (r, d) in DROP_REASONS.iter().zip(s.drops.iter()) {
                drops.push((
                    vec![("shard", sh.clone()), ("reason", r.to_string())],
                    d.load(Relaxed),
                ));
            }
            drops.push((
                vec![("shard", sh.clone()), ("reason", "truncated".into())],
                s.truncated.load(Relaxed),
            ));
        }
        counter(
            &mut enc,
            "actrix_packets_received",
            "Datagrams handled by side (truncated ones are only in actrix_drops_total{reason=\"truncated\"})",
            &packets,
        )?;
        counter(
            &mut enc,
            "actrix_bytes_received",
            "Bytes received by side",
            &bytes,
        )?;
        counter(
            &mut enc,
            "actrix_packets_sent",
            "Datagrams sent",
            &self.per_shard(|s| s.sent.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_send_errors",
            "Datagrams the kernel refused to send",
            &self.per_shard(|s| s.send_errors.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_send_syscalls",
            "sendmmsg calls",
            &self.per_shard(|s| s.send_syscalls.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_shard_wakeups",
            "Rounds of a shard's loop (returns from epoll_wait or io_uring_enter)",
            &self.per_shard(|s| s.wakeups.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_coalesce_pauses",
            "Rounds that first slept out the wake-up coalescing period (io.coalesce_us)",
            &self.per_shard(|s| s.coalesce_pauses.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_relayed_packets",
            "Datagrams relayed by direction",
            &relayed,
        )?;
        counter(
            &mut enc,
            "actrix_drops",
            "Datagrams dropped without an answer, by reason",
            &drops,
        )?;
        let (mut s_open, mut s_acc, mut s_closed, mut s_over) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut dtls_hs, mut dtls_cookies, mut dtls_stray) = (Vec::new(), Vec::new(), Vec::new());
        for (i, st) in self.shards.iter().enumerate() {
            for (t, tr) in actrix_dataplane::streams::STREAM_TRANSPORTS
                .iter()
                .enumerate()
            {
                let l = vec![
                    ("shard", i.to_string()),
                    ("transport", tr.name().to_string()),
                ];
                s_open.push((l.clone(), st.streams_open[t].load(Relaxed) as i64));
                s_acc.push((l.clone(), st.streams_accepted[t].load(Relaxed)));
                s_over.push((l.clone(), st.streams_send_overflow[t].load(Relaxed)));
                for (r, v) in actrix_dataplane::streams::CLOSE_REASONS
                    .iter()
                    .zip(st.streams_closed[t].iter())
                {
                    let mut l = l.clone();
                    l.push(("reason", r.to_string()));
                    s_closed.push((l, v.load(Relaxed)));
                }
            }
            // DTLS associations count as connections of transport "dtls".
            let l = vec![("shard", i.to_string()), ("transport", "dtls".to_string())];
            s_open.push((l.clone(), st.dtls_open.load(Relaxed) as i64));
            s_acc.push((l.clone(), st.dtls_handshakes_completed.load(Relaxed)));
            for (r, v) in actrix_dataplane::streams::CLOSE_REASONS
                .iter()
                .zip(st.dtls_closed.iter())
            {
                let mut l = l.clone();
                l.push(("reason", r.to_string()));
                s_closed.push((l, v.load(Relaxed)));
            }
            let s = i.to_string();
            for (result, v) in [
                ("completed", &st.dtls_handshakes_completed),
                ("failed", &st.dtls_handshakes_failed),
            ] {
                dtls_hs.push((
                    vec![("shard", s.clone()), ("result", result.to_string())],
                    v.load(Relaxed),
                ));
            }
            dtls_cookies.push((
                vec![("shard", s.clone())],
                st.dtls_cookies_sent.load(Relaxed),
            ));
            dtls_stray.push((vec![("shard", s)], st.dtls_stray.load(Relaxed)));
        }
        gauge(
            &mut enc,
            "actrix_stream_connections",
            "Client connections over TCP and TLS, and DTLS associations, open now",
            &s_open,
        )?;
        counter(
            &mut enc,
            "actrix_stream_accepted",
            "Client connections accepted over TCP and TLS, DTLS associations whose handshake finished",
            &s_acc,
        )?;
        counter(
            &mut enc,
            "actrix_stream_closed",
            "Client connections closed or refused, by reason",
            &s_closed,
        )?;
        counter(
            &mut enc,
            "actrix_dtls_handshakes",
            "DTLS handshakes, by result (failed: an error or the deadline before it finished)",
            &dtls_hs,
        )?;
        counter(
            &mut enc,
            "actrix_dtls_hello_verify",
            "Stateless DTLS HelloVerifyRequests sent (ClientHellos without a valid cookie)",
            &dtls_cookies,
        )?;
        counter(
            &mut enc,
            "actrix_dtls_stray",
            "Datagrams on a DTLS listener from a source without an association that were not a ClientHello",
            &dtls_stray,
        )?;
        counter(
            &mut enc,
            "actrix_stream_send_overflow",
            "Datagrams for a stream client dropped because its send buffer was full (a slow reader)",
            &s_over,
        )?;
        gauge(
            &mut enc,
            "actrix_allocations_active",
            "Allocations currently active",
            &self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        vec![("shard", i.to_string())],
                        s.allocations_active.load(Relaxed) as i64,
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        let per_shard_gauge = |f: &dyn Fn(&ShardStats) -> u64| {
            self.shards
                .iter()
                .enumerate()
                .map(|(i, s)| (vec![("shard", i.to_string())], f(s) as i64))
                .collect::<Vec<_>>()
        };
        gauge(
            &mut enc,
            "actrix_timers_pending",
            "Timer-wheel entries armed (allocation, permission and channel deadlines, stale ones until they fire)",
            &per_shard_gauge(&|s| s.timers.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "actrix_reservations_active",
            "Relay ports held by EVEN-PORT reservations",
            &per_shard_gauge(&|s| s.reservations.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "actrix_identity_queue",
            "Identity lookups queued toward the control thread",
            &per_shard_gauge(&|s| s.identity_queue.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_allocations_created",
            "Allocations granted",
            &self.per_shard(|s| s.allocations_created.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_allocations_expired",
            "Allocations that reached their lifetime",
            &self.per_shard(|s| s.allocations_expired.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_allocations_deleted",
            "Allocations deleted by Refresh 0",
            &self.per_shard(|s| s.allocations_deleted.load(Relaxed)),
        )?;
        let mut refused = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            refused.push((
                vec![("shard", i.to_string()), ("reason", "quota".into())],
                s.allocations_refused_quota.load(Relaxed),
            ));
            refused.push((
                vec![("shard", i.to_string()), ("reason", "capacity".into())],
                s.allocations_refused_capacity.load(Relaxed),
            ));
            refused.push((
                vec![("shard", i.to_string()), ("reason", "reservation".into())],
                s.allocations_refused_reservation.load(Relaxed),
            ));
        }
        counter(
            &mut enc,
            "actrix_allocations_refused",
            "Allocations refused (486 quota; 508 capacity or draining, or a RESERVATION-TOKEN not held by this shard)",
            &refused,
        )?;
        counter(
            &mut enc,
            "actrix_allocations_redirected",
            "Allocates answered 300 Try Alternate (draining or over a load limit)",
            &self.per_shard(|s| s.allocations_redirected.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_allocations_disconnected",
            "Allocations ended by an operator (actrix disconnect)",
            &self.per_shard(|s| s.allocations_disconnected.load(Relaxed)),
        )?;
        // RFC 6062 TCP allocations.
        counter(
            &mut enc,
            "actrix_tcp_allocations_created",
            "TCP allocations (RFC 6062) granted",
            &self.per_shard(|s| s.tcp_allocations_created.load(Relaxed)),
        )?;
        let mut connects = Vec::new();
        let mut peers = Vec::new();
        let mut bytes6062 = Vec::new();
        let mut moved = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            let l = |k: &'static str, v: &str| vec![("shard", i.to_string()), (k, v.to_string())];
            connects.push((l("result", "connected"), s.tcp_connects.load(Relaxed)));
            connects.push((l("result", "failed"), s.tcp_connect_failures.load(Relaxed)));
            peers.push((
                l("result", "accepted"),
                s.tcp_peer_connections_accepted.load(Relaxed),
            ));
            peers.push((
                l("result", "refused"),
                s.tcp_peer_connections_refused.load(Relaxed),
            ));
            bytes6062.push((l("direction", "to_peer"), s.tcp_bytes_to_peer.load(Relaxed)));
            bytes6062.push((
                l("direction", "to_client"),
                s.tcp_bytes_to_client.load(Relaxed),
            ));
            moved.push((l("direction", "out"), s.tcp_moved_out.load(Relaxed)));
            moved.push((l("direction", "in"), s.tcp_moved_in.load(Relaxed)));
        }
        counter(
            &mut enc,
            "actrix_tcp_connects",
            "Connect requests (RFC 6062) by outcome: connected to the peer, or 447",
            &connects,
        )?;
        counter(
            &mut enc,
            "actrix_tcp_peer_connections_incoming",
            "Peer connections to a TCP allocation's relayed address: accepted (ConnectionAttempt sent) or refused (no permission, policy, limit)",
            &peers,
        )?;
        counter(
            &mut enc,
            "actrix_tcp_connection_binds",
            "ConnectionBind requests that joined a client data connection to a peer",
            &self.per_shard(|s| s.tcp_connection_binds.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "actrix_tcp_peer_connections",
            "Peer data connections open now (RFC 6062)",
            &self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        vec![("shard", i.to_string())],
                        s.tcp_peer_connections_open.load(Relaxed) as i64,
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        counter(
            &mut enc,
            "actrix_tcp_relayed_bytes",
            "Bytes passed between joined client and peer data connections",
            &bytes6062,
        )?;
        counter(
            &mut enc,
            "actrix_tcp_connections_moved",
            "Client connections handed to the shard owning their ConnectionBind (out) or taken over (in)",
            &moved,
        )?;
        counter(
            &mut enc,
            "actrix_permissions_created",
            "Permissions installed or refreshed",
            &self.per_shard(|s| s.permissions_created.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_channels_bound",
            "Channel bindings made or refreshed",
            &self.per_shard(|s| s.channels_bound.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_peers_denied",
            "Peer addresses refused by policy (403)",
            &self.per_shard(|s| s.peers_denied.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_binding_requests",
            "STUN Binding requests answered",
            &self.per_shard(|s| s.binding_requests.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_auth_challenges",
            "401 challenges to requests without credentials",
            &self.per_shard(|s| s.auth_challenges.load(Relaxed)),
        )?;
        let mut by_reason = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            for (r, v) in AUTH_FAILURE_REASONS
                .iter()
                .zip(s.auth_failures_by_reason.iter())
            {
                by_reason.push((
                    vec![("shard", i.to_string()), ("reason", r.to_string())],
                    v.load(Relaxed),
                ));
            }
        }
        counter(
            &mut enc,
            "actrix_auth_failures",
            "Authenticated requests refused with 401, by reason (the answer is the same for all)",
            &by_reason,
        )?;
        counter(
            &mut enc,
            "actrix_stale_nonces",
            "Requests with an expired nonce (438)",
            &self.per_shard(|s| s.stale_nonces.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_error_responses",
            "STUN error responses sent",
            &self.per_shard(|s| s.error_responses.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "actrix_relay_bind_errors",
            "Relay ports that could not be bound",
            &self.per_shard(|s| s.relay_bind_errors.load(Relaxed)),
        )?;

        let p = process_figures();
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory",
            &[(vec![], p.rss as i64)],
        )?;
        gauge(
            &mut enc,
            "process_open_fds",
            "Open file descriptors",
            &[(vec![], p.fds as i64)],
        )?;
        gauge(
            &mut enc,
            "process_threads",
            "Threads",
            &[(vec![], p.threads as i64)],
        )?;
        counter(
            &mut enc,
            "process_cpu_ticks",
            "User+system CPU time in clock ticks (USER_HZ)",
            &[(vec![], p.cpu_ticks)],
        )?;
        Ok(())
    }
}

struct Process {
    rss: u64,
    fds: u64,
    threads: u64,
    cpu_ticks: u64,
}

fn process_figures() -> Process {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Process {
        rss: field("VmRSS:") * 1024,
        fds: std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        threads: field("Threads:"),
        cpu_ticks: tick(11) + tick(12),
    }
}

/// Request counts and latencies of the control HTTP server (KS, AIS, signaling, metrics),
/// labelled by service, method, route pattern and status.
#[derive(Debug)]
pub struct HttpCollector {
    pub stats: Arc<actrix_control::http_stats::HttpStats>,
}

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use actrix_control::http_stats::BUCKETS;
        use prometheus_client::metrics::exemplar::Exemplar;
        use prometheus_client::metrics::MetricType;
        let snap = self.stats.snapshot();
        let labels = |k: &actrix_control::http_stats::Key| -> Labels {
            vec![
                ("service", k.0.to_string()),
                ("method", k.1.clone()),
                ("route", k.2.clone()),
                ("status", k.3.to_string()),
            ]
        };
        let series: Vec<(Labels, u64)> = snap.iter().map(|(k, v)| (labels(k), v.count)).collect();
        counter(
            &mut enc,
            "actrix_http_requests",
            "HTTP requests by service, route and status",
            &series,
        )?;
        let c = &self.stats.conns;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        gauge(
            &mut enc,
            "actrix_http_connections_open",
            "Connections open on the control listener (upgraded WebSockets included)",
            &[(vec![], load(&c.open) as i64)],
        )?;
        counter(
            &mut enc,
            "actrix_http_connections_accepted",
            "Connections admitted by the control listener",
            &[(vec![], load(&c.accepted))],
        )?;
        let closed: Vec<(Labels, u64)> = [
            ("total_cap", &c.refused_total_cap),
            ("per_ip_cap", &c.refused_per_ip),
            ("first_bytes_timeout", &c.first_bytes_timeouts),
            ("http2", &c.refused_http2),
            ("tls_handshake", &c.tls_failures),
            ("accept_error", &c.accept_errors),
        ]
        .into_iter()
        .map(|(r, v)| (vec![("reason", r.to_string())], load(v)))
        .collect();
        counter(
            &mut enc,
            "actrix_http_connections_refused",
            "Connections the control listener closed before serving a request, by reason",
            &closed,
        )?;
        let mut m = enc.encode_descriptor(
            "actrix_http_request_duration_seconds",
            "HTTP request latency by service, route and status",
            None,
            MetricType::Histogram,
        )?;
        for (k, v) in &snap {
            let mut buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .copied()
                .zip(v.buckets.iter().copied())
                .collect();
            let inside: u64 = v.buckets.iter().sum();
            buckets.push((f64::MAX, v.count - inside));
            let l = labels(k);
            let mut f = m.encode_family(&l)?;
            f.encode_histogram::<Labels>(
                v.sum_seconds,
                v.count,
                &buckets,
                None::<&std::collections::HashMap<usize, Exemplar<Labels, f64>>>,
            )?;
        }
        Ok(())
    }
}

/// The control thread's TURN identity verifier: resolutions, ECIES decryptions, KS key fetches.
#[derive(Debug)]
pub struct IdentityCollector {
    pub stats: Arc<actrix_control::IdentityStats>,
}

impl Collector for IdentityCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        for (name, help, v) in [
            (
                "actrix_identity_resolutions",
                "Actrix identity usernames verified for TURN (each answer is cached by the shard)",
                &s.resolutions,
            ),
            (
                "actrix_identity_decryptions",
                "Identity tokens decrypted (ECIES)",
                &s.decryptions,
            ),
            (
                "actrix_identity_key_fetches",
                "KS secret keys fetched for identity verification",
                &s.key_fetches,
            ),
        ] {
            counter(&mut enc, name, help, &[(Labels::new(), v.load(Relaxed))])?;
        }
        Ok(())
    }
}

/// The signaling hub's counters.
#[derive(Debug)]
pub struct SignalingCollector {
    pub stats: Arc<actrix_signaling::SignalingStats>,
}

impl Collector for SignalingCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let one = |v: &std::sync::atomic::AtomicU64| vec![(Labels::new(), v.load(Relaxed))];
        gauge(
            &mut enc,
            "actrix_signaling_connections_open",
            "WebSocket connections open",
            &[(vec![], s.connections_open.load(Relaxed) as i64)],
        )?;
        gauge(
            &mut enc,
            "actrix_signaling_connections_v4",
            "WebSocket connections open that speak actr 0.4",
            &[(vec![], s.connections_v4.load(Relaxed) as i64)],
        )?;
        gauge(
            &mut enc,
            "actrix_signaling_registry_entries",
            "Actors in the in-memory registry",
            &[(vec![], s.registry_entries.load(Relaxed) as i64)],
        )?;
        for (name, help, v) in [
            (
                "actrix_signaling_cluster_connected",
                "1 while the cluster bus (NATS) is connected; 0 while routing is local-only or without [cluster]",
                &s.cluster_connected,
            ),
            (
                "actrix_signaling_cluster_nodes",
                "Other cluster nodes heard within the node timeout",
                &s.cluster_nodes,
            ),
            (
                "actrix_signaling_cluster_remote_actors",
                "Actors of other cluster nodes known here",
                &s.cluster_remote_actors,
            ),
        ] {
            gauge(&mut enc, name, help, &[(vec![], v.load(Relaxed) as i64)])?;
        }
        for (name, help, v) in [
            (
                "actrix_signaling_connections",
                "WebSocket connections accepted",
                &s.connections_total,
            ),
            (
                "actrix_signaling_connections_rejected_rate",
                "Upgrades refused by the per-IP rate (429)",
                &s.connections_rejected_rate,
            ),
            (
                "actrix_signaling_connections_rejected_concurrency",
                "Upgrades refused by concurrency limits (429)",
                &s.connections_rejected_concurrency,
            ),
            (
                "actrix_signaling_connections_rejected_origin",
                "Upgrades refused for a browser origin that is not allowed (403)",
                &s.connections_rejected_origin,
            ),
            (
                "actrix_signaling_frames_in",
                "Binary frames received",
                &s.frames_in,
            ),
            (
                "actrix_signaling_envelopes_out",
                "Envelopes sent",
                &s.envelopes_out,
            ),
            (
                "actrix_signaling_envelopes_relayed",
                "Envelopes relayed between actors",
                &s.envelopes_relayed,
            ),
            (
                "actrix_signaling_relays_no_target",
                "Relays dropped: target not connected",
                &s.relays_no_target,
            ),
            (
                "actrix_signaling_decode_errors",
                "Undecodable frames",
                &s.decode_errors,
            ),
            (
                "actrix_signaling_oversize_closes",
                "Connections closed with 1009",
                &s.oversize_closes,
            ),
            (
                "actrix_signaling_protocol_closes",
                "Connections closed with 1002 or 1007 (WebSocket protocol violations)",
                &s.protocol_closes,
            ),
            (
                "actrix_signaling_slow_consumer_drops",
                "Connections dropped for not reading",
                &s.slow_consumer_drops,
            ),
            (
                "actrix_signaling_timeout_closes",
                "Connections closed by idle or auth timeouts",
                &s.timeout_closes,
            ),
            (
                "actrix_signaling_registrations",
                "Successful registrations",
                &s.registrations,
            ),
            (
                "actrix_signaling_url_identity_refused",
                "Reconnect identities refused",
                &s.url_identity_refused,
            ),
            (
                "actrix_signaling_wrong_protocol",
                "Envelopes refused: a credential of the other actr protocol than the connection's",
                &s.wrong_protocol,
            ),
            (
                "actrix_signaling_registry_evictions",
                "Registry entries evicted after the heartbeat timeout",
                &s.registry_evictions,
            ),
            (
                "actrix_signaling_registry_restores",
                "Registry entries restored from storage by a Ping",
                &s.registry_restores,
            ),
            (
                "actrix_signaling_persist_failures",
                "Registry writes that failed",
                &s.persist_failures,
            ),
            (
                "actrix_signaling_cluster_outages",
                "Times the cluster bus was lost (routing fell back to local-only)",
                &s.cluster_outages,
            ),
            (
                "actrix_signaling_cluster_relays_out",
                "Relays sent to another cluster node",
                &s.cluster_relays_out,
            ),
            (
                "actrix_signaling_cluster_relays_in",
                "Relays from another cluster node delivered here",
                &s.cluster_relays_in,
            ),
            (
                "actrix_signaling_cluster_relays_refused",
                "Relays from another cluster node refused by this node's checks",
                &s.cluster_relays_refused,
            ),
            (
                "actrix_signaling_cluster_dropped",
                "Cluster messages not published (bus down or queue full)",
                &s.cluster_dropped,
            ),
        ] {
            counter(&mut enc, name, help, &one(v))?;
        }
        let mut by_code: Vec<(Labels, u64)> = actrix_signaling::stats::ERROR_CODES
            .iter()
            .map(|c| (vec![("code", c.to_string())], s.errors(*c)))
            .collect();
        by_code.push((vec![("code", "other".into())], s.errors(0)));
        counter(
            &mut enc,
            "actrix_signaling_errors",
            "Error responses sent, by code",
            &by_code,
        )?;
        use prometheus_client::metrics::exemplar::Exemplar;
        use prometheus_client::metrics::MetricType;
        let (counts, sum) = s.forward_latency.snapshot();
        let bounds = actrix_signaling::stats::LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts).collect();
        let count = counts.iter().sum();
        let mut m = enc.encode_descriptor(
            "actrix_signaling_forward_latency_seconds",
            "From an envelope's arrival to the frames it caused (relay or answer) written to the target sockets",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<Labels>(
            sum,
            count,
            &buckets,
            None::<&std::collections::HashMap<usize, Exemplar<Labels, f64>>>,
        )
    }
}

/// Upstream Actrix's metric names for the figures both servers have, as aliases of ours, named
/// as an upstream node exports them (control/WIRE-0.4.md, "Metrics"): upstream declares most
/// metrics as `Opts::new("actrix_x", ..).namespace("actrix")`, which its `prometheus` crate
/// exports as `actrix_actrix_x`, so that is what dashboards built on upstream query.
/// `actrix_actrix_requests_total{service,method,path,status}` (= `actrix_http_requests_total`),
/// `actrix_actrix_turn_allocations_total{status}` (success = allocations created, failed =
/// refused), `actrix_actrix_auth_failures_total{service="turn",reason}` (= the sum of
/// `actrix_auth_failures_total` over shards), `actrix_actrix_actors_total` (=
/// `actrix_signaling_registry_entries`), and the two gauges upstream declares without a
/// namespace, `actrix_turn_active_sessions` (= the sum of `actrix_allocations_active`) and
/// `actrix_websocket_connections` (= `actrix_signaling_connections_open`).
#[derive(Debug)]
pub struct UpstreamAliases {
    pub shards: Vec<Arc<ShardStats>>,
    pub http: Arc<actrix_control::http_stats::HttpStats>,
    pub signaling: Option<Arc<actrix_signaling::SignalingStats>>,
}

impl Collector for UpstreamAliases {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series: Vec<(Labels, u64)> = self
            .http
            .snapshot()
            .iter()
            .map(|(k, v)| {
                (
                    vec![
                        ("service", k.0.to_string()),
                        ("method", k.1.clone()),
                        ("path", k.2.clone()),
                        ("status", k.3.to_string()),
                    ],
                    v.count,
                )
            })
            .collect();
        counter(
            &mut enc,
            "actrix_actrix_requests",
            "HTTP requests (upstream Actrix name of actrix_http_requests_total)",
            &series,
        )?;
        let sum = |f: &dyn Fn(&ShardStats) -> u64| self.shards.iter().map(|s| f(s)).sum::<u64>();
        counter(
            &mut enc,
            "actrix_actrix_turn_allocations",
            "TURN allocations by outcome (upstream Actrix name)",
            &[
                (
                    vec![("status", "success".into())],
                    sum(&|s| s.allocations_created.load(Relaxed)),
                ),
                (
                    vec![("status", "failed".into())],
                    sum(&|s| {
                        s.allocations_refused_quota.load(Relaxed)
                            + s.allocations_refused_capacity.load(Relaxed)
                            + s.allocations_refused_reservation.load(Relaxed)
                    }),
                ),
            ],
        )?;
        let by_reason: Vec<(Labels, u64)> = AUTH_FAILURE_REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    vec![("service", "turn".into()), ("reason", r.to_string())],
                    sum(&|s| s.auth_failures_by_reason[i].load(Relaxed)),
                )
            })
            .collect();
        counter(
            &mut enc,
            "actrix_actrix_auth_failures",
            "TURN authentication failures by reason (upstream Actrix name)",
            &by_reason,
        )?;
        gauge(
            &mut enc,
            "actrix_turn_active_sessions",
            "Active TURN allocations (upstream Actrix name)",
            &[(
                Labels::new(),
                sum(&|s| s.allocations_active.load(Relaxed)) as i64,
            )],
        )?;
        if let Some(st) = &self.signaling {
            gauge(
                &mut enc,
                "actrix_websocket_connections",
                "Open signaling WebSocket connections (upstream Actrix name)",
                &[(Labels::new(), st.connections_open.load(Relaxed) as i64)],
            )?;
            gauge(
                &mut enc,
                "actrix_actrix_actors_total",
                "Actors in the signaling registry (upstream Actrix name)",
                &[(Labels::new(), st.registry_entries.load(Relaxed) as i64)],
            )?;
        }
        Ok(())
    }
}

/// Build the registry for `/metrics`.
pub fn registry(
    shards: Vec<Arc<ShardStats>>,
    http: Arc<actrix_control::http_stats::HttpStats>,
    signaling: Option<Arc<actrix_signaling::SignalingStats>>,
    identity: Option<Arc<actrix_control::IdentityStats>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(UpstreamAliases {
        shards: shards.clone(),
        http: http.clone(),
        signaling: signaling.clone(),
    }));
    r.register_collector(Box::new(DataPlaneCollector { shards }));
    r.register_collector(Box::new(HttpCollector { stats: http }));
    if let Some(stats) = identity {
        r.register_collector(Box::new(IdentityCollector { stats }));
    }

    if let Some(stats) = signaling {
        r.register_collector(Box::new(SignalingCollector { stats }));
    }
    r
}

/// Text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// The `/metrics` route.
pub fn router(registry: Arc<Registry>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let r = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&r),
                )
            }
        }),
    )
}
