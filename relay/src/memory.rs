//! Memory: the cgroup limit the appliance runs under, and new allocations refused before the
//! kernel's OOM killer would end the process (reliability checklist C4).
//!
//! Without this, a node in a memory cgroup (a systemd `MemoryMax=`, a container limit) whose
//! `turn.max_allocations` is more than the limit can hold is killed outright by the OOM killer
//! when clients fill it: every allocation on the node is lost at once. Two guards instead:
//!
//! - At start, the allocations the limit can hold are estimated from what the process uses
//!   already and a conservative cost per allocation ([`PER_ALLOCATION_BYTES`]: the core's
//!   state, a relay socket's kernel memory, its share of buffers), keeping [`HEADROOM_BYTES`]
//!   free; when that is below `turn.max_allocations`, new allocations are capped there and the
//!   start says so once.
//! - While running, a watcher reads the cgroup's usage and limit once a second. Above
//!   [`PRESSURE_ON`] of the limit, every new allocation is refused (486, counted by the quota
//!   refusals) while existing ones keep relaying; below [`PRESSURE_OFF`] they are accepted
//!   again, up to the start cap. Each change is logged once.
//!
//! Both act through the shared quota's memory cap ([`actrix_proto::turn::Quotas`]), read once
//! per Allocate, never per packet.

use actrix_proto::turn::CrossShard;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What one allocation is taken to cost, bytes, including the kernel's side of its relay
/// socket (measured: ~0.7 kB of core state and ~0.3 kB of shard state per idle allocation,
/// about 1.5 kB of kernel socket memory; four times that for bursts in its queues).
pub const PER_ALLOCATION_BYTES: u64 = 4096;
/// Memory kept free under the limit for everything that is not an allocation (control plane
/// requests, TLS handshakes, signaling bursts).
pub const HEADROOM_BYTES: u64 = 16 << 20;
/// Fraction of the limit above which new allocations are refused.
pub const PRESSURE_ON: f64 = 0.90;
/// Fraction of the limit below which they are accepted again.
pub const PRESSURE_OFF: f64 = 0.80;

/// The memory cgroup of the process: its limit and where its usage is read.
#[derive(Debug, Clone)]
pub struct CgroupMemory {
    pub limit: u64,
    limit_file: PathBuf,
    usage: PathBuf,
}

impl CgroupMemory {
    /// The limit of the process's memory cgroup (v2 `memory.max`, v1
    /// `memory.limit_in_bytes`), or None without a finite one.
    pub fn detect() -> Option<CgroupMemory> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::from_proc(&own, Path::new("/sys/fs/cgroup"))
    }

    /// [`CgroupMemory::detect`] from the text of `/proc/self/cgroup` and the cgroup mount
    /// point. Inside a cgroup namespace or a container the path named there can start with
    /// components the mount does not show; the longest suffix that exists is the one.
    pub fn from_proc(own: &str, root: &Path) -> Option<CgroupMemory> {
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let (dirs, limit_file, usage_file) = if controllers.is_empty() {
                (
                    vec![root.to_path_buf(), root.join("unified")],
                    "memory.max",
                    "memory.current",
                )
            } else if controllers.split(',').any(|c| c == "memory") {
                (
                    vec![root.join("memory")],
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                )
            } else {
                continue;
            };
            let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
            for base in &dirs {
                for skip in 0..=comps.len() {
                    let dir = comps[skip..].iter().fold(base.clone(), |d, c| d.join(c));
                    let Ok(text) = std::fs::read_to_string(dir.join(limit_file)) else {
                        continue;
                    };
                    if let Some(limit) = parse_limit(&text) {
                        return Some(CgroupMemory {
                            limit,
                            limit_file: dir.join(limit_file),
                            usage: dir.join(usage_file),
                        });
                    }
                    break;
                }
            }
        }
        None
    }

    /// The limit now (an operator may change it while the node runs); the one at start when
    /// it cannot be read or was lifted.
    pub fn current_limit(&self) -> u64 {
        std::fs::read_to_string(&self.limit_file)
            .ok()
            .and_then(|t| parse_limit(&t))
            .unwrap_or(self.limit)
    }

    /// Bytes the cgroup uses now.
    pub fn usage(&self) -> Option<u64> {
        std::fs::read_to_string(&self.usage)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// A limit file's text: v2 "max" and v1's near-2^63 "unlimited" are no limit.
fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        t => t.parse::<u64>().ok().filter(|&l| l < 1 << 60),
    }
}

/// The allocations a limit of `limit` bytes can hold with `used` bytes in use already.
pub fn allocation_capacity(limit: u64, used: u64) -> usize {
    (limit.saturating_sub(used).saturating_sub(HEADROOM_BYTES) / PER_ALLOCATION_BYTES) as usize
}

/// Apply the start cap and watch the cgroup's usage (a thread, once a second) for as long as
/// the process lives. Returns the start cap.
pub fn guard(cg: CgroupMemory, shared: Arc<CrossShard>, configured: usize) -> usize {
    let used = cg.usage().unwrap_or(0);
    let cap = allocation_capacity(cg.limit, used).max(1);
    if cap < configured {
        tracing::warn!(
            limit = cg.limit,
            used,
            cap,
            configured,
            "the memory cgroup limit holds fewer allocations than turn.max_allocations: new \
             allocations are capped at {cap} (raise MemoryMax or lower turn.max_allocations)"
        );
    } else {
        tracing::info!(limit = cg.limit, used, cap, "memory cgroup limit");
    }
    shared.quotas.set_memory_cap(cap);
    let pressed = AtomicBool::new(false);
    let spawned = std::thread::Builder::new()
        .name("actrix-memory".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(now) = cg.usage() else { continue };
            let limit = cg.current_limit();
            let frac = now as f64 / limit as f64;
            if frac >= PRESSURE_ON && !pressed.swap(true, Ordering::Relaxed) {
                shared.quotas.set_memory_cap(0);
                tracing::warn!(
                    usage = now,
                    limit,
                    allocations = shared.quotas.total(),
                    "memory pressure: new allocations refused until usage falls below {:.0}% \
                     of the limit",
                    PRESSURE_OFF * 100.0
                );
            } else if frac < PRESSURE_OFF && pressed.swap(false, Ordering::Relaxed) {
                shared.quotas.set_memory_cap(cap);
                tracing::info!(usage = now, limit, "memory pressure lifted");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "memory watcher not started");
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_found_for_v1_v2_and_namespaced_paths() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v1, the process's path with a prefix the mount does not show.
        std::fs::create_dir_all(r.join("memory/node")).unwrap();
        std::fs::write(r.join("memory/node/memory.limit_in_bytes"), "67108864\n").unwrap();
        std::fs::write(r.join("memory/node/memory.usage_in_bytes"), "1048576\n").unwrap();
        let cg = CgroupMemory::from_proc("4:memory:/outer/node\n1:cpu:/\n", r).unwrap();
        assert_eq!(cg.limit, 64 << 20);
        assert_eq!(cg.usage(), Some(1 << 20));
        // v2 with "max": no limit.
        std::fs::create_dir_all(r.join("svc")).unwrap();
        std::fs::write(r.join("svc/memory.max"), "max\n").unwrap();
        assert!(CgroupMemory::from_proc("0::/svc\n", r).is_none());
        std::fs::write(r.join("svc/memory.max"), "33554432\n").unwrap();
        std::fs::write(r.join("svc/memory.current"), "4096\n").unwrap();
        let cg = CgroupMemory::from_proc("0::/svc\n", r).unwrap();
        assert_eq!((cg.limit, cg.usage()), (32 << 20, Some(4096)));
        // v1 without a limit (the kernel's "unlimited" is about 2^63).
        std::fs::write(
            r.join("memory/node/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert!(CgroupMemory::from_proc("4:memory:/node\n", r).is_none());
    }

    #[test]
    fn capacity_keeps_the_headroom() {
        assert_eq!(allocation_capacity(16 << 20, 0), 0);
        assert_eq!(allocation_capacity((64 << 20) + 4096 * 100, 48 << 20), 100);
        assert_eq!(allocation_capacity(1 << 20, 8 << 20), 0);
    }
}
