//! Reading the host: CPU topology, NICs and their IRQs, sysctls, limits, cpufreq.
//!
//! Every path is joined onto a `root` so that the same code reads the live host
//! (`/`) and a recorded fixture tree. Nothing here fails: a missing or garbled file
//! becomes "unknown" plus a line in [`Host::notes`], because a tuning tool that
//! refuses to run on an odd kernel is worse than one that says what it could not see.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::addrs::InterfaceAddrs;
use crate::cpulist;

/// The sysctls the plan reads (and may change), in the order they are shown.
pub const SYSCTL_KEYS: &[&str] = &[
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.core.rmem_default",
    "net.core.wmem_default",
    "net.core.netdev_max_backlog",
    "net.core.optmem_max",
    "net.core.busy_poll",
    "net.core.busy_read",
    "net.ipv4.udp_mem",
    "net.ipv4.udp_rmem_min",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
];

/// What [`observe`] saw. Plain data, so that [`crate::plan`] stays a pure function
/// of it and tests can also build one by hand.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Host {
    /// Online logical CPUs, ascending.
    pub cpus: Vec<Cpu>,
    /// NUMA nodes (may be empty when the kernel has no NUMA support compiled in).
    pub nodes: Vec<NumaNode>,
    /// Every interface under /sys/class/net.
    pub nics: Vec<Nic>,
    /// Interface of the IPv4 default route, used when the listen IP is a wildcard.
    pub default_route: Option<String>,
    /// Values of [`SYSCTL_KEYS`] that could be read, whitespace-normalised.
    pub sysctls: BTreeMap<String, String>,
    /// Resource limits of the running actrix service if one is found, else of the
    /// observing process (which is the service when it checks itself at start-up).
    pub limits: Limits,
    /// Whose limits those are: `actrix pid N` or `this process`.
    pub limits_of: String,
    /// MemTotal in bytes.
    pub mem_total: Option<u64>,
    /// Page size in bytes (udp_mem is counted in pages).
    pub page_size: u64,
    /// An irqbalance process was seen; it rewrites IRQ affinities behind our back.
    pub irqbalance: bool,
    /// What could not be read, and what was assumed instead.
    pub notes: Vec<String>,
}

/// One online logical CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub id: u32,
    pub core_id: Option<u32>,
    pub package: Option<u32>,
    /// SMT siblings including this CPU (a single entry when SMT is off or unknown).
    pub siblings: Vec<u32>,
    pub node: Option<u32>,
    pub governor: Option<String>,
    pub governors_available: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of the node.
    pub cpus: Vec<u32>,
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub name: String,
    pub addrs: Vec<IpAddr>,
    /// Bus name of the backing device (`0000:af:00.0`, `virtio2`); `None` for
    /// virtual interfaces (lo, bond, vlan, bridge).
    pub device: Option<String>,
    pub driver: Option<String>,
    pub numa_node: Option<u32>,
    pub rx_queues: usize,
    pub tx_queues: usize,
    /// Interfaces this one is stacked on (`lower_*` links of a vlan or bond).
    pub lower: Vec<String>,
    /// IRQs that belong to this interface's device.
    pub irqs: Vec<Irq>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Irq {
    pub number: u32,
    pub name: String,
    /// Queue index for a data queue IRQ (`eth0-TxRx-3` → 3); `None` for the
    /// device's other vectors (config, async events, link), which we leave alone.
    pub queue: Option<u32>,
    pub affinity: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum LimitValue {
    Value(u64),
    Unlimited,
}

impl LimitValue {
    pub fn at_least(self, want: u64) -> bool {
        match self {
            LimitValue::Unlimited => true,
            LimitValue::Value(v) => v >= want,
        }
    }
}

impl std::fmt::Display for LimitValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitValue::Unlimited => f.write_str("unlimited"),
            LimitValue::Value(v) => write!(f, "{v}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub soft: LimitValue,
    pub hard: LimitValue,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub nofile: Option<Limit>,
    pub memlock: Option<Limit>,
}

impl Host {
    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus.iter().find(|c| c.id == id)
    }

    pub fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics.iter().find(|n| n.name == name)
    }
}

/// True when `root` is the real filesystem root, i.e. writes would hit the host.
pub fn is_live_root(root: &Path) -> bool {
    root.canonicalize()
        .map(|p| p == Path::new("/"))
        .unwrap_or(false)
}

/// Observes the host under `root`, with interface addresses supplied by the caller
/// (see [`crate::addrs`]).
pub fn observe(root: &Path, addrs: &InterfaceAddrs) -> Host {
    let mut host = Host {
        page_size: page_size(root),
        ..Host::default()
    };
    observe_cpus(root, &mut host);
    observe_nics(root, addrs, &mut host);
    observe_sysctls(root, &mut host);
    let service = find_process(root, "actrix");
    let (limits_file, limits_of) = match service {
        Some(pid) => (format!("proc/{pid}/limits"), format!("actrix pid {pid}")),
        None => ("proc/self/limits".to_string(), "this process".to_string()),
    };
    host.limits = observe_limits(root, &limits_file, &mut host.notes);
    host.limits_of = limits_of;
    host.mem_total = read(root, "proc/meminfo").and_then(|t| parse_meminfo(&t));
    if host.mem_total.is_none() {
        host.notes
            .push("MemTotal unknown (proc/meminfo); udp_mem not capped by RAM".into());
    }
    host.default_route = read(root, "proc/net/route").and_then(|t| parse_default_route(&t));
    host.irqbalance = find_process(root, "irqbalance").is_some();
    host
}

fn page_size(root: &Path) -> u64 {
    if is_live_root(root) {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            return n as u64;
        }
    }
    // Fixtures are recorded on x86_64/aarch64 hosts with 4 KiB pages.
    4096
}

fn read(root: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(root.join(rel)).ok()
}

fn read_path(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn link_basename(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn dir_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `cpu12` → 12, `node1` → 1.
fn numbered(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

fn observe_cpus(root: &Path, host: &mut Host) {
    let cpu_dir = root.join("sys/devices/system/cpu");
    let listed: Vec<u32> = dir_names(&cpu_dir)
        .iter()
        .filter_map(|n| numbered(n, "cpu"))
        .collect();
    let online = match read_path(&cpu_dir.join("online")).map(|t| cpulist::parse_list(&t)) {
        Some(Some(list)) if !list.is_empty() => list,
        other => {
            let why = if other.is_some() {
                "unparsable"
            } else {
                "missing"
            };
            host.notes.push(format!(
                "cpu/online {why}; assuming every cpuN directory is online"
            ));
            let mut l = listed.clone();
            l.sort_unstable();
            l
        }
    };
    if online.is_empty() {
        host.notes
            .push("no CPUs found; assuming a single CPU 0".into());
    }
    let online = if online.is_empty() { vec![0] } else { online };
    // Membership tests below run per CPU per list; keep them logarithmic.
    let online_set: std::collections::BTreeSet<u32> = online.iter().copied().collect();

    // NUMA nodes first, so each CPU can be tagged with its node.
    let node_dir = root.join("sys/devices/system/node");
    for name in dir_names(&node_dir) {
        let Some(id) = numbered(&name, "node") else {
            continue;
        };
        let path = node_dir.join(&name).join("cpulist");
        match read_path(&path).map(|t| cpulist::parse_list(&t)) {
            Some(Some(cpus)) => host.nodes.push(NumaNode {
                id,
                cpus: cpus
                    .into_iter()
                    .filter(|c| online_set.contains(c))
                    .collect(),
            }),
            _ => host
                .notes
                .push(format!("node{id}/cpulist unreadable; node ignored")),
        }
    }
    if host.nodes.is_empty() {
        host.notes
            .push("no NUMA information; treating the host as one node".into());
    }

    let mut bad_topology = Vec::new();
    let mut no_governor = 0;
    for &id in &online {
        let dir = cpu_dir.join(format!("cpu{id}"));
        let topo = dir.join("topology");
        let num = |file: &str| -> Option<u32> {
            read_path(&topo.join(file))
                .and_then(|t| t.trim().parse::<i64>().ok())
                .and_then(|v| u32::try_from(v).ok())
        };
        let core_id = num("core_id");
        let package = num("physical_package_id");
        let siblings = match read_path(&topo.join("thread_siblings_list"))
            .and_then(|t| cpulist::parse_list(&t))
        {
            Some(mut s) => {
                s.retain(|c| online_set.contains(c));
                if !s.contains(&id) {
                    s.push(id);
                    s.sort_unstable();
                }
                s
            }
            None => {
                bad_topology.push(id);
                vec![id]
            }
        };
        let node = host
            .nodes
            .iter()
            .find(|n| n.cpus.contains(&id))
            .map(|n| n.id);
        let governor = read_path(&dir.join("cpufreq/scaling_governor"))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if governor.is_none() {
            no_governor += 1;
        }
        let governors_available = read_path(&dir.join("cpufreq/scaling_available_governors"))
            .map(|t| t.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        host.cpus.push(Cpu {
            id,
            core_id,
            package,
            siblings,
            node,
            governor,
            governors_available,
        });
    }
    if !bad_topology.is_empty() {
        host.notes.push(format!(
            "thread_siblings_list unreadable for CPUs {}; treated as having no SMT sibling",
            cpulist::format_list(&bad_topology)
        ));
    }
    if no_governor == online.len() {
        host.notes.push(
            "no cpufreq scaling_governor (VM or cpufreq disabled); governor not managed".into(),
        );
    } else if no_governor > 0 {
        host.notes
            .push(format!("{no_governor} CPUs have no scaling_governor"));
    }
}

fn observe_nics(root: &Path, addrs: &InterfaceAddrs, host: &mut Host) {
    let net_dir = root.join("sys/class/net");
    let interrupts = match read(root, "proc/interrupts") {
        Some(t) => parse_interrupts(&t),
        None => {
            host.notes
                .push("proc/interrupts unreadable; NIC IRQs unknown".into());
            Vec::new()
        }
    };
    let names = dir_names(&net_dir);
    if names.is_empty() {
        host.notes.push("no interfaces under sys/class/net".into());
    }
    for name in names {
        let dir = net_dir.join(&name);
        let queues = dir_names(&dir.join("queues"));
        let count = |prefix: &str| {
            queues
                .iter()
                .filter(|q| numbered(q, prefix).is_some())
                .count()
        };
        let device = link_basename(&dir.join("device"));
        let driver = link_basename(&dir.join("device/driver"));
        let numa_node = read_path(&dir.join("device/numa_node"))
            .and_then(|t| t.trim().parse::<i64>().ok())
            .and_then(|v| u32::try_from(v).ok());
        let lower = dir_names(&dir)
            .iter()
            .filter_map(|n| n.strip_prefix("lower_").map(str::to_string))
            .collect();
        let mut nic = Nic {
            addrs: addrs.get(&name).cloned().unwrap_or_default(),
            name,
            device,
            driver,
            numa_node,
            rx_queues: count("rx-"),
            tx_queues: count("tx-"),
            lower,
            irqs: Vec::new(),
        };
        // Only devices have IRQs; matching "lo" or a vlan name would only find noise.
        if nic.device.is_some() {
            for (number, irq_name) in &interrupts {
                if irq_belongs(irq_name, &nic) {
                    nic.irqs.push(Irq {
                        number: *number,
                        name: irq_name.clone(),
                        queue: queue_index(irq_name),
                        affinity: irq_affinity(root, *number),
                    });
                }
            }
            let unknown: Vec<u32> = nic
                .irqs
                .iter()
                .filter(|i| i.queue.is_some() && i.affinity.is_none())
                .map(|i| i.number)
                .collect();
            if !unknown.is_empty() {
                host.notes.push(format!(
                    "{}: affinity of IRQs {unknown:?} unreadable",
                    nic.name
                ));
            }
        }
        host.nics.push(nic);
    }
}

fn irq_affinity(root: &Path, irq: u32) -> Option<Vec<u32>> {
    let dir = root.join(format!("proc/irq/{irq}"));
    read_path(&dir.join("smp_affinity_list"))
        .and_then(|t| cpulist::parse_list(&t))
        .or_else(|| read_path(&dir.join("smp_affinity")).and_then(|t| cpulist::parse_mask(&t)))
}

/// Parses /proc/interrupts into (number, action name) for numbered lines.
///
/// The columns between the per-CPU counts and the name differ by arch and kernel
/// (`IR-PCI-MSI 524288-edge`, `PCI-MSIX-0000:00:03.0 1-edge`, `ITS-MSI 524288 Edge`),
/// so the name is taken as what follows the trigger-type token, or the last word.
pub fn parse_interrupts(text: &str) -> Vec<(u32, String)> {
    let mut lines = text.lines();
    let ncpu = lines
        .next()
        .map(|h| {
            h.split_whitespace()
                .filter(|t| t.starts_with("CPU"))
                .count()
        })
        .unwrap_or(0);
    let mut out = Vec::new();
    for line in lines {
        let Some((num, rest)) = line.trim_start().split_once(':') else {
            continue;
        };
        let Ok(number) = num.trim().parse::<u32>() else {
            continue;
        };
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let counts = tokens
            .iter()
            .take(ncpu)
            .take_while(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .count();
        let tail = &tokens[counts..];
        let trigger = tail.iter().position(|t| {
            let t = t.to_ascii_lowercase();
            t.ends_with("edge") || t.ends_with("level") || t.ends_with("fasteoi")
        });
        let name = match trigger {
            Some(i) if i + 1 < tail.len() => tail[i + 1..].join(" "),
            _ => tail.last().map(|s| s.to_string()).unwrap_or_default(),
        };
        if !name.is_empty() {
            out.push((number, name));
        }
    }
    out
}

/// `needle` occurs in `hay` as a whole word (neighbours are not letters or digits),
/// so that `eth0` does not match `veth0-...` or `eth01-...`, nor `virtio2` match
/// `virtio20-input.0`.
fn contains_word(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(pos) = hay[from..].find(needle) {
        let start = from + pos;
        let end = start + needle.len();
        let before_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let after_ok = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
        while !hay.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}

/// IRQ action names carry either the interface name (`eth0-TxRx-3`,
/// `i40e-ens2f0-TxRx-0`), the virtio device (`virtio2-input.0`) or the PCI
/// address (`mlx5_comp3@pci:0000:af:00.0`, `i40e-0000:3b:00.0:misc`).
fn irq_belongs(irq_name: &str, nic: &Nic) -> bool {
    irq_name.split(", ").any(|action| {
        contains_word(action, &nic.name)
            || nic
                .device
                .as_deref()
                .is_some_and(|d| contains_word(action, d))
    })
}

/// Queue index of a data-queue IRQ, `None` for other vectors. Data queues end in a
/// number and name a queue kind (`TxRx`, `rx`, `tx`, `input`, `output`, `comp`,
/// `fp`, `queue`, `ring`); `eth0` (ixgbe's link vector), `virtio2-config`,
/// `mlx5_async0` and `i40e-...:misc` do not.
pub fn queue_index(irq_name: &str) -> Option<u32> {
    const KINDS: &[&str] = &[
        "txrx", "rx", "tx", "input", "output", "comp", "fp", "queue", "ring",
    ];
    let action = irq_name.split(", ").next().unwrap_or(irq_name);
    let base = action
        .split('@')
        .next()
        .unwrap_or(action)
        .to_ascii_lowercase();
    let stem = base.trim_end_matches(|c: char| c.is_ascii_digit());
    let digits = &base[stem.len()..];
    if digits.is_empty() || digits.len() > 6 {
        return None;
    }
    let is_queue = stem
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| KINDS.contains(&word));
    if is_queue {
        digits.parse().ok()
    } else {
        None
    }
}

fn observe_sysctls(root: &Path, host: &mut Host) {
    let mut missing = Vec::new();
    for key in SYSCTL_KEYS {
        match read_path(&sysctl_path(root, key)) {
            Some(v) => {
                host.sysctls.insert(key.to_string(), normalize(&v));
            }
            None => missing.push(*key),
        }
    }
    if !missing.is_empty() {
        host.notes
            .push(format!("sysctls not readable: {}", missing.join(", ")));
    }
}

/// `net.core.rmem_max` → `root/proc/sys/net/core/rmem_max`.
pub fn sysctl_path(root: &Path, key: &str) -> PathBuf {
    root.join("proc/sys").join(key.replace('.', "/"))
}

/// Collapses whitespace (udp_mem and ip_local_port_range are tab-separated).
pub fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn observe_limits(root: &Path, file: &str, notes: &mut Vec<String>) -> Limits {
    let Some(text) = read(root, file) else {
        notes.push(format!("{file} unreadable; limits unknown"));
        return Limits::default();
    };
    let limits = parse_limits(&text);
    if limits.nofile.is_none() || limits.memlock.is_none() {
        notes.push(format!("{file} lacks open files or locked memory"));
    }
    limits
}

pub fn parse_limits(text: &str) -> Limits {
    let parse_value = |t: &str| -> Option<LimitValue> {
        if t == "unlimited" {
            Some(LimitValue::Unlimited)
        } else {
            t.parse().ok().map(LimitValue::Value)
        }
    };
    let parse_line = |rest: &str| -> Option<Limit> {
        let mut words = rest.split_whitespace();
        Some(Limit {
            soft: parse_value(words.next()?)?,
            hard: parse_value(words.next()?)?,
        })
    };
    let mut limits = Limits::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            limits.nofile = parse_line(rest);
        } else if let Some(rest) = line.strip_prefix("Max locked memory") {
            limits.memlock = parse_line(rest);
        }
    }
    limits
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The interface of the first IPv4 default route (destination and mask 0).
fn parse_default_route(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The lowest pid whose comm is `name`, never our own (`actrix tune` is itself an
/// `actrix` process).
fn find_process(root: &Path, name: &str) -> Option<u32> {
    let proc_dir = root.join("proc");
    let me = is_live_root(root).then(std::process::id);
    let mut pids: Vec<u32> = dir_names(&proc_dir)
        .iter()
        .filter_map(|n| n.parse().ok())
        .filter(|pid| Some(*pid) != me)
        .collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        read_path(&proc_dir.join(pid.to_string()).join("comm")).is_some_and(|c| c.trim() == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPTS: &str = "           CPU0       CPU1       \n\
  24:          1          0  IO-APIC   5-edge      ACPI:Ged\n\
  38:          0        494 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0\n\
  39:        396          0 PCI-MSIX-0000:00:03.0   2-edge      virtio2-output.0\n\
  40:          0          0 PCI-MSIX-0000:00:04.0   0-edge      virtio20-input.0\n\
  41:          0          0  IR-PCI-MSI-edge      eth0-TxRx-3\n\
  42:          0          0  ITS-MSI 524288 Edge      mlx5_comp3@pci:0000:af:00.0\n\
  43:          0          0  IO-APIC  1-edge  i8042, timer\n\
 NMI:          0          0   Non-maskable interrupts\n\
 ERR:          0\n";

    #[test]
    fn interrupts_names() {
        let parsed = parse_interrupts(INTERRUPTS);
        let names: Vec<&str> = parsed.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ACPI:Ged",
                "virtio2-input.0",
                "virtio2-output.0",
                "virtio20-input.0",
                "eth0-TxRx-3",
                "mlx5_comp3@pci:0000:af:00.0",
                "i8042, timer"
            ]
        );
    }

    #[test]
    fn irq_matching_respects_word_boundaries() {
        let nic = Nic {
            name: "eth0".into(),
            device: Some("virtio2".into()),
            ..Nic::default()
        };
        assert!(irq_belongs("virtio2-input.0", &nic));
        assert!(irq_belongs("eth0-TxRx-3", &nic));
        assert!(!irq_belongs("virtio20-input.0", &nic));
        assert!(!irq_belongs("veth0-rx-1", &nic));
        let mlx = Nic {
            name: "ens1f0np0".into(),
            device: Some("0000:af:00.0".into()),
            ..Nic::default()
        };
        assert!(irq_belongs("mlx5_comp3@pci:0000:af:00.0", &mlx));
        assert!(!irq_belongs("mlx5_comp3@pci:0000:af:00.1", &mlx));
    }

    #[test]
    fn queue_indices() {
        assert_eq!(queue_index("eth0-TxRx-3"), Some(3));
        assert_eq!(queue_index("i40e-ens2f0-TxRx-7"), Some(7));
        assert_eq!(queue_index("virtio2-input.0"), Some(0));
        assert_eq!(queue_index("virtio2-output.12"), Some(12));
        assert_eq!(queue_index("mlx5_comp15@pci:0000:af:00.0"), Some(15));
        assert_eq!(queue_index("ena-Tx-Rx-2"), Some(2));
        assert_eq!(queue_index("virtio2-config"), None);
        assert_eq!(queue_index("mlx5_async0@pci:0000:af:00.0"), None);
        assert_eq!(queue_index("eth0"), None);
        assert_eq!(queue_index("i40e-0000:3b:00.0:misc"), None);
        assert_eq!(queue_index(""), None);
    }

    #[test]
    fn limits_and_route() {
        let l = parse_limits(
            "Limit Soft Hard Units\nMax open files            1024                 524288               files\nMax locked memory         unlimited            unlimited            bytes\n",
        );
        assert_eq!(l.nofile.unwrap().soft, LimitValue::Value(1024));
        assert_eq!(l.memlock.unwrap().hard, LimitValue::Unlimited);
        assert!(parse_limits("garbage\nMax open files x y").nofile.is_none());
        let r = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\nbond0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\neth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(parse_default_route(r).as_deref(), Some("eth0"));
    }

    #[test]
    fn observe_empty_root_does_not_panic() {
        let host = observe(
            Path::new("/nonexistent-actrix-root"),
            &InterfaceAddrs::new(),
        );
        assert_eq!(host.cpus.len(), 1);
        assert!(!host.notes.is_empty());
    }
}

#[cfg(test)]
mod fuzz {
    //! Deterministic junk through every parser: none may panic.
    use super::*;
    use crate::plan::parse_ports;

    #[test]
    fn parsers_survive_junk() {
        const ALPHABET: &[u8] = b"0123456789abcdefxCPU-,:@. \t\n\0\xff_TxRxinputmlx5comp";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = (next() % 80) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = cpulist::parse_list(&text);
            let _ = cpulist::parse_mask(&text);
            let _ = parse_interrupts(&text);
            let _ = parse_interrupts(&format!("CPU0 CPU1\n{text}"));
            let _ = queue_index(&text);
            let _ = parse_limits(&text);
            let _ = parse_meminfo(&text);
            let _ = parse_default_route(&text);
            let _ = parse_ports(&text);
            let _ = contains_word(&text, "eth0");
        }
    }
}
