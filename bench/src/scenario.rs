//! Scenario files (TOML): what load to offer, for how long, and what counts as a failure.
//!
//! ```toml
//! name = "relay-channel"
//! kind = "relay"            # binding | churn | relay | idle | handshake | ks | ais | signaling
//! description = "..."
//! [relay]
//! clients = 4
//! ```
//!
//! Each kind has its own section, with defaults for every field. Unknown keys are errors, so
//! a typo never silently measures something else.
//!
//! Extension point: signaling, KS and AIS rates become new [`Kind`] variants with their own
//! section struct here and a module next to `binding.rs`; `main.rs` dispatches on the kind.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// STUN Binding request rate.
    Binding,
    /// TURN allocation churn: allocate, permission, channel bind, refresh 0.
    Churn,
    /// ChannelData or Send/Data relay, N clients times M peers.
    Relay,
    /// Many idle allocations held open: server memory per allocation.
    Idle,
    /// Stream connections per second (TLS handshakes): connect, handshake, one request, close.
    Handshake,
    /// Key Server request rate (signed HTTP): secret-key fetches or key generation.
    Ks,
    /// AIS registrations (protobuf over HTTP) per second.
    Ais,
    /// Signaling: concurrent WebSocket actors, relayed envelopes/s, routing latency.
    Signaling,
    /// Spoofed-source Allocate flood through a raw socket while legitimate clients allocate:
    /// server memory and their success (reliability checklist A4).
    Flood,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Binding => "binding",
            Kind::Churn => "churn",
            Kind::Relay => "relay",
            Kind::Idle => "idle",
            Kind::Handshake => "handshake",
            Kind::Ks => "ks",
            Kind::Ais => "ais",
            Kind::Signaling => "signaling",
            Kind::Flood => "flood",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub description: String,
    pub binding: Option<BindingSpec>,
    pub churn: Option<ChurnSpec>,
    pub relay: Option<RelaySpec>,
    pub idle: Option<IdleSpec>,
    pub handshake: Option<HandshakeSpec>,
    pub ks: Option<KsSpec>,
    pub ais: Option<AisSpec>,
    pub signaling: Option<SignalingSpec>,
    pub flood: Option<FloodSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FloodSpec {
    /// Spoofed Allocates per second.
    pub pps: u64,
    pub duration_secs: f64,
    /// Where the spoofed sources are drawn from (IPv4 CIDR). The default is loopback, so the
    /// server's answers go to no one.
    pub source_cidr: String,
    /// Legitimate clients allocating (and releasing) during the flood, each every
    /// `legit_interval_ms`, with the target's credentials.
    pub legit_clients: usize,
    pub legit_interval_ms: u64,
    pub legit_rto_ms: u64,
    pub legit_attempts: u32,
    /// Fail when the server's RSS grows more than this under the flood.
    pub max_rss_growth_mb: f64,
    /// Fail when fewer legitimate Allocates than this fraction succeed.
    pub min_legit_success: f64,
}

impl Default for FloodSpec {
    fn default() -> Self {
        FloodSpec {
            pps: 100_000,
            duration_secs: 10.0,
            source_cidr: "127.64.0.0/10".into(),
            legit_clients: 4,
            legit_interval_ms: 100,
            legit_rto_ms: 500,
            legit_attempts: 4,
            max_rss_growth_mb: 16.0,
            min_legit_success: 0.95,
        }
    }
}

/// How the clients reach the server (RFC 8656 §3.1). Relaying to peers is UDP whatever the
/// client side uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One UDP socket per client 5-tuple.
    #[default]
    Udp,
    /// A TCP connection per client, STUN and ChannelData framed on the stream.
    Tcp,
    /// The same inside TLS (RFC 7350; rustls, ALPN "stun.turn").
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// TCP or TLS: a connection per client, its allocation ending with it.
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// The TLS version the generator's clients offer (only that one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.3")]
    Tls13,
    #[serde(rename = "1.2")]
    Tls12,
}

/// How a churn cycle ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChurnEnd {
    /// Refresh with LIFETIME 0 (then, over a stream, close the connection).
    #[default]
    Refresh,
    /// Close the connection without a Refresh: the allocation ends with it (streams only).
    Close,
}

/// What a handshake cycle asks once the connection is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HandshakeRequest {
    /// A STUN Binding request (no credentials).
    #[default]
    Binding,
    /// An authenticated Allocate (the 401 challenge first).
    Allocate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KsOperation {
    /// `GET /ks/secret/{key_id}` of one key generated before the run.
    Secret,
    /// `POST /ks/generate`.
    Generate,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KsSpec {
    pub operation: KsOperation,
    /// Concurrent keep-alive connections, one closed-loop worker each.
    pub connections: usize,
    pub duration_secs: f64,
    /// Fail when more than this fraction of requests fails.
    pub max_errors: f64,
    /// Fail when fewer requests/s than this complete (0: no floor).
    pub min_rate: f64,
}

impl Default for KsSpec {
    fn default() -> Self {
        KsSpec {
            operation: KsOperation::Secret,
            connections: 16,
            duration_secs: 5.0,
            max_errors: 0.001,
            min_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AisSpec {
    pub connections: usize,
    pub duration_secs: f64,
    pub realm: u32,
    /// Sign each request with the shared key (X-Actrix-* headers); unsigned registration
    /// works only from loopback when the appliance allows it. (0.1.7 only: 0.4 clients
    /// register unsigned.)
    pub signed: bool,
    /// `"0.1.7"` (ECIES token and PSK) or `"0.4"` (Ed25519-signed claims, TURN REST
    /// credential, renewal token; the realm is provisioned with a signed admin request first).
    pub protocol: String,
    /// 0.4: verify the Ed25519 signature of the first and every `verify_every`-th response of
    /// each worker (1 = every response; the other checks run on all of them).
    pub verify_every: u32,
    pub max_errors: f64,
    pub min_rate: f64,
}

impl Default for AisSpec {
    fn default() -> Self {
        AisSpec {
            connections: 16,
            duration_secs: 5.0,
            realm: 1,
            signed: true,
            protocol: "0.1.7".into(),
            verify_every: 1,
            max_errors: 0.001,
            min_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SignalingSpec {
    /// Registered actors, in pairs that relay to each other.
    pub actors: usize,
    /// WebSocket connections held open in total (the actors plus idle ones).
    pub connections: usize,
    /// Offered envelopes/s over all actors (SDP relays to the partner).
    pub offered_eps: u64,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    /// Filler bytes in each SDP.
    pub payload: usize,
    /// Realm the actors register in (created with the shared key when missing).
    pub realm: u32,
    /// Fail when more than this fraction of the envelopes sent is not delivered.
    pub max_loss: f64,
    /// Fail when the p99 routing latency exceeds this (0: no ceiling).
    pub max_p99_ms: f64,
    /// HTTP base URL of a second node of the same signaling cluster (`[cluster]`, one Key
    /// Server): the odd actor of every pair registers there, so every relay crosses nodes
    /// through the bus. Empty: one node.
    pub peer_http: String,
}

impl Default for SignalingSpec {
    fn default() -> Self {
        SignalingSpec {
            actors: 200,
            connections: 200,
            offered_eps: 20_000,
            warmup_secs: 2.0,
            duration_secs: 5.0,
            payload: 200,
            realm: 1,
            max_loss: 0.001,
            max_p99_ms: 0.0,
            peer_http: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BindingSpec {
    /// Client sockets (distinct 5-tuples).
    pub clients: usize,
    pub duration_secs: f64,
    /// Offered requests/s over all clients; 0 = as fast as `window` allows (closed loop).
    pub offered_rps: u64,
    /// Requests in flight over all clients when `offered_rps` is 0.
    pub window: usize,
    /// Requests not answered after the run and `drain_ms` count as lost.
    pub drain_ms: u64,
    /// Fail when more than this fraction is lost.
    pub max_loss: f64,
}

impl Default for BindingSpec {
    fn default() -> Self {
        BindingSpec {
            clients: 4,
            duration_secs: 3.0,
            offered_rps: 0,
            window: 128,
            drain_ms: 300,
            max_loss: 0.01,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChurnSpec {
    /// Clients running cycles concurrently, each on its own socket.
    pub concurrency: usize,
    pub duration_secs: f64,
    /// Per-transaction retransmission timeout and attempts (RFC 8489 style, fixed RTO).
    pub rto_ms: u64,
    pub attempts: u32,
    /// Open a new socket (new 5-tuple) for every cycle instead of reusing the client's.
    pub new_socket_per_cycle: bool,
    /// With `new_socket_per_cycle`: each client keeps this many extra sockets on distinct
    /// source addresses and takes them in turn instead of opening one per cycle (the
    /// generator's socket, bind, connect and close calls cost a quarter of its CPU). A 5-tuple
    /// then returns after `client_sockets + 1` of its client's cycles, its allocation long
    /// deleted. 0: a new socket every cycle.
    pub client_sockets: usize,
    /// Peer address used in CreatePermission/ChannelBind (need not exist).
    pub peer: String,
    /// Spread the clients over this many loopback source addresses (127.1.x.y) when the
    /// server is on loopback, so per-source-IP limits see many sources.
    pub source_ips: usize,
    /// Fail when more than this fraction of cycles fails.
    pub max_failure: f64,
    /// Client transport; over TCP and TLS every cycle is a new connection.
    pub transport: Transport,
    pub tls_version: TlsVersion,
    /// How a cycle ends: Refresh 0, or (streams) closing the connection.
    pub end: ChurnEnd,
}

impl Default for ChurnSpec {
    fn default() -> Self {
        ChurnSpec {
            concurrency: 16,
            duration_secs: 3.0,
            rto_ms: 500,
            attempts: 4,
            new_socket_per_cycle: true,
            client_sockets: 0,
            peer: "127.0.0.1:9".into(),
            source_ips: 1024,
            max_failure: 0.01,
            transport: Transport::Udp,
            tls_version: TlsVersion::Tls13,
            end: ChurnEnd::Refresh,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// ChannelData both ways (channel bound per client and peer).
    Channel,
    /// Send indications out, Data indications back.
    Send,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySpec {
    pub clients: usize,
    pub peers: usize,
    pub mode: RelayMode,
    /// Application payload bytes per datagram (at least 24: sequence and timestamp).
    pub payload: usize,
    pub duration_secs: f64,
    /// Offered client datagrams/s over all clients (each relayed twice: out and back);
    /// 0 = as fast as `window` allows.
    pub offered_pps: u64,
    /// Datagrams in flight over all clients when `offered_pps` is 0.
    pub window: usize,
    pub drain_ms: u64,
    /// Fail a fixed-rate run when more than this fraction of round trips is lost.
    pub max_loss: f64,
    /// Step the offered rate to find the highest one under `search.max_loss`.
    pub search: Option<SearchSpec>,
    /// Client transport (peers are UDP either way).
    pub transport: Transport,
    pub tls_version: TlsVersion,
    /// Over streams: datagrams the generator writes to a connection with one send (TLS: each
    /// is its own record either way). 1 is what independent real clients produce.
    pub frames_per_write: usize,
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            clients: 4,
            peers: 4,
            mode: RelayMode::Channel,
            payload: 100,
            duration_secs: 3.0,
            offered_pps: 20_000,
            window: 256,
            drain_ms: 300,
            max_loss: 0.001,
            search: None,
            transport: Transport::Udp,
            tls_version: TlsVersion::Tls13,
            frames_per_write: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSpec {
    pub start_pps: u64,
    pub max_pps: u64,
    /// Multiply the offered rate by this after a passing step.
    pub growth: f64,
    /// Bisection steps between the last pass and the first failure.
    pub refine: u32,
    pub step_secs: f64,
    pub max_loss: f64,
    /// Hard bound on the number of steps.
    pub max_steps: u32,
}

impl Default for SearchSpec {
    fn default() -> Self {
        SearchSpec {
            start_pps: 20_000,
            max_pps: 2_000_000,
            growth: 1.5,
            refine: 3,
            step_secs: 1.5,
            max_loss: 0.001,
            max_steps: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdleSpec {
    pub allocations: usize,
    /// Allocations being set up at once.
    pub concurrency: usize,
    /// How long they are held before the "after" reading.
    pub hold_secs: f64,
    pub rto_ms: u64,
    pub attempts: u32,
    /// As `churn.source_ips`: a server may rate-limit new clients per source IP.
    pub source_ips: usize,
    /// Fail when fewer than this fraction of allocations succeeded.
    pub min_success: f64,
    /// Client transport; over TCP and TLS each allocation holds its own connection.
    pub transport: Transport,
    pub tls_version: TlsVersion,
}

impl Default for IdleSpec {
    fn default() -> Self {
        IdleSpec {
            allocations: 2000,
            concurrency: 64,
            hold_secs: 1.0,
            rto_ms: 500,
            attempts: 4,
            source_ips: 256,
            min_success: 0.99,
            transport: Transport::Udp,
            tls_version: TlsVersion::Tls13,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HandshakeSpec {
    /// `tls` (full handshakes, no session resumption) or `tcp` (connections alone).
    pub transport: Transport,
    pub tls_version: TlsVersion,
    /// Connections being set up at once (closed loop: a new one when one finishes).
    pub concurrency: usize,
    pub duration_secs: f64,
    /// The request each connection makes before it closes.
    pub request: HandshakeRequest,
    /// A cycle not answered within this long (from connect) fails.
    pub timeout_ms: u64,
    /// As `churn.source_ips`.
    pub source_ips: usize,
    /// Fail when more than this fraction of cycles fails.
    pub max_failure: f64,
}

impl Default for HandshakeSpec {
    fn default() -> Self {
        HandshakeSpec {
            transport: Transport::Tls,
            tls_version: TlsVersion::Tls13,
            concurrency: 32,
            duration_secs: 3.0,
            request: HandshakeRequest::Binding,
            timeout_ms: 3000,
            source_ips: 1024,
            max_failure: 0.01,
        }
    }
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.fill_defaults();
        s.validate()?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The section of the scenario's kind gets its defaults when absent.
    fn fill_defaults(&mut self) {
        match self.kind {
            Kind::Binding => {
                self.binding.get_or_insert_with(Default::default);
            }
            Kind::Churn => {
                self.churn.get_or_insert_with(Default::default);
            }
            Kind::Relay => {
                self.relay.get_or_insert_with(Default::default);
            }
            Kind::Idle => {
                self.idle.get_or_insert_with(Default::default);
            }
            Kind::Handshake => {
                self.handshake.get_or_insert_with(Default::default);
            }
            Kind::Ks => {
                self.ks.get_or_insert_with(Default::default);
            }
            Kind::Ais => {
                self.ais.get_or_insert_with(Default::default);
            }
            Kind::Signaling => {
                self.signaling.get_or_insert_with(Default::default);
            }
            Kind::Flood => {
                self.flood.get_or_insert_with(Default::default);
            }
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            errs.push("name: 1+ characters of [A-Za-z0-9._-] (it names the output folder)".into());
        }
        let others = [
            (Kind::Binding, self.binding.is_some()),
            (Kind::Churn, self.churn.is_some()),
            (Kind::Relay, self.relay.is_some()),
            (Kind::Idle, self.idle.is_some()),
            (Kind::Handshake, self.handshake.is_some()),
            (Kind::Ks, self.ks.is_some()),
            (Kind::Ais, self.ais.is_some()),
            (Kind::Signaling, self.signaling.is_some()),
            (Kind::Flood, self.flood.is_some()),
        ];
        for (k, present) in others {
            if present && k != self.kind {
                errs.push(format!(
                    "[{}] section given but kind = \"{}\"",
                    k.as_str(),
                    self.kind.as_str()
                ));
            }
        }
        let dur = |d: f64, what: &str, errs: &mut Vec<String>| {
            if !(d > 0.0 && d <= 3600.0) {
                errs.push(format!("{what}: must be in (0, 3600] seconds"));
            }
        };
        let frac = |f: f64, what: &str, errs: &mut Vec<String>| {
            if !(0.0..=1.0).contains(&f) {
                errs.push(format!("{what}: must be a fraction in [0, 1]"));
            }
        };
        if let Some(b) = &self.binding {
            if b.clients == 0 || b.clients > 4096 {
                errs.push("binding.clients: 1..=4096".into());
            }
            if b.offered_rps == 0 && b.window == 0 {
                errs.push("binding.window: must be positive when offered_rps is 0".into());
            }
            dur(b.duration_secs, "binding.duration_secs", &mut errs);
            frac(b.max_loss, "binding.max_loss", &mut errs);
        }
        if let Some(c) = &self.churn {
            if c.concurrency == 0 || c.concurrency > 4096 {
                errs.push("churn.concurrency: 1..=4096".into());
            }
            if c.source_ips == 0 || c.source_ips > 62_500 {
                errs.push("churn.source_ips: 1..=62500".into());
            }
            if c.concurrency.saturating_mul(c.client_sockets + 1) > 16_384 {
                errs.push(
                    "churn.client_sockets: (client_sockets + 1) x concurrency must be at most 16384 sockets"
                        .into(),
                );
            }
            if c.client_sockets > 0 && !c.new_socket_per_cycle {
                errs.push("churn.client_sockets: needs new_socket_per_cycle = true".into());
            }
            if c.attempts == 0 || c.rto_ms == 0 {
                errs.push("churn.attempts and churn.rto_ms: must be positive".into());
            }
            if c.peer.parse::<std::net::SocketAddr>().is_err() {
                errs.push(format!("churn.peer: {:?} is not IP:PORT", c.peer));
            }
            if c.transport.is_stream() && (c.client_sockets > 0 || !c.new_socket_per_cycle) {
                errs.push(
                    "churn.transport: over tcp and tls every cycle is a new connection \
                     (new_socket_per_cycle = true, client_sockets = 0)"
                        .into(),
                );
            }
            if c.end == ChurnEnd::Close && !c.transport.is_stream() {
                errs.push("churn.end = \"close\": only over tcp or tls".into());
            }
            dur(c.duration_secs, "churn.duration_secs", &mut errs);
            frac(c.max_failure, "churn.max_failure", &mut errs);
        }
        if let Some(r) = &self.relay {
            if r.clients == 0 || r.clients > 4096 {
                errs.push("relay.clients: 1..=4096".into());
            }
            if r.peers == 0 || r.peers > 4095 {
                errs.push("relay.peers: 1..=4095 (one channel number each)".into());
            }
            if !(crate::relay::MIN_PAYLOAD..=1200).contains(&r.payload) {
                errs.push(format!(
                    "relay.payload: {}..=1200 bytes",
                    crate::relay::MIN_PAYLOAD
                ));
            }
            if r.offered_pps == 0 && r.window == 0 && r.search.is_none() {
                errs.push("relay.window: must be positive when offered_pps is 0".into());
            }
            if !(1..=64).contains(&r.frames_per_write) {
                errs.push("relay.frames_per_write: 1..=64".into());
            }
            dur(r.duration_secs, "relay.duration_secs", &mut errs);
            frac(r.max_loss, "relay.max_loss", &mut errs);
            if let Some(s) = &r.search {
                if s.start_pps == 0 || s.max_pps < s.start_pps {
                    errs.push("relay.search: need 0 < start_pps <= max_pps".into());
                }
                if !(s.growth > 1.0 && s.growth <= 10.0) {
                    errs.push("relay.search.growth: in (1, 10]".into());
                }
                if s.max_steps == 0 || s.max_steps > 100 || s.refine > 20 {
                    errs.push("relay.search: max_steps 1..=100, refine 0..=20".into());
                }
                dur(s.step_secs, "relay.search.step_secs", &mut errs);
                frac(s.max_loss, "relay.search.max_loss", &mut errs);
            }
        }
        if let Some(i) = &self.idle {
            if i.allocations == 0 || i.allocations > 200_000 {
                errs.push("idle.allocations: 1..=200000".into());
            }
            if i.source_ips == 0 || i.source_ips > 62_500 {
                errs.push("idle.source_ips: 1..=62500".into());
            }
            if i.concurrency == 0 || i.attempts == 0 || i.rto_ms == 0 {
                errs.push("idle.concurrency, attempts and rto_ms: must be positive".into());
            }
            if !(0.0..=3600.0).contains(&i.hold_secs) {
                errs.push("idle.hold_secs: in [0, 3600]".into());
            }
            frac(i.min_success, "idle.min_success", &mut errs);
        }
        if let Some(h) = &self.handshake {
            if !h.transport.is_stream() {
                errs.push("handshake.transport: tcp or tls".into());
            }
            if h.concurrency == 0 || h.concurrency > 4096 {
                errs.push("handshake.concurrency: 1..=4096".into());
            }
            if h.source_ips == 0 || h.source_ips > 62_500 {
                errs.push("handshake.source_ips: 1..=62500".into());
            }
            if h.timeout_ms == 0 || h.timeout_ms > 60_000 {
                errs.push("handshake.timeout_ms: 1..=60000".into());
            }
            dur(h.duration_secs, "handshake.duration_secs", &mut errs);
            frac(h.max_failure, "handshake.max_failure", &mut errs);
        }
        if let Some(k) = &self.ks {
            if k.connections == 0 || k.connections > 1024 {
                errs.push("ks.connections: 1..=1024".into());
            }
            dur(k.duration_secs, "ks.duration_secs", &mut errs);
            frac(k.max_errors, "ks.max_errors", &mut errs);
            if !(k.min_rate >= 0.0 && k.min_rate.is_finite()) {
                errs.push("ks.min_rate: a rate >= 0".into());
            }
        }
        if let Some(a) = &self.ais {
            if a.connections == 0 || a.connections > 1024 {
                errs.push("ais.connections: 1..=1024".into());
            }
            dur(a.duration_secs, "ais.duration_secs", &mut errs);
            frac(a.max_errors, "ais.max_errors", &mut errs);
            if !(a.min_rate >= 0.0 && a.min_rate.is_finite()) {
                errs.push("ais.min_rate: a rate >= 0".into());
            }
        }
        if let Some(s) = &self.signaling {
            if s.actors < 2 || s.actors > 20_000 || s.actors % 2 != 0 {
                errs.push("signaling.actors: an even number in 2..=20000".into());
            }
            if s.connections < s.actors || s.connections > 100_000 {
                errs.push("signaling.connections: actors..=100000".into());
            }
            if s.offered_eps == 0 || s.offered_eps > 1_000_000 {
                errs.push("signaling.offered_eps: 1..=1000000".into());
            }
            if s.payload > 60_000 {
                errs.push("signaling.payload: at most 60000 bytes".into());
            }
            if !(0.0..=600.0).contains(&s.warmup_secs) {
                errs.push("signaling.warmup_secs: in [0, 600]".into());
            }
            dur(s.duration_secs, "signaling.duration_secs", &mut errs);
            frac(s.max_loss, "signaling.max_loss", &mut errs);
            if !(s.max_p99_ms >= 0.0 && s.max_p99_ms.is_finite()) {
                errs.push("signaling.max_p99_ms: >= 0".into());
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// Scale every duration by `f` (the `--time-scale` of quick runs), keeping them positive.
    pub fn scale_time(&mut self, f: f64) {
        let s = |d: &mut f64| *d = (*d * f).max(0.2);
        if let Some(b) = &mut self.binding {
            s(&mut b.duration_secs);
        }
        if let Some(c) = &mut self.churn {
            s(&mut c.duration_secs);
        }
        if let Some(h) = &mut self.handshake {
            s(&mut h.duration_secs);
        }
        if let Some(r) = &mut self.relay {
            s(&mut r.duration_secs);
            if let Some(se) = &mut r.search {
                s(&mut se.step_secs);
            }
        }
        if let Some(k) = &mut self.ks {
            s(&mut k.duration_secs);
        }
        if let Some(a) = &mut self.ais {
            s(&mut a.duration_secs);
        }
        if let Some(g) = &mut self.signaling {
            s(&mut g.duration_secs);
            g.warmup_secs *= f;
        }
        if let Some(i) = &mut self.idle {
            i.hold_secs *= f;
            if f < 1.0 {
                i.allocations = ((i.allocations as f64 * f).ceil() as usize).max(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_with_defaults() {
        let s = Scenario::parse("name = \"b\"\nkind = \"binding\"\n").unwrap();
        assert_eq!(s.binding, Some(BindingSpec::default()));
        let s = Scenario::parse(
            "name = \"r\"\nkind = \"relay\"\n[relay]\nclients = 2\nmode = \"send\"\n\
             [relay.search]\nstart_pps = 1000\nmax_pps = 5000\n",
        )
        .unwrap();
        let r = s.relay.unwrap();
        assert_eq!(r.clients, 2);
        assert_eq!(r.peers, 4);
        assert_eq!(r.mode, RelayMode::Send);
        assert_eq!(r.search.unwrap().growth, 1.5);
        let s =
            Scenario::parse("name = \"c\"\nkind = \"churn\"\n[churn]\nconcurrency = 3\n").unwrap();
        assert_eq!(s.churn.unwrap().concurrency, 3);
        let s = Scenario::parse("name = \"i\"\nkind = \"idle\"\n").unwrap();
        assert_eq!(s.idle.unwrap().allocations, 2000);
        let s = Scenario::parse("name = \"k\"\nkind = \"ks\"\n[ks]\noperation = \"generate\"\n")
            .unwrap();
        assert_eq!(s.ks.unwrap().operation, KsOperation::Generate);
        let s = Scenario::parse("name = \"a\"\nkind = \"ais\"\n").unwrap();
        assert!(s.ais.unwrap().signed);
        let s = Scenario::parse("name = \"s\"\nkind = \"signaling\"\n[signaling]\nactors = 4\n")
            .unwrap();
        assert_eq!(s.signaling.as_ref().unwrap().actors, 4);
        assert_eq!(s.signaling.unwrap().offered_eps, 20_000);
        let e = Scenario::parse(
            "name = \"s\"\nkind = \"signaling\"\n[signaling]\nactors = 3\nconnections = 2\n",
        )
        .unwrap_err();
        assert!(
            e.contains("signaling.actors") && e.contains("signaling.connections"),
            "{e}"
        );
    }

    #[test]
    fn rejects_typos_and_mismatches() {
        assert!(
            Scenario::parse("name = \"b\"\nkind = \"binding\"\n[binding]\nclient = 2\n")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(Scenario::parse("name = \"b\"\nkind = \"bindings\"\n").is_err());
        assert!(
            Scenario::parse("name = \"b\"\nkind = \"binding\"\n[relay]\n")
                .unwrap_err()
                .contains("[relay] section given")
        );
        assert!(Scenario::parse("name = \"a b\"\nkind = \"idle\"\n").is_err());
        let e = Scenario::parse(
            "name = \"r\"\nkind = \"relay\"\n[relay]\npayload = 4\nmax_loss = 2\npeers = 0\n",
        )
        .unwrap_err();
        assert!(
            e.contains("payload") && e.contains("max_loss") && e.contains("peers"),
            "{e}"
        );
        let churn = |body: &str| {
            Scenario::parse(&format!("name = \"c\"\nkind = \"churn\"\n[churn]\n{body}"))
        };
        assert_eq!(
            churn("client_sockets = 63\n")
                .unwrap()
                .churn
                .unwrap()
                .client_sockets,
            63
        );
        assert!(churn("concurrency = 1024\nclient_sockets = 63\n")
            .unwrap_err()
            .contains("at most 16384 sockets"));
        assert!(churn("new_socket_per_cycle = false\nclient_sockets = 3\n")
            .unwrap_err()
            .contains("needs new_socket_per_cycle"));
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap();
                n += 1;
            }
        }
        assert!(
            n >= 5,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn time_scaling() {
        let mut s = Scenario::parse(
            "name = \"r\"\nkind = \"relay\"\n[relay]\nduration_secs = 10\n[relay.search]\n",
        )
        .unwrap();
        s.scale_time(0.1);
        let r = s.relay.unwrap();
        assert!((r.duration_secs - 1.0).abs() < 1e-9);
        assert!((r.search.unwrap().step_secs - 0.2).abs() < 1e-9);
    }
}
