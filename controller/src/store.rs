//! The controller's state: workloads and runs, in SQLite (one file, the embedded default),
//! behind this small interface (so that another database can carry a highly available
//! controller later). Workload snapshots are not here: their records on the sink are the
//! truth.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a workload's members are held for their points in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Each member on its own, no hold.
    None,
    /// All members paused together: one exact crash-consistent cut.
    Crash,
    /// All members' filesystems frozen together through qemu-ga.
    Application,
}

/// What a run does (what a policy will carry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub consistency: Consistency,
    #[serde(default = "default_hold")]
    pub hold_timeout_secs: u64,
    pub sink: String,
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_hold() -> u64 {
    10
}

fn default_level() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// Members: instance names or UUIDs, on whichever host runs them at each run.
    pub instances: Vec<String>,
    pub options: RunOptions,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub workload: String,
    pub tenant: String,
    /// `running`, `succeeded`, `failed`.
    pub state: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    /// Progress while it runs, the snapshot record at its end.
    pub detail: Value,
}

impl Run {
    /// A new run of `w`, running from now.
    pub fn start(w: &Workload, detail: Value) -> Run {
        Run {
            id: hostd::registry::new_job_id(),
            workload: w.id.clone(),
            tenant: w.tenant.clone(),
            state: "running".into(),
            started_ms: now_ms(),
            finished_ms: None,
            error: None,
            detail,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("controller database: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS workloads (
               id TEXT PRIMARY KEY, tenant TEXT NOT NULL, spec TEXT NOT NULL,
               created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS runs (
               id TEXT PRIMARY KEY, workload TEXT NOT NULL, tenant TEXT NOT NULL,
               state TEXT NOT NULL, started_ms INTEGER NOT NULL, finished_ms INTEGER,
               error TEXT, detail TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS runs_workload ON runs(workload, started_ms);",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&c)?)
    }

    pub fn put_workload(&self, w: &Workload) -> Result<(), StoreError> {
        let spec = serde_json::to_string(w).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT INTO workloads (id, tenant, spec, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![w.id, w.tenant, spec, w.created_ms],
            )
            .map(|_| ())
        })
    }

    pub fn workload(&self, id: &str) -> Result<Option<Workload>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT spec FROM workloads WHERE id = ?1",
                params![id],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })
        .map(|s| s.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// A tenant's workloads (`None`: everybody's), oldest first.
    pub fn workloads(&self, tenant: Option<&str>) -> Result<Vec<Workload>, StoreError> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT spec FROM workloads WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_ms, id",
            )?;
            let rows = s.query_map(params![tenant], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<Vec<String>>>()
        })
        .map(|v| {
            v.iter()
                .filter_map(|s| serde_json::from_str(s).ok())
                .collect()
        })
    }

    pub fn delete_workload(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM workloads WHERE id = ?1", params![id])
                .map(|n| n > 0)
        })
    }

    pub fn insert_run(&self, r: &Run) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (id, workload, tenant, state, started_ms, finished_ms, error, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    r.id,
                    r.workload,
                    r.tenant,
                    r.state,
                    r.started_ms,
                    r.finished_ms,
                    r.error,
                    r.detail.to_string()
                ],
            )
            .map(|_| ())
        })
    }

    pub fn update_run(&self, r: &Run) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET state = ?2, finished_ms = ?3, error = ?4, detail = ?5 WHERE id = ?1",
                params![r.id, r.state, r.finished_ms, r.error, r.detail.to_string()],
            )
            .map(|_| ())
        })
    }

    fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
        let detail: String = r.get(7)?;
        Ok(Run {
            id: r.get(0)?,
            workload: r.get(1)?,
            tenant: r.get(2)?,
            state: r.get(3)?,
            started_ms: r.get(4)?,
            finished_ms: r.get(5)?,
            error: r.get(6)?,
            detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
        })
    }

    pub fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, workload, tenant, state, started_ms, finished_ms, error, detail
                 FROM runs WHERE id = ?1",
                params![id],
                Store::run_row,
            )
            .optional()
        })
    }

    /// A workload's runs, newest first.
    pub fn runs(&self, workload: &str) -> Result<Vec<Run>, StoreError> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT id, workload, tenant, state, started_ms, finished_ms, error, detail
                 FROM runs WHERE workload = ?1 ORDER BY started_ms DESC LIMIT 100",
            )?;
            let rows = s.query_map(params![workload], Store::run_row)?;
            rows.collect()
        })
    }

    /// Runs a previous life left running: settled as failed (the hosts' deadlines released
    /// their holds; no snapshot record was written, so no snapshot exists).
    pub fn settle_unfinished(&self) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET state = 'failed', finished_ms = ?1,
                 error = 'the controller stopped during the run; no snapshot was recorded'
                 WHERE state = 'running'",
                params![now_ms()],
            )
        })
    }
}
