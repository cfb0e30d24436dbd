//! A minimal HTTP/1.1 GET client for the admin endpoints of a running
//! server (`smsflow messages --server URL`). Plain `http://` only: the
//! admin endpoints are meant for loopback or a private network, and a TLS
//! stack is not worth its weight for one CLI call. Knows nothing of smsflow.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

/// GET `path` from `base` (`http://host:port`) with a bearer token; the
/// body on 200, an error naming the status otherwise.
pub fn get(base: &str, path: &str, token: &str) -> anyhow::Result<String> {
    let Some(hostport) = base.trim_end_matches('/').strip_prefix("http://") else {
        bail!("--server must look like http://HOST:PORT (plain http only)");
    };
    if hostport.contains('/') {
        bail!("--server must be just http://HOST:PORT, without a path");
    }
    let mut stream =
        TcpStream::connect(hostport).with_context(|| format!("connecting to {hostport}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP answer from {hostport}");
    };
    let status_line = head.lines().next().unwrap_or("");
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    if code != "200" {
        bail!("{hostport} answered {status_line}: {}", body.trim());
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = s.split_once("\r\n") else {
            bail!("malformed chunked body");
        };
        let n = usize::from_str_radix(size.trim(), 16).context("malformed chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).context("truncated chunk")?;
        out.push_str(chunk);
        s = rest.get(n + 2..).unwrap_or("");
    }
}
