//! observe → plan → apply → check on the recorded fixture trees under
//! tests/fixtures/ (see gen_synthetic.py and capture.sh there).

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use actrix_tuning::cli::run_with;
use actrix_tuning::plan::Want;
use actrix_tuning::{
    apply, check, fixture_addresses, observe, plan, Action, Fix, Host, Plan, PlanInput, TuneArgs,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn host_of(root: &Path) -> Host {
    let (addrs, _) = fixture_addresses(root);
    observe(root, &addrs)
}

fn input(listen: &str) -> PlanInput {
    PlanInput {
        listen: listen.parse().unwrap(),
        ..PlanInput::default()
    }
}

/// A private copy of a fixture tree (symlinks kept as symlinks) that apply() may
/// write to. Removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn copy_of(name: &str) -> TempTree {
        let dir = std::env::temp_dir().join(format!(
            "actrix-tuning-{}-{}-{name}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        copy_tree(&fixture(name), &dir);
        TempTree(dir)
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = fs::symlink_metadata(&src).unwrap().file_type();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

fn siblings(host: &Host, cpu: u32) -> Vec<u32> {
    host.cpu(cpu).unwrap().siblings.clone()
}

fn assert_no_shard_siblings(host: &Host, plan: &Plan) {
    let shards: BTreeSet<u32> = plan.shards.iter().copied().collect();
    assert_eq!(shards.len(), plan.shards.len(), "duplicate shard CPU");
    for &s in &plan.shards {
        for sib in siblings(host, s) {
            assert!(
                sib == s || !shards.contains(&sib),
                "shards {s} and {sib} are SMT siblings"
            );
        }
    }
    assert!(
        !shards.contains(&plan.control),
        "control {} is a shard CPU",
        plan.control
    );
}

fn irq_plan(plan: &Plan) -> Vec<(u32, u32)> {
    plan.items
        .iter()
        .filter_map(|i| match &i.action {
            Action::IrqAffinity { irq, cpus } => Some((*irq, cpus[0])),
            _ => None,
        })
        .collect()
}

fn sysctl_value<'p>(plan: &'p Plan, key: &str) -> Option<&'p str> {
    plan.items.iter().find_map(|i| match &i.action {
        Action::Sysctl { key: k, value, .. } if k == key => Some(value.as_str()),
        _ => None,
    })
}

#[test]
fn vm_two_cores_one_shard_plus_control() {
    let host = host_of(&fixture("vm-2core"));
    assert_eq!(host.cpus.len(), 2);
    let eth0 = host.nic("eth0").unwrap();
    assert_eq!(eth0.device.as_deref(), Some("virtio2"));
    assert_eq!(eth0.driver.as_deref(), Some("virtio_net"));
    assert_eq!((eth0.rx_queues, eth0.tx_queues), (1, 1));
    assert_eq!(eth0.numa_node, None);

    let plan = plan(&host, &input("192.0.2.2"));
    println!("{}", plan.render_table());
    assert_eq!(plan.nic.as_deref(), Some("eth0"));
    assert_eq!(plan.shards, vec![1]);
    assert_eq!(plan.control, 0);
    assert_no_shard_siblings(&host, &plan);
    // virtio2-input.0 and virtio2-output.0 are queue 0 and go to the shard; the
    // config vector (37) is left alone.
    assert_eq!(irq_plan(&plan), vec![(38, 1), (39, 1)]);
    // The wildcard resolves through the default route to the same NIC.
    assert_eq!(
        crate::plan(&host, &PlanInput::default()).nic.as_deref(),
        Some("eth0")
    );
    assert!(plan
        .render_config_snippet()
        .contains("shards = [1]\ncontrol = 0\n"));
}

#[test]
fn big_two_socket_host_prefers_nic_node() {
    let host = host_of(&fixture("big-2s-mlx5"));
    assert_eq!(host.cpus.len(), 64);
    assert_eq!(host.nodes.len(), 2);
    let mlx = host.nic("ens1f0np0").unwrap();
    assert_eq!(mlx.numa_node, Some(1));
    assert_eq!(mlx.irqs.iter().filter(|i| i.queue.is_some()).count(), 16);

    let plan = plan(&host, &input("203.0.113.10"));
    println!("{}", plan.render_table());
    assert_eq!(plan.nic.as_deref(), Some("ens1f0np0"));
    // All physical cores but CPU 0's: 31 shards, the 16 of node 1 first.
    assert_eq!(plan.shards.len(), 31);
    assert_no_shard_siblings(&host, &plan);
    let node = |cpu: u32| host.cpu(cpu).unwrap().node;
    assert!(plan.shards[..16].iter().all(|&c| node(c) == Some(1)));
    assert_eq!(plan.control, 0);
    assert!(plan.notes.iter().any(|n| n.contains("--shards 16")));

    // 16 completion IRQs, one per node-1 shard; the async vector is left alone.
    let irqs = irq_plan(&plan);
    assert_eq!(irqs.len(), 16);
    let cpus: BTreeSet<u32> = irqs.iter().map(|(_, c)| *c).collect();
    assert_eq!(cpus.len(), 16);
    assert!(cpus.iter().all(|&c| node(c) == Some(1)));
    assert!(!irqs.iter().any(|(irq, _)| *irq == 120));

    // Asking for 16 keeps the whole data plane on the NIC's node.
    let sixteen = crate::plan(
        &host,
        &PlanInput {
            shards: Some(16),
            ..input("203.0.113.10")
        },
    );
    assert_eq!(sixteen.shards, (16..32).collect::<Vec<u32>>());
    assert_eq!(sixteen.control, 0);

    // The wildcard follows the default route to the management NIC instead.
    assert_eq!(
        crate::plan(&host, &PlanInput::default()).nic.as_deref(),
        Some("eno1")
    );
}

#[test]
fn smt_host_vlan_on_i40e() {
    let host = host_of(&fixture("smt-1s-i40e"));
    assert!(host.irqbalance);
    let plan = plan(&host, &input("203.0.113.20"));
    println!("{}", plan.render_table());
    assert_eq!(plan.nic.as_deref(), Some("ens2f0.100"));
    assert_eq!(plan.queue_nics, vec!["ens2f0".to_string()]);
    assert_eq!(plan.shards, (1..8).collect::<Vec<u32>>());
    assert_eq!(plan.control, 0);
    assert_no_shard_siblings(&host, &plan);
    // 8 queues round-robin over 7 shards: queue 7 wraps to shard 0 (CPU 1).
    let irqs = irq_plan(&plan);
    assert_eq!(irqs.len(), 8);
    assert_eq!(irqs[0], (61, 1));
    assert_eq!(irqs[7], (68, 1));
    assert!(plan.notes.iter().any(|n| n.contains("irqbalance")));

    // 8 shards still avoid shard/shard SMT pairs: the 8th takes CPU 0's sibling.
    let eight = crate::plan(
        &host,
        &PlanInput {
            shards: Some(8),
            ..input("203.0.113.20")
        },
    );
    assert_no_shard_siblings(&host, &eight);
    assert_eq!(eight.shards.last(), Some(&8));
    assert_eq!(eight.control, 0);

    // 12 cannot avoid pairs, and says so; 40 is capped to leave the control a CPU.
    let twelve = crate::plan(
        &host,
        &PlanInput {
            shards: Some(12),
            ..input("203.0.113.20")
        },
    );
    assert_eq!(twelve.shards.len(), 12);
    assert!(twelve
        .notes
        .iter()
        .any(|n| n.contains("share a physical core")));
    let many = crate::plan(
        &host,
        &PlanInput {
            shards: Some(40),
            ..input("203.0.113.20")
        },
    );
    assert_eq!(many.shards.len(), 15);
    assert!(!many.shards.contains(&many.control));
}

#[test]
fn sysctl_targets() {
    let vm = host_of(&fixture("vm-2core"));
    let p = plan(&vm, &input("192.0.2.2"));
    assert_eq!(sysctl_value(&p, "net.core.rmem_max"), Some("8388608"));
    assert_eq!(
        sysctl_value(&p, "net.core.netdev_max_backlog"),
        Some("16384")
    );
    // The default ephemeral range overlaps the default relay range: moved below it.
    assert_eq!(
        sysctl_value(&p, "net.ipv4.ip_local_port_range"),
        Some("20920 49151")
    );
    let dropin = p.render_sysctl_dropin();
    assert!(dropin.contains("net.ipv4.ip_local_port_range = 20920 49151\n"));
    assert!(dropin.contains("net.core.rmem_max = 8388608\n"));

    // Already higher than the target: kept, never lowered.
    let smt = host_of(&fixture("smt-1s-i40e"));
    let p = plan(&smt, &input("203.0.113.20"));
    assert_eq!(sysctl_value(&p, "net.core.rmem_max"), Some("16777216"));
    // Overlapping, but the relay range is in ip_local_reserved_ports: kept.
    assert_eq!(
        sysctl_value(&p, "net.ipv4.ip_local_port_range"),
        Some("32768 60999")
    );

    // 31 shards: 31 MiB buffer ceiling.
    let big = host_of(&fixture("big-2s-mlx5"));
    let p = plan(&big, &input("203.0.113.10"));
    assert_eq!(
        sysctl_value(&p, "net.core.rmem_max"),
        Some(&*(31u64 << 20).to_string())
    );

    // A relay range low in the port space moves the ephemeral range above it.
    let p = plan(
        &vm,
        &PlanInput {
            relay_ports: (30000, 40000),
            ..input("192.0.2.2")
        },
    );
    let moved = sysctl_value(&p, "net.ipv4.ip_local_port_range").unwrap();
    let (a, b) = moved.split_once(' ').unwrap();
    let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(b < 30000 || a > 40000, "{moved} overlaps 30000-40000");

    // Many allocations on a small host raise udp_mem.
    let p = plan(
        &vm,
        &PlanInput {
            allocations: 100_000,
            ..input("192.0.2.2")
        },
    );
    let item = p
        .items
        .iter()
        .find(|i| i.item == "sysctl net.ipv4.udp_mem")
        .unwrap();
    let Action::Sysctl {
        want: Want::AtLeastEach(t),
        ..
    } = &item.action
    else {
        panic!("udp_mem is not a floor")
    };
    assert!(t[1] > 767738, "pressure {} not raised", t[1]);
}

#[test]
fn limits_and_governor() {
    let vm = host_of(&fixture("vm-2core"));
    let p = plan(&vm, &input("192.0.2.2"));
    let nofile = p.items.iter().find(|i| i.item == "limit nofile").unwrap();
    // 10000 allocations x 2 + 4096 + 64, rounded up to 1024.
    assert_eq!(nofile.planned, "24576");
    assert!(p
        .items
        .iter()
        .any(|i| i.item == "cpufreq governor" && i.current == "n/a"));

    let big = host_of(&fixture("big-2s-mlx5"));
    let p = plan(&big, &input("203.0.113.10"));
    // Limits are the running service's, not the shell's that runs `actrix tune`.
    assert_eq!(big.limits_of, "actrix pid 4242");
    let memlock = p.items.iter().find(|i| i.item == "limit memlock").unwrap();
    assert_eq!(
        memlock.planned, "unlimited",
        "an unlimited limit must not be lowered"
    );
    let gov = p
        .items
        .iter()
        .find(|i| i.item.starts_with("governor"))
        .unwrap();
    assert_eq!(
        (gov.current.as_str(), gov.planned.as_str()),
        ("powersave", "performance")
    );
}

fn apply_then_check(name: &str, listen: &str) -> (Vec<String>, Vec<actrix_tuning::Difference>) {
    let tree = TempTree::copy_of(name);
    let before = host_of(&tree.0);
    let p = plan(&before, &input(listen));
    let diffs = check(&p, &before);
    assert!(
        !diffs.is_empty(),
        "{name}: a fresh fixture should differ from its plan"
    );

    let changed = apply(&p, &tree.0).expect("apply");
    assert!(!changed.is_empty());
    assert!(tree.0.join("etc/sysctl.d/60-actrix.conf").is_file());
    let after = host_of(&tree.0);
    let left = check(&p, &after);
    // Applying again changes nothing.
    assert!(
        apply(&p, &tree.0).expect("re-apply").is_empty(),
        "{name}: apply not idempotent"
    );
    (changed, left)
}

#[test]
fn apply_fixes_everything_on_big_host() {
    let (changed, left) = apply_then_check("big-2s-mlx5", "203.0.113.10");
    assert!(left.is_empty(), "left: {left:#?}");
    assert!(changed
        .iter()
        .any(|c| c.starts_with("irq 121 affinity: 0-63 -> 16")));
    assert!(changed
        .iter()
        .any(|c| c.starts_with("governor performance on cpu 0-63")));
}

#[test]
fn apply_on_vm_leaves_only_restart_items() {
    let (changed, left) = apply_then_check("vm-2core", "192.0.2.2");
    assert!(changed.iter().any(|c| c.contains("ip_local_port_range")));
    assert!(changed.iter().any(|c| c.contains("60-actrix-limits.conf")));
    // The tool's own process limits only change when the service restarts with the
    // drop-in; everything else is fixed in place.
    assert!(!left.is_empty());
    assert!(
        left.iter().all(|d| d.fix == Fix::Restart),
        "left: {left:#?}"
    );
}

#[test]
fn check_detects_drift() {
    let tree = TempTree::copy_of("big-2s-mlx5");
    let p = plan(&host_of(&tree.0), &input("203.0.113.10"));
    apply(&p, &tree.0).unwrap();
    assert!(check(&p, &host_of(&tree.0)).is_empty());
    // Something (irqbalance, another tool) moves an IRQ and lowers a sysctl.
    fs::write(tree.0.join("proc/irq/125/smp_affinity_list"), "0-63\n").unwrap();
    fs::write(
        tree.0.join("proc/sys/net/core/netdev_max_backlog"),
        "1000\n",
    )
    .unwrap();
    let items: Vec<String> = check(&p, &host_of(&tree.0))
        .into_iter()
        .map(|d| d.item)
        .collect();
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(items[0].contains("netdev_max_backlog") || items[1].contains("netdev_max_backlog"));
}

#[test]
fn cli_modes_and_exit_codes() {
    let tree = TempTree::copy_of("vm-2core");
    let args = |apply: bool, check: bool, json: bool| TuneArgs {
        root: tree.0.clone(),
        listen: "192.0.2.2".parse::<IpAddr>().unwrap(),
        relay_ports: "49152-65535".parse().unwrap(),
        shards: None,
        allocations: 1000,
        apply,
        check,
        json,
    };
    let run = |a: TuneArgs| {
        let mut out = Vec::new();
        let code = run_with(&a, &mut out).unwrap();
        (code, String::from_utf8(out).unwrap())
    };
    let (code, text) = run(args(false, false, false));
    assert_eq!(code, 0);
    assert!(text.contains("dry run"));
    assert!(text.contains("[cores]"));
    assert!(!tree.0.join("etc").exists(), "dry run wrote files");

    let (code, _) = run(args(false, true, false));
    assert_eq!(code, 1, "check must fail before apply");

    let (code, text) = run(args(true, false, false));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("changed:"));
    // Only the memlock limit is left: it needs a service restart with the drop-in,
    // so --check still fails, and says how it gets fixed.
    let (code, text) = run(args(false, true, true));
    assert_eq!(code, 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["plan"]["control"], 0);
    let diffs = v["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{text}");
    assert_eq!(diffs[0]["item"], "limit memlock");
    assert_eq!(diffs[0]["fix"], "Restart");
}

#[test]
fn garbage_sysfs_degrades_with_notes() {
    let tree = TempTree::copy_of("smt-1s-i40e");
    let root = &tree.0;
    fs::write(root.join("sys/devices/system/cpu/online"), "banana\n").unwrap();
    fs::write(
        root.join("sys/devices/system/cpu/cpu3/topology/thread_siblings_list"),
        "3-\n",
    )
    .unwrap();
    fs::remove_file(root.join("sys/devices/system/cpu/cpu4/topology/core_id")).unwrap();
    fs::write(
        root.join("proc/interrupts"),
        "\u{0}\u{1} not interrupts\n 12: x y\n",
    )
    .unwrap();
    fs::write(
        root.join("proc/sys/net/ipv4/ip_local_port_range"),
        "a b c\n",
    )
    .unwrap();
    fs::write(root.join("proc/sys/net/ipv4/udp_mem"), "1 2\n").unwrap();
    fs::write(root.join("proc/self/limits"), "nonsense").unwrap();
    fs::remove_dir_all(root.join("sys/devices/system/node")).unwrap();
    let host = host_of(root);
    assert_eq!(host.cpus.len(), 16, "falls back to the cpuN directories");
    assert!(host.notes.iter().any(|n| n.contains("cpu/online")));
    assert!(host
        .notes
        .iter()
        .any(|n| n.contains("thread_siblings_list")));
    let p = plan(&host, &input("203.0.113.20"));
    assert!(!p.shards.is_empty());
    assert!(!p.shards.contains(&p.control));
    assert!(irq_plan(&p).is_empty());
    assert!(p.notes.iter().any(|n| n.contains("no queue IRQs")));
    let table = p.render_table();
    assert!(table.contains("ip_local_port_range"));
}
