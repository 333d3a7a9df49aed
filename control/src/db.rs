//! SQLite connection setup shared by the stores.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use crate::error::ControlError;

/// Open `path` in WAL mode with `synchronous=FULL`: a commit that returned is on disk, so an
/// acknowledged key or a recorded nonce survives a crash or a power cut.
pub(crate) fn open(path: &Path) -> Result<Connection, ControlError> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            std::fs::create_dir_all(parent).map_err(|e| ControlError::io(parent, e))?;
        }
    }
    private_file(path).map_err(|e| ControlError::io(path, e))?;
    let conn = Connection::open(path).map_err(|e| ControlError::db(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| ControlError::db(path, e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| ControlError::db(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ControlError::db(
            path,
            format!("cannot switch to WAL mode (got {mode})"),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| ControlError::db(path, e))?;
    // Deleted secrets must not linger in free pages.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(|e| ControlError::db(path, e))?;
    Ok(conn)
}

/// Make `path` an owner-only (0600) file before SQLite opens it: created with that mode when
/// missing (so it is never readable by others, not even for a moment), tightened when it
/// exists with a wider one (a database made by an older version). SQLite gives the WAL and
/// shared-memory files it creates next to a database the database file's mode, so they are
/// owner-only too; existing ones are tightened here as well.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        match std::fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Restrict a database file (and its WAL/SHM side files, when present) to the owner.
pub(crate) fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if p.exists() {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
    }
}
