//! Flow HTTP calls on the wire: the [`Caller`] the pipeline makes a
//! flow's `call:` through, and [`HttpCaller`], the real one `serve` uses.
//!
//! Safety lives here, defined once: the allow-list ([`Allow`], the
//! `http_allow` setting), no requests to loopback, private, link-local or
//! other non-public addresses unless the allow-list names that address as
//! the host (a host name is resolved first and refused if any address it
//! resolves to is not public; the connection then goes to an address
//! that was checked, so DNS cannot smuggle one in between), redirects
//! followed by hand (at most [`MAX_REDIRECTS`], each checked like the
//! first, never to another origin while a secret header is set), the
//! answer capped at [`MAX_RESPONSE_BYTES`], no proxy, and the deadline the
//! pipeline gives (the message's `call_budget_ms`). Secret header values
//! are read from the environment (or systemd credentials) at the call,
//! marked sensitive, and never logged. Knows nothing of flows beyond the
//! request and answer types ([`crate::flow::calls`]).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use reqwest::Url;

use crate::flow::calls::{CallError, CallRequest, CallResponse, HeaderValue};

/// The default `call_budget_ms`: all calls of one message share 5 s.
pub const DEFAULT_CALL_BUDGET_MS: u64 = 5_000;
/// The largest `call_budget_ms`: the rest of Twilio's 15 s is for the
/// engine, the commit and the flush.
pub const MAX_CALL_BUDGET_MS: u64 = 12_000;
/// The largest answer read; a larger one fails the call.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// At most this many redirects per call.
pub const MAX_REDIRECTS: usize = 3;

/// A future a [`Caller`] returns.
pub type CallFuture<'a> = Pin<Box<dyn Future<Output = CallResponse> + Send + 'a>>;

/// Makes a flow's HTTP calls for the pipeline: the real client in `serve`,
/// a transcript's declared answers in `test` and `chat`.
pub trait Caller: Send + Sync {
    /// Make `request`, answering by `deadline` at the latest (a failure
    /// when it passes).
    fn call<'a>(&'a self, request: &'a CallRequest, deadline: Instant) -> CallFuture<'a>;
}

/// A caller for when calls are off: every call fails (and the flow takes
/// its `on_error`).
#[derive(Debug, Clone)]
pub struct NoCalls(pub String);

impl Caller for NoCalls {
    fn call<'a>(&'a self, _request: &'a CallRequest, _deadline: Instant) -> CallFuture<'a> {
        let reason = self.0.clone();
        Box::pin(async move { CallResponse::failed(CallError::Refused, reason) })
    }
}

/// The `http_allow` setting, parsed: hosts (`shop.example`, `10.0.0.5`,
/// any port, http or https) and URL prefixes (`https://shop.example/api/`:
/// that scheme, host and port, and a path under that one).
#[derive(Debug, Clone, Default)]
pub struct Allow {
    hosts: Vec<String>,
    prefixes: Vec<Url>,
}

impl Allow {
    /// Parse the setting's entries; the first bad one is an error.
    pub fn parse(entries: &[String]) -> Result<Allow, String> {
        let mut allow = Allow::default();
        for entry in entries {
            let e = entry.trim();
            if e.contains("://") {
                let url = Url::parse(e).map_err(|err| format!("`{e}` is not a URL: {err}"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(format!(
                        "`{e}` must be an http:// or https:// URL with a host"
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
                    return Err(format!(
                        "`{e}`: a URL prefix has no query, fragment or user"
                    ));
                }
                allow.prefixes.push(url);
            } else {
                let host = e.to_ascii_lowercase();
                let ok = !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
                if !ok {
                    return Err(format!(
                        "`{e}` is not a host name or address (a URL prefix needs its scheme)"
                    ));
                }
                allow.hosts.push(host.trim_matches(['[', ']']).to_owned());
            }
        }
        Ok(allow)
    }

    /// Does the list let a call reach `url`? Its host must be listed, or
    /// its scheme, host and port equal a prefix's and its path lie under
    /// the prefix's path.
    pub fn permits(&self, url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        self.prefixes.iter().any(|p| {
            p.scheme() == url.scheme()
                && p.host_str().map(str::to_ascii_lowercase).as_deref()
                    == url.host_str().map(str::to_ascii_lowercase).as_deref()
                && p.port_or_known_default() == url.port_or_known_default()
                && under(p.path(), url.path())
        })
    }
}

/// Is `path` `prefix` itself or below it (`/api` covers `/api` and
/// `/api/x`, not `/apix`)?
fn under(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// Is `ip` a public unicast address (not loopback, private, link-local,
/// shared, documentation, multicast, reserved or unspecified)?
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from([0u16, 0, 0, 0, 0, 0xffff, 0, 0]))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // shared (carrier-grade NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19))) // benchmarking
}

/// reqwest's resolver for calls: a host name whose addresses are not all
/// public is refused; otherwise the connection goes to these checked
/// addresses.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no address").into());
            }
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(Box::new(NotPublic(format!(
                    "{host} resolves to {} (not a public address; name the address itself in http_allow to allow it)",
                    bad.ip()
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The resolver's refusal of a non-public address: found again in a
/// reqwest error's causes to tell a refusal from a connection error.
#[derive(Debug)]
struct NotPublic(String);

impl std::fmt::Display for NotPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPublic {}

/// Why a request failed: the category flows see and the words for logs.
type Failure = (CallError, String);

/// The real client: HTTP(S) over rustls, with the checks above.
pub struct HttpCaller {
    http: reqwest::Client,
    /// Shared with nothing else; cheap to clone the caller around.
    allow: Arc<Allow>,
}

impl HttpCaller {
    /// A client that may reach what `allow` permits.
    pub fn new(allow: Allow) -> anyhow::Result<HttpCaller> {
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(PublicOnly))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("smsflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpCaller {
            http,
            allow: Arc::new(allow),
        })
    }

    /// Checks `url` before any connection: allowed, and an address written
    /// as the host is one the allow-list names (only a listed host can
    /// pass, so a literal private address passes only when listed).
    fn check(&self, url: &Url) -> Result<(), Failure> {
        if !self.allow.permits(url) {
            return Err((
                CallError::Refused,
                format!(
                    "{} is not in http_allow",
                    url.host_str().unwrap_or("a URL without a host")
                ),
            ));
        }
        Ok(())
    }

    async fn call_inner(&self, request: &CallRequest) -> Result<CallResponse, Failure> {
        let invalid = |text: String| (CallError::Invalid, text);
        let refused = |text: String| (CallError::Refused, text);
        let mut url = Url::parse(&request.url).map_err(|e| invalid(format!("bad URL: {e}")))?;
        let mut method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| invalid(format!("bad method {}", request.method)))?;
        let mut body = request.body.clone();
        let origin = url.origin();
        let has_secret = request
            .headers
            .iter()
            .any(|(_, v)| matches!(v, HeaderValue::Secret(_)));
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("bad header name {name}")))?;
            let value = match value {
                HeaderValue::Text(t) => reqwest::header::HeaderValue::from_str(t)
                    .map_err(|_| invalid(format!("bad value for header {name}")))?,
                HeaderValue::Secret(var) => {
                    let secret = crate::config::secret(var)
                        .map_err(|_| refused(format!("secret {var} cannot be read")))?
                        .ok_or_else(|| refused(format!("secret {var} is not set")))?;
                    let mut v = reqwest::header::HeaderValue::from_str(&secret).map_err(|_| {
                        invalid(format!("secret {var} is not a valid header value"))
                    })?;
                    v.set_sensitive(true);
                    v
                }
            };
            headers.append(name, value);
        }
        for hop in 0..=MAX_REDIRECTS {
            self.check(&url)?;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some((content_type, text)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(text.clone());
            }
            let mut resp = req.send().await.map_err(describe)?;
            let status = resp.status();
            if status.is_redirection() {
                let Some(location) = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                else {
                    return Ok(CallResponse::Answered {
                        status: status.as_u16(),
                        json: None,
                    });
                };
                if hop == MAX_REDIRECTS {
                    return Err((
                        CallError::Redirects,
                        format!("more than {MAX_REDIRECTS} redirects"),
                    ));
                }
                let next = url
                    .join(location)
                    .map_err(|_| invalid("redirect to a bad URL".to_owned()))?;
                if has_secret && next.origin() != origin {
                    return Err(refused(
                        "redirect to another origin with a secret header".to_owned(),
                    ));
                }
                // 301, 302 and 303 turn a POST into a GET without a body
                // (as browsers do); 307 and 308 repeat the request.
                if matches!(status.as_u16(), 301..=303) && method != reqwest::Method::HEAD {
                    method = reqwest::Method::GET;
                    body = None;
                }
                url = next;
                continue;
            }
            if resp
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
            {
                return Err(too_large());
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(describe)? {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk);
            }
            return Ok(CallResponse::Answered {
                status: status.as_u16(),
                json: serde_json::from_slice(&bytes).ok(),
            });
        }
        Err((
            CallError::Redirects,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }
}

fn too_large() -> Failure {
    (
        CallError::TooLarge,
        format!("answer larger than {} KiB", MAX_RESPONSE_BYTES / 1024),
    )
}

/// A reqwest error's category (a refusal when the resolver refused a
/// non-public address) and its words without its URL (which may hold a
/// sender's data), with its causes (the resolver's refusal, a connection
/// error).
fn describe(err: reqwest::Error) -> Failure {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut error = if err.is_timeout() {
        CallError::Timeout
    } else {
        CallError::Connection
    };
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        if cause.is::<NotPublic>() {
            error = CallError::Refused;
        }
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    (error, text)
}

impl Caller for HttpCaller {
    fn call<'a>(&'a self, request: &'a CallRequest, deadline: Instant) -> CallFuture<'a> {
        Box::pin(async move {
            let now = Instant::now();
            if now >= deadline {
                return CallResponse::failed(CallError::Timeout, "call budget spent");
            }
            let until = deadline.min(now + request.timeout);
            let budget_cut = until == deadline && now + request.timeout > deadline;
            match tokio::time::timeout_at(until.into(), self.call_inner(request)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err((error, detail))) => CallResponse::failed(error, detail),
                Err(_) if budget_cut => {
                    CallResponse::failed(CallError::Timeout, "call budget spent")
                }
                Err(_) => CallResponse::failed(
                    CallError::Timeout,
                    format!("timed out after {} ms", request.timeout.as_millis()),
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> Allow {
        Allow::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn url(u: &str) -> Url {
        Url::parse(u).unwrap()
    }

    #[test]
    fn hosts_and_prefixes() {
        let a = allow(&[
            "shop.example",
            "https://crm.example/api/",
            "http://10.0.0.5:8080/x",
        ]);
        assert!(a.permits(&url("https://shop.example/orders")));
        assert!(a.permits(&url("http://SHOP.example:81/")));
        assert!(!a.permits(&url("https://shop.example.evil.com/")));
        assert!(a.permits(&url("https://crm.example/api/contacts")));
        assert!(!a.permits(&url("https://crm.example/apix")));
        assert!(!a.permits(&url("http://crm.example/api/")));
        assert!(!a.permits(&url("https://crm.example:444/api/")));
        assert!(a.permits(&url("http://10.0.0.5:8080/x/y")));
        assert!(!a.permits(&url("http://10.0.0.5:8080/xy")));
        assert!(!a.permits(&url("ftp://shop.example/")));
        assert!(!allow(&[]).permits(&url("https://shop.example/")));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["ftp://x/", "http://", "sh op", "https://x/?q=1", ""] {
            assert!(Allow::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
