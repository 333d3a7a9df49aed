//! `[signaling]` configuration. Defaults follow wire reference section 8.7 where it gives one.

use serde::Deserialize;

/// Limits and timers of the signaling hub. Mounted by the appliance as TOML section
/// `[signaling]`; every key is optional.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SignalingConfig {
    /// New WebSocket connections per peer IP: sustained rate per second. Default 1 (Actrix's
    /// "5/min" rounds up to 1/s, wire section 8.7).
    pub conn_rate_per_sec: u32,
    /// New WebSocket connections per peer IP: burst. Default 10.
    pub conn_burst: u32,
    /// Concurrent WebSocket connections per peer IP. Default 100.
    pub max_conns_per_ip: u32,
    /// Concurrent WebSocket connections in total. Default 20 000.
    pub max_conns: u32,
    /// Binary frames per connection: sustained rate per second. Default 10.
    pub msg_rate_per_sec: u32,
    /// Binary frames per connection: burst. Default 50.
    pub msg_burst: u32,
    /// Largest accepted message (after reassembly of fragments), bytes. Larger: close 1009.
    /// Default 256 KiB.
    pub max_message_bytes: usize,
    /// Largest accepted single frame payload, bytes. Default 256 KiB.
    pub max_frame_bytes: usize,
    /// Envelopes queued for one connection before it is treated as a slow consumer and
    /// disconnected. Default 256.
    pub send_queue_len: usize,
    /// Server WebSocket Ping interval, seconds. Default 20.
    pub ping_interval_secs: u64,
    /// Close a connection from which nothing arrived for this long, seconds. Default 60.
    pub idle_timeout_secs: u64,
    /// Close a connection that has no identity (no register, no URL identity) after this long,
    /// seconds. Default 30.
    pub auth_timeout_secs: u64,
    /// Evict a registry entry from memory after this long without Ping, seconds. Default 300.
    pub heartbeat_timeout_secs: u64,
    /// Eviction sweep period, seconds. Default 30.
    pub sweep_interval_secs: u64,
    /// TTL of persisted registry rows (refreshed by Ping), seconds. Default 43 200 (12 h).
    pub persist_ttl_secs: u64,
    /// TTL of persisted service specs used for compatibility analysis, seconds. Default 7 days.
    pub spec_ttl_secs: u64,
    /// `Pong.suggest_interval_secs`. Default 30.
    pub suggest_ping_interval_secs: u32,
    /// How long a realm validity answer is cached, milliseconds. Default 1000.
    pub realm_cache_ms: u64,
    /// Most ActrUp subscriptions one actor may hold. Default 256.
    pub max_subscriptions_per_actor: usize,
    /// Most validated credentials remembered per connection (bytes compared, so no decrypt on
    /// every request). Default 4.
    pub credential_cache_per_conn: usize,
    /// Browser origins (`scheme://host[:port]`) allowed to open the WebSocket besides the
    /// node's own (an `Origin` equal to the request's `Host`). Requests without `Origin`
    /// (native clients) are not affected; `"*"` allows any origin. Default: none.
    pub allowed_origins: Vec<String>,
}

impl Default for SignalingConfig {
    fn default() -> Self {
        SignalingConfig {
            conn_rate_per_sec: 1,
            conn_burst: 10,
            max_conns_per_ip: 100,
            max_conns: 20_000,
            msg_rate_per_sec: 10,
            msg_burst: 50,
            max_message_bytes: 256 * 1024,
            max_frame_bytes: 256 * 1024,
            send_queue_len: 256,
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
            auth_timeout_secs: 30,
            heartbeat_timeout_secs: 300,
            sweep_interval_secs: 30,
            persist_ttl_secs: 12 * 3600,
            spec_ttl_secs: 7 * 24 * 3600,
            suggest_ping_interval_secs: 30,
            realm_cache_ms: 1000,
            max_subscriptions_per_actor: 256,
            credential_cache_per_conn: 4,
            allowed_origins: Vec::new(),
        }
    }
}

impl SignalingConfig {
    /// Problems with this configuration, one line each, prefixed with `signaling.`; empty when
    /// it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut nonzero = |name: &str, v: u64| {
            if v == 0 {
                p.push(format!("signaling.{name}: must be greater than 0"));
            }
        };
        nonzero("conn_rate_per_sec", self.conn_rate_per_sec.into());
        nonzero("conn_burst", self.conn_burst.into());
        nonzero("max_conns_per_ip", self.max_conns_per_ip.into());
        nonzero("max_conns", self.max_conns.into());
        nonzero("msg_rate_per_sec", self.msg_rate_per_sec.into());
        nonzero("msg_burst", self.msg_burst.into());
        nonzero("max_message_bytes", self.max_message_bytes as u64);
        nonzero("max_frame_bytes", self.max_frame_bytes as u64);
        nonzero("send_queue_len", self.send_queue_len as u64);
        nonzero("ping_interval_secs", self.ping_interval_secs);
        nonzero("idle_timeout_secs", self.idle_timeout_secs);
        nonzero("auth_timeout_secs", self.auth_timeout_secs);
        nonzero("heartbeat_timeout_secs", self.heartbeat_timeout_secs);
        nonzero("sweep_interval_secs", self.sweep_interval_secs);
        nonzero("persist_ttl_secs", self.persist_ttl_secs);
        nonzero("spec_ttl_secs", self.spec_ttl_secs);
        nonzero(
            "credential_cache_per_conn",
            self.credential_cache_per_conn as u64,
        );
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                p.push(format!(
                    "signaling.allowed_origins[{i}]: '{o}' is not \"*\" or an http(s):// origin"
                ));
            }
        }
        if self.max_frame_bytes > self.max_message_bytes {
            p.push("signaling.max_frame_bytes: must not exceed max_message_bytes".into());
        }
        if self.max_message_bytes > 64 << 20 {
            p.push("signaling.max_message_bytes: at most 64 MiB".into());
        }
        if self.idle_timeout_secs <= self.ping_interval_secs {
            p.push(
                "signaling.idle_timeout_secs: must be longer than ping_interval_secs".to_owned(),
            );
        }
        if self.persist_ttl_secs < self.heartbeat_timeout_secs {
            p.push(
                "signaling.persist_ttl_secs: must be at least heartbeat_timeout_secs".to_owned(),
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_toml_partial_works() {
        assert!(SignalingConfig::default().validate().is_empty());
        let c: SignalingConfig = toml::from_str("max_conns_per_ip = 7\n").unwrap();
        assert_eq!(c.max_conns_per_ip, 7);
        assert_eq!(c.msg_burst, 50);
        let bad = SignalingConfig {
            send_queue_len: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().len(), 1);
    }
}
