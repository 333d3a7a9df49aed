//! The data plane as the configuration file describes it: the shards' TURN configurations
//! built from `[turn]`, `[stun]` and `[io]`, the start, and live reloads.

use crate::config::{Config, Resolved};
use actrix_dataplane::stats::ShardStats;
use actrix_dataplane::{DataPlane, DataPlaneSpec, IdentityLinks, RelaySocketMode, ShardSpec};
use actrix_proto::auth::AuthConfig;
use actrix_proto::plan::port_slices;
use actrix_proto::policy::PeerPolicy;
use actrix_proto::stun::channel;
use actrix_proto::turn::{CrossShard, Transport, TurnConfig};
use std::net::IpAddr;
use std::sync::Arc;

/// Authentication settings for every shard. The nonce key is kept across reloads so that
/// outstanding nonces stay valid.
pub fn build_auth(cfg: &Config, nonce_key: [u8; 32], identities: bool) -> Arc<AuthConfig> {
    let mut auth = AuthConfig::new(&cfg.turn.realm, nonce_key);
    for u in &cfg.turn.users {
        auth.add_user(&u.name, &u.password);
    }
    auth.rest_secrets = cfg
        .turn
        .rest_secrets
        .iter()
        .map(|s| s.as_bytes().into())
        .collect();
    auth.identities = identities && cfg.turn.identity_credentials;
    auth.nonce_lifetime = cfg.turn.nonce_lifetime as u64;
    Arc::new(auth)
}

/// The peer policy: configured ranges, and this host's own addresses and service ports.
pub fn build_policy(cfg: &Config, r: &Resolved) -> Arc<PeerPolicy> {
    let mut policy = PeerPolicy::new(r.allow.clone(), r.deny.clone());
    let mut own: Vec<IpAddr> = actrix_udp::interface_addresses();
    own.extend(r.listen.iter().map(|a| a.ip()));
    own.extend(r.listen_streams.iter().map(|(a, _)| a.ip()));
    own.extend(r.listen_dtls.iter().map(|a| a.ip()));
    for list in [&r.relay_v4, &r.relay_v6] {
        for (i, (bind, adv)) in list.iter().enumerate() {
            own.push(*bind);
            own.push(*adv);
            policy.relay_ips.push((*adv, i as u8));
            if bind != adv {
                policy.relay_ips.push((*bind, i as u8));
            }
        }
    }
    own.sort();
    own.dedup();
    policy.own_ips = own;
    let mut ports: Vec<u16> = r
        .listen
        .iter()
        .chain(r.listen_streams.iter().map(|(a, _)| a))
        .chain(r.listen_dtls.iter())
        .map(|a| a.port())
        .collect();
    ports.push(cfg.http.listen.port());
    ports.sort();
    ports.dedup();
    policy.service_ports = ports;
    Arc::new(policy)
}

/// The running data plane with what survives a live reload.
pub struct Plane {
    pub dp: DataPlane,
    /// Drain and load flags the shards read per Allocate.
    pub shared: Arc<CrossShard>,
    nonce_key: [u8; 32],
    identities: bool,
    slices: Vec<(u16, u16)>,
}

fn turn_config(
    cfg: &Config,
    r: &Resolved,
    slice: (u16, u16),
    auth: &Arc<AuthConfig>,
    policy: &Arc<PeerPolicy>,
) -> TurnConfig {
    let mut turn = TurnConfig::new(auth.clone(), policy.clone());
    turn.relay_v4 = r.relay_v4.iter().map(|(_, adv)| *adv).collect();
    turn.relay_v6 = r.relay_v6.iter().map(|(_, adv)| *adv).collect();
    turn.port_min = slice.0;
    turn.port_max = slice.1;
    // Listener indices: the UDP listeners, then the stream listeners, then the DTLS ones.
    turn.listener_transports = r
        .listen
        .iter()
        .map(|_| Transport::Udp)
        .chain(r.listen_streams.iter().map(|(_, t)| *t))
        .chain(r.listen_dtls.iter().map(|_| Transport::Dtls))
        .collect();
    turn.default_lifetime = cfg.turn.default_lifetime;
    turn.max_lifetime = cfg.turn.max_lifetime;
    turn.permission_lifetime = cfg.turn.permission_lifetime;
    turn.channel_lifetime = cfg.turn.channel_lifetime;
    turn.max_permissions = cfg.turn.max_permissions_per_allocation;
    turn.tcp_relay = cfg.turn.tcp_relay;
    turn.max_tcp_connections = cfg.turn.max_tcp_connections_per_allocation;
    turn.max_bytes_per_sec = cfg.turn.max_bytes_per_sec;
    turn.challenges_per_source = cfg.turn.challenges_per_source_per_sec;
    turn.bindings_per_source = cfg.stun.bindings_per_source_per_sec;
    turn.identity_lookups_per_source = cfg.turn.identity_lookups_per_source_per_sec;
    // Validated by `Config::validate`.
    turn.alternates = cfg.turn.alternates().unwrap_or_default();
    turn.redirect_above_allocations = cfg.turn.redirect_above_allocations;
    turn.channel_max = if cfg.turn.rfc5766_channel_range {
        0x7FFF
    } else {
        channel::MAX
    };
    // Shared relay sockets have no socket per allocation to keep open.
    turn.relay_socket_pool = match r.io.relay_sockets {
        RelaySocketMode::PerAllocation => cfg.io.relay_socket_pool,
        RelaySocketMode::Shared => 0,
    };
    turn
}

impl Plane {
    /// The state the shards share (allocation quotas, relay port bitmap).
    pub fn shared(&self) -> &Arc<CrossShard> {
        &self.shared
    }

    /// Open every socket and start the shards (see [`DataPlane::start`]). `stats` holds one
    /// entry per shard.
    pub fn start(
        cfg: &Config,
        r: &Resolved,
        identity: Option<IdentityLinks>,
        stats: Vec<Arc<ShardStats>>,
    ) -> anyhow::Result<Plane> {
        let n = r.shard_cores.len().max(1);
        let nonce_key: [u8; 32] = rand::random();
        let identities = identity.is_some();
        let shared = Arc::new(CrossShard::new(
            cfg.turn.max_allocations,
            cfg.turn.max_allocations_per_user,
            r.relay_v4.len().max(r.relay_v6.len()),
            rand::random(),
        ));
        let slices = port_slices(r.port_min, r.port_max, n);
        let auth = build_auth(cfg, nonce_key, identities);
        let policy = build_policy(cfg, r);
        let shards = slices
            .iter()
            .enumerate()
            .map(|(i, slice)| ShardSpec {
                core: if cfg.cores.pin {
                    r.shard_cores.get(i).copied()
                } else {
                    None
                },
                turn: turn_config(cfg, r, *slice, &auth, &policy),
            })
            .collect();
        let dp = DataPlane::start(DataPlaneSpec {
            io: r.io.clone(),
            listen: r.listen.clone(),
            listen_streams: r.listen_streams.clone(),
            streams: r.streams.clone(),
            tls: match (&cfg.stun.tls_cert, &cfg.stun.tls_key) {
                (Some(c), Some(k)) if !cfg.stun.listen_tls.is_empty() => Some(
                    crate::tls::server_config(c, k)
                        .map_err(|e| anyhow::anyhow!("stun.tls: {e}"))?,
                ),
                _ => None,
            },
            listen_dtls: r.listen_dtls.clone(),
            dtls: match (&cfg.stun.tls_cert, &cfg.stun.tls_key) {
                (Some(c), Some(k)) if !r.listen_dtls.is_empty() => Some(
                    crate::tls::dtls_certificate(c, k)
                        .map_err(|e| anyhow::anyhow!("stun.listen_dtls: {e}"))?,
                ),
                _ => None,
            },
            bind_v4: r.relay_v4.iter().map(|(b, _)| *b).collect(),
            bind_v6: r.relay_v6.iter().map(|(b, _)| *b).collect(),
            shards,
            shared: shared.clone(),
            stats,
            warn_per_sec: cfg.log.warn_per_sec,
            identity,
        })?;
        Ok(Plane {
            dp,
            nonce_key,
            identities,
            shared,
            slices,
        })
    }

    /// Apply a new, validated configuration to every shard without dropping allocations:
    /// users, REST secrets, quotas, peer ranges, lifetimes. Settings that need new sockets or
    /// threads (listeners, relay addresses, port range, cores, I/O) are returned as notes and
    /// keep their old values.
    /// `tls`: the TLS configuration already built from the new file's certificate (a renewal),
    /// for connections accepted from now on.
    pub fn reload(
        &self,
        old: (&Config, &Resolved),
        cfg: &Config,
        r: &Resolved,
        tls: Option<Arc<rustls::ServerConfig>>,
        dtls: Option<actrix_dataplane::dtls::DtlsCertificate>,
    ) -> Vec<String> {
        let mut needs_restart = Vec::new();
        if old.1.listen != r.listen
            || old.1.listen_streams != r.listen_streams
            || old.1.listen_dtls != r.listen_dtls
        {
            needs_restart.push("stun.listen/listen_tcp/listen_tls/listen_dtls");
        }
        if old.1.streams != r.streams {
            needs_restart.push("stun (stream limits)");
        }
        if old.1.relay_v4 != r.relay_v4 || old.1.relay_v6 != r.relay_v6 {
            needs_restart.push("turn.relay_addresses/advertised_addresses");
        }
        if (old.1.port_min, old.1.port_max) != (r.port_min, r.port_max) {
            needs_restart.push("turn.relay_port_range");
        }
        if old.1.shard_cores != r.shard_cores || old.1.control_core != r.control_core {
            needs_restart.push("cores");
        }
        if old.0.http.listen != cfg.http.listen {
            needs_restart.push("http.listen");
        }
        if old.0.turn.realm != cfg.turn.realm {
            needs_restart.push("turn.realm");
        }
        let mut io_new = r.io.clone();
        io_new.relay_socket_pool = old.1.io.relay_socket_pool;
        if io_new != old.1.io {
            needs_restart.push("io (other than relay_socket_pool)");
        }
        // Values that need new sockets keep the running ones.
        let effective = Resolved {
            listen: old.1.listen.clone(),
            listen_streams: old.1.listen_streams.clone(),
            listen_dtls: old.1.listen_dtls.clone(),
            streams: old.1.streams.clone(),
            relay_v4: old.1.relay_v4.clone(),
            relay_v6: old.1.relay_v6.clone(),
            port_min: old.1.port_min,
            port_max: old.1.port_max,
            shard_cores: old.1.shard_cores.clone(),
            control_core: old.1.control_core,
            allow: r.allow.clone(),
            deny: r.deny.clone(),
            io: old.1.io.clone(),
        };
        let mut notes = Vec::new();
        if let Some(tls) = tls {
            if old
                .1
                .listen_streams
                .iter()
                .any(|(_, t)| *t == Transport::Tls)
            {
                self.dp.set_tls(tls);
                notes.push("stun.tls: certificate reloaded for new connections".to_string());
            }
        }
        if let Some(cert) = dtls {
            if !old.1.listen_dtls.is_empty() {
                self.dp.set_dtls(cert);
                notes.push("stun.dtls: certificate reloaded for new associations".to_string());
            }
        }
        let mut cfg = cfg.clone();
        cfg.turn.realm = old.0.turn.realm.clone();
        cfg.http.listen = old.0.http.listen;
        self.shared
            .quotas
            .set_limits(cfg.turn.max_allocations, cfg.turn.max_allocations_per_user);
        let auth = build_auth(&cfg, self.nonce_key, self.identities);
        let policy = build_policy(&cfg, &effective);
        self.dp.reconfigure(
            self.slices
                .iter()
                .map(|s| turn_config(&cfg, &effective, *s, &auth, &policy))
                .collect(),
        );
        notes.extend(
            needs_restart
                .into_iter()
                .map(|k| format!("{k}: changed, takes effect after a restart")),
        );
        notes
    }
}
