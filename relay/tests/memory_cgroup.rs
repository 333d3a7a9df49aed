//! Reliability checklist C4, memory: the appliance in a memory cgroup whose limit holds fewer
//! allocations than `turn.max_allocations`. Clients filling it get 486 at the cap the start
//! derived from the limit, never an OOM kill; under pressure (the limit lowered to just above
//! the usage while running) every new Allocate is refused while existing allocations keep
//! working; when the pressure lifts, allocations are accepted again.

mod common;

use actrix_proto::stun::{attr, method};
use common::{Appliance, Launch, TurnClient};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PER_ALLOCATION: u64 = 4096;
const HEADROOM: u64 = 16 << 20;
/// The cap the limit is chosen to give (measured usage + headroom + this many allocations).
const TARGET: u64 = 600;

/// A memory cgroup made for the test (v1 or v2), removed on drop.
struct Cgroup {
    dir: PathBuf,
    limit: &'static str,
    usage: &'static str,
    oom_events: &'static str,
}

impl Cgroup {
    fn make(name: &str) -> Option<Cgroup> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let cg = if v1.join("memory.limit_in_bytes").exists() {
            Cgroup {
                dir: v1.join(name),
                limit: "memory.limit_in_bytes",
                usage: "memory.usage_in_bytes",
                oom_events: "memory.oom_control",
            }
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            Cgroup {
                dir: v2.join(name),
                limit: "memory.max",
                usage: "memory.current",
                oom_events: "memory.events",
            }
        } else {
            return None;
        };
        let _ = std::fs::remove_dir(&cg.dir);
        std::fs::create_dir(&cg.dir).ok()?;
        Some(cg)
    }

    fn usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(self.usage))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn set_limit(&self, bytes: u64) -> std::io::Result<()> {
        std::fs::write(self.dir.join(self.limit), bytes.to_string())
    }

    /// OOM kills in the cgroup ("oom_kill N" in v1's memory.oom_control and v2's
    /// memory.events).
    fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(self.oom_events))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn config() -> String {
    let relays: Vec<String> = (2..=9).map(|i| format!("\"127.0.0.{i}\"")).collect();
    format!(
        "[turn]\nmax_allocations = 100000\nmax_allocations_per_user = 100000\n\
         relay_addresses = [{}]\nchallenges_per_source_per_sec = 100000\n\
         users = [{{ name = \"alice\", password = \"alice-password\" }}]\n\
         [io]\nrelay_socket_pool = 0\n",
        relays.join(", ")
    )
}

fn start(dir: &Path, cg: &Cgroup) -> Appliance {
    Appliance::launch(
        dir,
        &config(),
        Launch {
            sections: &[("cores", "shards = [0]")],
            cgroup: Some(&cg.dir),
            ..Launch::default()
        },
    )
}

fn client(app: &Appliance) -> TurnClient {
    TurnClient::new(app.stun, b"alice", b"alice-password", "actor-rtc.local")
}

fn allocate(c: &mut TurnClient) -> Option<u16> {
    c.allocate(3).expect("the Allocate is answered").code()
}

fn raise_own_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

#[test]
fn a_memory_limit_caps_allocations_and_pressure_refuses_new_ones_without_an_oom_kill() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: creating a memory cgroup needs root");
        return;
    }
    let name = format!("actrix-c4-{}", std::process::id());
    let Some(probe) = Cgroup::make(&format!("{name}-probe")) else {
        eprintln!(
            "SKIP: no writable memory cgroup hierarchy (v1 memory or v2 with memory delegated)"
        );
        return;
    };
    raise_own_nofile();

    // What the appliance uses at start with this configuration, without a limit.
    let tmp = tempfile::tempdir().unwrap();
    let used = {
        let app = start(tmp.path(), &probe);
        assert!(
            !app.early_log
                .iter()
                .any(|l| l.contains("memory cgroup limit")),
            "no limit, no cap: {:#?}",
            app.early_log
        );
        std::thread::sleep(Duration::from_millis(500));
        probe.usage()
    };
    drop(probe);

    // A limit that holds about TARGET allocations beyond that.
    let cg = Cgroup::make(&name).expect("second cgroup");
    let limit = used + HEADROOM + TARGET * PER_ALLOCATION;
    cg.set_limit(limit).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let app = start(tmp.path(), &cg);
    let line = app
        .early_log
        .iter()
        .find(|l| l.contains("new allocations are capped at"))
        .cloned()
        .unwrap_or_else(|| panic!("no cap logged: {:#?}", app.early_log));
    let cap: usize = line
        .split("cap=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cap in {line}"));
    // The usage at start moves a little between runs; the cap follows it.
    assert!(
        (100..=1500).contains(&cap),
        "cap {cap} far from the {TARGET} the limit was sized for: {line}"
    );

    // Fill it: exactly `cap` allocations, then 486 (the quota answer), and the process lives.
    let t0 = Instant::now();
    let mut held: Vec<TurnClient> = Vec::with_capacity(cap);
    for i in 0..cap {
        let mut c = client(&app);
        assert_eq!(allocate(&mut c), None, "allocation {i} of {cap}");
        held.push(c);
    }
    let mut extra = client(&app);
    assert_eq!(allocate(&mut extra), Some(486), "over the memory cap");
    assert!(t0.elapsed() < Duration::from_secs(60));
    let mut app = app;
    assert!(app.child.try_wait().unwrap().is_none(), "alive at the cap");
    assert_eq!(cg.oom_kills(), 0, "no OOM kill");

    // Pressure: the limit lowered to just above the usage (as an operator or a sibling's
    // growth would); every new Allocate is refused, the held ones keep answering.
    let now = cg.usage();
    let tight = (now as f64 / 0.95) as u64;
    cg.set_limit(tight).unwrap();
    app.wait_log("memory pressure: new allocations refused");
    for c in held.iter_mut().take(10) {
        let r = c
            .call(
                method::REFRESH,
                &[(attr::LIFETIME, 0u32.to_be_bytes().to_vec())],
                3,
            )
            .expect("Refresh answered");
        assert_eq!(r.code(), None, "a held allocation is deleted normally");
    }
    let mut fresh = client(&app);
    assert_eq!(
        allocate(&mut fresh),
        Some(486),
        "under pressure, below the cap"
    );
    let r = held[20]
        .call(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            3,
        )
        .expect("Refresh answered");
    assert_eq!(r.code(), None, "existing allocations keep working");

    // The pressure lifts: new allocations again, up to the cap.
    cg.set_limit(limit * 4).unwrap();
    app.wait_log("memory pressure lifted");
    for _ in 0..10 {
        let mut c = client(&app);
        assert_eq!(allocate(&mut c), None, "accepted after the pressure");
        held.push(c);
    }
    assert!(app.child.try_wait().unwrap().is_none());
    assert_eq!(cg.oom_kills(), 0);
    drop(app);
}
