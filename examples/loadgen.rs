//! Load generator: drives the real smsflow server over loopback HTTP with
//! signed webhooks from many senders through a multi-step flow, then drives
//! a bare axum handler (parse the form, answer fixed TwiML) the same way on
//! the same machine, and prints both figures and their ratio.
//!
//! ```sh
//! cargo run --release --example loadgen -- --requests 20000 --senders 1000 --concurrency 32
//! ```
//!
//! Both servers run in this process on their own 2-thread runtime; the
//! client runs on another. Only loopback traffic, bounded by `--requests`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use smsflow::app::App;
use smsflow::config::Config;
use smsflow::store::Durability;
use smsflow::twilio::{encode_form, RequestValidator};

const TOKEN: &str = "loadgen-token";
const OUR_NUMBER: &str = "+15550001111";

/// The conversation every simulated sender repeats.
const FLOW: &str = r#"
name: loadtest
trigger:
  keywords: [JOIN]
steps:
  ask_name:
    say: "Hi! What's your name?"
    wait:
      - anything: true
        save: name
        goto: ask_age
  ask_age:
    say: "Thanks {{name}}! How old are you?"
    wait:
      - number: 1..120
        save: age
        goto: done
    retry:
      say: "Please send your age as a number."
      limit: 2
  done:
    say: "All set, {{name}} ({{age}})."
"#;

const KEYWORDS: &str = "keywords:\n  HOURS: \"We're open 9-5\"\n";

struct Args {
    requests: usize,
    senders: usize,
    concurrency: usize,
    durability: Durability,
    scenario: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        requests: 20_000,
        senders: 1_000,
        concurrency: 32,
        durability: Durability::Flush,
        scenario: "multistep".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--requests" => a.requests = val.parse().expect("--requests N"),
            "--senders" => a.senders = val.parse().expect("--senders N"),
            "--concurrency" => a.concurrency = val.parse().expect("--concurrency N"),
            "--durability" => {
                a.durability = match val.as_str() {
                    "relaxed" => Durability::Relaxed,
                    _ => Durability::Flush,
                }
            }
            "--scenario" => a.scenario = val,
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
        i += 2;
    }
    a
}

#[derive(Default)]
struct Report {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[idx]
    }
    fn line(&self, name: &str) -> String {
        format!(
            "{name:<10} {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ok {}  errors {}",
            self.rps(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.ok,
            self.errors
        )
    }
}

/// Sends `requests` signed webhooks to `addr` from `concurrency` workers.
/// Sender `s` walks the conversation JOIN → name → age, and starts again.
async fn drive(addr: SocketAddr, public_url: &str, args: &Args, keyword: bool) -> Report {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .expect("client");
    let validator = Arc::new(RequestValidator::new(TOKEN));
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("http://{addr}/twilio/sms");
    let signed_url = format!("{public_url}/twilio/sms");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, validator, next) = (client.clone(), validator.clone(), next.clone());
        let (url, signed_url) = (url.clone(), signed_url.clone());
        let (requests, senders) = (args.requests, args.senders);
        tasks.push(tokio::spawn(async move {
            let mut rep = Report::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    break;
                }
                // Consecutive messages of one sender are `senders` requests
                // apart, so with senders >> concurrency they arrive in order,
                // like a real phone's.
                let sender = n % senders.max(1);
                let round = n / senders.max(1);
                let body = if keyword {
                    "HOURS".to_string()
                } else {
                    match round % 3 {
                        0 => "JOIN".to_string(),
                        1 => format!("Person {sender}"),
                        _ => format!("{}", 20 + sender % 50),
                    }
                };
                let sid = format!("SM{n:032x}");
                let params: Vec<(String, String)> = [
                    ("MessageSid", sid.as_str()),
                    ("SmsSid", sid.as_str()),
                    ("AccountSid", "AC00000000000000000000000000000000"),
                    ("From", &format!("+1555{sender:07}")),
                    ("To", OUR_NUMBER),
                    ("Body", &body),
                    ("NumMedia", "0"),
                    ("NumSegments", "1"),
                    ("ApiVersion", "2010-04-01"),
                ]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                let sig = validator.compute(&signed_url, &params);
                let t = Instant::now();
                let res = client
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("x-twilio-signature", sig)
                    .body(encode_form(&params))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        rep.ok += 1;
                        rep.latencies.push(t.elapsed());
                    }
                    _ => rep.errors += 1,
                }
            }
            rep
        }));
    }
    let mut total = Report::default();
    for t in tasks {
        let r = t.await.expect("worker");
        total.ok += r.ok;
        total.errors += r.errors;
        total.latencies.extend(r.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort();
    total
}

async fn bare_handler(body: Bytes) -> impl IntoResponse {
    // The ceiling: parse the form like the real server, fixed TwiML.
    let ok = smsflow::twilio::parse_form(&body).is_ok();
    let twiml = if ok {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message><Body>ok</Body></Message></Response>"
    } else {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"
    };
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], twiml)
}

fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    let args = parse_args();
    let keyword = args.scenario == "keyword";
    let tmp = tempfile::tempdir().expect("tempdir");
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).expect("flows dir");
    write(&flows.join("loadtest.yaml"), FLOW);
    write(&flows.join("keywords.yaml"), KEYWORDS);

    let mut config = Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    config.durability = args.durability;
    let server_rt = server_runtime();
    let app = server_rt.block_on(App::build(config)).expect("app builds");
    let addr = app.local_addr();
    server_rt.spawn(app.run_until(std::future::pending()));

    let bare_rt = server_runtime();
    let bare_addr = bare_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new().route("/twilio/sms", axum::routing::post(bare_handler));
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });

    let client_rt = server_runtime();
    println!(
        "scenario {}  requests {}  senders {}  concurrency {}  durability {:?}",
        args.scenario, args.requests, args.senders, args.concurrency, args.durability
    );
    // Warm-up, then the measured runs.
    let warm = Args {
        requests: args.requests.min(2_000),
        ..args_clone(&args)
    };
    client_rt.block_on(drive(bare_addr, "http://localhost", &warm, keyword));
    let bare = client_rt.block_on(drive(bare_addr, "http://localhost", &args, keyword));
    let ours = client_rt.block_on(drive(addr, "http://localhost", &args, keyword));
    println!("{}", bare.line("bare axum"));
    println!("{}", ours.line("smsflow"));
    println!(
        "ratio      {:.1}% of the bare handler's requests/s",
        100.0 * ours.rps() / bare.rps()
    );
}

fn args_clone(a: &Args) -> Args {
    Args {
        requests: a.requests,
        senders: a.senders,
        concurrency: a.concurrency,
        durability: a.durability,
        scenario: a.scenario.clone(),
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write flow");
}
