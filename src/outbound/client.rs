//! Twilio's Messages API: `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`,
//! form-encoded, HTTP Basic. The only user of reqwest (over rustls).
//!
//! Every answer is sorted by what it means for sending again: accepted
//! (201 with the message resource), refused with Twilio's error body, not
//! sent (no connection was made: safe to retry), or ambiguous (the request
//! may have reached Twilio: never retried). Knows nothing of the outbox.

use std::time::Duration;

use serde::Deserialize;

use super::Credentials;

/// One message to create.
#[derive(Debug, Clone)]
pub(crate) struct NewMessage<'a> {
    pub to: &'a str,
    /// Our number; ignored when `messaging_service_sid` is set.
    pub from: &'a str,
    pub messaging_service_sid: Option<&'a str>,
    pub body: &'a str,
    pub media: &'a [String],
    pub status_callback: Option<&'a str>,
}

/// What came of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Twilio created the message.
    Accepted {
        /// Its MessageSid (`SM…`).
        sid: String,
        /// Its first status (`queued`, or `accepted` through a Messaging
        /// Service).
        status: String,
    },
    /// Twilio answered with an error.
    Refused {
        /// The HTTP status.
        http: u16,
        /// Twilio's error code, when the body had one.
        code: Option<u32>,
        /// Twilio's message, or the HTTP status text.
        message: String,
    },
    /// No connection was made: Twilio never saw the request.
    NotSent(String),
    /// The request may have reached Twilio, and no usable answer came back
    /// (a timeout after sending, a connection lost mid-answer).
    Ambiguous(String),
}

#[derive(Deserialize)]
struct Created {
    sid: String,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    message: Option<String>,
}

/// A client for one account.
pub(crate) struct Client {
    http: reqwest::Client,
    url: String,
    credentials: Credentials,
}

impl Client {
    /// A client posting to `base` (e.g. `https://api.twilio.com`) with a
    /// time limit of `timeout` per request.
    pub fn new(
        base: &str,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("smsflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = format!(
            "{base}/2010-04-01/Accounts/{}/Messages.json",
            credentials.account_sid()
        );
        Ok(Client {
            http,
            url,
            credentials,
        })
    }

    /// Create one message. Never logs the credentials or the body.
    pub async fn send(&self, m: &NewMessage<'_>) -> Answer {
        let mut form: Vec<(String, String)> = vec![("To".into(), m.to.into())];
        match m.messaging_service_sid {
            Some(sid) => form.push(("MessagingServiceSid".into(), sid.into())),
            None => form.push(("From".into(), m.from.into())),
        }
        if !m.body.is_empty() {
            form.push(("Body".into(), m.body.into()));
        }
        for url in m.media {
            form.push(("MediaUrl".into(), url.clone()));
        }
        if let Some(cb) = m.status_callback {
            form.push(("StatusCallback".into(), cb.into()));
        }
        let sent = self
            .http
            .post(&self.url)
            .basic_auth(&self.credentials.user, Some(&self.credentials.secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(crate::twilio::encode_form(&form))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Answer::NotSent(describe(&e)),
            Err(e) => return Answer::Ambiguous(describe(&e)),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            // A success we could not read is still a message Twilio made.
            Err(e) if status.is_success() => return Answer::Ambiguous(describe(&e)),
            Err(_) => Default::default(),
        };
        if status.is_success() {
            return match serde_json::from_slice::<Created>(&body) {
                Ok(c) => Answer::Accepted {
                    sid: c.sid,
                    status: c.status.unwrap_or_else(|| "queued".into()),
                },
                Err(e) => Answer::Ambiguous(format!(
                    "HTTP {status} with a body that is not a message resource: {e}"
                )),
            };
        }
        let error: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        Answer::Refused {
            http: status.as_u16(),
            code: error.as_ref().and_then(|e| e.code),
            message: error
                .and_then(|e| e.message)
                .unwrap_or_else(|| status.to_string()),
        }
    }
}

/// An error with its causes, without the URL (it names the account).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
