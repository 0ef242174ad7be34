//! Prometheus metrics at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// Jobs that ended, by kind and final state.
    pub jobs: Family<Labels, Counter>,
    pub jobs_running: Gauge,
    pub jobs_queued: Gauge,
    pub bytes_read: Counter,
    pub bytes_data: Counter,
    pub bytes_stored: Counter,
    pub backup_seconds: Histogram,
    pub fulls: Family<Labels, Counter>,
    pub freeze_seconds: Histogram,
    pub errors: Family<Labels, Counter>,
    /// Retention: backups deleted, objects deleted and bytes reclaimed, by what deleted them
    /// (`prune`, `delete`, `gc`, `compact`: its objects are the segments it rewrote); folds by
    /// why (`prune`, `max_chain`).
    pub retention_backups: Family<Labels, Counter>,
    pub retention_objects: Family<Labels, Counter>,
    pub retention_bytes: Family<Labels, Counter>,
    pub folds: Family<Labels, Counter>,
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cbt");
        let m = Metrics {
            jobs: Family::default(),
            jobs_running: Gauge::default(),
            jobs_queued: Gauge::default(),
            bytes_read: Counter::default(),
            bytes_data: Counter::default(),
            bytes_stored: Counter::default(),
            backup_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            fulls: Family::default(),
            freeze_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            errors: Family::default(),
            retention_backups: Family::default(),
            retention_objects: Family::default(),
            retention_bytes: Family::default(),
            folds: Family::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs that ended, by kind and state", m.jobs.clone());
        registry.register("jobs_running", "Jobs running now", m.jobs_running.clone());
        registry.register(
            "jobs_queued",
            "Jobs waiting for a slot",
            m.jobs_queued.clone(),
        );
        registry.register(
            "backup_read_bytes",
            "Bytes read from disks by backups",
            m.bytes_read.clone(),
        );
        registry.register(
            "backup_data_bytes",
            "Non-zero bytes backed up",
            m.bytes_data.clone(),
        );
        registry.register(
            "backup_stored_bytes",
            "Bytes written to sinks (compressed)",
            m.bytes_stored.clone(),
        );
        registry.register(
            "backup_duration_seconds",
            "Backup job duration",
            m.backup_seconds.clone(),
        );
        registry.register(
            "backup_fulls",
            "Disks backed up in full, by reason",
            m.fulls.clone(),
        );
        registry.register(
            "freeze_duration_seconds",
            "Guest filesystem freeze duration",
            m.freeze_seconds.clone(),
        );
        registry.register("errors", "Failed jobs by error kind", m.errors.clone());
        registry.register(
            "retention_deleted_backups",
            "Backups deleted, by prune or delete",
            m.retention_backups.clone(),
        );
        registry.register(
            "retention_deleted_objects",
            "Sink objects deleted, by prune, delete or gc",
            m.retention_objects.clone(),
        );
        registry.register(
            "retention_reclaimed_bytes",
            "Bytes of the sink objects deleted, by prune, delete or gc",
            m.retention_bytes.clone(),
        );
        registry.register(
            "folds",
            "New manifest generations written by folds, by why (prune, max_chain)",
            m.folds.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn job_ended(&self, kind: &str, state: &str) {
        self.jobs
            .get_or_create(&l(&[("kind", kind), ("state", state)]))
            .inc();
    }

    pub fn full(&self, reason: &str) {
        self.fulls.get_or_create(&l(&[("reason", reason)])).inc();
    }

    /// What a prune, a delete or a garbage collection (`by`) removed.
    pub fn reclaimed(&self, by: &str, backups: usize, objects: usize, bytes: u64) {
        let k = l(&[("by", by)]);
        self.retention_backups
            .get_or_create(&k)
            .inc_by(backups as u64);
        self.retention_objects
            .get_or_create(&k)
            .inc_by(objects as u64);
        self.retention_bytes.get_or_create(&k).inc_by(bytes);
    }

    /// What a prune or a deletion (`by`) removed and folded.
    pub fn pruned(&self, by: &str, r: &libcbt::engine::PruneReport) {
        self.reclaimed(by, r.deleted.len(), r.objects, r.bytes_reclaimed);
        self.folded("prune", r.folds);
    }

    pub fn folded(&self, why: &str, n: usize) {
        self.folds
            .get_or_create(&l(&[("why", why)]))
            .inc_by(n as u64);
    }

    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&l(&[("kind", kind)])).inc();
    }

    /// The text exposition, with a derived compression ratio.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            return String::new();
        }
        let (data, stored) = (self.bytes_data.get(), self.bytes_stored.get());
        let ratio = if stored == 0 {
            0.0
        } else {
            data as f64 / stored as f64
        };
        // Before the EOF marker, which must stay last.
        let eof = s.rfind("# EOF").unwrap_or(s.len());
        s.insert_str(
            eof,
            &format!(
                "# HELP cbt_compression_ratio Backed-up bytes per stored byte, since start.\n\
                 # TYPE cbt_compression_ratio gauge\ncbt_compression_ratio {ratio}\n"
            ),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_counters_and_ratio() {
        let m = super::Metrics::new();
        m.job_ended("backup", "succeeded");
        m.full("first_backup");
        m.bytes_data.inc_by(300);
        m.bytes_stored.inc_by(100);
        let t = m.render();
        assert!(
            t.contains("cbt_jobs_total{kind=\"backup\",state=\"succeeded\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("cbt_backup_fulls_total{reason=\"first_backup\"} 1"),
            "{t}"
        );
        assert!(t.contains("cbt_compression_ratio 3"), "{t}");
        assert!(t.trim_end().ends_with("# EOF"), "{t}");
    }
}
