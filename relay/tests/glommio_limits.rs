//! The glommio backend needs RLIMIT_MEMLOCK of at least 512 KiB for its io_uring rings: with
//! less, `actrix check` and `actrix run` refuse with an error that says what to raise, instead
//! of a glommio panic or a silent fallback.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The binary with RLIMIT_MEMLOCK lowered to `kib` KiB.
fn actrix_with_memlock(kib: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_actrix"));
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: kib * 1024,
                rlim_max: kib * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn config(dir: &std::path::Path, backend: &str) -> std::path::PathBuf {
    let port = common::free_udp_port();
    let http = common::free_tcp_port();
    let path = dir.join("actrix.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\ndata_dir = \"{}\"\n[cores]\npin = false\n[stun]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [turn]\nrelay_port_range = \"61000-61099\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [io]\nbackend = \"{backend}\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_and_run_refuse_glommio_under_a_low_memlock_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "glommio");
    for cmd in ["check", "run"] {
        let out = actrix_with_memlock(256)
            .args([cmd, "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("io.backend = glommio needs RLIMIT_MEMLOCK of at least 512 KiB")
                && err.contains("this process has 256 KiB")
                && err.contains("LimitMEMLOCK"),
            "{cmd}: {err}"
        );
    }
    // The same limit is no problem for the default backend, and enough memlock is no problem
    // for glommio.
    let ok = actrix_with_memlock(256)
        .args(["check", "-c"])
        .arg(config(tmp.path(), "mmsg"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = actrix_with_memlock(8192)
        .args(["check", "-c"])
        .arg(config(tmp.path(), "glommio"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
