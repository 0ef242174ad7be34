//! The job journal: one SQLite row per job, written before the job touches anything, so that
//! a restarted daemon knows what an interrupted job may have left behind.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("job journal: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job journal {path}: cannot make it private ({JOURNAL_FILE_MODE:o})")]
    Mode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Mode of the journal and of SQLite's `-wal`/`-shm` files beside it (SQLite creates those
/// with the database's mode): job requests name instances, paths, tenants and errors.
pub const JOURNAL_FILE_MODE: u32 = 0o600;

/// Creates the journal file `0600` when missing and narrows it and leftover `-wal`/`-shm`
/// files (a previous version, a crash) to `0600`, whatever the umask.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(JOURNAL_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(JOURNAL_FILE_MODE))?;
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(JOURNAL_FILE_MODE))?
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a regular file", p.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a job does. Its serde name is the one in the API, the journal and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    #[default]
    Backup,
    Restore,
    Verify,
    /// A prune of an instance's backups.
    Prune,
    /// A sink's garbage collection, and compaction when asked.
    Gc,
}

/// Where a job is. `Recovering`: a previous life's job whose recovery could not finish yet
/// (libvirt unreachable, say) and is being retried. `Interrupted`: ended by a daemon restart
/// and rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    #[default]
    Queued,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

/// `as_str`, `Display` and SQLite text for the enums above, by their serde names.
macro_rules! named_enum {
    ($t:ty { $($v:ident => $n:literal),+ $(,)? }) => {
        impl $t {
            pub const ALL: &'static [$t] = &[$(<$t>::$v),+];
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $n),+ }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($n => Ok(<$t>::$v),)+
                    _ => Err(format!("unknown {} {s:?}", stringify!($t))),
                }
            }
        }
        impl rusqlite::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e: String| rusqlite::types::FromSqlError::Other(e.into()))
            }
        }
    };
}

named_enum!(JobKind { Backup => "backup", Restore => "restore", Verify => "verify", Prune => "prune", Gc => "gc" });
named_enum!(JobState {
    Queued => "queued",
    Running => "running",
    Recovering => "recovering",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
    Interrupted => "interrupted",
});

impl JobState {
    /// Not ended: queued, running or recovering.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Running | JobState::Recovering
        )
    }
}

/// One journaled job.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: String,
    pub kind: JobKind,
    pub tenant: Option<String>,
    /// Domain UUID.
    pub instance: String,
    pub sink: String,
    pub backup_id: String,
    pub request: Value,
    pub state: JobState,
    /// What the job has set up that a recovery must know (disk ids, output paths …).
    pub plan: Option<Value>,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

pub struct Journal {
    conn: Mutex<Connection>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let js = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(JobRow {
        id: r.get(0)?,
        kind: r.get(1)?,
        tenant: r.get(2)?,
        instance: r.get(3)?,
        sink: r.get(4)?,
        backup_id: r.get(5)?,
        request: js(r.get(6)?).unwrap_or(Value::Null),
        state: r.get(7)?,
        plan: js(r.get(8)?),
        error: r.get(9)?,
        result: js(r.get(10)?),
        created_ms: r.get(11)?,
        finished_ms: r.get(12)?,
    })
}

const COLS: &str = "id, kind, tenant, instance, sink, backup_id, request, state, plan, error, result, created_ms, finished_ms";

impl Journal {
    /// Opens (or creates) the journal at `path`, `0600` with its companions.
    pub fn open(path: &Path) -> Result<Arc<Journal>, JournalError> {
        make_private(path).map_err(|source| JournalError::Mode {
            path: path.into(),
            source,
        })?;
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS jobs (
               id TEXT PRIMARY KEY, kind TEXT NOT NULL, tenant TEXT, instance TEXT NOT NULL,
               sink TEXT NOT NULL, backup_id TEXT NOT NULL, request TEXT NOT NULL,
               state TEXT NOT NULL, plan TEXT, error TEXT, result TEXT,
               created_ms INTEGER NOT NULL, finished_ms INTEGER);
             CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
             CREATE TABLE IF NOT EXISTS mounts (
               id TEXT PRIMARY KEY, spec TEXT NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS holds (
               id TEXT PRIMARY KEY, spec TEXT NOT NULL, created_ms INTEGER NOT NULL);",
        )?;
        Ok(Arc::new(Journal {
            conn: Mutex::new(conn),
        }))
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&c)?)
    }

    /// Records mount `id` (what serves it again after a restart).
    pub fn put_mount(&self, id: &str, spec: &Value) -> Result<(), JournalError> {
        self.put_spec(
            "mounts",
            id,
            spec,
            " ON CONFLICT(id) DO UPDATE SET spec = excluded.spec",
        )
    }

    pub fn delete_mount(&self, id: &str) -> Result<(), JournalError> {
        self.delete_spec("mounts", id)
    }

    /// Every recorded mount: (id, spec), oldest first.
    pub fn mounts(&self) -> Result<Vec<(String, Value)>, JournalError> {
        self.specs("mounts")
    }

    /// Records consistency group `id`'s hold before any guest is held: what a restarted
    /// daemon ends if this one could not.
    pub fn put_hold(&self, id: &str, spec: &Value) -> Result<(), JournalError> {
        self.put_spec("holds", id, spec, "")
    }

    pub fn delete_hold(&self, id: &str) -> Result<(), JournalError> {
        self.delete_spec("holds", id)
    }

    /// Every recorded hold: (id, spec), oldest first.
    pub fn holds(&self) -> Result<Vec<(String, Value)>, JournalError> {
        self.specs("holds")
    }

    /// A row of `table` (one of ours: id, spec, created_ms); `conflict` ends the statement.
    fn put_spec(
        &self,
        table: &'static str,
        id: &str,
        spec: &Value,
        conflict: &'static str,
    ) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO {table} (id, spec, created_ms) VALUES (?1, ?2, ?3){conflict}"
                ),
                params![id, spec.to_string(), now_ms()],
            )
            .map(|_| ())
        })
    }

    fn delete_spec(&self, table: &'static str, id: &str) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(&format!("DELETE FROM {table} WHERE id = ?1"), params![id])
                .map(|_| ())
        })
    }

    fn specs(&self, table: &'static str) -> Result<Vec<(String, Value)>, JournalError> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT id, spec FROM {table} ORDER BY created_ms, id"
            ))?;
            let rows = s.query_map([], |r| {
                let spec: String = r.get(1)?;
                Ok((
                    r.get(0)?,
                    serde_json::from_str(&spec).unwrap_or(Value::Null),
                ))
            })?;
            rows.collect()
        })
    }

    pub fn insert(&self, j: &JobRow) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO jobs ({COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
                ),
                params![
                    j.id,
                    j.kind,
                    j.tenant,
                    j.instance,
                    j.sink,
                    j.backup_id,
                    j.request.to_string(),
                    j.state,
                    j.plan.as_ref().map(Value::to_string),
                    j.error,
                    j.result.as_ref().map(Value::to_string),
                    j.created_ms,
                    j.finished_ms
                ],
            )
            .map(|_| ())
        })
    }

    pub fn set_state(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        result: Option<&Value>,
    ) -> Result<(), JournalError> {
        let finished = (!state.is_active()).then(now_ms);
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = ?2, error = COALESCE(?3, error),
                 result = COALESCE(?4, result), finished_ms = ?5 WHERE id = ?1",
                params![id, state, error, result.map(Value::to_string), finished],
            )
            .map(|_| ())
        })
    }

    pub fn set_plan(&self, id: &str, plan: &Value) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET plan = ?2 WHERE id = ?1",
                params![id, plan.to_string()],
            )
            .map(|_| ())
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRow>, JournalError> {
        self.with(|c| {
            c.query_row(&format!("SELECT {COLS} FROM jobs WHERE id = ?1"), [id], row)
                .optional()
        })
    }

    /// Deletes jobs that ended before `before_ms`; returns how many.
    pub fn prune_finished(&self, before_ms: i64) -> Result<usize, JournalError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < ?1
                 AND state NOT IN ('queued','running','recovering')",
                params![before_ms],
            )
        })
    }

    /// Jobs a previous run left queued, running or recovering.
    pub fn unfinished(&self) -> Result<Vec<JobRow>, JournalError> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {COLS} FROM jobs WHERE state IN ('queued','running','recovering') ORDER BY created_ms"
            ))?;
            let v = s.query_map([], row)?.collect();
            v
        })
    }

    /// The newest `limit` jobs.
    pub fn recent(&self, limit: usize) -> Result<Vec<JobRow>, JournalError> {
        self.with(|c| {
            let mut s = c.prepare(&format!(
                "SELECT {COLS} FROM jobs ORDER BY created_ms DESC LIMIT ?1"
            ))?;
            let v = s.query_map([limit as i64], row)?.collect();
            v
        })
    }

    pub fn now_ms() -> i64 {
        now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_states_have_one_name_everywhere() {
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(*k));
            assert_eq!(serde_json::to_value(k).expect("json"), k.as_str());
        }
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).expect("json"), s.as_str());
        }
        assert!("done".parse::<JobState>().is_err());
        let active: Vec<_> = JobState::ALL.iter().filter(|s| s.is_active()).collect();
        assert_eq!(active.len(), 3);
    }

    #[test]
    fn journal_and_leftover_wal_are_narrowed_to_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("j.sqlite");
        let wal = d.path().join("j.sqlite-wal");
        for f in [&p, &wal] {
            std::fs::write(f, b"").expect("write");
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let _j = Journal::open(&p).expect("open");
        for f in [&p, &wal] {
            let m = std::fs::metadata(f).expect("stat").permissions().mode() & 0o7777;
            assert_eq!(m, 0o600, "{}", f.display());
        }
    }

    #[test]
    fn rows_round_trip_and_unfinished() {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(&d.path().join("j.sqlite")).expect("open");
        let mut r = JobRow {
            id: "a".into(),
            kind: JobKind::Backup,
            tenant: Some("t".into()),
            instance: "u".into(),
            sink: "s".into(),
            backup_id: "b".into(),
            request: serde_json::json!({"x": 1}),
            state: JobState::Queued,
            plan: None,
            error: None,
            result: None,
            created_ms: 1,
            finished_ms: None,
        };
        j.insert(&r).expect("insert");
        r.id = "b".into();
        r.created_ms = 2;
        j.insert(&r).expect("insert");
        j.set_plan("a", &serde_json::json!(["d1"])).expect("plan");
        j.set_state(
            "b",
            JobState::Succeeded,
            None,
            Some(&serde_json::json!({"ok": true})),
        )
        .expect("state");
        let u = j.unfinished().expect("unfinished");
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].plan, Some(serde_json::json!(["d1"])));
        let b = j.get("b").expect("get").expect("row");
        assert_eq!(b.state, JobState::Succeeded);
        assert!(b.finished_ms.is_some());
        assert_eq!(j.recent(10).expect("recent")[0].id, "b");
        drop(j);
        // Survives a reopen.
        let j = Journal::open(&d.path().join("j.sqlite")).expect("reopen");
        assert_eq!(j.unfinished().expect("u").len(), 1);
    }
}
