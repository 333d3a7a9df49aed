//! Appliance configuration: the TOML schema, the embedded default, and validation that lists
//! every problem at once.
//!
//! Addresses, ranges and sizes are kept as text in the raw schema and parsed by
//! [`Config::validate`], so one bad value does not hide the next: `actrix check` reports all of
//! them, each with the key that holds it.

use actrix_dataplane::streams::StreamSettings;
use actrix_dataplane::{Backend, IoConfig, IoSettings, Mode};
use actrix_proto::policy::IpRange;
use actrix_proto::turn::Transport;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    pub node: NodeConfig,
    pub log: LogConfig,
    pub cores: CoresConfig,
    pub stun: StunConfig,
    pub turn: TurnSection,
    pub io: IoConfig,
    pub http: actrix_control::HttpConfig,
    pub services: actrix_control::ServicesConfig,
    pub ks: actrix_control::KsConfig,
    pub ais: actrix_control::AisConfig,
    pub signaling: actrix_signaling::SignalingConfig,
    /// Cross-node signaling over NATS; absent: this node routes only its own actors.
    pub cluster: Option<actrix_signaling::ClusterConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Name of this node in logs and metrics.
    pub id: String,
    /// Where keys, databases and generated secrets live.
    pub data_dir: PathBuf,
    /// When started as root: the user (and group) to switch to once every socket is bound.
    /// Empty: keep running as the starting user.
    pub user: String,
    pub group: String,
    /// Write the process id here at start (removed at exit). Empty: no PID file.
    pub pid_file: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "actrix".into(),
            data_dir: "/var/lib/actrix".into(),
            user: String::new(),
            group: String::new(),
            pid_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// trace, debug, info, warn or error (or a tracing filter directive).
    pub level: String,
    /// text or json.
    pub format: Mode<LogFormat>,
    /// Repeated warnings allowed per shard per second before they are only counted.
    pub warn_per_sec: u32,
    /// Log to this file instead of stderr. Empty: stderr (journald under systemd).
    pub file: String,
    /// Rotation of `file`: daily, hourly or never.
    pub rotation: Mode<Rotation>,
    /// Rotated files kept.
    pub keep: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: Mode::Known(LogFormat::Text),
            warn_per_sec: 5,
            file: String::new(),
            rotation: Mode::Known(Rotation::Daily),
            keep: 7,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// When a log file is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    Daily,
    Hourly,
    Never,
}

/// Core pinning. `auto` means: all cores but one run shards, the remaining one runs the
/// control thread; on a 2-core machine that is one shard and the control thread.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CoresConfig {
    pub shards: CoreList,
    pub control: CoreChoice,
    /// Pin threads at all (turn off inside containers with a restricted cpuset).
    pub pin: bool,
}

impl Default for CoresConfig {
    fn default() -> Self {
        CoresConfig {
            shards: CoreList::Auto("auto".into()),
            control: CoreChoice::Auto("auto".into()),
            pin: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CoreList {
    List(Vec<usize>),
    Auto(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CoreChoice {
    Core(usize),
    Auto(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StunConfig {
    /// STUN/TURN UDP listeners; every shard opens each with SO_REUSEPORT.
    pub listen: Vec<String>,
    /// STUN/TURN over TCP (RFC 8656 §3.1): every shard listens on each with SO_REUSEPORT and
    /// serves the connections it accepts.
    pub listen_tcp: Vec<String>,
    /// STUN/TURN over TLS (RFC 7350; TLS 1.2 and 1.3, ALPN `stun.turn`/`stun.nat-discovery`).
    /// Needs `tls_cert` and `tls_key`.
    pub listen_tls: Vec<String>,
    /// STUN/TURN over DTLS (RFC 7350 §4; DTLS 1.2, ECDSA certificates). Needs `tls_cert`
    /// and `tls_key`: the same certificate as TLS.
    pub listen_dtls: Vec<String>,
    /// PEM certificate chain and private key for `listen_tls` and `listen_dtls` (re-read on
    /// SIGHUP).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Stream connections open at once, all transports and shards together.
    pub max_connections: usize,
    /// Stream connections open at once from one source address.
    pub max_connections_per_ip: usize,
    /// Seconds a TLS client has to finish its handshake.
    pub tls_handshake_timeout_secs: u32,
    /// Seconds a stream client has to make its allocation after connecting.
    pub first_request_timeout_secs: u32,
    /// Seconds a stream connection without an allocation may stay idle.
    pub idle_timeout_secs: u32,
    /// Bytes waiting to be written to one stream client, at most; relayed data beyond it is
    /// dropped and counted (a slow reader).
    pub stream_send_buffer: usize,
    /// Unauthenticated Binding requests answered per source IP per second (a Binding answer
    /// is larger than its request: without a budget the port reflects floods); more are
    /// dropped and counted (`actrix_drops_total{reason="binding_rate_limited"}`).
    pub bindings_per_source_per_sec: u32,
}

impl Default for StunConfig {
    fn default() -> Self {
        let s = actrix_dataplane::streams::StreamSettings::default();
        StunConfig {
            listen: vec!["127.0.0.1:3478".into()],
            listen_tcp: Vec::new(),
            listen_tls: Vec::new(),
            listen_dtls: Vec::new(),
            tls_cert: None,
            tls_key: None,
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            tls_handshake_timeout_secs: s.tls_handshake_timeout_secs,
            first_request_timeout_secs: s.first_request_timeout_secs,
            idle_timeout_secs: s.idle_timeout_secs,
            stream_send_buffer: s.send_buffer,
            bindings_per_source_per_sec: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StaticUser {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TurnSection {
    pub enabled: bool,
    pub realm: String,
    /// Local addresses relay sockets bind to. Several per family multiply the allocation
    /// capacity (one allocation per address and port).
    pub relay_addresses: Vec<String>,
    /// Addresses announced in XOR-RELAYED-ADDRESS when behind 1:1 NAT: one per relay address,
    /// paired in order within each family; empty means the relay addresses themselves.
    pub advertised_addresses: Vec<String>,
    /// Inclusive `MIN-MAX`.
    pub relay_port_range: String,
    pub default_lifetime: u32,
    pub max_lifetime: u32,
    pub permission_lifetime: u32,
    pub channel_lifetime: u32,
    pub nonce_lifetime: u32,
    pub max_allocations: usize,
    pub max_allocations_per_user: usize,
    pub max_permissions_per_allocation: usize,
    /// RFC 6062 TCP allocations (REQUESTED-TRANSPORT TCP over a TCP or TLS connection).
    pub tcp_relay: bool,
    /// Peer data connections one TCP allocation may have open at once.
    pub max_tcp_connections_per_allocation: usize,
    /// Peer ranges allowed in spite of the default deny list (`CIDR`, `ADDR` or `START-END`).
    pub allow_peers: Vec<String>,
    /// Peer ranges always denied.
    pub deny_peers: Vec<String>,
    pub users: Vec<StaticUser>,
    /// TURN REST shared secrets (the first is current; the others still accepted).
    pub rest_secrets: Vec<String>,
    /// Accept Actrix identity credentials (resolved by the control thread).
    pub identity_credentials: bool,
    /// Seconds to let allocations drain after SIGTERM before exiting.
    pub shutdown_grace_secs: u64,
    /// Accept channel numbers 0x5000-0x7FFF (the RFC 5766 range) from older clients. RFC 8656
    /// reserves them; off by default.
    pub rfc5766_channel_range: bool,
    /// Let `GET /diag/credential` mint short-lived TURN REST credentials (with the first
    /// `rest_secrets` entry) for the diagnostics page. Anyone who reaches the HTTP listener
    /// can then get one; off by default.
    pub diag_credentials: bool,
    /// Lifetime of those credentials, seconds.
    pub diag_credential_ttl_secs: u64,
    /// Per-allocation bandwidth cap in bytes per second, in each direction (payload bytes);
    /// excess datagrams are dropped and counted. 0: no cap.
    pub max_bytes_per_sec: u64,
    /// 401/438 challenges answered per source IP per second (reflection and brute-force
    /// damping); more are dropped and counted.
    pub challenges_per_source_per_sec: u32,
    /// Actrix identity resolutions (an ECIES decryption each, on the control thread) per
    /// source IP per second.
    pub identity_lookups_per_source_per_sec: u32,
    /// Load spreading (RFC 8656 §7.2): where new Allocates are sent (300 Try Alternate with
    /// ALTERNATE-SERVER) while this node drains or is over a load limit. `ADDR:PORT`, at most
    /// one per family; a client gets the one of its own family.
    pub alternate_servers: Vec<String>,
    /// The name the alternate's certificate is for, sent as ALTERNATE-DOMAIN to TLS and DTLS
    /// clients (empty: none).
    pub alternate_domain: String,
    /// At this many allocations on the node, new Allocates are redirected (0: no limit).
    pub redirect_above_allocations: usize,
    /// Above this many relayed bytes per second (both directions, all allocations), new
    /// Allocates are redirected (0: no limit).
    pub redirect_above_bytes_per_sec: u64,
}

impl Default for TurnSection {
    fn default() -> Self {
        TurnSection {
            enabled: true,
            realm: "actor-rtc.local".into(),
            relay_addresses: vec!["127.0.0.1".into()],
            advertised_addresses: vec![],
            relay_port_range: "49152-65535".into(),
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            nonce_lifetime: 600,
            max_allocations: 100_000,
            max_allocations_per_user: 1_000,
            max_permissions_per_allocation: 256,
            tcp_relay: true,
            max_tcp_connections_per_allocation: 32,
            allow_peers: vec![],
            deny_peers: vec![],
            users: vec![],
            rest_secrets: vec![],
            identity_credentials: true,
            shutdown_grace_secs: 30,
            rfc5766_channel_range: false,
            diag_credentials: false,
            diag_credential_ttl_secs: 300,
            max_bytes_per_sec: 0,
            challenges_per_source_per_sec: 50,
            identity_lookups_per_source_per_sec: 10,
            alternate_servers: vec![],
            alternate_domain: String::new(),
            redirect_above_allocations: 0,
            redirect_above_bytes_per_sec: 0,
        }
    }
}

impl TurnSection {
    /// `alternate_servers` and `alternate_domain` parsed; the problems, one per entry.
    pub fn alternates(&self) -> Result<actrix_proto::turn::Alternates, Vec<String>> {
        let mut alt = actrix_proto::turn::Alternates::default();
        let mut errors = Vec::new();
        for (i, a) in self.alternate_servers.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 || addr.ip().is_unspecified() => errors.push(format!(
                    "turn.alternate_servers[{i}]: '{a}' needs a real address and a port"
                )),
                Ok(addr) => {
                    let slot = if addr.is_ipv4() {
                        &mut alt.v4
                    } else {
                        &mut alt.v6
                    };
                    if slot.replace(addr).is_some() {
                        errors.push(format!(
                            "turn.alternate_servers[{i}]: a second {} alternate (one per family)",
                            if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                        ));
                    }
                }
                Err(_) => errors.push(format!(
                    "turn.alternate_servers[{i}]: '{a}' is not ADDR:PORT ([ADDR]:PORT for IPv6)"
                )),
            }
        }
        let d = &self.alternate_domain;
        if !d.is_empty() {
            // RFC 8489 §14.16: a DNS name (RFC 1123), under 256 bytes.
            let ok = d.len() < 256
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                errors.push(format!("turn.alternate_domain: '{d}' is not a DNS name"));
            }
            if self.alternate_servers.is_empty() {
                errors.push("turn.alternate_domain: needs turn.alternate_servers".into());
            }
            alt.domain = Some(d.as_str().into());
        }
        if (self.redirect_above_allocations > 0 || self.redirect_above_bytes_per_sec > 0)
            && self.alternate_servers.is_empty()
        {
            errors.push(
                "turn.redirect_above_allocations/redirect_above_bytes_per_sec: need \
                 turn.alternate_servers to redirect to"
                    .into(),
            );
        }
        if errors.is_empty() {
            Ok(alt)
        } else {
            Err(errors)
        }
    }
}

/// The configuration `actrix run` uses without `-c`: everything on loopback, a demo user
/// whose password is generated at start.
pub const EMBEDDED_DEFAULT: &str = r#"
[node]
id = "actrix-dev"
data_dir = "actrix-data"

[stun]
listen = ["127.0.0.1:3478"]
listen_tcp = ["127.0.0.1:3478"]

[turn]
realm = "actor-rtc.local"
relay_addresses = ["127.0.0.1"]
relay_port_range = "49152-65535"

[http]
listen = "127.0.0.1:8080"
"#;

/// A validated, parsed view of the parts the data plane needs.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub listen: Vec<SocketAddr>,
    /// Stream listeners and their transports, in TURN listener order after `listen`.
    pub listen_streams: Vec<(SocketAddr, Transport)>,
    /// DTLS listeners (UDP), in TURN listener order after the stream ones.
    pub listen_dtls: Vec<SocketAddr>,
    pub streams: StreamSettings,
    /// (bind, advertised) relay addresses of each family.
    pub relay_v4: Vec<(IpAddr, IpAddr)>,
    pub relay_v6: Vec<(IpAddr, IpAddr)>,
    pub port_min: u16,
    pub port_max: u16,
    pub allow: Vec<IpRange>,
    pub deny: Vec<IpRange>,
    pub shard_cores: Vec<usize>,
    pub control_core: Option<usize>,
    pub io: IoSettings,
}

/// Parse TOML text; unknown keys are collected (not fatal here, reported by validation).
pub fn parse(text: &str) -> Result<(Config, Vec<String>), Vec<String>> {
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let cfg: Config = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .map_err(|e| vec![format!("{}", e.to_string().trim_end())])?;
    Ok((cfg, unknown))
}

/// Load a file (or the embedded default) and validate it; every problem is returned at once.
pub fn load(path: Option<&std::path::Path>) -> Result<(Config, Resolved), Vec<String>> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| vec![format!("{}: {e}", p.display())])?,
        None => EMBEDDED_DEFAULT.to_string(),
    };
    let (cfg, unknown) = parse(&text)?;
    let mut errors: Vec<String> = unknown
        .into_iter()
        .map(|k| format!("{k}: unknown key"))
        .collect();
    let resolved = cfg.validate(&mut errors, available_cores());
    if errors.is_empty() {
        Ok((cfg, resolved.expect("no errors means resolved")))
    } else {
        Err(errors)
    }
}

pub fn available_cores() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1))
            .collect(),
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not MIN-MAX"))?;
    let a: u16 = a.trim().parse().map_err(|_| format!("bad port '{a}'"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("bad port '{b}'"))?;
    if a == 0 || a > b {
        return Err(format!("'{s}': need 1 <= MIN <= MAX"));
    }
    Ok((a, b))
}

impl Config {
    /// Check everything; push one message per problem to `errors`. Returns the parsed view
    /// when there were no errors.
    pub fn validate(&self, errors: &mut Vec<String>, cores: Vec<usize>) -> Option<Resolved> {
        let start = errors.len();
        self.log
            .rotation
            .check("log.rotation", "daily, hourly or never", errors);
        self.log.format.check("log.format", "text or json", errors);
        let io = self.io.validate(errors);
        let mut err = |m: String| errors.push(m);

        match self.log.level.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" => {}
            other
                if tracing_subscriber::EnvFilter::try_new(other).is_ok() && other.contains('=') => {
            }
            other => err(format!(
                "log.level: '{other}' is not trace, debug, info, warn or error"
            )),
        }
        if !self.log.file.is_empty() && std::path::Path::new(&self.log.file).file_name().is_none() {
            err(format!("log.file: '{}' names no file", self.log.file));
        }
        if !self.node.user.is_empty() && crate::privileges::lookup_user(&self.node.user).is_none() {
            err(format!("node.user: no user named '{}'", self.node.user));
        }
        if !self.node.group.is_empty()
            && crate::privileges::lookup_group(&self.node.group).is_none()
        {
            err(format!("node.group: no group named '{}'", self.node.group));
        }

        let mut listen = Vec::new();
        if self.stun.listen.is_empty() {
            err("stun.listen: at least one listener is needed".into());
        }
        for (i, l) in self.stun.listen.iter().enumerate() {
            match l.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => err(format!("stun.listen[{i}]: '{l}' needs a port")),
                Ok(a) => {
                    if listen.contains(&a) {
                        err(format!("stun.listen[{i}]: '{l}' is listed twice"));
                    }
                    listen.push(a)
                }
                Err(_) => err(format!("stun.listen[{i}]: '{l}' is not an IP:port address")),
            }
        }

        let mut listen_streams: Vec<(SocketAddr, Transport)> = Vec::new();
        for (key, list, transport) in [
            ("stun.listen_tcp", &self.stun.listen_tcp, Transport::Tcp),
            ("stun.listen_tls", &self.stun.listen_tls, Transport::Tls),
        ] {
            for (i, l) in list.iter().enumerate() {
                match l.parse::<SocketAddr>() {
                    Ok(a) if a.port() == 0 => err(format!("{key}[{i}]: '{l}' needs a port")),
                    Ok(a) => {
                        if listen_streams.iter().any(|(b, _)| *b == a) {
                            err(format!(
                                "{key}[{i}]: '{l}' is already a TCP or TLS listener"
                            ));
                        }
                        listen_streams.push((a, transport))
                    }
                    Err(_) => err(format!("{key}[{i}]: '{l}' is not an IP:port address")),
                }
            }
        }
        let mut listen_dtls: Vec<SocketAddr> = Vec::new();
        for (i, l) in self.stun.listen_dtls.iter().enumerate() {
            match l.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => err(format!("stun.listen_dtls[{i}]: '{l}' needs a port")),
                Ok(a) if listen.contains(&a) => err(format!(
                    "stun.listen_dtls[{i}]: '{l}' is already a UDP listener (stun.listen)"
                )),
                Ok(a) if listen_dtls.contains(&a) => {
                    err(format!("stun.listen_dtls[{i}]: '{l}' is listed twice"))
                }
                Ok(a) => listen_dtls.push(a),
                Err(_) => err(format!(
                    "stun.listen_dtls[{i}]: '{l}' is not an IP:port address"
                )),
            }
        }
        if listen.len() + listen_streams.len() + listen_dtls.len() > 255 {
            err("stun: more than 255 listeners in all".into());
        }
        if !self.stun.listen_dtls.is_empty()
            && (self.stun.tls_cert.is_none() || self.stun.tls_key.is_none())
        {
            err("stun.listen_dtls: needs stun.tls_cert and stun.tls_key, an ECDSA certificate (actrix cert --self-signed makes a pair for trying it)".into());
        }
        if let (Some(c), Some(k), false) = (
            &self.stun.tls_cert,
            &self.stun.tls_key,
            self.stun.listen_dtls.is_empty(),
        ) {
            if c.is_file() && k.is_file() {
                if let Err(e) = crate::tls::dtls_certificate(c, k) {
                    err(format!("stun.listen_dtls: {e}"));
                }
            }
        }
        if !self.stun.listen_tls.is_empty()
            && (self.stun.tls_cert.is_none() || self.stun.tls_key.is_none())
        {
            err("stun.listen_tls: needs stun.tls_cert and stun.tls_key (actrix cert --self-signed makes a pair for trying it)".into());
        }
        for (key, path) in [
            ("stun.tls_cert", &self.stun.tls_cert),
            ("stun.tls_key", &self.stun.tls_key),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    err(format!("{key}: {} is not a readable file", p.display()));
                }
            }
        }
        if !listen_streams.is_empty() && matches!(self.io.backend, Mode::Known(Backend::Glommio)) {
            err("stun.listen_tcp/listen_tls: stream transports are served by the mmsg and io_uring backends, not glommio".into());
        }
        let st = &self.stun;
        if st.max_connections == 0 || st.max_connections_per_ip == 0 {
            err("stun.max_connections and stun.max_connections_per_ip must be positive".into());
        }
        if st.tls_handshake_timeout_secs == 0
            || st.first_request_timeout_secs == 0
            || st.idle_timeout_secs == 0
        {
            err("stun.tls_handshake_timeout_secs, first_request_timeout_secs and idle_timeout_secs must be positive".into());
        }
        if !(4096..=16 << 20).contains(&st.stream_send_buffer) {
            err(format!(
                "stun.stream_send_buffer: {} is not between 4096 and 16777216",
                st.stream_send_buffer
            ));
        }
        let streams = StreamSettings {
            max_connections: st.max_connections,
            max_connections_per_ip: st.max_connections_per_ip,
            tls_handshake_timeout_secs: st.tls_handshake_timeout_secs,
            first_request_timeout_secs: st.first_request_timeout_secs,
            idle_timeout_secs: st.idle_timeout_secs,
            send_buffer: st.stream_send_buffer,
        };

        let t = &self.turn;
        if t.realm.is_empty() || t.realm.len() > 763 {
            err("turn.realm: must be 1 to 763 bytes".into());
        }
        let mut relay_v4: Vec<(IpAddr, IpAddr)> = Vec::new();
        let mut relay_v6: Vec<(IpAddr, IpAddr)> = Vec::new();
        let mut relay_ips = Vec::new();
        for (i, a) in t.relay_addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) => relay_ips.push(ip),
                Err(_) => err(format!(
                    "turn.relay_addresses[{i}]: '{a}' is not an IP address"
                )),
            }
        }
        let mut adv_ips = Vec::new();
        for (i, a) in t.advertised_addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => err(format!(
                    "turn.advertised_addresses[{i}]: '{a}' cannot be unspecified"
                )),
                Ok(ip) => adv_ips.push(ip),
                Err(_) => err(format!(
                    "turn.advertised_addresses[{i}]: '{a}' is not an IP address"
                )),
            }
        }
        // Addresses pair with advertised addresses of the same family, in order.
        for v6 in [false, true] {
            let fam = if v6 { "IPv6" } else { "IPv4" };
            let binds: Vec<IpAddr> = relay_ips
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == v6)
                .collect();
            let advs: Vec<IpAddr> = adv_ips
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == v6)
                .collect();
            if !advs.is_empty() && advs.len() != binds.len() {
                err(format!(
                    "turn.advertised_addresses: {} {fam} address(es) for {} {fam} relay address(es); give one per relay address, in the same order",
                    advs.len(),
                    binds.len()
                ));
            }
            if binds.len() > 64 {
                err(format!(
                    "turn.relay_addresses: more than 64 {fam} addresses"
                ));
            }
            let slot = if v6 { &mut relay_v6 } else { &mut relay_v4 };
            for (i, ip) in binds.iter().enumerate() {
                let adv = advs.get(i).copied();
                if ip.is_unspecified() && adv.is_none() {
                    err(format!("turn.relay_addresses: '{ip}' is unspecified; set turn.advertised_addresses for it"));
                }
                if slot.iter().any(|(b, _): &(IpAddr, IpAddr)| b == ip) {
                    err(format!("turn.relay_addresses: '{ip}' is listed twice"));
                }
                slot.push((*ip, adv.unwrap_or(*ip)));
            }
        }
        if t.enabled && relay_ips.is_empty() {
            err(
                "turn.relay_addresses: at least one relay address is needed when TURN is enabled"
                    .into(),
            );
        }
        let (mut port_min, mut port_max) = (0, 0);
        match parse_port_range(&t.relay_port_range) {
            Ok((a, b)) => {
                port_min = a;
                port_max = b;
                for l in listen
                    .iter()
                    .chain(listen_streams.iter().map(|(a, _)| a))
                    .chain(listen_dtls.iter())
                {
                    if (a..=b).contains(&l.port()) {
                        err(format!(
                            "turn.relay_port_range: {a}-{b} overlaps the listener port {}",
                            l.port()
                        ));
                    }
                }
                if let Ok(h) = self.http.listen.to_string().parse::<SocketAddr>() {
                    if (a..=b).contains(&h.port()) {
                        err(format!(
                            "turn.relay_port_range: {a}-{b} overlaps the HTTP port {}",
                            h.port()
                        ));
                    }
                }
            }
            Err(e) => err(format!("turn.relay_port_range: {e}")),
        }
        if t.default_lifetime == 0 || t.max_lifetime == 0 {
            err("turn.default_lifetime and turn.max_lifetime must be positive".into());
        }
        if t.default_lifetime > t.max_lifetime {
            err(format!(
                "turn.default_lifetime: {} exceeds turn.max_lifetime {}",
                t.default_lifetime, t.max_lifetime
            ));
        }
        if t.max_lifetime > 86_400 {
            err(format!(
                "turn.max_lifetime: {} exceeds one day",
                t.max_lifetime
            ));
        }
        if t.permission_lifetime == 0 || t.channel_lifetime == 0 || t.nonce_lifetime == 0 {
            err(
                "turn.permission_lifetime, channel_lifetime and nonce_lifetime must be positive"
                    .into(),
            );
        }
        if t.max_allocations == 0
            || t.max_allocations_per_user == 0
            || t.max_permissions_per_allocation == 0
            || t.max_tcp_connections_per_allocation == 0
        {
            err("turn.max_allocations, max_allocations_per_user, max_permissions_per_allocation and max_tcp_connections_per_allocation must be positive".into());
        }
        if t.challenges_per_source_per_sec == 0 || t.identity_lookups_per_source_per_sec == 0 {
            err("turn.challenges_per_source_per_sec and identity_lookups_per_source_per_sec must be positive".into());
        }
        if self.stun.bindings_per_source_per_sec == 0 {
            err("stun.bindings_per_source_per_sec: must be positive".into());
        }
        let mut names = BTreeSet::new();
        for (i, u) in t.users.iter().enumerate() {
            if u.name.is_empty() || u.name.len() > 513 {
                err(format!("turn.users[{i}].name: must be 1 to 513 bytes"));
            }
            if u.password.len() < 8 {
                err(format!(
                    "turn.users[{i}].password: shorter than 8 characters"
                ));
            }
            if !names.insert(&u.name) {
                err(format!(
                    "turn.users[{i}].name: '{}' is defined twice",
                    u.name
                ));
            }
            // Such a name would be answered at once when it is a static user and only after a
            // resolution otherwise: the timing would tell that the static user exists.
            if t.identity_credentials && actrix_proto::auth::could_be_identity(u.name.as_bytes()) {
                err(format!(
                    "turn.users[{i}].name: has the shape of an Actrix identity credential \
                     (base122 of {}+ bytes); choose another name",
                    actrix_proto::auth::IDENTITY_USERNAME_MIN_DECODED
                ));
            }
        }
        for (i, s) in t.rest_secrets.iter().enumerate() {
            if s.len() < 16 {
                err(format!(
                    "turn.rest_secrets[{i}]: shorter than 16 characters"
                ));
            }
        }
        if t.diag_credentials && t.rest_secrets.is_empty() {
            err("turn.diag_credentials: needs a turn.rest_secrets entry to mint with".into());
        }
        if !(1..=86_400).contains(&t.diag_credential_ttl_secs) {
            err(format!(
                "turn.diag_credential_ttl_secs: {} is not between 1 and 86400",
                t.diag_credential_ttl_secs
            ));
        }
        let parse_ranges = |key: &str, v: &[String], errs: &mut Vec<String>| -> Vec<IpRange> {
            let mut out = Vec::new();
            for (i, r) in v.iter().enumerate() {
                match r.parse::<IpRange>() {
                    Ok(x) => out.push(x),
                    Err(e) => errs.push(format!("turn.{key}[{i}]: {e}")),
                }
            }
            out
        };
        let allow = parse_ranges("allow_peers", &t.allow_peers, errors);
        let deny = parse_ranges("deny_peers", &t.deny_peers, errors);
        if let Err(e) = t.alternates() {
            errors.extend(e);
        }
        let mut err = |m: String| errors.push(m);

        // Cores.
        let auto = core_plan(&cores);
        let shard_cores = match &self.cores.shards {
            CoreList::List(v) => {
                if v.is_empty() {
                    err("cores.shards: empty list".into());
                }
                let mut seen = BTreeSet::new();
                for c in v {
                    if !cores.contains(c) {
                        err(format!(
                            "cores.shards: core {c} does not exist (available: {cores:?})"
                        ));
                    }
                    if !seen.insert(c) {
                        err(format!("cores.shards: core {c} listed twice"));
                    }
                }
                v.clone()
            }
            CoreList::Auto(s) if s == "auto" => auto.0.clone(),
            CoreList::Auto(s) => {
                err(format!(
                    "cores.shards: '{s}' is neither a list of cores nor \"auto\""
                ));
                vec![]
            }
        };
        let control_core = match &self.cores.control {
            CoreChoice::Core(c) => {
                if !cores.contains(c) {
                    err(format!(
                        "cores.control: core {c} does not exist (available: {cores:?})"
                    ));
                }
                if shard_cores.contains(c) && cores.len() > 1 {
                    err(format!("cores.control: core {c} also runs a shard"));
                }
                Some(*c)
            }
            CoreChoice::Auto(s) if s == "auto" => auto
                .1
                .filter(|c| !shard_cores.contains(c))
                .or_else(|| cores.iter().copied().find(|c| !shard_cores.contains(c))),
            CoreChoice::Auto(s) => {
                err(format!(
                    "cores.control: '{s}' is neither a core number nor \"auto\""
                ));
                None
            }
        };
        if shard_cores.len() > (port_max as usize).saturating_sub(port_min as usize) + 1 {
            err("turn.relay_port_range: fewer ports than shards".into());
        }

        // The control plane's own sections.
        for e in self.control_errors() {
            err(e);
        }

        if errors.len() > start {
            return None;
        }
        Some(Resolved {
            listen,
            listen_streams,
            listen_dtls,
            streams,
            relay_v4,
            relay_v6,
            port_min,
            port_max,
            allow,
            deny,
            shard_cores,
            control_core,
            io: io?,
        })
    }

    /// The control plane configuration derived from this file.
    pub fn control(&self) -> actrix_control::ControlConfig {
        actrix_control::ControlConfig {
            node_id: self.node.id.clone(),
            data_dir: self.node.data_dir.clone(),
            turn_realm: self.turn.realm.clone(),
            http: self.http.clone(),
            services: self.services.clone(),
            ks: self.ks.clone(),
            ais: self.ais.clone(),
            // actr 0.4 TURN credentials are minted with the secret TURN verifies first.
            turn_rest_secret: self
                .turn
                .rest_secrets
                .first()
                .map(actrix_control::SecretString::new),
        }
    }

    fn control_errors(&self) -> Vec<String> {
        let mut e = self.control().validate();
        e.extend(self.signaling.validate());
        if let Some(c) = &self.cluster {
            if !self.services.signaling_enabled() {
                e.push("cluster: needs the signaling service (services)".into());
            }
            let mut c = c.clone();
            if c.node_id.is_empty() {
                c.node_id = self.node.id.clone();
            }
            e.extend(c.validate());
        }
        e
    }
}

/// Automatic core plan: all cores but one for shards, the first core for the control thread;
/// a single-core machine shares it.
pub fn core_plan(cores: &[usize]) -> (Vec<usize>, Option<usize>) {
    match cores {
        [] => (vec![0], None),
        [only] => (vec![*only], Some(*only)),
        [first, rest @ ..] => (rest.to_vec(), Some(*first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let (cfg, unknown) = parse(EMBEDDED_DEFAULT).unwrap();
        assert!(unknown.is_empty());
        let mut errors = vec![];
        let r = cfg
            .validate(&mut errors, vec![0, 1])
            .unwrap_or_else(|| panic!("{errors:?}"));
        assert_eq!(r.listen, vec!["127.0.0.1:3478".parse().unwrap()]);
        assert_eq!(r.shard_cores, vec![1]);
        assert_eq!(r.control_core, Some(0));
    }

    #[test]
    fn alternate_servers_are_checked() {
        let errors_of = |turn: &str| {
            let text = EMBEDDED_DEFAULT.replace("[turn]\n", &format!("[turn]\n{turn}\n"));
            let (cfg, _) = parse(&text).unwrap();
            let mut errors = vec![];
            let r = cfg.validate(&mut errors, vec![0, 1]);
            (r.is_some(), errors.join("\n"))
        };
        let (ok, e) = errors_of(
            "alternate_servers = [\"192.0.2.7:3478\", \"[2001:db8::7]:3478\"]\nalternate_domain = \"turn2.example.com\"\nredirect_above_allocations = 10",
        );
        assert!(ok, "{e}");
        let (ok, e) = errors_of(
            "alternate_servers = [\"192.0.2.7\", \"192.0.2.8:1\", \"192.0.2.9:2\"]\nalternate_domain = \"bad name\"",
        );
        assert!(!ok);
        for want in [
            "turn.alternate_servers[0]: '192.0.2.7' is not ADDR:PORT",
            "turn.alternate_servers[2]: a second IPv4 alternate",
            "turn.alternate_domain: 'bad name' is not a DNS name",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let (ok, e) = errors_of("redirect_above_bytes_per_sec = 1000");
        assert!(!ok && e.contains("need turn.alternate_servers"), "{e}");
    }

    #[test]
    fn dtls_listeners_need_the_certificate_and_an_address_of_their_own() {
        let errors_of = |stun: &str| {
            let text = EMBEDDED_DEFAULT.replace("[stun]\n", &format!("[stun]\n{stun}\n"));
            let (cfg, _) = parse(&text).unwrap();
            let mut errors = vec![];
            let r = cfg.validate(&mut errors, vec![0, 1]);
            (r, errors.join("\n"))
        };
        let (r, e) = errors_of("listen_dtls = [\"127.0.0.1:5350\"]");
        assert!(
            r.is_none() && e.contains("stun.listen_dtls: needs stun.tls_cert"),
            "{e}"
        );
        let (_, e) = errors_of("listen_dtls = [\"127.0.0.1:3478\"]");
        assert!(e.contains("already a UDP listener"), "{e}");
        let (_, e) = errors_of("listen_dtls = [\"127.0.0.1:5350\", \"127.0.0.1:5350\"]");
        assert!(e.contains("listed twice"), "{e}");
        // An ECDSA pair serves DTLS; a key that is not one (DTLS has ECDSA only) is refused at
        // validation, naming the file.
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        crate::tls::write_self_signed(&["localhost".into()], &cert, &key).unwrap();
        let (r, e) = errors_of(&format!(
            "listen_dtls = [\"127.0.0.1:5350\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ));
        let r = r.unwrap_or_else(|| panic!("{e}"));
        assert_eq!(r.listen_dtls, vec!["127.0.0.1:5350".parse().unwrap()]);
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let (r, e) = errors_of(&format!(
            "listen_dtls = [\"127.0.0.1:5350\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ));
        assert!(
            r.is_none() && e.contains("stun.listen_dtls") && e.contains("k.pem"),
            "{e}"
        );
    }

    #[test]
    fn documented_example_parses_validates_and_has_no_unknown_keys() {
        let text = include_str!("../actrix.example.toml");
        let (cfg, unknown) = parse(text).unwrap();
        assert!(
            unknown.is_empty(),
            "unknown keys in the example: {unknown:?}"
        );
        let mut errors = vec![];
        cfg.validate(&mut errors, vec![0, 1])
            .unwrap_or_else(|| panic!("{errors:?}"));
        // The example states the defaults: spot-check that it agrees with the code.
        let d = Config::default();
        assert_eq!(cfg.turn.default_lifetime, d.turn.default_lifetime);
        assert_eq!(cfg.turn.max_lifetime, d.turn.max_lifetime);
        assert_eq!(cfg.turn.relay_port_range, d.turn.relay_port_range);
        assert_eq!(
            cfg.turn.max_allocations_per_user,
            d.turn.max_allocations_per_user
        );
        assert_eq!(cfg.io.batch, d.io.batch);
        assert_eq!(cfg.io.socket_buffer, d.io.socket_buffer);
        assert_eq!(cfg.stun.listen, d.stun.listen);
        assert_eq!(cfg.ks.key_ttl_seconds, d.ks.key_ttl_seconds);
        assert_eq!(cfg.ais.token_ttl_secs, d.ais.token_ttl_secs);
        assert_eq!(cfg.http.max_connections, d.http.max_connections);
        assert_eq!(
            cfg.http.max_connections_per_ip,
            d.http.max_connections_per_ip
        );
        assert_eq!(
            cfg.http.first_bytes_timeout_secs,
            d.http.first_bytes_timeout_secs
        );
        assert_eq!(
            cfg.http.header_read_timeout_secs,
            d.http.header_read_timeout_secs
        );
        assert_eq!(
            cfg.stun.bindings_per_source_per_sec,
            d.stun.bindings_per_source_per_sec
        );
        // Every top-level key of the example is a section of the schema and vice versa.
        let doc: toml::Table = text.parse().unwrap();
        let sections: Vec<&str> = doc.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            sections,
            [
                "ais",
                "cores",
                "http",
                "io",
                "ks",
                "log",
                "node",
                "services",
                "signaling",
                "stun",
                "turn"
            ]
        );
    }

    #[test]
    fn cluster_section_lists_every_problem() {
        let (cfg, _) = parse("").unwrap();
        assert!(cfg.cluster.is_none(), "no [cluster] by default");
        let (cfg, _) = parse(
            "[cluster]\nnode_id = \"a b\"\nurls = [\"nats://127.0.0.1:4222\", \"::bad\"]\nuser = \"u\"\ntoken = \"t\"\nheartbeat_interval_ms = 1000\nnode_timeout_ms = 1500\n",
        )
        .unwrap();
        let mut errors = vec![];
        assert!(cfg.validate(&mut errors, vec![0, 1]).is_none());
        assert_eq!(
            errors,
            [
                "cluster.node_id: \"a b\" must be letters, digits, '-' or '_'",
                "cluster.urls: \"::bad\" is not a NATS server address",
                "cluster.user and cluster.password: set both or neither",
                "cluster: choose one of credentials_file, user/password and token",
                "cluster.node_timeout_ms: must be at least twice heartbeat_interval_ms",
            ]
        );
        // The node id defaults to [node] id.
        let (cfg, _) =
            parse("[node]\nid = \"edge-1\"\n[cluster]\nurls = [\"nats://10.0.0.5:4222\"]\n")
                .unwrap();
        let mut errors = vec![];
        cfg.validate(&mut errors, vec![0, 1]);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn shared_relay_sockets_need_a_recvmmsg_backend() {
        let (cfg, _) = parse("[io]\nrelay_sockets = \"shared\"\nbackend = \"io_uring\"\n").unwrap();
        let mut errors = vec![];
        assert!(cfg.validate(&mut errors, vec![0, 1]).is_none());
        assert_eq!(
            errors,
            ["io.relay_sockets: 'shared' works with io.backend = 'mmsg' or 'glommio', not 'io_uring'"]
        );
        let (cfg, _) = parse("[io]\nrelay_sockets = \"shared\"\n").unwrap();
        let mut errors = vec![];
        assert!(
            cfg.validate(&mut errors, vec![0, 1]).is_some(),
            "{errors:?}"
        );
    }

    #[test]
    fn every_error_is_listed_at_once() {
        let text = r#"
            bogus_top = 1
            [stun]
            listen = ["127.0.0.1:3478", "not-an-address", "127.0.0.1:0"]
            whatever = true
            [turn]
            relay_addresses = ["10.0.0.300"]
            relay_port_range = "3000-4000"
            default_lifetime = 7200
            allow_peers = ["10.0.0.0/99"]
            rest_secrets = ["short"]
            users = [{ name = "a", password = "x" }]
            [cores]
            shards = [0, 7]
            control = 0
            [io]
            coalesce_us = 50000
            relay_sockets = "bogus"
            backend = "epoll"
            [log]
            format = "xml"
            [stun.extra]
        "#;
        let (cfg, unknown) = parse(text).unwrap();
        let mut errors: Vec<String> = unknown
            .into_iter()
            .map(|k| format!("{k}: unknown key"))
            .collect();
        assert!(cfg.validate(&mut errors, vec![0, 1]).is_none());
        let all = errors.join("\n");
        for needle in [
            "bogus_top: unknown key",
            "stun.whatever: unknown key",
            "stun.extra: unknown key",
            "stun.listen[1]",
            "stun.listen[2]",
            "turn.relay_addresses[0]",
            "overlaps the listener port 3478",
            "turn.default_lifetime",
            "turn.allow_peers[0]",
            "turn.rest_secrets[0]",
            "turn.users[0].password",
            "core 7 does not exist",
            "cores.control: core 0 also runs a shard",
            "io.coalesce_us: 50000 is above 10000",
            "io.relay_sockets: 'bogus' is not per_allocation or shared",
            "io.backend: 'epoll' is not mmsg, io_uring or glommio",
            "log.format: 'xml' is not text or json",
        ] {
            assert!(all.contains(needle), "missing '{needle}' in:\n{all}");
        }
    }

    #[test]
    fn several_relay_addresses_pair_with_advertised_ones() {
        let ok = r#"
            [turn]
            relay_addresses = ["10.0.0.1", "10.0.0.2", "fd00::1"]
            advertised_addresses = ["203.0.113.1", "203.0.113.2", "2001:db8::1"]
        "#;
        let (cfg, _) = parse(ok).unwrap();
        let mut errors = vec![];
        let r = cfg
            .validate(&mut errors, vec![0, 1])
            .unwrap_or_else(|| panic!("{errors:?}"));
        assert_eq!(r.relay_v4.len(), 2);
        assert_eq!(
            r.relay_v4[1],
            ("10.0.0.2".parse().unwrap(), "203.0.113.2".parse().unwrap())
        );
        assert_eq!(r.relay_v6.len(), 1);
        let bad = r#"
            [turn]
            relay_addresses = ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
            advertised_addresses = ["203.0.113.1"]
        "#;
        let (cfg, _) = parse(bad).unwrap();
        let mut errors = vec![];
        assert!(cfg.validate(&mut errors, vec![0, 1]).is_none());
        let all = errors.join("\n");
        assert!(all.contains("listed twice"), "{all}");
        assert!(
            all.contains("1 IPv4 address(es) for 3 IPv4 relay address(es)"),
            "{all}"
        );
    }

    #[test]
    fn auto_core_plan() {
        assert_eq!(core_plan(&[0, 1]), (vec![1], Some(0)));
        assert_eq!(core_plan(&[0, 1, 2, 3]), (vec![1, 2, 3], Some(0)));
        assert_eq!(core_plan(&[0]), (vec![0], Some(0)));
    }
}
