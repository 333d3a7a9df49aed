//! `actrix tune`: the command-line front of observe → plan → apply/check.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use serde::Serialize;

use crate::addrs::{fixture_addresses, live_addresses};
use crate::apply::{apply, check, limits_dropin, Difference, Fix, SYSCTL_DROPIN};
use crate::observe::{is_live_root, observe, Host};
use crate::plan::{plan, Plan, PlanInput};
use crate::render::render_differences;

/// An inclusive port range written `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
        let min: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
        let max: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
        if min == 0 || min > max {
            return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
        }
        Ok(PortRange { min, max })
    }
}

/// Arguments of `actrix tune`. Without `--apply` or `--check` it is a dry run that
/// prints the plan, the `[cores]` config snippet and the sysctl drop-in.
#[derive(Debug, Clone, clap::Args)]
pub struct TuneArgs {
    /// Read (and with --apply, write) the host under this directory instead of /.
    #[arg(long, hide = true, default_value = "/")]
    pub root: PathBuf,
    /// STUN/TURN listen IP; the wildcard means the NIC of the default route.
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub listen: IpAddr,
    /// Relay port range; the ephemeral port range is moved out of it.
    #[arg(long, value_name = "MIN-MAX", default_value = "49152-65535")]
    pub relay_ports: PortRange,
    /// Data-plane shard count (default: one per physical core but one).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub shards: Option<u16>,
    /// Expected concurrent TURN allocations (sizes udp_mem and the open-file limit).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub allocations: u64,
    /// Change the host: write sysctls, IRQ affinities, governors and drop-in files.
    #[arg(long)]
    pub apply: bool,
    /// Exit non-zero when the running host differs from the plan.
    #[arg(long)]
    pub check: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl TuneArgs {
    pub fn plan_input(&self) -> PlanInput {
        PlanInput {
            listen: self.listen,
            relay_ports: (self.relay_ports.min, self.relay_ports.max),
            shards: self.shards.map(usize::from),
            allocations: self.allocations,
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    mode: &'static str,
    host: &'a Host,
    plan: &'a Plan,
    config_snippet: String,
    sysctl_dropin: String,
    changed: Vec<String>,
    differences: Vec<Difference>,
    exit_code: i32,
}

/// Runs `actrix tune`, printing to stdout. Returns the process exit code: 0, or 1
/// when `--check` finds differences (or `--apply` leaves some it could have fixed).
pub fn run_cli(args: TuneArgs) -> anyhow::Result<i32> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_with(&args, &mut out)
}

/// [`run_cli`] with the output going to `out` (for tests).
pub fn run_with(args: &TuneArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let root = args.root.as_path();
    let live = is_live_root(root);
    let read_host = || -> anyhow::Result<Host> {
        let (addrs, notes) = if live {
            (live_addresses().context("getifaddrs")?, Vec::new())
        } else {
            fixture_addresses(root)
        };
        let mut host = observe(root, &addrs);
        host.notes.extend(notes);
        Ok(host)
    };
    let host = read_host()?;
    let input = args.plan_input();
    let the_plan = plan(&host, &input);

    let mut changed = Vec::new();
    let (host_after, mode) = if args.apply {
        changed = apply(&the_plan, root)?;
        (read_host()?, "apply")
    } else {
        (host, if args.check { "check" } else { "dry-run" })
    };
    let differences = check(&the_plan, &host_after);
    let exit_code = if args.check {
        i32::from(!differences.is_empty())
    } else if args.apply {
        i32::from(differences.iter().any(|d| d.fix == Fix::Apply))
    } else {
        0
    };

    if args.json {
        let report = Report {
            mode,
            host: &host_after,
            plan: &the_plan,
            config_snippet: the_plan.render_config_snippet(),
            sysctl_dropin: the_plan.render_sysctl_dropin(),
            changed,
            differences,
            exit_code,
        };
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
        return Ok(exit_code);
    }

    writeln!(out, "{}", the_plan.render_table())?;
    match mode {
        "dry-run" => {
            writeln!(out, "# [cores] section for the actrix config:")?;
            writeln!(out, "{}", the_plan.render_config_snippet())?;
            writeln!(out, "# would write /{SYSCTL_DROPIN}:")?;
            writeln!(out, "{}", the_plan.render_sysctl_dropin())?;
            let limits = limits_dropin(&the_plan);
            if !limits.is_empty() {
                writeln!(out, "# would write /{}:", crate::apply::LIMITS_DROPIN)?;
                writeln!(out, "{limits}")?;
            }
            write!(out, "{}", render_differences(&differences))?;
            writeln!(
                out,
                "dry run: nothing changed (use --apply to change, --check to verify)"
            )?;
        }
        "apply" => {
            if changed.is_empty() {
                writeln!(out, "nothing to change")?;
            } else {
                writeln!(out, "changed:")?;
                for c in &changed {
                    writeln!(out, "  {c}")?;
                }
            }
            writeln!(out)?;
            writeln!(out, "# [cores] section for the actrix config:")?;
            writeln!(out, "{}", the_plan.render_config_snippet())?;
            write!(out, "{}", render_differences(&differences))?;
        }
        _ => write!(out, "{}", render_differences(&differences))?,
    }
    Ok(exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range() {
        assert_eq!(
            "1000-2000".parse::<PortRange>(),
            Ok(PortRange {
                min: 1000,
                max: 2000
            })
        );
        assert!("2000-1000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("x".parse::<PortRange>().is_err());
    }

    #[test]
    fn clap_definition_is_valid() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            tune: TuneArgs,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tune",
            "--listen",
            "192.0.2.2",
            "--relay-ports",
            "40000-50000",
            "--shards",
            "3",
            "--check",
        ])
        .expect("parses");
        assert_eq!(cli.tune.plan_input().relay_ports, (40000, 50000));
        assert_eq!(cli.tune.plan_input().shards, Some(3));
        assert!(Cli::try_parse_from(["tune", "--shards", "0"]).is_err());
    }
}
