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
