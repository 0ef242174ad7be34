//! A small HTTP/1.1 client for the daemon's API, over the Unix socket or TCP with TLS.
//! Used by `cbtctl` and the tests (which so exercise the same HTTP the orchestrator does).

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(String),
    #[error("bad response: {0}")]
    Response(String),
}

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `https://host:port`, with the CA that signed the daemon's certificate.
    Https {
        host: String,
        port: u16,
        ca: PathBuf,
    },
}

impl Endpoint {
    /// `unix:/path` or a path; or `https://host:port` (then `ca` is required).
    pub fn parse(s: &str, ca: Option<PathBuf>) -> Result<Endpoint, ClientError> {
        if let Some(rest) = s.strip_prefix("https://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| ClientError::Request(format!("{s}: no port")))?;
            let port = port
                .parse()
                .map_err(|_| ClientError::Request(format!("{s}: bad port")))?;
            let ca = ca.ok_or_else(|| ClientError::Request("https needs --ca".into()))?;
            return Ok(Endpoint::Https {
                host: host.trim_matches(['[', ']']).to_string(),
                port,
                ca,
            });
        }
        Ok(Endpoint::Unix(PathBuf::from(
            s.strip_prefix("unix:").unwrap_or(s),
        )))
    }
}

/// A response: status, content type and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

type Sender = http1::SendRequest<Full<Bytes>>;

impl Client {
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Client {
        Client { endpoint, token }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| ClientError::Connect(p.display().to_string(), e))?;
                let (tx, conn) = http1::handshake(TokioIo::new(s)).await?;
                tokio::spawn(conn);
                Ok(tx)
            }
            Endpoint::Https { host, port, ca } => {
                let mut roots = rustls::RootCertStore::empty();
                let f = std::fs::File::open(ca)
                    .map_err(|e| ClientError::Tls(format!("{}: {e}", ca.display())))?;
                for c in rustls_pemfile::certs(&mut std::io::BufReader::new(f)) {
                    let c = c.map_err(|e| ClientError::Tls(e.to_string()))?;
                    roots.add(c).map_err(|e| ClientError::Tls(e.to_string()))?;
                }
                let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| ClientError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| ClientError::Connect(format!("{host}:{port}"), e))?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                let (tx, conn) = http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(conn);
                Ok(tx)
            }
        }
    }

    fn build(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        json: bool,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Https { host, port, .. } => format!("{host}:{port}"),
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if json {
            b = b.header("content-type", "application/json");
        }
        b.body(Full::new(body))
            .map_err(|e| ClientError::Request(e.to_string()))
    }

    /// Sends raw bytes (tests use it for malformed bodies).
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        json: bool,
    ) -> Result<Reply, ClientError> {
        let mut tx = self.connect().await?;
        let req = self.build(method, path, Bytes::from(body), json)?;
        let resp = tx.send_request(req).await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    /// A JSON request (or none, with `body` `None`).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let b = body.map(|v| v.to_string().into_bytes()).unwrap_or_default();
        self.send_raw(method, path, b, body.is_some()).await
    }

    /// Follows a Server-Sent Events stream; `on` gets each event's data (JSON) and returns
    /// whether to go on.
    pub async fn events(
        &self,
        path: &str,
        mut on: impl FnMut(Value) -> bool,
    ) -> Result<u16, ClientError> {
        let mut tx = self.connect().await?;
        let resp = tx
            .send_request(self.build("GET", path, Bytes::new(), false)?)
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Ok(status);
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            if buf.len() > 4 << 20 {
                return Err(ClientError::Response("event larger than 4 MiB".into()));
            }
            while let Some(end) = buf.find("\n\n") {
                let ev: String = buf.drain(..end + 2).collect();
                let data: String = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                if data.is_empty() {
                    continue;
                }
                let v = serde_json::from_str(&data)
                    .map_err(|e| ClientError::Response(e.to_string()))?;
                if !on(v) {
                    return Ok(status);
                }
            }
        }
        Ok(status)
    }
}
