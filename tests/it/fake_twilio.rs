//! A fake of Twilio's Messages REST API: a real HTTP server on
//! 127.0.0.1:0 that follows the documented API
//! (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`): HTTP Basic
//! auth and the Account SID in the path checked, the required parameters,
//! `Body` at most 1,600 characters, 201 with a JSON message resource, and
//! errors as Twilio writes them (`{code, message, more_info, status}`).
//!
//! Tests script it: faults for the next requests (429/20429, 500, a hang
//! past the client's timeout, a connection dropped after the request was
//! read), errors per recipient (21610, 21211, …), and the status callbacks
//! it then posts to the message's `StatusCallback`, signed with
//! `X-Twilio-Signature` exactly as Twilio signs them, in any order.
//!
//! Hand-written HTTP/1.1 over TCP (one request per connection,
//! `Connection: close`), so that a fault can drop or hold a connection at
//! any point.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use smsflow::twilio::{parse_form, RequestValidator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// The auth token of the fake account (the REST API's Basic password).
pub const API_SECRET: &str = "fake-twilio-auth-token-0123456789";
/// An API key of the fake account, and its secret (the other way in).
pub const API_KEY_SID: &str = "SK0123456789abcdef0123456789abcdef";
pub const API_KEY_SECRET: &str = "fake-twilio-api-key-secret-0123456";

/// What the next request gets instead of being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 429 with Twilio's error 20429.
    TooManyRequests,
    /// 500 with error 20500.
    ServerError,
    /// Read the request, then answer nothing for this long.
    Hang(Duration),
    /// Read the request, then close the connection without an answer.
    Drop,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub path: String,
    pub params: Vec<(String, String)>,
    /// The HTTP status answered (0: none, a fault).
    pub answered: u16,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A status callback the fake posted, and what our server answered.
#[derive(Debug, Clone)]
pub struct Callback {
    pub message_sid: String,
    pub status: String,
    pub answered: u16,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    errors: HashMap<String, u32>,
    /// Statuses posted back for every created message, in this order.
    callbacks: Vec<&'static str>,
    requests: Vec<Request>,
    posted: Vec<Callback>,
    created: u64,
}

#[derive(Clone)]
pub struct FakeTwilio {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Signs callbacks with our server's auth token, as Twilio does.
    signer: Arc<RequestValidator>,
}

impl FakeTwilio {
    /// Start the fake; `auth_token` is the one our server verifies
    /// callbacks with.
    pub async fn start(auth_token: &str) -> FakeTwilio {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let fake = FakeTwilio {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(State::default())),
            signer: Arc::new(RequestValidator::new(auth_token)),
        };
        let me = fake.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve(socket).await });
            }
        });
        fake
    }

    /// The API base to configure (`twilio_api_base`).
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn messages_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
            self.base()
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The next requests get these faults, one each, in order.
    pub fn fault(&self, faults: &[Fault]) {
        self.state().faults.extend(faults);
    }

    /// Messages to `to` are refused with Twilio error `code`.
    pub fn refuse(&self, to: &str, code: u32) {
        self.state().errors.insert(to.to_owned(), code);
    }

    /// Post these statuses back for every message created, in this order.
    pub fn callbacks(&self, statuses: &[&'static str]) {
        self.state().callbacks = statuses.to_vec();
    }

    /// Every request received, faults included.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// Requests to `to`.
    pub fn requests_to(&self, to: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.param("To") == Some(to))
            .collect()
    }

    pub fn posted(&self) -> Vec<Callback> {
        self.state().posted.clone()
    }

    async fn serve(&self, mut socket: TcpStream) {
        let Some((head, body)) = read_request(&mut socket).await else {
            return;
        };
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut parts = request_line.split(' ');
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let params = parse_form(&body).unwrap_or_default();
        let fault = self.state().faults.pop_front();
        let at = Instant::now();
        // A request is listed with the status it is answered with, so a
        // test that sees it sees its answer too; one never answered (a
        // fault) is listed with 0 as it arrives.
        let record = |status: u16| {
            self.state().requests.push(Request {
                at,
                path: path.clone(),
                params: params.clone(),
                answered: status,
            })
        };
        let (status, json, created) = match fault {
            Some(Fault::Hang(d)) => {
                record(0);
                tokio::time::sleep(d).await;
                return;
            }
            Some(Fault::Drop) => {
                record(0);
                return;
            }
            Some(Fault::TooManyRequests) => (429, error(20429, "Too Many Requests", 429), None),
            Some(Fault::ServerError) => (500, error(20500, "Internal Server Error", 500), None),
            None => self.answer(&method, &path, &headers, &params),
        };
        record(status);
        let text = json.to_string();
        let reason = match status {
            201 => "CREATED",
            400 => "BAD REQUEST",
            401 => "UNAUTHORIZED",
            404 => "NOT FOUND",
            405 => "METHOD NOT ALLOWED",
            429 => "TOO MANY REQUESTS",
            _ => "INTERNAL SERVER ERROR",
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = socket.write_all(response.as_bytes()).await;
        let _ = socket.shutdown().await;
        if let Some((sid, to, from, callback)) = created {
            self.post_callbacks(sid, to, from, callback).await;
        }
    }

    #[allow(clippy::type_complexity)]
    fn answer(
        &self,
        method: &str,
        path: &str,
        headers: &HashMap<String, String>,
        params: &[(String, String)],
    ) -> (
        u16,
        serde_json::Value,
        Option<(String, String, String, Option<String>)>,
    ) {
        let accepted = [
            format!("Basic {}", basic(ACCOUNT_SID, API_SECRET)),
            format!("Basic {}", basic(API_KEY_SID, API_KEY_SECRET)),
        ];
        if !headers
            .get("authorization")
            .is_some_and(|h| accepted.contains(h))
        {
            return (401, error(20003, "Authenticate", 401), None);
        }
        let account = path
            .strip_prefix("/2010-04-01/Accounts/")
            .and_then(|rest| rest.strip_suffix("/Messages.json"));
        if account != Some(ACCOUNT_SID) {
            return (
                404,
                error(
                    20404,
                    &format!("The requested resource {path} was not found"),
                    404,
                ),
                None,
            );
        }
        if method != "POST" {
            return (405, error(20004, "Method not allowed", 405), None);
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let media: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "MediaUrl")
            .map(|(_, v)| v.clone())
            .collect();
        let Some(to) = get("To") else {
            return (
                400,
                error(21604, "A 'To' phone number is required.", 400),
                None,
            );
        };
        let from = get("From");
        let service = get("MessagingServiceSid");
        if from.is_none() && service.is_none() {
            return (
                400,
                error(21603, "A 'From' phone number is required.", 400),
                None,
            );
        }
        let body = get("Body").unwrap_or_default();
        if body.is_empty() && media.is_empty() {
            return (400, error(21602, "Message body is required.", 400), None);
        }
        if body.chars().count() > 1600 {
            return (
                400,
                error(
                    21617,
                    "The concatenated message body exceeds the 1600 character limit.",
                    400,
                ),
                None,
            );
        }
        if media.len() > 10 {
            return (
                400,
                error(21623, "Number of media files exceeds allowed limit.", 400),
                None,
            );
        }
        if let Some(code) = self.state().errors.get(&to).copied() {
            let message = match code {
                21610 => "Attempt to send to unsubscribed recipient".to_owned(),
                21211 => format!("The 'To' number {to} is not a valid phone number."),
                21612 => format!("The 'To' phone number: {to}, is not currently reachable using the 'From' phone number via SMS."),
                21614 => format!("'To' number {to} is not a valid mobile number"),
                21408 => "Permission to send an SMS has not been enabled for the region indicated by the 'To' number".to_owned(),
                _ => format!("error {code}"),
            };
            return (400, error(code, &message, 400), None);
        }
        let n = {
            let mut s = self.state();
            s.created += 1;
            s.created
        };
        let sid = format!(
            "SM{:032x}",
            (u128::from(std::process::id()) << 64)
                | u128::from(n)
                | (u128::from(self.addr.port()) << 48)
        );
        let now = jiff::Timestamp::now()
            .strftime("%a, %d %b %Y %H:%M:%S +0000")
            .to_string();
        let status = if service.is_some() {
            "accepted"
        } else {
            "queued"
        };
        let uri = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json");
        let resource = serde_json::json!({
            "account_sid": ACCOUNT_SID,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": null,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": null,
            "error_message": null,
            "from": from,
            "messaging_service_sid": service,
            "num_media": media.len().to_string(),
            "num_segments": "1",
            "price": null,
            "price_unit": "USD",
            "sid": sid,
            "status": status,
            "subresource_uris": { "media": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media.json") },
            "to": to,
            "uri": uri,
        });
        let from = from.or(service).unwrap_or_default();
        (201, resource, Some((sid, to, from, get("StatusCallback"))))
    }

    /// Post the scripted statuses to `url`, signed, one after another.
    async fn post_callbacks(&self, sid: String, to: String, from: String, url: Option<String>) {
        let Some(url) = url else { return };
        let statuses = self.state().callbacks.clone();
        let client = reqwest::Client::new();
        for status in statuses {
            let mut params: Vec<(String, String)> = vec![
                ("AccountSid".into(), ACCOUNT_SID.into()),
                ("ApiVersion".into(), "2010-04-01".into()),
                ("From".into(), from.clone()),
                ("MessageSid".into(), sid.clone()),
                ("MessageStatus".into(), status.into()),
                ("SmsSid".into(), sid.clone()),
                ("SmsStatus".into(), status.into()),
                ("To".into(), to.clone()),
            ];
            if status == "failed" || status == "undelivered" {
                params.push(("ErrorCode".into(), "30003".into()));
            }
            let signature = self.signer.compute(&url, &params);
            let answered = match client
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-twilio-signature", signature)
                .body(smsflow::twilio::encode_form(&params))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            self.state().posted.push(Callback {
                message_sid: sid.clone(),
                status: status.to_owned(),
                answered,
            });
        }
    }
}

pub fn basic(user: &str, secret: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
}

fn error(code: u32, message: &str, status: u16) -> serde_json::Value {
    serde_json::json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    })
}

/// One request: the head (request line and headers) and the body
/// (`Content-Length` bytes).
async fn read_request(socket: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some((head, body))
}

/// The bodies Twilio accepted (201) for `to`, once there are at least `n`
/// (waiting up to 20 s).
pub async fn bodies_sent(fake: &FakeTwilio, to: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<String> = fake
            .requests_to(to)
            .iter()
            .filter(|r| r.answered == 201)
            .map(|r| r.param("Body").unwrap_or("").to_owned())
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{to}: only {got:?} sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
