//! Applying a plan to a host tree, and checking a host against a plan.
//!
//! Both only touch what the plan's [`Action`]s name. Values are floors, so a host
//! already above a target is left alone and counts as matching.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cpulist::{format_list, parse_list};
use crate::observe::{is_live_root, normalize, sysctl_path, Host, LimitValue};
use crate::plan::{
    overlaps, parse_ports, reserved_covers, Action, Plan, Resource, Want, SERVICE_UNIT,
};

/// Where the sysctl drop-in goes, relative to the root.
pub const SYSCTL_DROPIN: &str = "etc/sysctl.d/60-actrix.conf";
/// Where the resource-limit drop-in for the service goes, relative to the root.
pub const LIMITS_DROPIN: &str = "etc/systemd/system/actrix.service.d/60-actrix-limits.conf";

/// How a difference gets fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fix {
    /// `--apply` fixes it on the running host.
    Apply,
    /// `--apply` writes the unit drop-in; the service must be restarted.
    Restart,
}

/// One plan line the running host does not meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub item: String,
    pub current: String,
    pub planned: String,
    pub reason: String,
    pub fix: Fix,
}

/// Whether a sysctl value meets the plan. `reserved` is the host's
/// ip_local_reserved_ports (only consulted for [`Want::Avoids`]).
pub fn sysctl_satisfied(want: &Want, current: &str, reserved: Option<&str>) -> bool {
    let nums: Option<Vec<u64>> = current.split_whitespace().map(|w| w.parse().ok()).collect();
    match want {
        Want::AtLeast(t) => matches!(nums.as_deref(), Some([v]) if v >= t),
        Want::AtLeastEach(ts) => {
            nums.is_some_and(|v| v.len() == ts.len() && v.iter().zip(ts).all(|(v, t)| v >= t))
        }
        Want::Avoids(a, b) => {
            let Some([lo, hi]) = nums.as_deref() else {
                return false;
            };
            let (Ok(lo), Ok(hi)) = (u16::try_from(*lo), u16::try_from(*hi)) else {
                return false;
            };
            let reserved = reserved.and_then(parse_ports).unwrap_or_default();
            !overlaps((lo, hi), (*a, *b)) || reserved_covers(&reserved, (*a, *b))
        }
    }
}

/// The plan lines `host` does not meet; empty when the host matches. Informational
/// lines (layout, hints, kept values) never differ.
pub fn check(plan: &Plan, host: &Host) -> Vec<Difference> {
    let mut out = Vec::new();
    for item in &plan.items {
        let mut diff = |current: String, fix: Fix| {
            out.push(Difference {
                item: item.item.clone(),
                current,
                planned: item.planned.clone(),
                reason: item.reason.clone(),
                fix,
            })
        };
        match &item.action {
            Action::Info => {}
            Action::Sysctl { key, want, .. } => {
                let reserved = host
                    .sysctls
                    .get("net.ipv4.ip_local_reserved_ports")
                    .map(String::as_str);
                match host.sysctls.get(key) {
                    Some(v) if sysctl_satisfied(want, v, reserved) => {}
                    Some(v) => diff(v.clone(), Fix::Apply),
                    None => diff("unreadable".into(), Fix::Apply),
                }
            }
            Action::IrqAffinity { irq, cpus } => {
                let found = host
                    .nics
                    .iter()
                    .flat_map(|n| &n.irqs)
                    .find(|i| i.number == *irq);
                match found.map(|i| i.affinity.as_deref()) {
                    Some(Some(aff)) if same_set(aff, cpus) => {}
                    Some(Some(aff)) => diff(format_list(aff), Fix::Apply),
                    Some(None) => diff("unreadable".into(), Fix::Apply),
                    None => diff("IRQ gone".into(), Fix::Apply),
                }
            }
            Action::Governor { cpus, governor } => {
                let wrong: Vec<u32> = cpus
                    .iter()
                    .copied()
                    .filter(|id| {
                        host.cpu(*id).and_then(|c| c.governor.as_deref()) != Some(governor.as_str())
                    })
                    .collect();
                if !wrong.is_empty() {
                    diff(
                        format!("not {governor} on cpu {}", format_list(&wrong)),
                        Fix::Apply,
                    );
                }
            }
            Action::Limit { resource, min, .. } => {
                let limit = match resource {
                    Resource::Nofile => host.limits.nofile,
                    Resource::Memlock => host.limits.memlock,
                };
                match limit {
                    Some(l) if l.soft.at_least(*min) => {}
                    Some(l) => diff(l.soft.to_string(), Fix::Restart),
                    None => diff("unknown".into(), Fix::Restart),
                }
            }
        }
    }
    out
}

fn same_set(a: &[u32], b: &[u32]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    a.dedup();
    b.sort_unstable();
    b.dedup();
    a == b
}

/// Applies `plan` under `root`; returns what changed, one line each.
///
/// Writes the sysctl drop-in and the service's limit drop-in (only when their
/// content differs), then the /proc/sys values, IRQ affinities and governors the
/// host does not yet meet. Every write is attempted; if any fails (a kernel-managed
/// IRQ refuses a new affinity with EIO, a value is clamped) the error lists both the
/// failures and what did change. Refuses to touch `/` unless running as root.
pub fn apply(plan: &Plan, root: &Path) -> anyhow::Result<Vec<String>> {
    if is_live_root(root) {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            bail!("--apply on the live host needs root (euid is {euid})");
        }
    }
    let mut changed = Vec::new();
    let mut failed = Vec::new();

    write_file_if_changed(
        root,
        SYSCTL_DROPIN,
        &plan.render_sysctl_dropin(),
        &mut changed,
    )?;
    let limits = limits_dropin(plan);
    if !limits.is_empty() {
        let before = changed.len();
        write_file_if_changed(root, LIMITS_DROPIN, &limits, &mut changed)?;
        if changed.len() > before {
            changed.push(format!(
                "  (limits take effect after `systemctl daemon-reload` and a restart of {SERVICE_UNIT})"
            ));
        }
    }

    let reserved = fs::read_to_string(sysctl_path(root, "net.ipv4.ip_local_reserved_ports")).ok();
    for item in &plan.items {
        match &item.action {
            Action::Sysctl { key, value, want } => {
                let path = sysctl_path(root, key);
                let current = fs::read_to_string(&path).map(|v| normalize(&v));
                if let Ok(cur) = &current {
                    if sysctl_satisfied(want, cur, reserved.as_deref()) {
                        continue;
                    }
                }
                let before = current.unwrap_or_else(|_| "?".into());
                match write_existing(&path, value) {
                    Ok(()) => match fs::read_to_string(&path).map(|v| normalize(&v)) {
                        Ok(now) if now == normalize(value) => {
                            changed.push(format!("{key}: {before} -> {value}"))
                        }
                        Ok(now) => failed.push(format!("{key}: wrote {value}, kernel kept {now}")),
                        Err(e) => {
                            failed.push(format!("{key}: wrote {value}, read back failed: {e}"))
                        }
                    },
                    Err(e) => failed.push(format!("{key}: {e}")),
                }
            }
            Action::IrqAffinity { irq, cpus } => {
                let path = root.join(format!("proc/irq/{irq}/smp_affinity_list"));
                let current = fs::read_to_string(&path).ok();
                let parsed = current.as_deref().and_then(parse_list);
                if parsed.as_deref().is_some_and(|c| same_set(c, cpus)) {
                    continue;
                }
                let want = format_list(cpus);
                let before = current.map_or("?".into(), |c| c.trim().to_string());
                match write_existing(&path, &want) {
                    Ok(()) => changed.push(format!("irq {irq} affinity: {before} -> {want}")),
                    Err(e) => failed.push(format!("irq {irq} affinity {want}: {e}")),
                }
            }
            Action::Governor { cpus, governor } => {
                let mut done = Vec::new();
                for cpu in cpus {
                    let path = root.join(format!(
                        "sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"
                    ));
                    let current = fs::read_to_string(&path).unwrap_or_default();
                    if current.trim() == governor {
                        continue;
                    }
                    match write_existing(&path, governor) {
                        Ok(()) => done.push(*cpu),
                        Err(e) => failed.push(format!("cpu{cpu} governor {governor}: {e}")),
                    }
                }
                if !done.is_empty() {
                    changed.push(format!("governor {governor} on cpu {}", format_list(&done)));
                }
            }
            Action::Info | Action::Limit { .. } => {}
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} change(s) failed:\n  {}\nchanged:\n  {}",
            failed.len(),
            failed.join("\n  "),
            if changed.is_empty() {
                "nothing".to_string()
            } else {
                changed.join("\n  ")
            }
        );
    }
    Ok(changed)
}

/// The systemd drop-in body for the limit lines, empty when the plan has none.
pub fn limits_dropin(plan: &Plan) -> String {
    let mut body = String::new();
    for item in &plan.items {
        if let Action::Limit {
            resource, value, ..
        } = &item.action
        {
            let v = match value {
                LimitValue::Unlimited => "infinity".to_string(),
                LimitValue::Value(v) => v.to_string(),
            };
            body.push_str(&format!(
                "# {}\n{}={v}\n",
                item.reason,
                resource.systemd_key()
            ));
        }
    }
    if body.is_empty() {
        return body;
    }
    format!("# Written by `actrix tune`; limits for {SERVICE_UNIT}.\n[Service]\n{body}")
}

/// Writes a /proc or /sys file. Never creates one: a missing knob means this kernel
/// does not have it, and creating a regular file in a fixture would hide that.
fn write_existing(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(format!("{value}\n").as_bytes())
}

fn write_file_if_changed(
    root: &Path,
    rel: &str,
    content: &str,
    changed: &mut Vec<String>,
) -> anyhow::Result<()> {
    let path: PathBuf = root.join(rel);
    if fs::read_to_string(&path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    changed.push(format!("wrote /{rel}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn satisfied() {
        assert!(sysctl_satisfied(&Want::AtLeast(10), "12", None));
        assert!(!sysctl_satisfied(&Want::AtLeast(10), "9", None));
        assert!(!sysctl_satisfied(&Want::AtLeast(10), "garbage", None));
        assert!(sysctl_satisfied(
            &Want::AtLeastEach(vec![1, 2, 3]),
            "1 2 3",
            None
        ));
        assert!(!sysctl_satisfied(
            &Want::AtLeastEach(vec![1, 2, 3]),
            "1 2",
            None
        ));
        let avoid = Want::Avoids(49152, 65535);
        assert!(!sysctl_satisfied(&avoid, "32768 60999", None));
        assert!(sysctl_satisfied(&avoid, "20920 49151", None));
        assert!(sysctl_satisfied(&avoid, "32768 60999", Some("49152-65535")));
        assert!(!sysctl_satisfied(&avoid, "32768 99999", None));
    }
}
