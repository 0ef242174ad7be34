//! One closed type over every backend, for callers that pick the backend at run time (the
//! daemon's configured sinks, `cbtctl`'s sink URLs), and the text form of a sink's address.

use std::path::PathBuf;
use std::time::Duration;

use super::local::{LocalSink, LocalWriter};
use super::s3::{S3Config, S3Sink, S3Writer};
use super::{ObjectInfo, ObjectWriter, Sink, SinkError};

/// A sink of any backend.
#[derive(Clone, Debug)]
pub enum AnySink {
    Local(LocalSink),
    S3(S3Sink),
}

/// A writer of an [`AnySink`].
pub enum AnyWriter {
    Local(LocalWriter),
    S3(S3Writer),
}

/// Where a sink is, as an operator writes it: a directory, or
/// `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]` (credentials come separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkAddress {
    Local(PathBuf),
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
        region: Option<String>,
    },
}

impl SinkAddress {
    /// Parses a sink address (see the type's documentation).
    pub fn parse(s: &str) -> Result<SinkAddress, SinkError> {
        let Some(rest) = s.strip_prefix("s3://") else {
            if s.contains("://") {
                return Err(SinkError::Config(
                    "sink: a directory or s3://bucket/prefix?endpoint=URL".into(),
                ));
            }
            return Ok(SinkAddress::Local(PathBuf::from(s)));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let mut endpoint = None;
        let mut region = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) => endpoint = Some(v.to_string()),
                Some(("region", v)) => region = Some(v.to_string()),
                // The address is not echoed: a parameter there may be a secret.
                _ => return Err(SinkError::Config(
                    "sink: unknown parameter (only endpoint and region; credentials go in a file)"
                        .into(),
                )),
            }
        }
        let endpoint = endpoint
            .ok_or_else(|| SinkError::Config("sink: no endpoint=http(s)://host:port".into()))?;
        Ok(SinkAddress::S3 {
            endpoint,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            region,
        })
    }
}

impl AnySink {
    /// Opens the sink at `addr`; an S3 sink with `credentials` (access key, secret), anonymous
    /// without.
    pub async fn open(
        addr: &SinkAddress,
        credentials: Option<(String, super::s3::Secret)>,
        tuning: &S3Config,
    ) -> Result<AnySink, SinkError> {
        match addr {
            SinkAddress::Local(p) => Ok(AnySink::Local(LocalSink::open(p)?)),
            SinkAddress::S3 {
                endpoint,
                bucket,
                prefix,
                region,
            } => {
                let (access_key, secret_key) = credentials.unwrap_or_default();
                let cfg = S3Config {
                    endpoint: endpoint.clone(),
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    region: region.clone().unwrap_or_else(|| tuning.region.clone()),
                    access_key,
                    secret_key,
                    ..tuning.clone()
                };
                Ok(AnySink::S3(S3Sink::open(&cfg).await?))
            }
        }
    }

    /// A short description for logs and errors (no credentials).
    pub fn describe(&self) -> String {
        match self {
            AnySink::Local(s) => format!("{s:?}"),
            AnySink::S3(s) => format!("{s:?}"),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnySink::Local($s) => $e,
            AnySink::S3($s) => $e,
        }
    };
}

impl Sink for AnySink {
    type Writer = AnyWriter;

    async fn create(&self, name: &str) -> Result<AnyWriter, SinkError> {
        match self {
            AnySink::Local(s) => s.create(name).await.map(AnyWriter::Local),
            AnySink::S3(s) => s.create(name).await.map(AnyWriter::S3),
        }
    }
    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        each!(self, s => s.put(name, data).await)
    }
    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        each!(self, s => s.put_new(name, data).await)
    }
    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        each!(self, s => s.get_range_into(name, offset, len, buf).await)
    }
    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        each!(self, s => s.get(name, max).await)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        each!(self, s => s.list(prefix).await)
    }
    async fn list_first(&self, prefix: &str, n: usize) -> Result<Vec<ObjectInfo>, SinkError> {
        each!(self, s => s.list_first(prefix, n).await)
    }
    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, SinkError> {
        each!(self, s => s.list_dirs(dir).await)
    }
    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        each!(self, s => s.delete(name).await)
    }
    async fn remove_stale_partials(&self, grace: Duration) -> Result<u64, SinkError> {
        each!(self, s => s.remove_stale_partials(grace).await)
    }
}

impl ObjectWriter for AnyWriter {
    async fn append_prefix(&mut self, data: Vec<u8>, len: usize) -> Result<Vec<u8>, SinkError> {
        match self {
            AnyWriter::Local(w) => w.append_prefix(data, len).await,
            AnyWriter::S3(w) => w.append_prefix(data, len).await,
        }
    }
    fn len(&self) -> u64 {
        match self {
            AnyWriter::Local(w) => w.len(),
            AnyWriter::S3(w) => w.len(),
        }
    }
    async fn finish(self) -> Result<(), SinkError> {
        match self {
            AnyWriter::Local(w) => w.finish().await,
            AnyWriter::S3(w) => w.finish().await,
        }
    }
    async fn abort(self) {
        match self {
            AnyWriter::Local(w) => w.abort().await,
            AnyWriter::S3(w) => w.abort().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            SinkAddress::parse("/srv/backups").expect("dir"),
            SinkAddress::Local("/srv/backups".into())
        );
        assert_eq!(
            SinkAddress::parse("s3://b/p/q?endpoint=http://h:1&region=r1").expect("s3"),
            SinkAddress::S3 {
                endpoint: "http://h:1".into(),
                bucket: "b".into(),
                prefix: "p/q".into(),
                region: Some("r1".into()),
            }
        );
        assert!(SinkAddress::parse("s3://b/p").is_err(), "no endpoint");
        let e = SinkAddress::parse("s3://b?endpoint=x&secret=hunter2").expect_err("secret");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(SinkAddress::parse("swift://c").is_err());
    }
}
