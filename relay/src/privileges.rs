//! Dropping root after the sockets are bound, and the PID file.

use std::ffi::CString;
use std::path::Path;

/// (uid, primary gid) of a user name.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy the fields at
    // once, on the main thread before other lookups.
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        if pw.is_null() {
            return None;
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

pub fn lookup_group(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: as above, for getgrnam.
    unsafe {
        let gr = libc::getgrnam(c.as_ptr());
        if gr.is_null() {
            return None;
        }
        Some((*gr).gr_gid)
    }
}

/// Give `dir` and the files directly in it to `uid:gid`, so the services can keep writing
/// their databases after the switch.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        std::os::unix::fs::chown(e?.path(), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Switch the whole process (every thread: glibc applies set*id to all of them) to `user` and
/// `group` (default: the user's primary group), dropping supplementary groups. Only when
/// running as root; a no-op otherwise.
pub fn drop_to(user: &str, group: &str) -> Result<Option<(u32, u32)>, String> {
    if user.is_empty() {
        return Ok(None);
    }
    // SAFETY: plain syscalls.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let (uid, primary) = lookup_user(user).ok_or_else(|| format!("no user named '{user}'"))?;
    let gid = if group.is_empty() {
        primary
    } else {
        lookup_group(group).ok_or_else(|| format!("no group named '{group}'"))?
    };
    // SAFETY: plain syscalls; order matters (groups, gid, then uid).
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(format!("setresgid: {}", std::io::Error::last_os_error()));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(format!("setresuid: {}", std::io::Error::last_os_error()));
        }
        // Regaining root must now fail.
        if libc::setuid(0) == 0 {
            return Err("privileges could be regained after the switch".into());
        }
    }
    Ok(Some((uid, gid)))
}

/// Write the PID file; the returned guard removes it on drop.
pub struct PidFile(std::path::PathBuf);

impl PidFile {
    pub fn create(path: &str) -> std::io::Result<Option<PidFile>> {
        if path.is_empty() {
            return Ok(None);
        }
        std::fs::write(path, format!("{}\n", std::process::id()))?;
        Ok(Some(PidFile(path.into())))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
