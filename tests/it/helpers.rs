//! Test harness: the real server on 127.0.0.1:0, driven over real HTTP with
//! requests signed exactly as Twilio signs them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smsflow::app::App;
use smsflow::config::Config;
use smsflow::store::AnyStore;
use smsflow::twilio::RequestValidator;
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-auth-token-0123456789abcdef";
pub const OUR_NUMBER: &str = "+15550001111";
/// The admin token the test servers accept (`/status` detail, `/messages`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

static SID_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A fresh, unique MessageSid shaped like Twilio's (SM + 32 hex).
pub fn new_sid() -> String {
    let n = SID_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("SM{:032x}", n + (std::process::id() as u64) * 1_000_000_000)
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// The admin address, when the config sets `admin_listen`.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub public_url: String,
    pub client: reqwest::Client,
    pub validator: RequestValidator,
    pub store: Arc<AnyStore>,
    pub flows_dir: PathBuf,
    pub data_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub _tmp: Option<tempfile::TempDir>,
}

/// A flows directory in a temp dir holding the given (file name, contents).
pub fn flows_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write flow");
    }
    dir
}

pub async fn spawn_app(files: &[(&str, &str)]) -> TestApp {
    spawn_configured(files, |_| {}).await
}

/// The server on the given flow files, with the test config adjusted by
/// `edit`; the temp dir lives as long as the returned app.
pub async fn spawn_configured(files: &[(&str, &str)], edit: impl FnOnce(&mut Config)) -> TestApp {
    let tmp = tempfile::tempdir().expect("tempdir");
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).expect("flows dir");
    for (name, text) in files {
        std::fs::write(flows.join(name), text).expect("write flow");
    }
    let mut config = Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    config.admin_token = Some(smsflow::config::AuthToken::new(ADMIN_TOKEN));
    edit(&mut config);
    spawn_with(config).await.owning(tmp)
}

/// Serve `config`. Without outbound credentials of its own, the server
/// gets placeholder ones whose API base is a closed port on loopback: the
/// shipped flows send reminders on their own, which `serve` refuses
/// without credentials, and a test that does not look at sending must
/// never reach anything (a send there is refused and retried, never sent).
pub async fn spawn_with(mut config: Config) -> TestApp {
    if config.outbound.credentials.is_none() {
        config.outbound.credentials = Some(smsflow::outbound::Credentials::with_auth_token(
            "AC00000000000000000000000000000000",
            "placeholder",
        ));
        config.outbound.api_base = "http://127.0.0.1:1".into();
    }
    let flows_dir = config.flows_dir.clone();
    let data_dir = config.data_dir.clone();
    let public_base = config.public_url.clone();
    let app = App::build(config).await.expect("app builds");
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let store = app.store().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin_addr,
        public_url: public_base,
        client: reqwest::Client::new(),
        validator: RequestValidator::new(TOKEN),
        store,
        flows_dir,
        data_dir,
        shutdown: Some(tx),
        handle: Some(handle),
        _tmp: None,
    }
}

impl Drop for TestApp {
    /// Removes the temp dir, trying again for a moment. Dropping the app
    /// ends its server, whose store may be closing right then: a
    /// checkpoint written while the directory is being removed makes that
    /// removal fail, which `TempDir` ignores, and left `data/checkpoint`
    /// behind in the system's temp directory.
    fn drop(&mut self) {
        let Some(tmp) = self._tmp.take() else {
            return;
        };
        let path = tmp.keep();
        for _ in 0..50 {
            // Its error may be about an entry the store just renamed: what
            // counts is whether the directory is gone.
            let _ = std::fs::remove_dir_all(&path);
            if !path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The parameters of a plain inbound SMS, in Twilio's real order.
pub fn sms_params(from: &str, body: &str, sid: &str) -> Vec<(String, String)> {
    [
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ToCity", ""),
        ("FromZip", ""),
        ("SmsSid", sid),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", ""),
        ("Body", body),
        ("FromCountry", "US"),
        ("To", OUR_NUMBER),
        ("ToZip", ""),
        ("NumSegments", "1"),
        ("MessageSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", from),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub use smsflow::twilio::encode_form;

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl TestApp {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// The URL Twilio would sign for this path: the public base + path.
    pub fn signed_url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.public_url, path_and_query)
    }

    pub async fn post_form(
        &self,
        path: &str,
        params: &[(String, String)],
        signature: Option<&str>,
    ) -> Reply {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode_form(params));
        if let Some(sig) = signature {
            req = req.header("x-twilio-signature", sig);
        }
        into_reply(req.send().await.expect("request")).await
    }

    /// POST a form to `path`, signed as Twilio signs it.
    pub async fn post_signed(&self, path: &str, params: &[(String, String)]) -> Reply {
        let sig = self.validator.compute(&self.signed_url(path), params);
        self.post_form(path, params, Some(&sig)).await
    }

    /// GET `path` (parameters in its query), signed as Twilio signs it:
    /// the full URL, with no POST parameters.
    pub async fn get_signed(&self, path: &str) -> Reply {
        let sig = self.validator.compute(&self.signed_url(path), &[]);
        self.raw(
            self.client
                .get(self.url(path))
                .header("x-twilio-signature", sig),
        )
        .await
    }

    /// Send an SMS from `from` with a fresh MessageSid.
    pub async fn send_sms(&self, from: &str, body: &str) -> Reply {
        self.send_sms_sid(from, body, &new_sid()).await
    }

    pub async fn send_sms_sid(&self, from: &str, body: &str, sid: &str) -> Reply {
        self.post_signed("/twilio/sms", &sms_params(from, body, sid))
            .await
    }

    /// The value of the `/metrics` sample `name` (a counter or gauge
    /// without labels), if the server exports it.
    pub async fn metric_value(&self, name: &str) -> Option<u64> {
        let text = self.raw(self.client.get(self.url("/metrics"))).await.body;
        metric_in(&text, name)?.parse().ok()
    }

    /// GET `path` with the admin token, as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let r = self
            .raw(self.client.get(self.url(path)).bearer_auth(ADMIN_TOKEN))
            .await;
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
    }

    pub async fn raw(&self, req: reqwest::RequestBuilder) -> Reply {
        into_reply(req.send().await.expect("request")).await
    }

    /// Hand the directory `tmp` to the app, whose drop removes it, trying
    /// again while the server still writes (see `Drop`). A directory
    /// dropped beside a running app is removed while its server writes,
    /// and a checkpoint written meanwhile can leave it behind.
    pub fn owning(mut self, tmp: impl Into<Option<tempfile::TempDir>>) -> Self {
        self._tmp = tmp.into();
        self
    }

    /// Signal shutdown without waiting for the server to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stop the server gracefully and wait for it (store flushed).
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        self.shutdown_inner().await;
        self._tmp.take()
    }

    async fn shutdown_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server ran cleanly");
        }
    }
}

async fn into_reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.text().await.unwrap_or_default();
    Reply {
        status,
        content_type,
        body,
    }
}

/// The message bodies in a TwiML document, in order (test-side parser).
/// The value of the sample `name` (a counter or gauge without labels) in
/// the text of a `/metrics` answer, as written.
pub fn metric_in<'a>(metrics: &'a str, name: &str) -> Option<&'a str> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::trim)
}

pub fn bodies(twiml: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(twiml);
    let mut out = Vec::new();
    let mut in_body = false;
    let mut cur = String::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if e.name().as_ref() == b"Body" => {
                in_body = true;
                cur.clear();
            }
            Ok(Event::End(e)) if e.name().as_ref() == b"Body" => {
                in_body = false;
                out.push(std::mem::take(&mut cur));
            }
            Ok(Event::Text(t)) if in_body => cur.push_str(&t.unescape().expect("escaped text")),
            Ok(Event::Eof) => break,
            Err(e) => panic!("TwiML does not parse: {e}: {twiml}"),
            _ => {}
        }
    }
    out
}
