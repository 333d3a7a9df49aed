//! Scenario files (TOML): what load to offer, for how long, and what counts as a failure.
//!
//! ```toml
//! name = "relay-channel"
//! kind = "relay"            # binding | churn | relay | idle
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
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Binding => "binding",
            Kind::Churn => "churn",
            Kind::Relay => "relay",
            Kind::Idle => "idle",
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
    /// Peer address used in CreatePermission/ChannelBind (need not exist).
    pub peer: String,
    /// Spread the clients over this many loopback source addresses (127.1.x.y) when the
    /// server is on loopback, so per-source-IP limits see many sources.
    pub source_ips: usize,
    /// Fail when more than this fraction of cycles fails.
    pub max_failure: f64,
}

impl Default for ChurnSpec {
    fn default() -> Self {
        ChurnSpec {
            concurrency: 16,
            duration_secs: 3.0,
            rto_ms: 500,
            attempts: 4,
            new_socket_per_cycle: true,
            peer: "127.0.0.1:9".into(),
            source_ips: 1024,
            max_failure: 0.01,
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
            if c.attempts == 0 || c.rto_ms == 0 {
                errs.push("churn.attempts and churn.rto_ms: must be positive".into());
            }
            if c.peer.parse::<std::net::SocketAddr>().is_err() {
                errs.push(format!("churn.peer: {:?} is not IP:PORT", c.peer));
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
        if let Some(r) = &mut self.relay {
            s(&mut r.duration_secs);
            if let Some(se) = &mut r.search {
                s(&mut se.step_secs);
            }
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
