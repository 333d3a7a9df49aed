//! The plan: a pure function from what was observed (and what the operator wants)
//! to a list of lines, each with the current value, the planned value, a reason,
//! and the [`Action`] that [`crate::apply`] and [`crate::check`] act on.
//!
//! Layout rules, in priority order:
//! 1. The control thread never shares a CPU with a shard (design: the data plane
//!    never waits for it), so at most `online - 1` shards.
//! 2. Two shards never share a physical core through SMT when it can be avoided:
//!    siblings share L1/L2 and execution ports, so a second shard there adds far
//!    less than a core's worth of packets and makes both jittery.
//! 3. The physical core of the lowest online CPU (CPU 0) is left to the control
//!    thread: the kernel puts timers, RCU work and unaffined IRQs there anyway.
//!    That is the "all cores but one" of the automatic shard count.
//! 4. Shards go to the NIC's NUMA node first: the NIC DMAs into that node's memory,
//!    so a remote shard pays a cross-socket transfer for every packet.
//! 5. NIC queue IRQs are spread round-robin over the shards in that same order, so
//!    with as many queues as shards queue `i` is served by shard `i`'s core.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;

use crate::cpulist::format_list;
use crate::observe::{Host, Limit, LimitValue, Nic};

const MIB: u64 = 1024 * 1024;
/// Relay socket memory budgeted per allocation: about 25 full-size datagrams at
/// kernel truesize, i.e. a short burst of a video stream while its shard is busy.
pub const BYTES_PER_ALLOCATION: u64 = 64 * 1024;
/// Lowest port we move the ephemeral range to: below it live the services of the
/// host itself (STUN 3478, HTTP 8080, exporters).
pub const EPHEMERAL_FLOOR: u16 = 10000;
/// The systemd unit whose drop-in carries the resource limits.
pub const SERVICE_UNIT: &str = "actrix.service";

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanInput {
    /// Configured STUN/TURN listen IP; a wildcard means "the default-route NIC".
    pub listen: IpAddr,
    /// Relay port range, inclusive.
    pub relay_ports: (u16, u16),
    /// Shard count; `None` is automatic (one per physical core but one).
    pub shards: Option<usize>,
    /// Expected concurrent TURN allocations (sizes udp_mem and nofile).
    pub allocations: u64,
}

impl Default for PlanInput {
    fn default() -> Self {
        PlanInput {
            listen: IpAddr::from([0, 0, 0, 0]),
            // RFC 8656 section 3.2 recommends the dynamic range for relayed addresses.
            relay_ports: (49152, 65535),
            shards: None,
            allocations: 10_000,
        }
    }
}

/// How a sysctl is judged to be in line with the plan. Targets are floors, not
/// exact values, so an operator who set a larger value is not told to lower it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Want {
    AtLeast(u64),
    /// Element-wise floor (udp_mem: min, pressure, max pages).
    AtLeastEach(Vec<u64>),
    /// A port range that does not overlap this one (unless the kernel already
    /// reserves it through ip_local_reserved_ports).
    Avoids(u16, u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Resource {
    Nofile,
    Memlock,
}

impl Resource {
    pub fn systemd_key(self) -> &'static str {
        match self {
            Resource::Nofile => "LimitNOFILE",
            Resource::Memlock => "LimitMEMLOCK",
        }
    }
}

/// What a line asks of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Shown for the operator, not applied or checked (layout, hints, kept values).
    Info,
    /// Write `value` to /proc/sys and the drop-in; satisfied when `want` holds.
    Sysctl {
        key: String,
        value: String,
        want: Want,
    },
    /// Write /proc/irq/N/smp_affinity_list.
    IrqAffinity { irq: u32, cpus: Vec<u32> },
    /// Write cpufreq/scaling_governor of these CPUs.
    Governor { cpus: Vec<u32>, governor: String },
    /// Soft limit of the service: satisfied at `min`; `value` (never below the
    /// current soft limit) goes into the systemd unit drop-in.
    Limit {
        resource: Resource,
        min: u64,
        value: LimitValue,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanItem {
    pub item: String,
    pub current: String,
    pub planned: String,
    pub reason: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub input: PlanInput,
    /// Shard CPUs in shard order (NIC node first).
    pub shards: Vec<u32>,
    pub control: u32,
    /// The interface carrying the listen IP.
    pub nic: Option<String>,
    /// The physical devices under it whose queues are steered.
    pub queue_nics: Vec<String>,
    pub items: Vec<PlanItem>,
    /// What the observer could not see and where the plan had to compromise.
    pub notes: Vec<String>,
}

/// Builds the plan. Pure: reads only its arguments.
pub fn plan(host: &Host, input: &PlanInput) -> Plan {
    let mut notes: Vec<String> = host.notes.iter().map(|n| format!("observe: {n}")).collect();
    let mut items = Vec::new();

    let nic = select_nic(host, input.listen, &mut notes);
    let physical = nic.map(|n| physical_nics(host, n)).unwrap_or_default();
    let nic_node = physical.iter().find_map(|n| n.numa_node).filter(|node| {
        host.nodes
            .iter()
            .any(|n| n.id == *node && !n.cpus.is_empty())
    });
    if nic.is_some() && nic_node.is_none() && host.nodes.len() > 1 {
        notes.push("NIC NUMA node unknown; shards not placed by NUMA".into());
    }

    let layout = layout(host, input.shards, nic_node, &mut notes);
    layout_items(host, input, nic, &physical, &layout, &mut items);
    irq_items(&physical, &layout.shards, &mut items, &mut notes);
    sysctl_items(host, input, layout.shards.len(), &mut items, &mut notes);
    limit_items(host, input, layout.shards.len(), &mut items);
    governor_items(host, &mut items, &mut notes);
    if host.irqbalance {
        notes.push(
            "irqbalance is running and will rewrite the IRQ affinities: stop it, or set \
             IRQBALANCE_BANNED_CPULIST to the shard CPUs"
                .into(),
        );
    }

    Plan {
        input: input.clone(),
        shards: layout.shards,
        control: layout.control,
        nic: nic.map(|n| n.name.clone()),
        queue_nics: physical.iter().map(|n| n.name.clone()).collect(),
        items,
        notes,
    }
}

fn select_nic<'h>(host: &'h Host, listen: IpAddr, notes: &mut Vec<String>) -> Option<&'h Nic> {
    if listen.is_unspecified() {
        if let Some(nic) = host.default_route.as_deref().and_then(|r| host.nic(r)) {
            return Some(nic);
        }
        let physical: Vec<&Nic> = host.nics.iter().filter(|n| n.device.is_some()).collect();
        if let [only] = physical.as_slice() {
            return Some(only);
        }
        notes.push(format!(
            "listen {listen} is a wildcard and there is no default route or single NIC; \
             pass --listen with the public IP to tune the NIC"
        ));
        return None;
    }
    let found = host.nics.iter().find(|n| n.addrs.contains(&listen));
    if found.is_none() {
        notes.push(format!(
            "no interface carries {listen}; NIC queues and IRQs not tuned"
        ));
    }
    found
}

/// The devices under a (possibly stacked) interface: a vlan's parent, a bond's
/// slaves. Bounded depth because sysfs links could in principle form a loop.
fn physical_nics<'h>(host: &'h Host, nic: &'h Nic) -> Vec<&'h Nic> {
    let mut out: Vec<&Nic> = Vec::new();
    let mut frontier = vec![nic];
    for _ in 0..4 {
        let mut next = Vec::new();
        for n in frontier {
            if n.device.is_some() {
                if !out.iter().any(|o| o.name == n.name) {
                    out.push(n);
                }
            } else {
                next.extend(n.lower.iter().filter_map(|l| host.nic(l)));
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    out
}

struct Core {
    threads: Vec<u32>,
    node: Option<u32>,
}

/// Physical cores from the SMT sibling lists, in ascending CPU order. A CPU that
/// already belongs to an earlier core is not counted again even if the lists
/// disagree, so every CPU is in exactly one core.
fn physical_cores(host: &Host) -> Vec<Core> {
    let online: BTreeSet<u32> = host.cpus.iter().map(|c| c.id).collect();
    let mut seen = BTreeSet::new();
    let mut cores = Vec::new();
    for cpu in &host.cpus {
        if seen.contains(&cpu.id) {
            continue;
        }
        let mut threads: Vec<u32> = cpu
            .siblings
            .iter()
            .copied()
            .filter(|s| online.contains(s) && !seen.contains(s))
            .collect();
        if !threads.contains(&cpu.id) {
            threads.push(cpu.id);
        }
        threads.sort_unstable();
        seen.extend(threads.iter().copied());
        cores.push(Core {
            threads,
            node: cpu.node,
        });
    }
    cores
}

struct Layout {
    shards: Vec<u32>,
    control: u32,
    /// Why each shard CPU was chosen, keyed by CPU.
    why: BTreeMap<u32, String>,
    control_why: String,
    auto: usize,
}

fn layout(
    host: &Host,
    wanted: Option<usize>,
    nic_node: Option<u32>,
    notes: &mut Vec<String>,
) -> Layout {
    let cores = physical_cores(host);
    let first_cpu = host.cpus.first().map(|c| c.id).unwrap_or(0);
    let logical = host.cpus.len().max(1);
    let auto = cores.len().saturating_sub(1).max(1);
    let mut want = wanted.unwrap_or(auto).max(1);
    let max_shards = (logical - 1).max(1);
    if want > max_shards {
        notes.push(format!(
            "{want} shards asked but only {logical} CPUs online; using {max_shards} so the \
             control thread keeps a CPU of its own"
        ));
        want = max_shards;
    }

    let (hk, mut others): (Vec<&Core>, Vec<&Core>) =
        cores.iter().partition(|c| c.threads.contains(&first_cpu));
    // Cores on the NIC's node first, then by node, then by CPU number.
    others.sort_by_key(|c| {
        (
            nic_node.is_some() && c.node != nic_node,
            c.node,
            c.threads[0],
        )
    });

    let node_txt = |node: Option<u32>| match (node, nic_node) {
        (Some(n), Some(nn)) if n == nn => format!("on NIC node {n}"),
        (Some(n), Some(nn)) => format!("node {n}, remote from NIC node {nn}"),
        (Some(n), None) => format!("node {n}"),
        (None, _) => "node unknown".to_string(),
    };
    let mut candidates: Vec<(u32, String)> = Vec::new();
    for c in &others {
        candidates.push((
            c.threads[0],
            format!("own physical core, {}", node_txt(c.node)),
        ));
    }
    for c in &hk {
        for &t in &c.threads[1..] {
            candidates.push((
                t,
                format!(
                    "SMT sibling of control CPU {first_cpu} (no free physical core left), {}",
                    node_txt(c.node)
                ),
            ));
        }
    }
    for c in &others {
        for &t in &c.threads[1..] {
            candidates.push((
                t,
                format!(
                    "SMT sibling of shard CPU {}: more shards than physical cores",
                    c.threads[0]
                ),
            ));
        }
    }
    if logical == 1 {
        candidates.push((first_cpu, "the only CPU".to_string()));
    }
    let chosen: Vec<(u32, String)> = candidates.into_iter().take(want).collect();
    if chosen
        .iter()
        .any(|(_, why)| why.starts_with("SMT sibling of shard"))
    {
        notes.push(
            "some shards share a physical core through SMT; fewer shards may be faster".into(),
        );
    }
    if let Some(nn) = nic_node {
        let remote = chosen
            .iter()
            .filter(|(cpu, _)| host.cpu(*cpu).and_then(|c| c.node) != Some(nn))
            .count();
        let local = cores
            .iter()
            .filter(|c| c.node == Some(nn) && !c.threads.contains(&first_cpu))
            .count();
        if remote > 0 {
            let hint = if local > 0 {
                format!("; --shards {local} keeps the data plane on the NIC's node")
            } else {
                String::new()
            };
            notes.push(format!("{remote} shard(s) remote from NIC node {nn}{hint}"));
        }
    }
    let shards: Vec<u32> = chosen.iter().map(|(c, _)| *c).collect();
    let why: BTreeMap<u32, String> = chosen.into_iter().collect();

    let shard_set: BTreeSet<u32> = shards.iter().copied().collect();
    let (control, control_why) = if !shard_set.contains(&first_cpu) {
        (
            first_cpu,
            format!("CPU {first_cpu} already carries kernel housekeeping; kept off the data plane"),
        )
    } else if let Some(c) = host
        .cpus
        .iter()
        .find(|c| !shard_set.contains(&c.id) && c.siblings.iter().any(|s| shard_set.contains(s)))
    {
        (
            c.id,
            format!("SMT sibling of a shard (CPU {first_cpu} runs a shard)"),
        )
    } else if let Some(c) = host.cpus.iter().find(|c| !shard_set.contains(&c.id)) {
        (c.id, "the first CPU not running a shard".to_string())
    } else {
        notes.push(
            "a single CPU: the control thread shares it with the shard; not a production layout"
                .into(),
        );
        (first_cpu, "shares the only CPU with the shard".to_string())
    };

    Layout {
        shards,
        control,
        why,
        control_why,
        auto,
    }
}

fn layout_items(
    host: &Host,
    input: &PlanInput,
    nic: Option<&Nic>,
    physical: &[&Nic],
    layout: &Layout,
    items: &mut Vec<PlanItem>,
) {
    let smt = host.cpus.iter().any(|c| c.siblings.len() > 1);
    let cores = physical_cores(host).len();
    items.push(info(
        "cpus",
        &format!(
            "{} online, {} cores{}, {} NUMA node(s)",
            host.cpus.len(),
            cores,
            if smt { " (SMT)" } else { "" },
            host.nodes.len().max(1)
        ),
        "-",
        "observed topology",
    ));
    if let Some(nic) = nic {
        let mut desc = nic.name.clone();
        for p in physical {
            desc.push_str(&format!(
                " [{} {}, {} rx/{} tx queues, node {}]",
                p.name,
                p.driver.as_deref().unwrap_or("?"),
                p.rx_queues,
                p.tx_queues,
                p.numa_node.map_or("?".into(), |n| n.to_string())
            ));
        }
        items.push(info(
            "listen NIC",
            &desc,
            "-",
            &format!("carries {}", input.listen),
        ));
    }
    let count_reason = match input.shards {
        Some(n) if n == layout.shards.len() => format!("asked for {n}"),
        Some(n) => format!("asked for {n}, capped"),
        None => format!(
            "auto: one per physical core but the control core ({})",
            layout.auto
        ),
    };
    items.push(info(
        "shards",
        "-",
        &layout.shards.len().to_string(),
        &count_reason,
    ));
    // Consecutive shards placed for the same reason share a line, so a 31-shard
    // host reads as two lines (NIC node, remote node) rather than 31.
    let mut i = 0;
    while i < layout.shards.len() {
        let why = layout.why.get(&layout.shards[i]).map_or("", String::as_str);
        let mut j = i + 1;
        while j < layout.shards.len()
            && layout.why.get(&layout.shards[j]).map_or("", String::as_str) == why
        {
            j += 1;
        }
        let (label, cpus) = if j - i == 1 {
            (format!("shard {i}"), format!("cpu {}", layout.shards[i]))
        } else {
            (
                format!("shards {i}-{}", j - 1),
                format!("cpus {}", format_list(&layout.shards[i..j])),
            )
        };
        items.push(info(&label, "-", &cpus, why));
        i = j;
    }
    items.push(info(
        "control thread",
        "-",
        &format!("cpu {}", layout.control),
        &layout.control_why,
    ));
    for p in physical {
        let queues = p.rx_queues.max(p.tx_queues);
        let n = layout.shards.len();
        if queues == 0 {
            continue;
        }
        let (planned, reason) = if queues == n {
            (queues.to_string(), "one queue per shard".to_string())
        } else {
            (
                format!("{n} (hint)"),
                format!(
                    "one RSS queue per shard keeps each queue's softirq on its shard core: \
                     `ethtool -L {} combined {n}` if the driver allows",
                    p.name
                ),
            )
        };
        items.push(info(
            &format!("{} RSS queues", p.name),
            &queues.to_string(),
            &planned,
            &reason,
        ));
    }
}

fn irq_items(
    physical: &[&Nic],
    shards: &[u32],
    items: &mut Vec<PlanItem>,
    notes: &mut Vec<String>,
) {
    if shards.is_empty() {
        return;
    }
    let mut offset = 0u64;
    for nic in physical {
        let mut queue_irqs: Vec<_> = nic.irqs.iter().filter(|i| i.queue.is_some()).collect();
        if queue_irqs.is_empty() {
            notes.push(format!(
                "{}: no queue IRQs recognised in /proc/interrupts; IRQ affinity not managed",
                nic.name
            ));
            continue;
        }
        queue_irqs.sort_by_key(|i| (i.queue, i.number));
        let mut max_queue = 0u64;
        for irq in queue_irqs {
            let q = u64::from(irq.queue.unwrap_or(0));
            max_queue = max_queue.max(q);
            let slot = ((offset + q) % shards.len() as u64) as usize;
            let cpu = shards[slot];
            items.push(PlanItem {
                item: format!("irq {} {}", irq.number, short_irq_name(&irq.name)),
                current: irq.affinity.as_deref().map_or("?".into(), format_list),
                planned: cpu.to_string(),
                reason: format!(
                    "queue {q} -> shard {slot}: its softirq runs on the core that reads it"
                ),
                action: Action::IrqAffinity {
                    irq: irq.number,
                    cpus: vec![cpu],
                },
            });
        }
        offset += max_queue + 1;
    }
}

/// `mlx5_comp3@pci:0000:af:00.0` → `mlx5_comp3`: the PCI suffix is the same on every
/// line and only widens the table.
fn short_irq_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

fn info(item: &str, current: &str, planned: &str, reason: &str) -> PlanItem {
    PlanItem {
        item: item.to_string(),
        current: current.to_string(),
        planned: planned.to_string(),
        reason: reason.to_string(),
        action: Action::Info,
    }
}

fn sysctl_u64(host: &Host, key: &str) -> Option<u64> {
    host.sysctls.get(key)?.parse().ok()
}

fn sysctl_list(host: &Host, key: &str) -> Option<Vec<u64>> {
    host.sysctls
        .get(key)?
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect()
}

fn human_bytes(b: u64) -> String {
    if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else if b >= 1024 && b % 1024 == 0 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// A floor on a numeric sysctl; the planned value is never below the current one.
fn at_least(
    host: &Host,
    key: &str,
    target: u64,
    reason: String,
    items: &mut Vec<PlanItem>,
    notes: &mut Vec<String>,
) -> u64 {
    let current = sysctl_u64(host, key);
    let raw = host.sysctls.get(key);
    if raw.is_none() {
        items.push(info(
            &format!("sysctl {key}"),
            "unreadable",
            "(skipped)",
            &reason,
        ));
        return target;
    }
    if current.is_none() {
        notes.push(format!(
            "{key}: unparsable value {:?}",
            raw.map(String::as_str).unwrap_or("")
        ));
    }
    let planned = current.map_or(target, |c| c.max(target));
    items.push(PlanItem {
        item: format!("sysctl {key}"),
        current: raw.cloned().unwrap_or_default(),
        planned: planned.to_string(),
        reason,
        action: Action::Sysctl {
            key: key.to_string(),
            value: planned.to_string(),
            want: Want::AtLeast(target),
        },
    });
    planned
}

fn keep(host: &Host, key: &str, reason: &str, items: &mut Vec<PlanItem>) {
    let current = host.sysctls.get(key).map_or("unreadable", String::as_str);
    items.push(info(&format!("sysctl {key}"), current, "(keep)", reason));
}

fn sysctl_items(
    host: &Host,
    input: &PlanInput,
    shards: usize,
    items: &mut Vec<PlanItem>,
    notes: &mut Vec<String>,
) {
    // Per-socket buffer ceilings. Each shard asks SO_RCVBUF/SO_SNDBUF up to this on
    // its listen socket: 8 MiB absorbs ~10 ms of a 640k packets/s burst at kernel
    // truesize. Bigger hosts get 1 MiB per shard because the reuseport hash can pile
    // a burst of flows onto one shard; capped at 64 MiB.
    let buf = (shards as u64 * MIB).clamp(8 * MIB, 64 * MIB);
    let buf_reason = format!(
        "shard socket buffer ceiling: max(8 MiB, {shards} shard(s) x 1 MiB) = {}",
        human_bytes(buf)
    );
    let rmem_max = at_least(
        host,
        "net.core.rmem_max",
        buf,
        buf_reason.clone(),
        items,
        notes,
    );
    at_least(host, "net.core.wmem_max", buf, buf_reason, items, notes);
    keep(
        host,
        "net.core.rmem_default",
        "used by every relay socket; raising it multiplies by allocations (shards size theirs explicitly)",
        items,
    );
    keep(host, "net.core.wmem_default", "as rmem_default", items);
    at_least(
        host,
        "net.core.netdev_max_backlog",
        16384,
        "per-CPU input backlog; the default 1000 drops bursts before the sockets see them".into(),
        items,
        notes,
    );
    at_least(
        host,
        "net.core.optmem_max",
        65536,
        "reuseport steering programs and batched cmsg (GSO, pktinfo) are charged to optmem".into(),
        items,
        notes,
    );
    keep(
        host,
        "net.core.busy_poll",
        "kernel busy polling spins the shard core inside syscalls; shards already poll; change only with a measurement",
        items,
    );
    keep(host, "net.core.busy_read", "as busy_poll", items);
    udp_mem_item(host, input, shards, rmem_max, items, notes);
    keep(
        host,
        "net.ipv4.udp_rmem_min",
        "floor under udp_mem pressure; the udp_mem target keeps the host out of pressure",
        items,
    );
    port_range_item(host, input.relay_ports, items, notes);
}

fn udp_mem_item(
    host: &Host,
    input: &PlanInput,
    shards: usize,
    rmem_max: u64,
    items: &mut Vec<PlanItem>,
    notes: &mut Vec<String>,
) {
    let key = "net.ipv4.udp_mem";
    let page = host.page_size.max(1);
    let need_bytes = input
        .allocations
        .saturating_mul(BYTES_PER_ALLOCATION)
        .saturating_add((shards as u64).saturating_mul(rmem_max));
    let need = need_bytes.div_ceil(page);
    let reason = format!(
        "pages: {} allocations x {} + {shards} shard(s) x rmem_max at pressure, twice that at max",
        input.allocations,
        human_bytes(BYTES_PER_ALLOCATION)
    );
    let Some(raw) = host.sysctls.get(key) else {
        items.push(info(
            &format!("sysctl {key}"),
            "unreadable",
            "(skipped)",
            &reason,
        ));
        return;
    };
    let current = sysctl_list(host, key).filter(|v| v.len() == 3);
    if current.is_none() {
        notes.push(format!("{key}: unparsable value {raw:?}"));
    }
    let cur = current.unwrap_or_else(|| vec![0, 0, 0]);
    let mut target = vec![need / 2, need, need.saturating_mul(2)];
    // Never let UDP take more than half of RAM: past that the OOM killer, not UDP
    // memory pressure, becomes the failure mode.
    if let Some(mem) = host.mem_total {
        let cap = mem / 2 / page;
        if target[2] > cap {
            notes.push(format!(
                "{} allocations need more UDP memory than half of RAM; udp_mem capped",
                input.allocations
            ));
            target = target.into_iter().map(|v| v.min(cap)).collect();
        }
    }
    let planned: Vec<u64> = cur.iter().zip(&target).map(|(c, t)| *c.max(t)).collect();
    let value = planned
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    items.push(PlanItem {
        item: format!("sysctl {key}"),
        current: raw.clone(),
        planned: value.clone(),
        reason,
        action: Action::Sysctl {
            key: key.to_string(),
            value,
            want: Want::AtLeastEach(target),
        },
    });
}

/// Parses `a b` (ip_local_port_range).
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut w = text.split_whitespace();
    let a = w.next()?.parse().ok()?;
    let b = w.next()?.parse().ok()?;
    (a <= b && w.next().is_none()).then_some((a, b))
}

/// Parses ip_local_reserved_ports (`8080,49152-65535`, may be empty).
pub fn parse_ports(text: &str) -> Option<Vec<(u16, u16)>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                    (a <= b).then_some((a, b))
                }
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Whether every port of `range` is in the reserved list.
pub fn reserved_covers(reserved: &[(u16, u16)], range: (u16, u16)) -> bool {
    let mut next = u32::from(range.0);
    let mut sorted = reserved.to_vec();
    sorted.sort_unstable();
    for (a, b) in sorted {
        if u32::from(a) <= next && u32::from(b) >= next {
            next = u32::from(b) + 1;
        }
        if next > u32::from(range.1) {
            return true;
        }
    }
    next > u32::from(range.1)
}

pub fn overlaps(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// Moves the ephemeral range beside the relay range, keeping its size where the
/// space allows, on the side with more room. The kernel wants start and end of
/// different parity (it splits bind and connect by parity), so the end is trimmed.
pub fn move_range(current: (u16, u16), relay: (u16, u16)) -> Option<(u16, u16)> {
    let size = u32::from(current.1 - current.0) + 1;
    let below = (u32::from(relay.0) > u32::from(EPHEMERAL_FLOOR) + 1).then(|| {
        let end = u32::from(relay.0) - 1;
        let start = end.saturating_sub(size - 1).max(u32::from(EPHEMERAL_FLOOR));
        (start, end)
    });
    let above = (relay.1 < u16::MAX).then(|| {
        let start = u32::from(relay.1).max(u32::from(EPHEMERAL_FLOOR) - 1) + 1;
        let end = (start + size - 1).min(u32::from(u16::MAX));
        (start, end)
    });
    let len = |r: Option<(u32, u32)>| r.map_or(0, |(a, b)| b.saturating_sub(a) + 1);
    let (start, mut end) = if len(below) >= len(above) {
        below?
    } else {
        above?
    };
    if start % 2 == end % 2 && end > start {
        end -= 1;
    }
    // 1024 ephemeral ports is the least for a host that makes any outgoing
    // connections at all (KS client, package updates, NTP).
    (end - start + 1 >= 1024).then_some((start as u16, end as u16))
}

fn port_range_item(
    host: &Host,
    relay: (u16, u16),
    items: &mut Vec<PlanItem>,
    notes: &mut Vec<String>,
) {
    let key = "net.ipv4.ip_local_port_range";
    let relay_txt = format!("{}-{}", relay.0, relay.1);
    let Some(raw) = host.sysctls.get(key) else {
        items.push(info(
            &format!("sysctl {key}"),
            "unreadable",
            "(skipped)",
            "must not overlap the relay ports",
        ));
        return;
    };
    let Some(current) = parse_range(raw) else {
        notes.push(format!("{key}: unparsable value {raw:?}; not managed"));
        items.push(info(
            &format!("sysctl {key}"),
            raw,
            "(skipped)",
            "unparsable",
        ));
        return;
    };
    let reserved = host
        .sysctls
        .get("net.ipv4.ip_local_reserved_ports")
        .and_then(|r| parse_ports(r))
        .unwrap_or_default();
    let push = |items: &mut Vec<PlanItem>, planned: (u16, u16), reason: String| {
        let value = format!("{} {}", planned.0, planned.1);
        items.push(PlanItem {
            item: format!("sysctl {key}"),
            current: raw.clone(),
            planned: value.clone(),
            reason,
            action: Action::Sysctl {
                key: key.to_string(),
                value,
                want: Want::Avoids(relay.0, relay.1),
            },
        });
    };
    if !overlaps(current, relay) {
        push(
            items,
            current,
            format!("does not overlap the relay ports {relay_txt}"),
        );
    } else if reserved_covers(&reserved, relay) {
        push(
            items,
            current,
            format!("overlaps relay ports {relay_txt}, but ip_local_reserved_ports keeps them out"),
        );
    } else if let Some(moved) = move_range(current, relay) {
        push(
            items,
            moved,
            format!(
                "overlapped relay ports {relay_txt}: an outgoing connection could take a relay port \
                 (or reserve them in ip_local_reserved_ports instead)"
            ),
        );
    } else {
        notes.push(format!(
            "relay ports {relay_txt} leave no room for an ephemeral range above {EPHEMERAL_FLOOR}; \
             narrow the relay range or reserve it in net.ipv4.ip_local_reserved_ports"
        ));
        items.push(info(
            &format!("sysctl {key}"),
            raw,
            "(no room)",
            "overlaps the relay ports",
        ));
    }
}

fn limit_items(host: &Host, input: &PlanInput, shards: usize, items: &mut Vec<PlanItem>) {
    let round = |v: u64| v.div_ceil(1024).saturating_mul(1024);
    let nofile = round(
        input
            .allocations
            .saturating_mul(2)
            .saturating_add(4096 + 64 * shards as u64),
    );
    let memlock = (8 * MIB * shards as u64).max(64 * MIB);
    let lines = [
        (
            Resource::Nofile,
            "limit nofile",
            host.limits.nofile,
            nofile,
            "2 per allocation (relay socket, client TCP/WS) + 4096 + 64/shard for control \
             clients, databases, rings"
                .to_string(),
        ),
        (
            Resource::Memlock,
            "limit memlock",
            host.limits.memlock,
            memlock,
            format!(
                "io_uring rings and registered buffers (io.backend = io_uring or glommio; glommio \
                 refuses to start below 512 KiB and registers 3 x io.glommio_io_memory per \
                 shard), max(64 MiB, 8 MiB/shard) = {}",
                human_bytes(memlock)
            ),
        ),
    ];
    for (resource, item, current, min, reason) in lines {
        // Never lower what the host already grants (e.g. memlock unlimited).
        let value = match current {
            Some(Limit { soft, .. }) if soft.at_least(min) => soft,
            _ => LimitValue::Value(min),
        };
        items.push(PlanItem {
            item: item.into(),
            current: current.map_or("unknown".to_string(), |l| {
                format!("{} (hard {}), {}", l.soft, l.hard, host.limits_of)
            }),
            planned: value.to_string(),
            reason: format!("{reason}; via {SERVICE_UNIT} drop-in"),
            action: Action::Limit {
                resource,
                min,
                value,
            },
        });
    }
}

fn governor_items(host: &Host, items: &mut Vec<PlanItem>, notes: &mut Vec<String>) {
    const WANT: &str = "performance";
    let managed: Vec<_> = host.cpus.iter().filter(|c| c.governor.is_some()).collect();
    if managed.is_empty() {
        items.push(info(
            "cpufreq governor",
            "n/a",
            "(none)",
            "no cpufreq on this host (VM or disabled)",
        ));
        return;
    }
    let (ok, lacking): (Vec<_>, Vec<_>) = managed.into_iter().partition(|c| {
        c.governors_available.is_empty() || c.governors_available.iter().any(|g| g == WANT)
    });
    if !lacking.is_empty() {
        let ids: Vec<u32> = lacking.iter().map(|c| c.id).collect();
        notes.push(format!(
            "CPUs {} offer no `{WANT}` governor; left as they are",
            format_list(&ids)
        ));
    }
    if ok.is_empty() {
        return;
    }
    let mut by_gov: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for c in &ok {
        by_gov
            .entry(c.governor.as_deref().unwrap_or("?"))
            .or_default()
            .push(c.id);
    }
    let current = if by_gov.len() == 1 {
        by_gov
            .keys()
            .next()
            .map(|g| g.to_string())
            .unwrap_or_default()
    } else {
        by_gov
            .iter()
            .map(|(g, cpus)| format!("{g}({})", format_list(cpus)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cpus: Vec<u32> = ok.iter().map(|c| c.id).collect();
    items.push(PlanItem {
        item: format!("governor cpu {}", format_list(&cpus)),
        current,
        planned: WANT.into(),
        reason: "frequency ramp-up after idle delays the first packets of every burst".into(),
        action: Action::Governor {
            cpus,
            governor: WANT.into(),
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_ephemeral_range() {
        // Default Linux range against the RFC 8656 relay range: moved below it.
        assert_eq!(
            move_range((32768, 60999), (49152, 65535)),
            Some((20920, 49151))
        );
        // Relay range low: moved above it.
        assert_eq!(
            move_range((32768, 60999), (10000, 20000)),
            Some((20001, 48232))
        );
        // No room anywhere.
        assert_eq!(move_range((32768, 60999), (1024, 65535)), None);
        let (a, b) = move_range((32768, 60999), (40000, 50000)).unwrap();
        assert!(!overlaps((a, b), (40000, 50000)));
        assert_ne!(a % 2, b % 2);
    }

    #[test]
    fn reserved_ports() {
        let r = parse_ports("8080,49152-60000,60001-65535").unwrap();
        assert!(reserved_covers(&r, (49152, 65535)));
        assert!(!reserved_covers(&r, (49000, 65535)));
        assert!(parse_ports("").unwrap().is_empty());
        assert!(parse_ports("x").is_none());
    }
}
