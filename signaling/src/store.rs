//! `<data_dir>/signaling.db`: the ACL (unique per (realm, from, to), last write wins), the
//! registry rows (restored by a Ping after eviction or a restart) and the service specs used
//! for compatibility analysis.
//!
//! One writer thread owns the connection, so the control thread's event loop never waits for
//! the disk; it commits whatever is queued in one transaction.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use rusqlite::{params, Connection, OptionalExtension};

use crate::hub::{ActorKey, Loaded, PersistOp, PersistedEntry};
use crate::proto::{ActrId, ServiceSpec};
use crate::stats::SignalingStats;

/// File name of the signaling database inside the data directory.
pub const SIGNALING_DB_FILE: &str = "signaling.db";
/// Bound of the writer queue.
const QUEUE: usize = 65_536;
/// Largest batch committed in one transaction.
const BATCH: usize = 1024;

/// Errors opening or reading the database.
#[derive(Debug, thiserror::Error)]
#[error("signaling database {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A request to the writer thread.
pub(crate) enum DbOp {
    Persist(Box<PersistOp>),
    /// The row of `key`, unless it expired before `now_unix`.
    Lookup {
        key: ActorKey,
        now_unix: u64,
        reply: tokio::sync::oneshot::Sender<Option<PersistedEntry>>,
    },
    /// Delete the rows expired at `now_unix` and the specs stored before `spec_cutoff`.
    Purge {
        now_unix: u64,
        spec_cutoff: u64,
    },
    Flush(std::sync::mpsc::Sender<()>),
}

/// Handle to the writer thread. Dropping every clone stops it after it drains its queue.
#[derive(Clone)]
pub(crate) struct Store {
    tx: SyncSender<DbOp>,
    stats: Arc<SignalingStats>,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    // Owner-only, like every other data file (created 0600, never wider for a moment).
    actrix_control::private_file(path).map_err(|e| err(path, e))?;
    let conn = Connection::open(path).map_err(|e| err(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| err(path, e))?;
    let _: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| err(path, e))?;
    // The registry is a cache of live state that clients re-establish; NORMAL keeps commits
    // cheap and WAL keeps the file consistent after a crash.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| err(path, e))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS signaling_acl (
             realm_id   INTEGER NOT NULL,
             from_type  TEXT NOT NULL,
             to_type    TEXT NOT NULL,
             allow      INTEGER NOT NULL,
             PRIMARY KEY (realm_id, from_type, to_type)
         );
         CREATE TABLE IF NOT EXISTS signaling_registry (
             realm_id        INTEGER NOT NULL,
             serial          INTEGER NOT NULL,
             actr_id         BLOB NOT NULL,
             service_name    TEXT NOT NULL,
             spec            BLOB NULL,
             ws_address      TEXT NULL,
             availability    INTEGER NULL,
             power_reserve   REAL NULL,
             mailbox_backlog REAL NULL,
             expires_at      INTEGER NOT NULL,
             PRIMARY KEY (realm_id, serial)
         );
         CREATE TABLE IF NOT EXISTS signaling_specs (
             type_base   TEXT NOT NULL,
             fingerprint TEXT NOT NULL,
             spec        BLOB NOT NULL,
             stored_at   INTEGER NOT NULL,
             PRIMARY KEY (type_base, fingerprint)
         );",
    )
    .map_err(|e| err(path, e))?;
    Ok(conn)
}

/// Serials are ≤ 54 bits when issued by the AIS; any u64 is stored bit-for-bit.
fn serial_sql(s: u64) -> i64 {
    s as i64
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Open the database, load what the hub needs, and start the writer thread.
pub(crate) fn start(
    now_unix: u64,
    data_dir: &Path,
    stats: Arc<SignalingStats>,
    spec_ttl: u64,
) -> Result<(Store, Loaded), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|e| err(data_dir, e))?;
    let path = data_dir.join(SIGNALING_DB_FILE);
    let conn = open(&path)?;
    let mut loaded = Loaded::default();
    {
        let mut st = conn
            .prepare("SELECT realm_id, from_type, to_type, allow FROM signaling_acl")
            .map_err(|e| err(&path, e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(|e| err(&path, e))?;
        for row in rows {
            let (realm, from, to, allow) = row.map_err(|e| err(&path, e))?;
            if let Ok(realm) = u32::try_from(realm) {
                loaded.acl.push((realm, from, to, allow != 0));
            }
        }
        let cutoff = to_i64(now_unix.saturating_sub(spec_ttl));
        let mut st = conn
            .prepare("SELECT type_base, spec FROM signaling_specs WHERE stored_at >= ?1")
            .map_err(|e| err(&path, e))?;
        let rows = st
            .query_map(params![cutoff], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| err(&path, e))?;
        for row in rows {
            let (base, blob) = row.map_err(|e| err(&path, e))?;
            if let Ok(spec) = ServiceSpec::decode(&blob[..]) {
                loaded.specs.push((base, spec));
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<DbOp>(QUEUE);
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("actrix-sig-db".into())
        .spawn(move || writer(conn, rx, thread_stats, path))
        .map_err(|e| err(data_dir, e))?;
    Ok((Store { tx, stats }, loaded))
}

impl Store {
    /// Queue an operation; a full queue drops it and counts a persistence failure.
    pub(crate) fn submit(&self, op: DbOp) {
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("signaling database queue full; operation dropped");
            }
        }
    }

    /// Wait until everything queued so far is committed (tests, shutdown).
    pub(crate) fn flush_blocking(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(DbOp::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

fn writer(mut conn: Connection, rx: Receiver<DbOp>, stats: Arc<SignalingStats>, path: PathBuf) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let res = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for op in batch {
                match op {
                    DbOp::Persist(p) => apply(&tx, *p)?,
                    DbOp::Lookup {
                        key,
                        now_unix,
                        reply,
                    } => {
                        let _ = reply.send(lookup(now_unix, &tx, key)?);
                    }
                    DbOp::Purge {
                        now_unix,
                        spec_cutoff,
                    } => {
                        tx.execute(
                            "DELETE FROM signaling_registry WHERE expires_at < ?1",
                            params![to_i64(now_unix)],
                        )?;
                        tx.execute(
                            "DELETE FROM signaling_specs WHERE stored_at < ?1",
                            params![to_i64(spec_cutoff)],
                        )?;
                    }
                    DbOp::Flush(done) => flushes.push(done),
                }
            }
            tx.commit()
        })();
        if let Err(e) = res {
            stats.persist_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %path.display(), error = %e, "signaling database write failed");
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

fn apply(tx: &rusqlite::Transaction<'_>, op: PersistOp) -> rusqlite::Result<()> {
    match op {
        PersistOp::UpsertEntry(e) => {
            tx.prepare_cached(
                "INSERT INTO signaling_registry (realm_id, serial, actr_id, service_name, spec,
                     ws_address, availability, power_reserve, mailbox_backlog, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (realm_id, serial) DO UPDATE SET actr_id = excluded.actr_id,
                     service_name = excluded.service_name, spec = excluded.spec,
                     ws_address = excluded.ws_address, availability = excluded.availability,
                     power_reserve = excluded.power_reserve,
                     mailbox_backlog = excluded.mailbox_backlog,
                     expires_at = excluded.expires_at",
            )?
            .execute(params![
                i64::from(e.actr_id.realm.realm_id),
                serial_sql(e.actr_id.serial_number),
                e.actr_id.encode_to_vec(),
                e.service_name,
                e.spec.map(|s| s.encode_to_vec()),
                e.ws_address,
                e.availability,
                e.power_reserve.map(f64::from),
                e.mailbox_backlog.map(f64::from),
                to_i64(e.expires_at),
            ])?;
        }
        PersistOp::TouchEntry {
            key,
            expires_at,
            availability,
            power_reserve,
            mailbox_backlog,
        } => {
            tx.prepare_cached(
                "UPDATE signaling_registry SET expires_at = ?3, availability = ?4,
                     power_reserve = ?5, mailbox_backlog = ?6
                 WHERE realm_id = ?1 AND serial = ?2",
            )?
            .execute(params![
                i64::from(key.realm),
                serial_sql(key.serial),
                to_i64(expires_at),
                availability,
                f64::from(power_reserve),
                f64::from(mailbox_backlog),
            ])?;
        }
        PersistOp::DeleteEntry(key) => {
            tx.prepare_cached(
                "DELETE FROM signaling_registry WHERE realm_id = ?1 AND serial = ?2",
            )?
            .execute(params![i64::from(key.realm), serial_sql(key.serial)])?;
        }
        PersistOp::UpsertAcl {
            realm,
            from,
            to,
            allow,
        } => {
            tx.prepare_cached(
                "INSERT INTO signaling_acl (realm_id, from_type, to_type, allow)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (realm_id, from_type, to_type) DO UPDATE SET allow = excluded.allow",
            )?
            .execute(params![i64::from(realm), from, to, i64::from(allow)])?;
        }
        PersistOp::UpsertSpec {
            type_base,
            spec,
            stored_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO signaling_specs (type_base, fingerprint, spec, stored_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (type_base, fingerprint) DO UPDATE SET spec = excluded.spec,
                     stored_at = excluded.stored_at",
            )?
            .execute(params![
                type_base,
                spec.fingerprint.clone(),
                spec.encode_to_vec(),
                to_i64(stored_at)
            ])?;
        }
    }
    Ok(())
}

type Row = (
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    Option<String>,
    Option<i32>,
    Option<f64>,
    Option<f64>,
    i64,
);

fn lookup(
    now_unix: u64,
    tx: &rusqlite::Transaction<'_>,
    key: ActorKey,
) -> rusqlite::Result<Option<PersistedEntry>> {
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT actr_id, service_name, spec, ws_address, availability, power_reserve,
                    mailbox_backlog, expires_at
             FROM signaling_registry WHERE realm_id = ?1 AND serial = ?2 AND expires_at >= ?3",
        )?
        .query_row(
            params![
                i64::from(key.realm),
                serial_sql(key.serial),
                to_i64(now_unix)
            ],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .optional()?;
    Ok(row.and_then(|(id, name, spec, ws, av, pr, mb, exp)| {
        Some(PersistedEntry {
            actr_id: ActrId::decode(&id[..]).ok()?,
            service_name: name,
            spec: spec.and_then(|s| ServiceSpec::decode(&s[..]).ok()),
            ws_address: ws,
            availability: av,
            power_reserve: pr.map(|v| v as f32),
            mailbox_backlog: mb.map(|v| v as f32),
            expires_at: u64::try_from(exp).unwrap_or(0),
        })
    }))
}
