//! A minimal HTTP/1.1 client for the admin endpoints of a running
//! server (`smsflow messages --server URL`, `smsflow start`, `smsflow
//! contacts`). Plain `http://` only: the
//! admin endpoints are meant for loopback or a private network, and a TLS
//! stack is not worth its weight for one CLI call. Knows nothing of smsflow.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

/// GET `path` from `base` (`http://host:port`) with a bearer token; the
/// body on 200, an error naming the status otherwise.
pub fn get(base: &str, path: &str, token: &str) -> anyhow::Result<String> {
    let (code, status_line, body) = exchange(base, "GET", path, token, None)?;
    if code != 200 {
        bail!("{base} answered {status_line}: {}", body.trim());
    }
    Ok(body)
}

/// POST `body` (of `content_type`) to `path` on `base` with a bearer
/// token; the status code and the body, whatever the status (the caller
/// decides what a 4xx means).
pub fn post(
    base: &str,
    path: &str,
    token: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let (code, _, body) = exchange(base, "POST", path, token, Some((content_type, body)))?;
    Ok((code, body))
}

/// DELETE `path` on `base` with a bearer token; the status code and the
/// body, whatever the status.
pub fn delete(base: &str, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
    let (code, _, body) = exchange(base, "DELETE", path, token, None)?;
    Ok((code, body))
}

/// One request and its answer: status code, status line, body.
fn exchange(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<(u16, String, String)> {
    let Some(hostport) = base.trim_end_matches('/').strip_prefix("http://") else {
        bail!("--server must look like http://HOST:PORT (plain http only)");
    };
    if hostport.contains('/') {
        bail!("--server must be just http://HOST:PORT, without a path");
    }
    let mut stream =
        TcpStream::connect(hostport).with_context(|| format!("connecting to {hostport}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some((content_type, bytes)) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    request.push_str("\r\n");
    let mut out = request.into_bytes();
    if let Some((_, bytes)) = body {
        out.extend_from_slice(bytes);
    }
    stream.write_all(&out)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP answer from {hostport}");
    };
    let status_line = head.lines().next().unwrap_or("").to_string();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP answer from {hostport}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((code, status_line, body))
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
