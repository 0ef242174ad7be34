//! NBD URIs in the form libnbd and QEMU use.
//!
//! | form | meaning |
//! |---|---|
//! | `nbd://HOST[:PORT][/EXPORT]` | TCP, port 10809 by default |
//! | `nbd+unix:///[EXPORT]?socket=PATH` | Unix domain socket |
//! | `nbds://…`, `nbds+unix://…` | TLS: refused with [`UriError::TlsUnsupported`] |
//!
//! The export name is the path after the first `/`, percent-decoded (`nbd://h//x` names the
//! export `/x`). `HOST` may be an IPv6 literal in brackets.

use std::fmt;
use std::path::PathBuf;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("unknown scheme (expected nbd:// or nbd+unix://)")]
    UnknownScheme,
    #[error("TLS (nbds) is not supported by this client")]
    TlsUnsupported,
    #[error("nbd+unix:// needs a socket= query parameter and no host")]
    MissingSocket,
    #[error("missing host")]
    MissingHost,
    #[error("invalid port")]
    BadPort,
    #[error("invalid percent-encoding")]
    BadEscape,
}

impl NbdUri {
    /// Parses a URI.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let (scheme, rest) = uri.split_once("://").ok_or(UriError::UnknownScheme)?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path)?;
        let socket = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "socket")
            .map(|(_, v)| percent_decode(v))
            .transpose()?;
        let address = match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(UriError::MissingSocket);
                }
                Address::Unix(PathBuf::from(socket.ok_or(UriError::MissingSocket)?))
            }
            "nbd" => {
                let (host, port) = split_host_port(authority)?;
                Address::Tcp { host, port }
            }
            "nbds" | "nbds+unix" => return Err(UriError::TlsUnsupported),
            _ => return Err(UriError::UnknownScheme),
        };
        Ok(NbdUri { address, export })
    }

    /// A Unix-socket URI for `path` and `export`.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: Address::Unix(path.into()),
            export: export.into(),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.address {
            Address::Unix(p) => {
                write!(
                    f,
                    "nbd+unix:///{export}?socket={}",
                    percent_encode(&p.to_string_lossy())
                )
            }
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(UriError::MissingHost)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(UriError::BadPort),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UriError::MissingHost);
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| UriError::BadPort)?,
        None => DEFAULT_PORT,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::BadEscape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::BadEscape)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_uri_with_export_and_socket() {
        let u = NbdUri::parse("nbd+unix:///vda?socket=/run/x%20y.sock").expect("valid uri");
        assert_eq!(u.export, "vda");
        assert_eq!(u.address, Address::Unix("/run/x y.sock".into()));
        assert_eq!(NbdUri::parse(&u.to_string()), Ok(u));
    }

    #[test]
    fn parses_tcp_forms() {
        let u = NbdUri::parse("nbd://example.com").expect("valid uri");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "example.com".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:1234//abs").expect("valid uri");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "/abs");
        assert_eq!(NbdUri::parse(&u.to_string()), Ok(u));
    }

    #[test]
    fn refuses_bad_uris() {
        assert_eq!(NbdUri::parse("http://x"), Err(UriError::UnknownScheme));
        assert_eq!(NbdUri::parse("nbds://x/"), Err(UriError::TlsUnsupported));
        assert_eq!(NbdUri::parse("nbd+unix:///x"), Err(UriError::MissingSocket));
        assert_eq!(NbdUri::parse("nbd://h:99999/"), Err(UriError::BadPort));
        assert_eq!(NbdUri::parse("nbd://:1/"), Err(UriError::MissingHost));
        assert_eq!(NbdUri::parse("nbd://h/%zz"), Err(UriError::BadEscape));
    }
}
