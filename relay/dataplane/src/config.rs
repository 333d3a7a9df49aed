//! The data plane's section of the configuration file (`[io]`), and its validated form.
//!
//! Modes are enums. The raw section keeps each as a [`Mode`], which accepts any string, so
//! that a misspelt value is reported together with every other error of the file (`actrix
//! check` lists them all) instead of stopping the parse; [`IoConfig::validate`] turns the
//! section into [`IoSettings`], where every mode is a plain enum.

use serde::Deserialize;

/// A configuration value that names a variant of `T`, or the unknown string it held.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Mode<T> {
    Known(T),
    Unknown(String),
}

impl<T: Copy> Mode<T> {
    /// The variant, or the error for `key` naming the accepted values.
    pub fn check(&self, key: &str, accepted: &str, errors: &mut Vec<String>) -> Option<T> {
        match self {
            Mode::Known(v) => Some(*v),
            Mode::Unknown(s) => {
                errors.push(format!("{key}: '{s}' is not {accepted}"));
                None
            }
        }
    }

    /// The variant, or `default` for an unknown value (only after validation reported it).
    pub fn or(&self, default: T) -> T {
        match self {
            Mode::Known(v) => *v,
            Mode::Unknown(_) => default,
        }
    }
}

/// How a shard waits for and moves datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Backend {
    /// epoll, recvmmsg and sendmmsg.
    #[serde(rename = "mmsg")]
    Mmsg,
    /// io_uring: multishot receives into a provided-buffer ring, sends batched across sockets
    /// in one `io_uring_enter`.
    #[serde(rename = "io_uring")]
    IoUring,
    /// A glommio `LocalExecutor` per shard: readiness through glommio's io_uring reactor,
    /// datagrams moved in batches with recvmmsg and sendmmsg.
    #[serde(rename = "glommio")]
    Glommio,
}

impl Backend {
    pub const ACCEPTED: &'static str = "mmsg, io_uring or glommio";

    pub fn name(self) -> &'static str {
        match self {
            Backend::Mmsg => "mmsg",
            Backend::IoUring => "io_uring",
            Backend::Glommio => "glommio",
        }
    }
}

/// Where relayed addresses' sockets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelaySocketMode {
    /// A socket per relayed address (per allocation and family).
    PerAllocation,
    /// One receiving socket per shard and family, steered by a BPF sk_lookup program, and a
    /// raw socket per shard and family for sending: no descriptor per allocation.
    Shared,
}

/// How clients are spread over the shards' listener sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Steering {
    /// A classic BPF reuseport program: a pure function of the client address and port.
    Cbpf,
    /// A classic BPF reuseport program of the client's IP address alone: every flow from one
    /// address lands on one shard, so an Allocate with a RESERVATION-TOKEN from the client's
    /// second port (an RTP/RTCP pair) finds the shard that holds the reservation. Clients
    /// behind one NAT address then share a shard.
    CbpfIp,
    /// The kernel's reuseport hash.
    Kernel,
}

/// The `[io]` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IoConfig {
    /// Datagrams per recvmmsg/sendmmsg call.
    pub batch: usize,
    /// SO_RCVBUF/SO_SNDBUF of listener sockets, bytes.
    pub socket_buffer: usize,
    /// `cbpf` (steer clients to shards by address and port, stable), `cbpf_ip` (by address
    /// only) or `kernel` (reuseport hash).
    pub steering: Mode<Steering>,
    /// `mmsg` (the default, measured best here), `io_uring` (falls back to mmsg when the
    /// kernel refuses it) or `glommio`.
    pub backend: Mode<Backend>,
    /// Relay sockets kept open (bound, read, unused) per shard after their allocation ends, so
    /// the next allocation reuses one instead of opening, binding and closing a socket. Each
    /// costs a file descriptor; 0 closes them at once.
    pub relay_socket_pool: usize,
    /// Wake-up coalescing period, microseconds (0: off). Under dense traffic a shard starts a
    /// round at most once per period, so each wake-up drains several datagrams; sparse
    /// traffic and saturation are unaffected. Adds at most one period of latency per hop.
    pub coalesce_us: u32,
    /// `per_allocation` or `shared` (see [`RelaySocketMode`]; needs root/CAP_BPF and
    /// CAP_NET_ADMIN at start, Linux 5.9+, the mmsg or glommio backend).
    pub relay_sockets: Mode<RelaySocketMode>,
    /// glommio only: bytes of I/O memory each shard's executor registers with its rings
    /// (counted against RLIMIT_MEMLOCK, three times: one per ring).
    pub glommio_io_memory: usize,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            batch: 32,
            socket_buffer: 4 << 20,
            steering: Mode::Known(Steering::Cbpf),
            backend: Mode::Known(Backend::Mmsg),
            relay_socket_pool: 256,
            coalesce_us: 200,
            relay_sockets: Mode::Known(RelaySocketMode::PerAllocation),
            glommio_io_memory: 256 << 10,
        }
    }
}

/// The validated `[io]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSettings {
    pub batch: usize,
    pub socket_buffer: usize,
    pub steering: Steering,
    pub backend: Backend,
    pub relay_socket_pool: usize,
    pub coalesce_us: u32,
    pub relay_sockets: RelaySocketMode,
    pub glommio_io_memory: usize,
}

impl IoConfig {
    /// Check the section; push one message per problem. `None` when there was one.
    pub fn validate(&self, errors: &mut Vec<String>) -> Option<IoSettings> {
        let start = errors.len();
        let steering = self
            .steering
            .check("io.steering", "cbpf, cbpf_ip or kernel", errors);
        let backend = self.backend.check("io.backend", Backend::ACCEPTED, errors);
        let relay_sockets =
            self.relay_sockets
                .check("io.relay_sockets", "per_allocation or shared", errors);
        if let (Some(RelaySocketMode::Shared), Some(Backend::IoUring)) = (relay_sockets, backend) {
            errors.push(
                "io.relay_sockets: 'shared' works with io.backend = 'mmsg' or 'glommio', not 'io_uring'"
                    .into(),
            );
        }
        if self.relay_socket_pool > 65_536 {
            errors.push(format!(
                "io.relay_socket_pool: {} is above 65536",
                self.relay_socket_pool
            ));
        }
        if self.coalesce_us > 10_000 {
            errors.push(format!(
                "io.coalesce_us: {} is above 10000 (10 ms)",
                self.coalesce_us
            ));
        }
        if !(1..=1024).contains(&self.batch) {
            errors.push(format!(
                "io.batch: {} is not between 1 and 1024",
                self.batch
            ));
        }
        if !(64 << 10..=256 << 20).contains(&self.glommio_io_memory) {
            errors.push(format!(
                "io.glommio_io_memory: {} is not between 65536 and 268435456",
                self.glommio_io_memory
            ));
        }
        if errors.len() > start {
            return None;
        }
        Some(IoSettings {
            batch: self.batch,
            socket_buffer: self.socket_buffer,
            steering: steering?,
            backend: backend?,
            relay_socket_pool: self.relay_socket_pool,
            coalesce_us: self.coalesce_us,
            relay_sockets: relay_sockets?,
            glommio_io_memory: self.glommio_io_memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        io: IoConfig,
    }

    fn parse(text: &str) -> IoConfig {
        // The binary reads TOML; any self-describing format shows the same behaviour.
        let v: Doc = serde_json_like(text);
        v.io
    }

    /// A tiny `key = "value"` reader for these tests (the dataplane does not depend on toml).
    fn serde_json_like(text: &str) -> Doc {
        use serde::de::value::{MapDeserializer, StrDeserializer};
        let pairs: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect();
        let io = IoConfig::deserialize(MapDeserializer::<_, serde::de::value::Error>::new(
            pairs
                .iter()
                .map(|(k, v)| (StrDeserializer::new(k), StrDeserializer::new(v))),
        ))
        .expect("parses");
        Doc { io }
    }

    #[test]
    fn modes_parse_and_bad_ones_are_listed_together() {
        let io = parse("backend = \"glommio\"\nrelay_sockets = \"shared\"\nsteering = \"kernel\"");
        let mut errors = vec![];
        let s = io.validate(&mut errors).expect("valid");
        assert_eq!(s.backend, Backend::Glommio);
        assert_eq!(s.relay_sockets, RelaySocketMode::Shared);
        assert_eq!(s.steering, Steering::Kernel);

        let io = parse("backend = \"epoll\"\nrelay_sockets = \"bogus\"\nsteering = \"random\"");
        let mut errors = vec![];
        assert!(io.validate(&mut errors).is_none());
        assert_eq!(
            errors,
            [
                "io.steering: 'random' is not cbpf, cbpf_ip or kernel",
                "io.backend: 'epoll' is not mmsg, io_uring or glommio",
                "io.relay_sockets: 'bogus' is not per_allocation or shared",
            ]
        );
    }

    #[test]
    fn shared_relay_sockets_need_a_recvmmsg_backend() {
        let io = parse("backend = \"io_uring\"\nrelay_sockets = \"shared\"");
        let mut errors = vec![];
        assert!(io.validate(&mut errors).is_none());
        assert_eq!(
            errors,
            ["io.relay_sockets: 'shared' works with io.backend = 'mmsg' or 'glommio', not 'io_uring'"]
        );
        for b in ["mmsg", "glommio"] {
            let io = parse(&format!("backend = \"{b}\"\nrelay_sockets = \"shared\""));
            assert!(io.validate(&mut vec![]).is_some(), "{b}");
        }
    }
}
