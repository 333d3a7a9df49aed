//! Realms (tenants) and their validity (wire reference section 8.6).
//!
//! A realm is valid when its row exists, its status is `Normal` and it has not expired (a NULL
//! expiry never expires; otherwise `now > expires_at` is expired, so 0 counts as expired).
//! Realms are provisioned out of band: [`provision_realm`], [`RealmStore::upsert`], or the
//! signed admin route `PUT /ais/realms/{realm_id}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::ControlError;

/// Realm status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RealmStatus {
    Normal,
    Suspended,
    Terminated,
}

impl RealmStatus {
    fn as_str(self) -> &'static str {
        match self {
            RealmStatus::Normal => "Normal",
            RealmStatus::Suspended => "Suspended",
            RealmStatus::Terminated => "Terminated",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "Normal" => Some(RealmStatus::Normal),
            "Suspended" => Some(RealmStatus::Suspended),
            "Terminated" => Some(RealmStatus::Terminated),
            _ => None,
        }
    }
}

/// A realm row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realm {
    pub realm_id: u32,
    pub name: String,
    pub status: RealmStatus,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
}

/// Why a realm is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealmError {
    #[error("realm not found")]
    NotFound,
    #[error("realm suspended")]
    Suspended,
    #[error("realm terminated")]
    Terminated,
    #[error("realm expired")]
    Expired,
    #[error("realm store failure: {0}")]
    Storage(String),
}

/// Handle to the realms table. Clones share one connection.
#[derive(Clone)]
pub struct RealmStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for RealmStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealmStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Longest accepted realm name.
pub const MAX_REALM_NAME: usize = 256;

impl RealmStore {
    /// Open (or create) the realms table in the database at `path`.
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        let conn = crate::db::open(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS realms (
                 realm_id   INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 status     TEXT NOT NULL CHECK (status IN ('Normal', 'Suspended', 'Terminated')),
                 expires_at INTEGER NULL,
                 updated_at INTEGER NOT NULL DEFAULT (strftime('%s', 'now'))
             );",
        )
        .map_err(|e| ControlError::db(path, e))?;
        crate::db::restrict_permissions(path);
        Ok(RealmStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, RealmError> {
        self.conn
            .lock()
            .map_err(|_| RealmError::Storage("lock poisoned".into()))
    }

    /// Insert or replace a realm.
    pub fn upsert(&self, realm: &Realm) -> Result<(), RealmError> {
        if realm.name.len() > MAX_REALM_NAME {
            return Err(RealmError::Storage(format!(
                "realm name longer than {MAX_REALM_NAME} bytes"
            )));
        }
        let conn = self.lock()?;
        conn.execute(
            "INSERT INTO realms (realm_id, name, status, expires_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, strftime('%s', 'now'))
             ON CONFLICT (realm_id) DO UPDATE SET
                 name = excluded.name, status = excluded.status,
                 expires_at = excluded.expires_at, updated_at = excluded.updated_at",
            params![
                i64::from(realm.realm_id),
                realm.name,
                realm.status.as_str(),
                realm
                    .expires_at
                    .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            ],
        )
        .map_err(|e| RealmError::Storage(e.to_string()))?;
        Ok(())
    }

    /// Delete a realm; true if it existed.
    pub fn remove(&self, realm_id: u32) -> Result<bool, RealmError> {
        let conn = self.lock()?;
        let n = conn
            .execute(
                "DELETE FROM realms WHERE realm_id = ?1",
                params![i64::from(realm_id)],
            )
            .map_err(|e| RealmError::Storage(e.to_string()))?;
        Ok(n > 0)
    }

    /// The realm row, if any.
    pub fn get(&self, realm_id: u32) -> Result<Option<Realm>, RealmError> {
        let conn = self.lock()?;
        let row: Option<(String, String, Option<i64>)> = conn
            .prepare_cached("SELECT name, status, expires_at FROM realms WHERE realm_id = ?1")
            .and_then(|mut s| {
                s.query_row(params![i64::from(realm_id)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(|e| RealmError::Storage(e.to_string()))?;
        let Some((name, status, expires_at)) = row else {
            return Ok(None);
        };
        let status = RealmStatus::parse(&status)
            .ok_or_else(|| RealmError::Storage(format!("bad status {status:?}")))?;
        Ok(Some(Realm {
            realm_id,
            name,
            status,
            expires_at: expires_at.map(|v| u64::try_from(v).unwrap_or(0)),
        }))
    }

    /// Whether `realm_id` is valid at `now_unix`.
    pub fn check(&self, now_unix: u64, realm_id: u32) -> Result<(), RealmError> {
        let realm = self.get(realm_id)?.ok_or(RealmError::NotFound)?;
        match realm.status {
            RealmStatus::Normal => {}
            RealmStatus::Suspended => return Err(RealmError::Suspended),
            RealmStatus::Terminated => return Err(RealmError::Terminated),
        }
        match realm.expires_at {
            Some(exp) if now_unix > exp => Err(RealmError::Expired),
            _ => Ok(()),
        }
    }
}

/// Provision a realm in `<data_dir>/control.db`, e.g. from an installer or CLI while the
/// appliance runs (WAL lets both processes use the file).
pub fn provision_realm(data_dir: &Path, realm: &Realm) -> Result<(), ControlError> {
    let path = data_dir.join(crate::config::CONTROL_DB_FILE);
    let store = RealmStore::open(&path)?;
    store.upsert(realm).map_err(|e| ControlError::db(&path, e))
}
