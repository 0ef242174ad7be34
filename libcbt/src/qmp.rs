//! Async QMP client (QEMU Machine Protocol) over a Unix socket.
//!
//! # Design
//!
//! QMP is JSON, one object per line. After the greeting
//! (`{"QMP": {"version": …, "capabilities": […]}}`) the client sends `qmp_capabilities`, then
//! commands `{"execute": NAME, "arguments": {…}, "id": N}`. The server answers each with
//! `{"return": …, "id": N}` or `{"error": {"class": …, "desc": …}, "id": N}`, and sends events
//! `{"event": NAME, "data": {…}, "timestamp": {…}}` at any time, even before the return of the
//! command that caused them.
//!
//! ```text
//!  execute() ──▶ pending[id] = oneshot ──▶ writer (Mutex<OwnedWriteHalf>) ──▶ socket
//!      ▲                                                                      │
//!      └── oneshot ◀── reader task: return/error by id; events ─▶ broadcast ◀─┘
//! ```
//!
//! - Every line is bounded ([`MAX_LINE`]) before it is parsed.
//! - When the socket closes, every pending command fails with [`QmpError::Disconnected`] and
//!   later commands fail at once; nothing waits forever.
//! - Events go to a broadcast channel; [`Qmp::events`] subscribes. A subscriber that falls more
//!   than [`EVENT_BACKLOG`] events behind loses the oldest (and is told so by tokio).
//! - [`Qmp::wait_event`] subscribes *before* it is awaited only if the caller subscribed
//!   first: subscribe, issue the command, then wait on the subscription (see its docs).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// Longest QMP line accepted (query-named-block-nodes on a big VM is a few hundred KiB).
pub const MAX_LINE: usize = 16 << 20;
/// Events kept for each subscriber.
pub const EVENT_BACKLOG: usize = 1024;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("I/O error while {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed QMP message")]
    Malformed(#[source] serde_json::Error),
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("unexpected QMP message: {0}")]
    Unexpected(&'static str),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("cannot decode the result of QMP command {command}")]
    BadResult {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP connection closed")]
    Disconnected,
    #[error("timed out waiting for QMP event {0}")]
    EventTimeout(String),
}

impl QmpError {
    /// The QMP error class of a failed command (`GenericError`, `CommandNotFound`, …).
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: Version,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// One parsed line from the server.
#[derive(Debug, PartialEq)]
enum Message {
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// Parses one line (pure; fuzzed through [`crate::fuzzing`]).
fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(QmpError::Malformed)?;
    let Value::Object(mut o) = v else {
        return Err(QmpError::Unexpected("a message that is not a JSON object"));
    };
    let id = o.get("id").and_then(Value::as_u64);
    if let Some(value) = o.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(e) = o.remove("error") {
        let e: ErrorBody = serde_json::from_value(e).map_err(QmpError::Malformed)?;
        return Ok(Message::Error {
            id,
            class: e.class,
            desc: e.desc,
        });
    }
    if o.contains_key("event") {
        let e: Event = serde_json::from_value(Value::Object(o)).map_err(QmpError::Malformed)?;
        return Ok(Message::Event(e));
    }
    Err(QmpError::Unexpected(
        "a message without return, error or event",
    ))
}

#[doc(hidden)]
pub fn fuzz_parse(line: &[u8]) {
    let _ = parse_message(line);
}

type Reply = Result<Value, (String, String)>;

struct Shared {
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
}

impl Shared {
    fn close(&self) {
        // Dropping the senders wakes every waiter with Disconnected.
        if let Ok(mut p) = self.pending.lock() {
            p.take();
        }
    }
}

/// A QMP connection. Cheap to share behind an `Arc`; commands may run concurrently.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    version: Version,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> Result<bool, QmpError> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await.map_err(|source| QmpError::Io {
            op: "reading from QMP",
            source,
        })?;
        if avail.is_empty() {
            return Ok(false);
        }
        let (chunk, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (&avail[..=i], true),
            None => (avail, false),
        };
        if buf.len() + chunk.len() > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
        buf.extend_from_slice(chunk);
        let n = chunk.len();
        r.consume(n);
        if done {
            return Ok(true);
        }
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path.as_ref())
            .await
            .map_err(|source| QmpError::Io {
                op: "connecting to QMP",
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        if !read_line(&mut r, &mut line).await? {
            return Err(QmpError::Disconnected);
        }
        let greeting: Greeting = serde_json::from_slice(&line).map_err(QmpError::Malformed)?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
        });
        let reader = tokio::spawn(reader_loop(r, shared.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(w),
            shared,
            next_id: AtomicU64::new(1),
            events,
            version: greeting.qmp.version.qemu,
            reader,
        };
        qmp.execute_value("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// QEMU's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// A new subscription to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs a command and decodes its result.
    pub async fn execute<A: Serialize, T: DeserializeOwned>(
        &self,
        command: &str,
        args: A,
    ) -> Result<T, QmpError> {
        let args = serde_json::to_value(args).map_err(|source| QmpError::BadResult {
            command: command.into(),
            source,
        })?;
        let v = self.execute_value(command, args).await?;
        serde_json::from_value(v).map_err(|source| QmpError::BadResult {
            command: command.into(),
            source,
        })
    }

    /// Runs a command whose result is not needed.
    pub async fn run<A: Serialize>(&self, command: &str, args: A) -> Result<(), QmpError> {
        let _: Value = self.execute(command, args).await?;
        Ok(())
    }

    /// Runs a command; `args` is `null` or an object.
    ///
    /// # Cancel safety
    /// Dropping the future after the command was sent does not cancel it in QEMU.
    pub async fn execute_value(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .map_err(|_| QmpError::Disconnected)?;
            p.as_mut().ok_or(QmpError::Disconnected)?.insert(id, tx);
        }
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        tracing::trace!(command, id, "QMP execute");
        {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await.map_err(|source| QmpError::Io {
                op: "writing to QMP",
                source,
            })?;
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Err(_) => Err(QmpError::Disconnected),
        }
    }

    /// Runs a `transaction` of `(type, data)` actions, all or nothing.
    pub async fn transaction(&self, actions: &[(&str, Value)]) -> Result<(), QmpError> {
        let actions: Vec<Value> = actions
            .iter()
            .map(|(t, d)| serde_json::json!({ "type": t, "data": d }))
            .collect();
        self.run("transaction", serde_json::json!({ "actions": actions }))
            .await
    }
}

/// Waits on `sub` for an event named `name` whose data satisfies `matches`, up to `timeout`.
/// Subscribe with [`Qmp::events`] *before* issuing the command that causes the event.
pub async fn wait_event(
    sub: &mut broadcast::Receiver<Event>,
    name: &str,
    timeout: Duration,
    mut matches: impl FnMut(&Value) -> bool,
) -> Result<Event, QmpError> {
    let fut = async {
        loop {
            match sub.recv().await {
                Ok(e) if e.event == name && matches(&e.data) => return Ok(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "QMP event subscriber lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| QmpError::EventTimeout(name.into()))?
}

async fn reader_loop(
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut r, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP read failed");
                break;
            }
        }
        match parse_message(&line) {
            Ok(Message::Event(e)) => {
                tracing::debug!(event = %e.event, "QMP event");
                // No subscriber is fine.
                let _ = events.send(e);
            }
            Ok(Message::Return {
                id: Some(id),
                value,
            }) => reply(&shared, id, Ok(value)),
            Ok(Message::Error {
                id: Some(id),
                class,
                desc,
            }) => reply(&shared, id, Err((class, desc))),
            Ok(other) => tracing::warn!(message = ?other, "QMP reply without id ignored"),
            Err(e) => {
                tracing::warn!(error = %e, "malformed QMP line; closing");
                break;
            }
        }
    }
    shared.close();
}

fn reply(shared: &Shared, id: u64, r: Reply) {
    let tx = shared
        .pending
        .lock()
        .ok()
        .and_then(|mut p| p.as_mut().and_then(|m| m.remove(&id)));
    match tx {
        Some(tx) => {
            let _ = tx.send(r);
        }
        None => tracing::warn!(id, "QMP reply for an unknown id ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_return_error_and_event() {
        assert_eq!(
            parse_message(br#"{"return": {}, "id": 7}"#).expect("return"),
            Message::Return {
                id: Some(7),
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            parse_message(br#"{"id": 3, "error": {"class": "GenericError", "desc": "nope"}}"#)
                .expect("error"),
            Message::Error {
                id: Some(3),
                class: "GenericError".into(),
                desc: "nope".into()
            }
        );
        let e = parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}"#)
            .expect("event");
        assert_eq!(
            e,
            Message::Event(Event {
                event: "BLOCK_EXPORT_DELETED".into(),
                data: serde_json::json!({"id": "e0"})
            })
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(matches!(
            parse_message(b"{not json"),
            Err(QmpError::Malformed(_))
        ));
        assert!(matches!(
            parse_message(b"[1,2]"),
            Err(QmpError::Unexpected(_))
        ));
        assert!(matches!(
            parse_message(br#"{"foo": 1}"#),
            Err(QmpError::Unexpected(_))
        ));
        assert!(matches!(
            parse_message(br#"{"error": {"class": 1}}"#),
            Err(QmpError::Malformed(_))
        ));
    }
}
