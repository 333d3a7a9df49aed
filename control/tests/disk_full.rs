//! Reliability checklist K9: the disk under the Key Server's and the control databases fills
//! up (ENOSPC on commit). Requests that need a commit are refused cleanly and return no key,
//! the service stays up, nothing acknowledged before or during is lost, and everything
//! works again once space is freed. The data directory is a 4 MiB tmpfs mounted for the test
//! (tests run as root here and in CI).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, size: &str) -> Tmpfs<'a> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount(8)");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (tests run as root)"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// Fill the filesystem of `dir` until ENOSPC; returns the filler's path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc_enospc()), "{e}");
                break;
            }
        }
    }
    // The last partial blocks too.
    while f.write(&[0u8; 512]).map(|n| n > 0).unwrap_or(false) {}
    path
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_full_disk_refuses_cleanly_loses_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _fs = Tmpfs::mount(&data, "4m");
    let h = start(config(&data));
    let base = base(&h);
    let mut n = 0;
    let mut next = || {
        n += 1;
        cred(now(), &format!("disk-full-{n}"), "generate_key")
    };
    // Acknowledged before the disk fills.
    let mut acknowledged = Vec::new();
    for _ in 0..3 {
        let (st, body) = generate(&base, &next());
        assert_eq!(st, 200, "{body}");
        acknowledged.push(body["key_id"].as_u64().unwrap() as u32);
    }
    let filler = fill(&data);
    // Keep asking until a commit needs space the disk does not have: every answer is either
    // a key (committed: it must survive) or a clean refusal, never a hang or a crash.
    let mut refused = 0;
    for _ in 0..200 {
        let (st, body) = generate(&base, &next());
        match st {
            200 => acknowledged.push(body["key_id"].as_u64().unwrap() as u32),
            500 | 503 => {
                assert!(
                    body.get("key_id").is_none(),
                    "no key with a refusal: {body}"
                );
                if refused == 0 {
                    eprintln!("refused with {st}: {body}");
                }
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(refused >= 5, "the full disk was noticed");
    eprintln!(
        "disk full: {} keys acknowledged in all, {refused} refused",
        acknowledged.len()
    );
    // Still up: health, reads of what was acknowledged.
    assert_eq!(get(&base, "/healthz").0, 200);
    // An AIS registration: its serial and its key are on disk already, so it may be served;
    // what it must not do is fail half-way or take the process down.
    let reg = agent()
        .post(format!("{base}/ais/register"))
        .header("content-type", "application/octet-stream")
        .send(&[][..]);
    assert!(reg.is_ok(), "the AIS answers: {reg:?}");
    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    let (st, body) = generate(&base, &next());
    assert_eq!(st, 200, "recovered: {body}");
    acknowledged.push(body["key_id"].as_u64().unwrap() as u32);
    for (i, key_id) in acknowledged.iter().enumerate() {
        let c = cred(
            now(),
            &format!("read-{i}"),
            &format!("get_secret_key:{key_id}"),
        );
        let (st, body) = secret(&base, *key_id, &c);
        assert_eq!(st, 200, "acknowledged key {key_id} readable: {body}");
    }
    h.shutdown().unwrap();
    // The databases are intact.
    for db in ["ks.db", "control.db"] {
        let conn = rusqlite::Connection::open(data.join(db)).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{db}");
    }
}
