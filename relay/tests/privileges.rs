//! Privilege drop, PID file and file logging on the real binary (needs root; skipped
//! otherwise, with a message).

mod common;

use common::TurnClient;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn drops_to_the_configured_user_after_binding_and_keeps_working() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to test the switch to another user");
        return;
    }
    let Some((uid, _)) = actrix::privileges::lookup_user("nobody") else {
        eprintln!("skipped: no user 'nobody' on this host");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = common::free_udp_port();
    let http = common::free_tcp_port();
    let pid_file = tmp.path().join("actrix.pid");
    let log_file = tmp.path().join("logs").join("actrix.log");
    std::fs::create_dir_all(log_file.parent().unwrap()).unwrap();
    let cfg = tmp.path().join("actrix.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndata_dir = \"{}\"\nuser = \"nobody\"\npid_file = \"{}\"\n[log]\nfile = \"{}\"\nrotation = \"never\"\n[cores]\npin = false\n[stun]\nlisten = [\"127.0.0.1:{port}\"]\n[http]\nlisten = \"127.0.0.1:{http}\"\n[turn]\nrelay_port_range = \"62000-62099\"\nshutdown_grace_secs = 1\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\n",
            tmp.path().join("data").display(),
            pid_file.display(),
            log_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let log_path = || {
        std::fs::read_dir(log_file.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("actrix.log")
            })
    };
    loop {
        if let Some(p) = log_path() {
            if std::fs::read_to_string(&p)
                .unwrap_or_default()
                .contains("actrix ready")
            {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "actrix exited early");
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uids.split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "{uids}"
    );
    let log = std::fs::read_to_string(log_path().unwrap()).unwrap();
    assert!(log.contains("dropped root privileges"), "{log}");

    // Still serving: relay sockets are bound after the switch.
    let mut c = TurnClient::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
        b"alice",
        b"secret-pass",
        "actor-rtc.local",
    );
    assert_eq!(c.allocate(3).unwrap().code(), None);

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "clean exit after the drain: {st}");
}
