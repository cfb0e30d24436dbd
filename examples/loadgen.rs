//! Load generator: drives the smsflow server over loopback HTTP with signed
//! webhooks from many senders, then compares it with a bare axum handler
//! (parse the form, answer fixed TwiML) measured the same way, on the same
//! machine, in the same run: requests/s, p50/p99 latency, errors, each
//! server's CPU time per message (its own utime + stime from
//! `/proc/<pid>/stat` over the measured run, divided by the requests), this
//! client's own CPU time per request, and each server's peak RSS (`VmHWM`
//! from `/proc/<pid>/status`). CPU time is far steadier than requests/s on
//! a shared machine: other work slows the server down but does not add to
//! its CPU time. The `switches` line counts context switches per message
//! (`/proc/<pid>/task/*/status`, summed over the threads alive at the
//! end): each server's threads going to sleep and being preempted, and
//! how often this client went to sleep waiting for answers. On a machine
//! whose cores the client shares, a server that answers more slowly than
//! the client sends lets it sleep, and each answer then wakes it and
//! often preempts the server: switches a faster server never pays. The
//! `threads` line splits smsflow's CPU per message by thread, from each
//! thread's on-CPU time (`/proc/<pid>/task/*/schedstat`, in ns): tokio's
//! async workers, the store's thread (grouped flushes: its CPU is mostly
//! the kernel's syncs) and the others. The `machine` line says how all
//! of the machine's CPUs spent each server's run (`/proc/stat`): busy,
//! idle, idle while a task waited for the disk, and stolen by the host
//! of a virtual machine. Idle time means requests/s was not bound by CPU
//! alone; steal means the host's other work took CPUs and moved the run's
//! figures.
//!
//! ```sh
//! cargo build --release --examples --bins
//! L=target/release/examples/loadgen
//! $L --scenario multistep --durability flush --senders 1000 --requests 20000 --concurrency 32
//! $L --scenario multistep --client reqwest                     # the same through reqwest
//! $L --scenario keyword
//! $L --scenario rhai                                           # multistep as a Rhai script
//! $L --scenario multistep --durability relaxed
//! $L --scenario multistep --rounds 5                           # five rounds, medians of their ratios
//! $L --scenario multistep --senders 100000 --prefill 100000     # peak RSS, 100k conversations
//! $L --scenario rhai --engine-only --requests 300000            # the flow engine alone, CPU per message
//! $L --startup-flows 100                                         # spawn -> first /healthz, median of 5
//! $L --scenario multistep --senders 100000 --prefill 100000 --soak-secs 300   # RSS over 5 minutes
//! $L --scenario timers --senders 1000 --prefill 100000        # with 100,000 pending timers
//! SMSFLOW_DATABASE_URL=postgres://… $L --instances 2          # two instances on PostgreSQL, round robin
//! $L --scenario calls --requests 2000 --upstream-delay-ms 3000 --call-budget-ms 1000
//! $L --scenario calls_mixed --requests 5000 --upstream-delay-ms 3000 --call-budget-ms 1000
//! ```
//!
//! The `calls` scenarios make HTTP calls from the flow (every message in
//! `calls`, one sender in ten in `calls_mixed`, the others a keyword) to
//! an upstream this program serves on loopback, answering after
//! `--upstream-delay-ms`; the server allows `127.0.0.1` and gives each
//! message `--call-budget-ms`. A delay past the budget shows what a slow
//! upstream costs in webhook latency.
//!
//! Both servers run as child processes by default: smsflow is the `smsflow`
//! binary next to this example's directory (`target/release/smsflow`, or
//! `--server-bin PATH`), started as `smsflow serve --listen 127.0.0.1:0`
//! with the token in `TWILIO_AUTH_TOKEN`; the bare handler is this program
//! re-executed with `--bare-server`. Without the binary (or with
//! `--in-process`) both run inside this process and no RSS is reported.
//! Each server gets a warm-up (2,000 requests from other senders) before
//! the measured run. Only loopback traffic, bounded by `--requests` (and
//! `--prefill`).
//!
//! The client shares the machine's cores with the server, so it is kept
//! lean. By default (`--client raw`) every webhook is built before the
//! clock starts as the bytes of its whole HTTP/1.1 request (request line,
//! `Host`, `Content-Type`, `Content-Length`, `X-Twilio-Signature` as Twilio
//! signs it, the form body) and written over `--concurrency` persistent
//! keep-alive TCP connections, one task each, on a single-threaded tokio
//! runtime: one write, one wait and one read per request. The response is
//! read just far enough to find its end (its `Content-Length`, or a chunked
//! body); one it cannot delimit for sure (no length, an interim `1xx`,
//! another transfer coding, bytes past its end) stops the run with the
//! response printed rather than being misread. That costs a few µs of CPU
//! per request (`client µs/req`: about 7 against the bare handler, 11-15
//! against smsflow, which answers more slowly and so wakes the client
//! about once per response). `--client reqwest` sends the same requests
//! through reqwest on a 2-thread runtime, as this program did before: 20-30
//! µs per request, for comparison. With either client each connection
//! takes the next unsent request (one shared counter) when its previous one
//! is answered, so one sender's messages, `--senders` requests apart, go
//! out in order; request n goes to instance n mod `--instances`; latency
//! runs from the write to the end of the response; an answer other than
//! 2xx, or a failed exchange, counts as an error. Every scenario's webhooks
//! (warm-up, prefill, measured run and soak, which signs and builds each
//! request as it sends it) go through the `--client`; the requests to
//! `/metrics`, `/status` and `/healthz` (and `--startup-flows`) always go
//! through reqwest, and the `calls` scenarios' upstream is an axum server on
//! the 2-thread runtime.
//!
//! On a shared machine one run says little: `--rounds N` measures N
//! times, the bare handler then smsflow each round (smsflow on a new store
//! each time, or with new MessageSids on a shared PostgreSQL one), prints
//! every round's two rows, and sums up with the median of the rounds'
//! ratios (each round's smsflow against that round's bare handler) and
//! their range, so a busy moment moves one round, not the figure.
//!
//! The loop guard is off for smsflow (`loop_max_replies = 0`): simulated
//! senders text far faster than people, and a long run would otherwise
//! measure cheap `rate_limited` silences instead of the flow.
//!
//! `--prefill N` first drives senders 0..N one step each (not measured), so
//! N conversations are stored; the measured run then continues those
//! conversations. `--soak-secs S` then keeps the load on smsflow alone for
//! S seconds (requests signed as they are sent, so memory stays flat on
//! this side) and prints its RSS every `--sample-secs`, to show whether it
//! grows. A scenario is a flow file in `examples/loadgen_flows/`
//! plus one arm in [`scenario`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use clap::Parser;
use smsflow::app::App;
use smsflow::cli::DurabilityArg;
use smsflow::config::Config;
use smsflow::store::Durability;
use smsflow::twilio::{encode_form, RequestValidator};
use tokio::sync::oneshot;

const TOKEN: &str = "loadgen-token";
/// `/status` shows the conversation count only to the admin token.
const ADMIN_TOKEN: &str = "loadgen-admin-token";
const OUR_NUMBER: &str = "+15550001111";
const PUBLIC_URL: &str = "http://localhost";
const WARM_UP: usize = 2_000;

#[derive(Debug, Parser)]
#[command(about = "Load generator for smsflow (commands: the doc comment of examples/loadgen.rs)")]
struct Args {
    /// What each sender texts: keyword | multistep | rhai | timers |
    /// calls | calls_mixed.
    #[arg(long, default_value = "multistep")]
    scenario: String,
    /// The server's durability setting.
    #[arg(long, value_enum, default_value = "flush")]
    durability: DurabilityArg,
    /// Distinct phone numbers texting us.
    #[arg(long, default_value_t = 1_000)]
    senders: usize,
    /// Measured requests per server.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Conversations to store before measuring (senders 0..N, one step).
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// The smsflow binary [default: `smsflow` in the parent of this
    /// example's directory, e.g. target/release/smsflow].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Run both servers inside this process (no RSS figures).
    #[arg(long)]
    in_process: bool,
    /// Instead of a load: write this many flow files and time the server
    /// from spawn to its first successful /healthz (median of 5 runs).
    #[arg(long)]
    startup_flows: Option<usize>,
    /// After the measured run, keep smsflow under load this many seconds
    /// and print its RSS every `--sample-secs` (0: no soak).
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// The `calls` scenarios' upstream answers after this many ms.
    #[arg(long, default_value_t = 0)]
    upstream_delay_ms: u64,
    /// The server's `call_budget_ms` in the `calls` scenarios.
    #[arg(long, default_value_t = 1000)]
    call_budget_ms: u64,
    /// How often the soak prints the server's RSS.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// smsflow instances, sent requests round robin (request i to
    /// instance i mod N: one sender's messages alternate between them).
    /// More than one needs a store they share: set SMSFLOW_DATABASE_URL
    /// (PostgreSQL), which the smsflow children inherit. Server CPU is
    /// then theirs together; peak RSS is the first one's.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// The webhooks' HTTP client: `raw` (each request pre-built as bytes,
    /// sent over plain keep-alive TCP connections from a single-threaded
    /// runtime: a few µs of CPU per request) or `reqwest` (on its own
    /// 2-thread runtime, 20-30 µs per request; for comparison).
    #[arg(long, value_enum, default_value = "raw")]
    client: ClientKind,
    /// Instead of a load: run the scenario's messages through the flow
    /// engine alone, in this process, on one thread (no HTTP, no store),
    /// `--requests` messages from `--senders` conversations, and print the
    /// engine's CPU time per message. Scenarios without calls or timers.
    #[arg(long)]
    engine_only: bool,
    /// Measure this many times, the bare handler then smsflow each time
    /// (smsflow on a new store each round), and print every round's rows
    /// and the medians of the rounds' ratios. Not with `--soak-secs`.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Internal: serve the bare handler and print its address.
    #[arg(long, hide = true)]
    bare_server: bool,
}

/// Which HTTP client sends the webhooks (`--client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ClientKind {
    /// Pre-built request bytes over plain keep-alive TCP connections.
    Raw,
    /// reqwest, on the 2-thread client runtime.
    Reqwest,
}

/// What sends the webhooks of a load: the `--client` and, for the raw
/// client, its own single-threaded runtime.
struct Webhooks {
    kind: ClientKind,
    raw_rt: tokio::runtime::Runtime,
}

impl Webhooks {
    fn new(kind: ClientKind) -> Webhooks {
        Webhooks {
            kind,
            raw_rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("raw client runtime"),
        }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            ClientKind::Raw => "raw",
            ClientKind::Reqwest => "reqwest",
        }
    }
}

/// One kind of traffic: the flow file the server loads and what senders
/// text. Adding a scenario is a flow file plus one arm in [`scenario`].
#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// File names and contents of the flows loaded for this scenario.
    flow: &'static [(&'static str, &'static str)],
    /// The body sender `sender` sends as its `round`-th message.
    message: fn(sender: usize, round: usize) -> String,
    /// Whether its first message stores a conversation (`--prefill` needs it).
    stateful: bool,
    /// Whether its flows send on their own (timeouts), so the server needs
    /// outbound credentials (placeholders here, and an API base on a
    /// closed loopback port: nothing comes due during a run).
    sends: bool,
    /// Whether its flows make HTTP calls to the upstream.
    calls: bool,
}

fn scenario(name: &str) -> Option<Scenario> {
    match name {
        "keyword" => Some(Scenario {
            name: "keyword",
            flow: &[("keyword.yaml", include_str!("loadgen_flows/keyword.yaml"))],
            message: |_, _| "HOURS".to_string(),
            stateful: false,
            sends: false,
            calls: false,
        }),
        // JOIN -> name -> age -> done, and again.
        "multistep" => Some(Scenario {
            name: "multistep",
            flow: &[(
                "multistep.yaml",
                include_str!("loadgen_flows/multistep.yaml"),
            )],
            message: |sender, round| match round % 3 {
                0 => "JOIN".to_string(),
                1 => format!("Person {sender}"),
                _ => format!("{}", 20 + sender % 50),
            },
            stateful: true,
            sends: false,
            calls: false,
        }),
        // The same conversation as a Rhai script.
        "rhai" => Some(Scenario {
            name: "rhai",
            flow: &[
                ("rhai.yaml", include_str!("loadgen_flows/rhai.yaml")),
                ("rhai.rhai", include_str!("loadgen_flows/rhai.rhai")),
            ],
            message: |sender, round| match round % 3 {
                0 => "JOIN".to_string(),
                1 => format!("Person {sender}"),
                _ => format!("{}", 20 + sender % 50),
            },
            stateful: true,
            sends: false,
            calls: false,
        }),
        // The multi-step conversation with a week-long reminder on each
        // waiting step: every stored conversation holds a pending timer.
        "timers" => Some(Scenario {
            name: "timers",
            flow: &[("timers.yaml", include_str!("loadgen_flows/timers.yaml"))],
            message: |sender, round| match round % 3 {
                0 => "JOIN".to_string(),
                1 => format!("Person {sender}"),
                _ => format!("{}", 20 + sender % 50),
            },
            stateful: true,
            sends: true,
            calls: false,
        }),
        // Every message looks an order up in the upstream.
        "calls" => Some(Scenario {
            name: "calls",
            flow: &[("calls.yaml", include_str!("loadgen_flows/calls.yaml"))],
            message: |_, _| "STATUS".to_string(),
            stateful: false,
            sends: false,
            calls: true,
        }),
        // One sender in ten looks an order up; the others text a keyword.
        "calls_mixed" => Some(Scenario {
            name: "calls_mixed",
            flow: &[
                ("calls.yaml", include_str!("loadgen_flows/calls.yaml")),
                ("keyword.yaml", include_str!("loadgen_flows/keyword.yaml")),
            ],
            message: |sender, _| if sender % 10 == 0 { "STATUS" } else { "HOURS" }.to_string(),
            stateful: false,
            sends: false,
            calls: true,
        }),
        _ => None,
    }
}

fn main() {
    let args = Args::parse();
    if args.bare_server {
        serve_bare();
        return;
    }
    if args.engine_only {
        engine_only(&args);
        return;
    }
    let mode = Mode::from_args(&args);
    let client_rt = client_runtime();
    match args.startup_flows {
        Some(n) => startup(&client_rt, &mode, &args, n),
        None => {
            load(&client_rt, &mode, &args);
        }
    }
}

/// The 2-thread runtime reqwest's requests (`--client reqwest`,
/// `/metrics`, `/status`) and the `calls` upstream run on; the raw client
/// has a single-threaded one of its own.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime")
}

// --------------------------------------------------------- engine only

/// `--engine-only`: the flow engine's own cost per message, without the
/// server around it. Each sender's conversation is kept in memory between
/// its messages, as the store would give it back.
fn engine_only(args: &Args) {
    let Some(sc) = scenario(&args.scenario) else {
        panic!("unknown --scenario {}", args.scenario);
    };
    let run = run_engine(&sc, args.senders, args.requests);
    println!(
        "engine     scenario {} | {} messages from {} senders, {} conversations completed, {} left mid-run | {:.2} µs of CPU per message (flow engine alone, one thread)",
        sc.name,
        args.requests,
        args.senders.max(1),
        run.completed,
        run.conversations.iter().filter(|c| c.run.is_some()).count(),
        run.cpu_ns as f64 / 1000.0 / args.requests.max(1) as f64
    );
}

/// What [`run_engine`] measured.
struct EngineRun {
    /// CPU time of the measured loop.
    cpu_ns: u64,
    /// Replies that ended a multi-step conversation ("All set, …").
    completed: usize,
    /// Each sender's conversation at the end.
    conversations: Vec<smsflow::flow::Conversation>,
}

fn run_engine(sc: &Scenario, senders: usize, requests: usize) -> EngineRun {
    use smsflow::flow::{handle, load_dir, Conversation, EngineOptions, Inbound, Outcome};
    assert!(
        !sc.calls && !sc.sends,
        "--engine-only runs scenarios without calls or timers: keyword | multistep | rhai"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, text) in sc.flow {
        std::fs::write(tmp.path().join(name), text).expect("write flow");
    }
    let set = match load_dir(tmp.path()) {
        Ok(loaded) => loaded.set,
        Err(d) => panic!("{d:#?}"),
    };
    let options = EngineOptions::default();
    let senders = senders.max(1);
    let froms: Vec<String> = (0..senders).map(|s| format!("+1555{s:07}")).collect();
    // Built before the clock starts, like the load's requests.
    let messages: Vec<(String, String)> = (0..requests)
        .map(|n| {
            (
                format!("SM{n:032x}"),
                (sc.message)(n % senders, n / senders),
            )
        })
        .collect();
    let mut conversations = vec![Conversation::default(); senders];
    let mut completed = 0;
    let now = 1_700_000_000;
    let cpu = thread_cpu_ns();
    for (n, (sid, body)) in messages.iter().enumerate() {
        let sender = n % senders;
        let msg = Inbound {
            from: &froms[sender],
            to: OUR_NUMBER,
            body,
            media: &[],
            message_sid: sid,
        };
        let conversation = std::mem::take(&mut conversations[sender]);
        let handled = handle(&set, &options, conversation, &msg, now + n as i64);
        if let Outcome::Reply(replies) = &handled.outcome {
            completed += usize::from(replies.iter().any(|r| r.body.starts_with("All set")));
        }
        conversations[sender] = handled.conversation;
    }
    EngineRun {
        cpu_ns: thread_cpu_ns() - cpu,
        completed,
        conversations,
    }
}

/// This thread's time on the CPU so far, in ns (`/proc/thread-self/schedstat`).
/// Not [`cpu_time`]: `/proc/<pid>/stat` counts 10-ms ticks, and a keyword
/// run of 300,000 messages takes under 100 ms of engine time.
fn thread_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    text.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .expect("schedstat's first field")
}

// ---------------------------------------------------------------- load

/// A load run (the default): returns its rounds.
fn load(client_rt: &tokio::runtime::Runtime, mode: &Mode, args: &Args) -> Vec<Round> {
    let Some(sc) = scenario(&args.scenario) else {
        panic!(
            "unknown --scenario {}: keyword | multistep | rhai | timers | calls | calls_mixed",
            args.scenario
        );
    };
    assert!(
        args.prefill == 0 || sc.stateful,
        "--prefill needs a scenario that stores conversations, not {}",
        sc.name
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).expect("flows dir");
    let upstream = sc
        .calls
        .then(|| client_rt.block_on(Upstream::start(args.upstream_delay_ms)));
    for (name, text) in sc.flow {
        let text = match &upstream {
            Some(u) => text.replace("UPSTREAM", &u.addr.to_string()),
            None => text.to_string(),
        };
        std::fs::write(flows.join(name), text).expect("write flow");
    }
    let client = client(args.concurrency);
    let hooks = Webhooks::new(args.client);

    println!(
        "scenario {} | durability {} | senders {} | prefill {} | requests {} | concurrency {} | client {}",
        sc.name,
        durability_name(args.durability),
        args.senders,
        args.prefill,
        args.requests,
        args.concurrency,
        hooks.name()
    );
    println!("servers: {}", mode.describe());
    if upstream.is_some() {
        println!(
            "upstream answers after {} ms; call_budget_ms {}",
            args.upstream_delay_ms, args.call_budget_ms
        );
    }

    assert!(
        (1..=MAX_ROUNDS).contains(&args.rounds) && (args.rounds == 1 || args.soak_secs == 0),
        "--rounds takes 1 to {MAX_ROUNDS}, and only 1 with --soak-secs"
    );
    let rounds: Vec<Round> = (1..=args.rounds)
        .map(|r| {
            // A fresh store for each round's smsflow.
            let dir = tmp.path().join(format!("round{r}"));
            one_round(
                client_rt,
                mode,
                args,
                r,
                &sc,
                &flows,
                &dir,
                upstream.as_ref(),
                &client,
                &hooks,
            )
        })
        .collect();
    for line in report(&rounds) {
        println!("{line}");
    }
    rounds
}

/// One round's figures: the bare handler's run, then smsflow's.
struct Round {
    bare: Report,
    bare_rss: Option<u64>,
    ours: Report,
    our_rss: Option<u64>,
    /// smsflow's grouped fsyncs during its measured run.
    fsyncs: Option<u64>,
    /// Conversations smsflow stored (from `/status`).
    stored: String,
}

/// `--rounds` at most: each round's phases need MessageSids of their own
/// (a shared PostgreSQL store keeps them across rounds), and a phase is
/// one byte of the MessageSid.
const MAX_ROUNDS: usize = 60;

/// Round `round` (from 1): the bare handler (warm-up, measured run), then
/// smsflow on a new store in `dir` (prefill, warm-up, measured run, soak).
#[allow(clippy::too_many_arguments)]
fn one_round(
    client_rt: &tokio::runtime::Runtime,
    mode: &Mode,
    args: &Args,
    round: usize,
    sc: &Scenario,
    flows: &Path,
    dir: &Path,
    upstream: Option<&Upstream>,
    client: &reqwest::Client,
    hooks: &Webhooks,
) -> Round {
    // Phases 1-4 in round 1, 5-8 in round 2, and so on.
    let phase = |n: u8| n + 4 * u8::try_from(round - 1).expect("round within MAX_ROUNDS");
    let measured = &Load {
        phase: phase(1),
        from_prefix: "+1555",
        requests: args.requests,
        senders: args.senders,
        prefilled: args.prefill,
    };
    let warm_up = &Load {
        phase: phase(2),
        from_prefix: "+1444",
        requests: WARM_UP.min(args.requests),
        senders: args.senders.min(WARM_UP),
        prefilled: 0,
    };
    let bare = Server::bare(mode);
    run(
        client_rt,
        client,
        hooks,
        &bare,
        sc,
        warm_up,
        args.concurrency,
    );
    let bare_report = run(
        client_rt,
        client,
        hooks,
        &bare,
        sc,
        measured,
        args.concurrency,
    );
    let bare_rss = bare.peak_rss();
    bare.stop();

    let mut ours = Server::smsflow(
        mode,
        flows,
        &dir.join("data"),
        args.durability,
        sc.sends,
        sc.calls.then_some(args.call_budget_ms),
    );
    assert!(
        args.instances <= 1 || std::env::var_os("SMSFLOW_DATABASE_URL").is_some(),
        "--instances {} needs a shared store: set SMSFLOW_DATABASE_URL",
        args.instances
    );
    for i in 1..args.instances {
        ours.others.push(Server::smsflow(
            mode,
            flows,
            &dir.join(format!("data{i}")),
            args.durability,
            sc.sends,
            sc.calls.then_some(args.call_budget_ms),
        ));
    }
    if args.prefill > 0 {
        let prefill = Load {
            phase: phase(3),
            from_prefix: "+1555",
            requests: args.prefill,
            senders: args.prefill,
            prefilled: 0,
        };
        let rep = run(
            client_rt,
            client,
            hooks,
            &ours,
            sc,
            &prefill,
            args.concurrency,
        );
        println!(
            "prefill  {} conversations in {:.1} s ({:.0} req/s, {} errors); RSS now {}, stored {}, pending timers {}",
            args.prefill,
            rep.elapsed.as_secs_f64(),
            rep.rps(),
            rep.errors,
            mib(ours.rss()),
            conversations(client_rt, client, ours.addr),
            metric(client_rt, client, ours.addr, "smsflow_timers_pending ")
                .map_or("?".into(), |n| n.to_string()),
        );
    }
    run(
        client_rt,
        client,
        hooks,
        &ours,
        sc,
        warm_up,
        args.concurrency,
    );
    let fsyncs_before = fsyncs(client_rt, client, ours.addr);
    let calls_before = upstream.map(|u| u.received.load(Ordering::Relaxed));
    let our_report = run(
        client_rt,
        client,
        hooks,
        &ours,
        sc,
        measured,
        args.concurrency,
    );
    let fsyncs_after = fsyncs(client_rt, client, ours.addr);
    if let (Some(u), Some(before)) = (upstream, calls_before) {
        println!(
            "upstream  {} calls received during the measured run",
            u.received.load(Ordering::Relaxed) - before
        );
    }
    let our_rss = ours.peak_rss();
    if args.soak_secs > 0 {
        let soak_load = Load {
            phase: phase(4),
            from_prefix: "+1555",
            requests: usize::MAX,
            senders: args.senders,
            prefilled: args.prefill,
        };
        soak(
            client_rt,
            client,
            hooks,
            &ours,
            sc,
            soak_load,
            args.requests,
            args.concurrency,
            args.soak_secs,
            args.sample_secs,
        );
    }
    let stored = conversations(client_rt, client, ours.addr);
    ours.stop();
    Round {
        bare: bare_report,
        bare_rss,
        ours: our_report,
        our_rss,
        fsyncs: fsyncs_after
            .zip(fsyncs_before)
            .map(|(after, before)| after.saturating_sub(before)),
        stored,
    }
}

/// The report's lines: each round's two rows, then the ratios, one
/// round's or, with `--rounds`, the medians of the rounds' (each round's
/// smsflow against that round's bare handler) with their range.
fn report(rounds: &[Round]) -> Vec<String> {
    const NO_CPU: &str = "cpu        per-server CPU needs child processes (not --in-process)";
    let mut out = Vec::new();
    out.push(format!(
        "{:<10} {:>9} {:>9} {:>9} {:>7} {:>7} {:>11} {:>13} {:>13}",
        "",
        "req/s",
        "p50 ms",
        "p99 ms",
        "ok",
        "errors",
        "peak RSS",
        "server µs/msg",
        "client µs/req"
    ));
    let many = rounds.len() > 1;
    for (i, r) in rounds.iter().enumerate() {
        let (bare, ours) = if many {
            (format!("bare r{}", i + 1), format!("smsflow r{}", i + 1))
        } else {
            ("bare axum".to_string(), "smsflow".to_string())
        };
        out.push(r.bare.line(&bare, r.bare_rss));
        out.push(r.ours.line(&ours, r.our_rss));
    }
    let last = rounds.last().expect("at least one round");
    let rps: Vec<f64> = rounds
        .iter()
        .map(|r| 100.0 * r.ours.rps() / r.bare.rps())
        .collect();
    // Every round's fsync count, if `/metrics` gave them all.
    let fsyncs: Option<Vec<u64>> = rounds.iter().map(|r| r.fsyncs).collect();
    let cpu: Vec<(f64, f64)> = rounds
        .iter()
        .filter_map(|r| Some((r.ours.server_cpu_per_req()?, r.bare.server_cpu_per_req()?)))
        .filter(|&(_, bare)| bare > 0.0)
        .collect();
    if many {
        let n = rounds.len();
        out.push(format!(
            "ratio      {} of the bare handler's requests/s (median of the {n} rounds' ratios; {}); {} conversations stored at the end of the last round",
            percent(median(&rps)),
            spread(&rps, percent),
            last.stored
        ));
        if cpu.len() == n {
            let ratios: Vec<f64> = cpu.iter().map(|(ours, bare)| ours / bare).collect();
            let ours: Vec<f64> = cpu.iter().map(|c| c.0).collect();
            let bare: Vec<f64> = cpu.iter().map(|c| c.1).collect();
            out.push(format!(
                "cpu        smsflow spent {:.2}x the bare handler's CPU per message (median of the {n} rounds' ratios; {}); medians {:.1} vs {:.1} µs",
                median(&ratios),
                spread(&ratios, |x| format!("{x:.2}x")),
                median(&ours),
                median(&bare)
            ));
        } else {
            out.push(NO_CPU.to_string());
        }
        out.extend(switches_line(rounds));
        out.extend(threads_line(rounds));
        out.extend(machine_line(rounds));
        let p99 = |report: fn(&Round) -> &Report| {
            let ms: Vec<f64> = rounds
                .iter()
                .map(|r| report(r).pct(0.99).as_secs_f64() * 1e3)
                .collect();
            median(&ms)
        };
        out.push(format!(
            "p99        smsflow {:.2} ms, the bare handler {:.2} ms (medians of the {n} rounds)",
            p99(|r| &r.ours),
            p99(|r| &r.bare)
        ));
        match fsyncs {
            Some(counts) if counts.iter().all(|&c| c == 0) => {
                out.push("flushes    0 grouped fsyncs in each round".into());
            }
            Some(counts) => {
                // A round without fsyncs (relaxed durability, where only
                // a checkpoint now and then syncs) has no messages per
                // fsync: the figure is the median of the rounds that had
                // some, and said so when some had none.
                let per_fsync: Vec<f64> = rounds
                    .iter()
                    .zip(&counts)
                    .filter(|(_, &c)| c > 0)
                    .map(|(r, &c)| r.ours.ok as f64 / c as f64)
                    .collect();
                let most = counts.iter().max().copied().unwrap_or(0);
                let counts: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
                let synced = per_fsync.len();
                out.push(if median(&counts) == 0.0 {
                    format!(
                        "flushes    0 grouped fsyncs (median of the {n} rounds; at most {most} in one)"
                    )
                } else if synced < n {
                    format!(
                        "flushes    {:.0} grouped fsyncs (median of the {n} rounds), {:.1} messages per fsync (median of the {synced} rounds with fsyncs)",
                        median(&counts),
                        median(&per_fsync)
                    )
                } else {
                    format!(
                        "flushes    {:.0} grouped fsyncs, {:.1} messages per fsync (medians of the {n} rounds)",
                        median(&counts),
                        median(&per_fsync)
                    )
                });
            }
            None => {}
        }
    } else {
        out.push(format!(
            "ratio      {} of the bare handler's requests/s; {} conversations stored at the end",
            percent(rps[0]),
            last.stored
        ));
        match cpu.first() {
            Some((ours, bare)) => out.push(format!(
                "cpu        smsflow spent {:.2}x the bare handler's CPU per message ({:.1} vs {:.1} µs)",
                ours / bare,
                ours,
                bare
            )),
            None => out.push(NO_CPU.to_string()),
        }
        out.extend(switches_line(rounds));
        out.extend(threads_line(rounds));
        out.extend(machine_line(rounds));
        match last.fsyncs {
            // Relaxed durability, or PostgreSQL: no figure made up.
            Some(0) => out.push("flushes    0 grouped fsyncs".into()),
            Some(n) => out.push(format!(
                "flushes    {n} grouped fsyncs, {:.1} messages per fsync",
                last.ours.ok as f64 / n as f64
            )),
            None => {}
        }
    }
    for (i, r) in rounds.iter().enumerate() {
        for (name, report) in [("bare axum", &r.bare), ("smsflow", &r.ours)] {
            if let Some(e) = &report.first_error {
                let round = if many {
                    format!(" in round {}", i + 1)
                } else {
                    String::new()
                };
                out.push(format!("first error from {name}{round}: {e}"));
            }
        }
    }
    out
}

/// The `switches` line: each server's switches to sleep and preemptions
/// per message, and the client's sleeps per request against each, one
/// round's or the medians of the rounds'; none without child processes.
fn switches_line(rounds: &[Round]) -> Option<String> {
    let m = round_medians(rounds, |r| {
        let (ours_sleep, ours_pre, ours_client) = r.ours.switches_per_req()?;
        let (bare_sleep, bare_pre, bare_client) = r.bare.switches_per_req()?;
        Some([
            ours_sleep,
            ours_pre,
            bare_sleep,
            bare_pre,
            ours_client,
            bare_client,
        ])
    })?;
    Some(format!(
        "switches   per message: smsflow {:.3} to sleep and {:.3} preempted, the bare handler {:.3} and {:.3}; the client slept {:.3} and {:.3} times per request{}",
        m[0], m[1], m[2], m[3], m[4], m[5], medians_of(rounds)
    ))
}

/// The `threads` line: smsflow's on-CPU time per message by thread,
/// the async workers', the store's thread's and the others', one round's
/// or the medians of the rounds'; none without child processes or
/// without `/proc/<pid>/task/*/schedstat`.
fn threads_line(rounds: &[Round]) -> Option<String> {
    let m = round_medians(rounds, |r| r.ours.threads_per_req())?;
    Some(format!(
        "threads    smsflow's on-CPU time per message: async workers {:.1} µs, the store's thread {:.1} µs, other threads {:.1} µs{}",
        m[0], m[1], m[2], medians_of(rounds)
    ))
}

/// The `machine` line: how the machine's CPUs spent the bare handler's
/// measured run and smsflow's, one round's or the medians of the
/// rounds': busy, idle, idle while waiting for the disk, and taken by the
/// host (on a virtual machine). Idle time during a run means the load
/// was not bound by CPU alone (the connections' requests were waiting, on
/// their answers' wake-ups or on the disk); steal means other work on the
/// host took this machine's CPUs, and the run's figures moved with it.
fn machine_line(rounds: &[Round]) -> Option<String> {
    let m = round_medians(rounds, |r| {
        let bare = r.bare.machine?.shares()?;
        let ours = r.ours.machine?.shares()?;
        Some([
            bare[0], bare[1], bare[2], bare[3], ours[0], ours[1], ours[2], ours[3],
        ])
    })?;
    Some(format!(
        "machine    all CPUs during the bare handler's run: {:.0}% busy, {:.0}% idle, {:.0}% waiting for the disk, {:.0}% stolen by the host; during smsflow's: {:.0}%, {:.0}%, {:.0}%, {:.0}%{}",
        m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], medians_of(rounds)
    ))
}

/// What a line of medians says after its figures: nothing for one round.
fn medians_of(rounds: &[Round]) -> String {
    match rounds.len() {
        1 => String::new(),
        n => format!(" (medians of the {n} rounds)"),
    }
}

/// Each round's figures by `each`, then each figure's median over the
/// rounds (one round's own figures); `None` when a round lacks them.
fn round_medians<const N: usize>(
    rounds: &[Round],
    each: impl Fn(&Round) -> Option<[f64; N]>,
) -> Option<[f64; N]> {
    let per: Vec<[f64; N]> = rounds.iter().map(each).collect::<Option<_>>()?;
    Some(std::array::from_fn(|i| {
        median(&per.iter().map(|p| p[i]).collect::<Vec<_>>())
    }))
}

fn percent(x: f64) -> String {
    format!("{x:.1}%")
}

/// The median of `xs` (the mean of the middle two for an even count).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// "from LOW to HIGH", each written by `show`.
fn spread(xs: &[f64], show: impl Fn(f64) -> String) -> String {
    let low = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let high = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("from {} to {}", show(low), show(high))
}

/// Which requests one phase sends.
struct Load {
    /// Keeps MessageSids unique across the phases of one server.
    phase: u8,
    /// Phone number prefix: warm-up senders never touch measured ones.
    from_prefix: &'static str,
    requests: usize,
    senders: usize,
    /// Senders below this already sent their first message (`--prefill`).
    prefilled: usize,
}

impl Load {
    /// Every request of the phase as (form body, signature), signed before
    /// the clock starts. Request `n` comes from sender `n % senders`, so one
    /// sender's consecutive messages are `senders` requests apart and, with
    /// senders >> concurrency, arrive in order like a real phone's.
    fn requests(&self, sc: &Scenario) -> Vec<(String, String)> {
        let signer = Signer::new();
        (0..self.requests)
            .map(|n| self.request(sc, &signer, n))
            .collect()
    }

    /// Request `n` of the phase as (form body, signature).
    fn request(&self, sc: &Scenario, signer: &Signer, n: usize) -> (String, String) {
        let senders = self.senders.max(1);
        let sender = n % senders;
        let round = n / senders + usize::from(sender < self.prefilled);
        let sid = format!("SM{:02x}{n:030x}", self.phase);
        let from = format!("{}{sender:07}", self.from_prefix);
        let body = (sc.message)(sender, round);
        let params: Vec<(String, String)> = [
            ("MessageSid", sid.as_str()),
            ("SmsSid", sid.as_str()),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("From", from.as_str()),
            ("To", OUR_NUMBER),
            ("Body", body.as_str()),
            ("NumMedia", "0"),
            ("NumSegments", "1"),
            ("ApiVersion", "2010-04-01"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let sig = signer.validator.compute(&signer.url, &params);
        (encode_form(&params), sig)
    }
}

/// Signs requests as Twilio would for our public URL.
struct Signer {
    validator: RequestValidator,
    url: String,
}

impl Signer {
    fn new() -> Signer {
        Signer {
            validator: RequestValidator::new(TOKEN),
            url: format!("{PUBLIC_URL}/twilio/sms"),
        }
    }
}

#[derive(Default)]
struct Report {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// The server process's CPU time (user + system) over the run; `None`
    /// for a server running inside this process.
    server_cpu: Option<Duration>,
    /// This process's own CPU time over the run (the client, plus any
    /// in-process server).
    client_cpu: Duration,
    /// The server process's context switches over the run; `None` for a
    /// server running inside this process.
    server_switches: Option<Switches>,
    /// This process's context switches over the run.
    client_switches: Option<Switches>,
    /// The server process's on-CPU time by thread over the run; `None`
    /// for a server running inside this process.
    server_threads: Option<ThreadCpu>,
    /// The whole machine's CPU time over the run (`/proc/stat`): every
    /// process's, the client's and the server's included.
    machine: Option<Machine>,
}

/// Counts read from `/proc` at one moment, added up over a process's
/// threads and a server's instances, and subtracted across a run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tally<const N: usize>([u64; N]);

impl<const N: usize> Default for Tally<N> {
    fn default() -> Self {
        Tally([0; N])
    }
}

impl<const N: usize> Tally<N> {
    /// The counts from `before` to `self`. A thread that ended in
    /// between takes its count with it, so a difference is at least 0.
    fn since(self, before: Self) -> Self {
        Tally(std::array::from_fn(|i| {
            self.0[i].saturating_sub(before.0[i])
        }))
    }

    /// The counts over a run, from the reads before and after it; `None`
    /// when either read failed.
    fn between(before: Option<Self>, after: Option<Self>) -> Option<Self> {
        Some(after?.since(before?))
    }

    fn add(self, other: Self) -> Self {
        Tally(std::array::from_fn(|i| self.0[i] + other.0[i]))
    }
}

/// Context switches of a process's threads (those alive when counted).
type Switches = Tally<2>;

impl Switches {
    /// Switched out to sleep (`voluntary_ctxt_switches`), and while it
    /// could have run on (`nonvoluntary_ctxt_switches`).
    fn new(sleeping: u64, preempted: u64) -> Switches {
        Tally([sleeping, preempted])
    }

    fn sleeping(self) -> u64 {
        self.0[0]
    }

    fn preempted(self) -> u64 {
        self.0[1]
    }
}

/// On-CPU time of a process's threads (those alive when counted), in ns,
/// from `/proc/<pid>/task/*/schedstat`, by what the thread is named:
/// tokio's async workers, smsflow's store thread, and every other.
type ThreadCpu = Tally<3>;

impl ThreadCpu {
    fn new(workers: u64, store: u64, other: u64) -> ThreadCpu {
        Tally([workers, store, other])
    }

    fn workers(self) -> u64 {
        self.0[0]
    }

    fn store(self) -> u64 {
        self.0[1]
    }

    fn other(self) -> u64 {
        self.0[2]
    }
}

/// The machine's CPU time over all its CPUs, in clock ticks, from the
/// `cpu` line of `/proc/stat`: busy (user, nice, system, irq, softirq),
/// idle, idle while a task waited for the disk (iowait), and stolen by
/// the host of a virtual machine (steal).
type Machine = Tally<4>;

impl Machine {
    /// The `cpu` line of `/proc/stat`'s text: `cpu  user nice system idle
    /// iowait irq softirq steal ...` (guest time is already in user).
    fn parse(stat: &str) -> Option<Machine> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Some(Tally([
            at(0) + at(1) + at(2) + at(5) + at(6),
            at(3),
            at(4),
            at(7),
        ]))
    }

    fn now() -> Option<Machine> {
        Machine::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Busy, idle, waiting for the disk and stolen, in % of the total;
    /// `None` when no tick passed.
    fn shares(self) -> Option<[f64; 4]> {
        let total: u64 = self.0.iter().sum();
        (total > 0).then(|| self.0.map(|t| 100.0 * t as f64 / total as f64))
    }
}

impl Report {
    /// Counts one request sent at `sent`: a 2xx answer is ok, with its
    /// latency; any other status or a failure is an error.
    fn record(&mut self, sent: Instant, result: Result<u16, String>) {
        let failure = match result {
            Ok(status) if (200..300).contains(&status) => {
                self.ok += 1;
                self.latencies.push(sent.elapsed());
                return;
            }
            Ok(status) => format!("status {status}"),
            Err(e) => e,
        };
        self.errors += 1;
        self.first_error.get_or_insert(failure);
    }

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

    /// The requests sent (at least 1, to divide by).
    fn requests(&self) -> f64 {
        (self.ok + self.errors).max(1) as f64
    }

    /// Server CPU time per request sent, in µs.
    fn server_cpu_per_req(&self) -> Option<f64> {
        Some(self.server_cpu?.as_secs_f64() * 1e6 / self.requests())
    }

    /// This process's CPU time per request sent, in µs.
    fn client_cpu_per_req(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / self.requests()
    }

    /// The server's on-CPU time per request sent, in µs: its async
    /// workers', its store thread's and its other threads'.
    fn threads_per_req(&self) -> Option<[f64; 3]> {
        let t = self.server_threads?;
        let us = |ns: u64| ns as f64 / 1e3 / self.requests();
        Some([us(t.workers()), us(t.store()), us(t.other())])
    }

    /// The server's switches to sleep and preemptions per request sent,
    /// and this client's switches to sleep per request.
    fn switches_per_req(&self) -> Option<(f64, f64, f64)> {
        let requests = self.requests();
        let server = self.server_switches?;
        let client = self.client_switches?;
        Some((
            server.sleeping() as f64 / requests,
            server.preempted() as f64 / requests,
            client.sleeping() as f64 / requests,
        ))
    }

    fn line(&self, name: &str, rss: Option<u64>) -> String {
        let server = match self.server_cpu_per_req() {
            Some(us) => format!("{us:.1}"),
            None => "n/a".into(),
        };
        format!(
            "{name:<10} {:>9.0} {:>9.2} {:>9.2} {:>7} {:>7} {:>11} {:>13} {:>13.1}",
            self.rps(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.ok,
            self.errors,
            mib(rss),
            server,
            self.client_cpu_per_req()
        )
    }
}

fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends one phase to `server` from `concurrency` connections with the
/// `--client`. Each connection sends its next request when the last one
/// is answered, taking the next unsent request in order (one shared
/// counter), so one sender's consecutive messages, `senders` requests
/// apart, are sent in order as today whichever client sends them.
#[allow(clippy::too_many_arguments)]
fn run(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    hooks: &Webhooks,
    server: &Server,
    sc: &Scenario,
    load: &Load,
    concurrency: usize,
) -> Report {
    let requests = load.requests(sc);
    let addrs: Vec<SocketAddr> = std::iter::once(server.addr)
        .chain(server.others.iter().map(|o| o.addr))
        .collect();
    // Request n goes to instance n mod N (`--instances`), with either client.
    let raw: Option<Arc<Vec<Vec<u8>>>> = (hooks.kind == ClientKind::Raw).then(|| {
        Arc::new(
            requests
                .iter()
                .enumerate()
                .map(|(n, (body, sig))| raw_request(addrs[n % addrs.len()], body, sig))
                .collect(),
        )
    });
    let server_before = server.cpu_time();
    let client_before = cpu_time(std::process::id());
    let switches_before = (server.switches(), switches(std::process::id()));
    let threads_before = server.threads();
    let machine_before = Machine::now();
    let mut total = match raw {
        Some(raw) => hooks
            .raw_rt
            .block_on(send_raw(raw, Arc::new(addrs), concurrency)),
        None => {
            let urls = addrs
                .iter()
                .map(|addr| format!("http://{addr}/twilio/sms"))
                .collect();
            rt.block_on(send_reqwest(
                client.clone(),
                Arc::new(requests),
                Arc::new(urls),
                concurrency,
            ))
        }
    };
    total.server_cpu = server
        .cpu_time()
        .zip(server_before)
        .map(|(after, before)| after.saturating_sub(before));
    total.client_cpu = cpu_time(std::process::id())
        .zip(client_before)
        .map(|(after, before)| after.saturating_sub(before))
        .unwrap_or_default();
    total.server_switches = Tally::between(switches_before.0, server.switches());
    total.client_switches = Tally::between(switches_before.1, switches(std::process::id()));
    total.server_threads = Tally::between(threads_before, server.threads());
    total.machine = Tally::between(machine_before, Machine::now());
    total
}

/// The raw client's run: `requests[n]` is request n's bytes, for
/// instance `addrs[n % addrs.len()]`.
async fn send_raw(
    requests: Arc<Vec<Vec<u8>>>,
    addrs: Arc<Vec<SocketAddr>>,
    concurrency: usize,
) -> Report {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (requests, next, addrs) = (requests.clone(), next.clone(), addrs.clone());
        tasks.push(tokio::spawn(async move {
            let mut conns: Vec<RawConn> = addrs.iter().map(|&a| RawConn::new(a)).collect();
            let mut rep = Report {
                latencies: Vec::with_capacity(requests.len() / concurrency.max(1) + 1),
                ..Report::default()
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(n) else {
                    break;
                };
                let instances = conns.len();
                let conn = &mut conns[n % instances];
                let t = Instant::now();
                let result = conn.exchange(request).await;
                rep.record(t, result);
            }
            rep
        }));
    }
    gather(tasks, started).await
}

/// The reqwest client's run: request n is `requests[n]` as (form body,
/// signature), posted to `urls[n % urls.len()]`.
async fn send_reqwest(
    client: reqwest::Client,
    requests: Arc<Vec<(String, String)>>,
    urls: Arc<Vec<String>>,
    concurrency: usize,
) -> Report {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, requests, next, urls) =
            (client.clone(), requests.clone(), next.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            let mut rep = Report::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, sig)) = requests.get(n) else {
                    break;
                };
                let t = Instant::now();
                let result = post_reqwest(&client, &urls[n % urls.len()], body.clone(), sig).await;
                rep.record(t, result);
            }
            rep
        }));
    }
    gather(tasks, started).await
}

/// One webhook through reqwest: its status once the body is read.
async fn post_reqwest(
    client: &reqwest::Client,
    url: &str,
    body: String,
    sig: &str,
) -> Result<u16, String> {
    let r = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    r.bytes().await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// The workers' reports summed, latencies sorted, `elapsed` since `started`.
async fn gather(tasks: Vec<tokio::task::JoinHandle<Report>>, started: Instant) -> Report {
    let mut total = Report::default();
    for t in tasks {
        let r = t.await.expect("worker");
        total.ok += r.ok;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
        total.latencies.extend(r.latencies);
    }
    total.elapsed = started.elapsed();
    total.latencies.sort();
    total
}

/// Keeps `server` under load for `secs` seconds (requests signed as they
/// are sent, from request `first` of `load` on, so each sender's
/// conversation continues where the measured run left it) and prints its
/// RSS every `every` seconds, with its CPU time per message over each
/// interval.
#[allow(clippy::too_many_arguments)]
fn soak(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    hooks: &Webhooks,
    server: &Server,
    sc: &Scenario,
    load: Load,
    first: usize,
    concurrency: usize,
    secs: u64,
    every: u64,
) {
    // A hard bound on the count too, whatever the speed.
    const MAX_SOAK_REQUESTS: usize = 50_000_000;
    let addr = server.addr;
    let url = format!("http://{addr}/twilio/sms");
    let duration = Duration::from_secs(secs);
    let load = Arc::new(load);
    let sc = Arc::new(*sc);
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let kind = hooks.kind;
    println!("soak     {secs} s against smsflow alone, RSS every {every} s:");
    let rt = match kind {
        ClientKind::Raw => &hooks.raw_rt,
        ClientKind::Reqwest => rt,
    };
    rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, load, sc, sent, failed) = (
                client.clone(),
                url.clone(),
                load.clone(),
                sc.clone(),
                sent.clone(),
                failed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let signer = Signer::new();
                let mut conn = RawConn::new(addr);
                while started.elapsed() < duration {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= MAX_SOAK_REQUESTS {
                        break;
                    }
                    let (body, sig) = load.request(&sc, &signer, first + n);
                    let result = match kind {
                        ClientKind::Raw => conn.exchange(&raw_request(addr, &body, &sig)).await,
                        ClientKind::Reqwest => post_reqwest(&client, &url, body, &sig).await,
                    };
                    if !result.is_ok_and(|status| (200..300).contains(&status)) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let mut last = (
            Instant::now(),
            sent.load(Ordering::Relaxed),
            server.cpu_time(),
        );
        while started.elapsed() < duration {
            tokio::time::sleep(Duration::from_secs(every.max(1))).await;
            let now = (
                Instant::now(),
                sent.load(Ordering::Relaxed),
                server.cpu_time(),
            );
            let requests = now.1 - last.1;
            let cpu = match (now.2, last.2) {
                (Some(a), Some(b)) if requests > 0 => format!(
                    "{:.1} µs/msg",
                    a.saturating_sub(b).as_secs_f64() * 1e6 / requests as f64
                ),
                _ => "n/a".into(),
            };
            println!(
                "  t={:>4.0} s  RSS {:>10}  peak {:>10}  {:>8.0} req/s  {cpu}  errors {}",
                started.elapsed().as_secs_f64(),
                mib(server.rss()),
                mib(server.peak_rss()),
                requests as f64 / now.0.duration_since(last.0).as_secs_f64(),
                failed.load(Ordering::Relaxed)
            );
            last = now;
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    println!(
        "soak     {} requests, {} errors",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------- raw client

/// How long the raw client waits for one exchange (reqwest's timeout here).
const RAW_TIMEOUT: Duration = Duration::from_secs(30);

/// One webhook as the bytes the raw client writes: the same headers that
/// matter as reqwest's (Host, Content-Type, Content-Length, the signature)
/// and the form body.
fn raw_request(addr: SocketAddr, body: &str, sig: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /twilio/sms HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nX-Twilio-Signature: {sig}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// One keep-alive HTTP/1.1 connection of the raw client: one request at
/// a time, connected on first use and again after an error or a
/// `Connection: close`.
struct RawConn {
    addr: SocketAddr,
    stream: Option<tokio::net::TcpStream>,
    /// The response being read; responses are a few hundred bytes.
    buf: Vec<u8>,
}

impl RawConn {
    fn new(addr: SocketAddr) -> RawConn {
        RawConn {
            addr,
            stream: None,
            buf: Vec::with_capacity(8 * 1024),
        }
    }

    /// Writes `request` and reads its whole response: the status, or the
    /// error (counted, and the connection dropped). A response this
    /// client cannot delimit for sure panics instead of being misread.
    async fn exchange(&mut self, request: &[u8]) -> Result<u16, String> {
        match tokio::time::timeout(RAW_TIMEOUT, self.exchange_once(request)).await {
            Ok(Ok((status, close))) => {
                if close {
                    self.stream = None;
                }
                Ok(status)
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(format!("{}: {e}", self.addr))
            }
            Err(_) => {
                self.stream = None;
                Err(format!("{}: no response in {RAW_TIMEOUT:?}", self.addr))
            }
        }
    }

    /// (status, whether the server closes the connection after it).
    async fn exchange_once(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.stream.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("connected above");
        };
        stream.write_all(request).await?;
        self.buf.clear();
        loop {
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} bytes of the response",
                        self.buf.len()
                    ),
                ));
            }
            match parse_response(&self.buf) {
                Ok(None) => continue,
                Ok(Some(r)) if r.len == self.buf.len() => return Ok((r.status, r.close)),
                Ok(Some(r)) => panic!(
                    "{}: {} bytes after the end of the response (none was asked for):\n{}",
                    self.addr,
                    self.buf.len() - r.len,
                    String::from_utf8_lossy(&self.buf)
                ),
                Err(e) => panic!(
                    "{}: a response the raw client cannot read: {e}:\n{}",
                    self.addr,
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(4096)])
                ),
            }
        }
    }
}

/// A complete response at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
struct RawResponse {
    status: u16,
    /// Bytes of head and body.
    len: usize,
    /// The server closes the connection after it.
    close: bool,
}

/// Bound on a response head: ours are a few hundred bytes.
const MAX_RAW_HEAD: usize = 64 * 1024;

/// Reads one HTTP/1.x response to a POST from the start of `buf`: `None`
/// while it is incomplete, an error for anything this client cannot
/// delimit for sure (no Content-Length nor chunked body, an interim
/// response, a transfer coding other than chunked, conflicting lengths).
fn parse_response(buf: &[u8]) -> Result<Option<RawResponse>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_RAW_HEAD {
            return Err(format!("no end of the head in {MAX_RAW_HEAD} bytes"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "a head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let (version, rest) = status_line
        .split_once(' ')
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(format!("HTTP version {version:?}")),
    };
    let status: u16 = rest
        .get(..3)
        .filter(|_| rest.len() == 3 || rest.as_bytes()[3] == b' ')
        .and_then(|code| code.parse().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("Content-Length {value:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!(
                    "Transfer-Encoding {value:?} (only chunked is read)"
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    if status < 200 {
        return Err(format!("interim response {status} (none was asked for)"));
    }
    let body = head_end + 4;
    if status == 204 || status == 304 {
        return Ok(Some(RawResponse {
            status,
            len: body,
            close,
        }));
    }
    let body_len =
        match (chunked, length) {
            (true, Some(_)) => return Err("both Transfer-Encoding and Content-Length".into()),
            (true, None) => match chunked_len(&buf[body..])? {
                Some(n) => n,
                None => return Ok(None),
            },
            (false, Some(n)) if buf.len() >= body + n => n,
            (false, Some(_)) => return Ok(None),
            (false, None) => return Err(
                "neither Content-Length nor chunked: the body would end only with the connection"
                    .into(),
            ),
        };
    Ok(Some(RawResponse {
        status,
        len: body + body_len,
        close,
    }))
}

/// The length of a complete chunked body at the start of `body` (chunks,
/// the last chunk, trailers, the final empty line), `None` while
/// incomplete.
fn chunked_len(body: &[u8]) -> Result<Option<usize>, String> {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&body[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[pos..pos + eol]).map_err(|_| "a chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let Some(eol) = find(&body[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        let end = pos.checked_add(size).ok_or("chunk size overflows")?;
        if body.len() < end + 2 {
            return Ok(None);
        }
        if &body[end..end + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".into());
        }
        pos = end + 2;
    }
}

/// Where `needle` first starts in `haystack` (compared only where its
/// first byte matches: the responses are scanned on every read).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    (0..(haystack.len() + 1).saturating_sub(needle.len()))
        .find(|&i| haystack[i] == first && haystack[i..].starts_with(needle))
}

/// User + system CPU time of process `pid` (all its threads, those that
/// ended included), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing one. utime and stime are fields 14
    // and 15, i.e. the 12th and 13th after the name.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    let tick = clock_ticks_per_sec();
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / tick as f64,
    ))
}

/// The directories of process `pid`'s threads alive now
/// (`/proc/<pid>/task/*`); `None` for no such process.
fn tasks(pid: u32) -> Option<Vec<std::path::PathBuf>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .map(|task| task.ok().map(|t| t.path()))
        .collect()
}

/// The context switches of process `pid`'s threads alive now, from
/// `/proc/<pid>/task/*/status`.
fn switches(pid: u32) -> Option<Switches> {
    let mut total = Switches::default();
    for task in tasks(pid)? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let field = |name| status_field(&status, name).unwrap_or(0);
        total = total.add(Switches::new(
            field("voluntary_ctxt_switches:"),
            field("nonvoluntary_ctxt_switches:"),
        ));
    }
    Some(total)
}

/// The on-CPU time of process `pid`'s threads alive now, by thread
/// (`/proc/<pid>/task/*/comm` and the first field of `schedstat`, in ns).
fn thread_cpu(pid: u32) -> Option<ThreadCpu> {
    let (mut workers, mut store, mut other) = (0, 0, 0);
    for task in tasks(pid)? {
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("schedstat")),
        ) else {
            continue;
        };
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        match comm.trim() {
            "tokio-rt-worker" => workers += ns,
            "smsflow-store" => store += ns,
            _ => other += ns,
        }
    }
    Some(ThreadCpu::new(workers, store, other))
}

/// The number on the line of `/proc/.../status` text `status` that starts
/// with `name` (a size without its `kB`).
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The kernel's clock tick (`getconf CLK_TCK`; 100 on every Linux we run).
fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The server's grouped fsyncs so far, from `/metrics`.
fn fsyncs(rt: &tokio::runtime::Runtime, client: &reqwest::Client, addr: SocketAddr) -> Option<u64> {
    metric(rt, client, addr, "smsflow_store_fsyncs_total ")
}

/// The value of the `/metrics` sample whose line starts with `prefix`.
fn metric(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    addr: SocketAddr,
    prefix: &str,
) -> Option<u64> {
    rt.block_on(async {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))?
            .trim()
            .parse()
            .ok()
    })
}

/// The stored conversation count from `/status`, or "?" if unavailable.
fn conversations(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    addr: SocketAddr,
) -> String {
    rt.block_on(async {
        let text = client
            .get(format!("http://{addr}/status"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(v["conversations"].as_u64()?.to_string())
    })
    .unwrap_or_else(|| "?".into())
}

// ------------------------------------------------------------- startup

fn startup(rt: &tokio::runtime::Runtime, mode: &Mode, args: &Args, n: usize) {
    const RUNS: usize = 5;
    let tmp = tempfile::tempdir().expect("tempdir");
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).expect("flows dir");
    write_startup_flows(&flows, n);
    // The same loader the server runs: a mistake here is reported plainly
    // instead of as a server that never comes up.
    smsflow::flow::load_flows(&flows).expect("generated flows are valid");
    let client = client(1);
    println!("startup with {n} flow files; server: {}", mode.describe());
    let mut times = Vec::new();
    for run in 0..RUNS {
        let started = Instant::now();
        let server = Server::smsflow(
            mode,
            &flows,
            &tmp.path().join(format!("data{run}")),
            args.durability,
            false,
            None,
        );
        rt.block_on(wait_healthy(&client, server.addr));
        let took = started.elapsed();
        server.stop();
        println!("run {}: {:.1} ms", run + 1, took.as_secs_f64() * 1e3);
        times.push(took);
    }
    times.sort();
    println!(
        "median   {:.1} ms (spawn to first successful /healthz, {RUNS} runs)",
        times[RUNS / 2].as_secs_f64() * 1e3
    );
}

/// Half keyword files, half three-step flows, each with its own keywords.
fn write_startup_flows(dir: &Path, n: usize) {
    for i in 0..n {
        let (name, text) = if i % 2 == 0 {
            let mut text = format!(
                "keywords:\n  K{i}A: \"Reply A number {i}.\"\n  K{i}B:\n    - \"First of two.\"\n    - \"Second of two.\"\n"
            );
            if i + 1 < n {
                // The next file is a flow: start it from a keyword too.
                text.push_str(&format!("  K{i}C: {{ flow: f{} }}\n", i + 1));
            }
            (format!("kw{i:03}.yaml"), text)
        } else {
            (
                format!("f{i:03}.yaml"),
                format!(
                    r#"name: f{i}
trigger:
  keywords: [F{i}, START{i}]
expire_after: 2h
steps:
  ask_name:
    say: "Hi! What's your name?"
    wait:
      - anything: true
        save: name
        goto: ask_age
  ask_age:
    say: "Thanks {{{{name}}}}! How old are you?"
    wait:
      - number: 13..120
        save: age
        goto: done
      - any_of: [skip, later]
        goto: done
    retry:
      say: "Please send your age as a number."
      limit: 2
  done:
    say: "All set, {{{{name}}}}."
"#
                ),
            )
        };
        std::fs::write(dir.join(name), text).expect("write flow");
    }
}

async fn wait_healthy(client: &reqwest::Client, addr: SocketAddr) {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no healthy /healthz at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ------------------------------------------------------------- servers

/// Where the servers run.
enum Mode {
    /// smsflow from this binary; the bare handler from this program.
    Child(PathBuf),
    InProcess,
}

impl Mode {
    fn from_args(args: &Args) -> Mode {
        if args.in_process {
            return Mode::InProcess;
        }
        if let Some(bin) = &args.server_bin {
            assert!(bin.is_file(), "--server-bin {} not found", bin.display());
            return Mode::Child(bin.clone());
        }
        // target/<profile>/examples/loadgen -> target/<profile>/smsflow
        let default = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("smsflow")));
        match default {
            Some(bin) if bin.is_file() => Mode::Child(bin),
            _ => Mode::InProcess,
        }
    }

    fn describe(&self) -> String {
        match self {
            Mode::Child(bin) => format!(
                "child processes ({} serve; loadgen --bare-server)",
                bin.display()
            ),
            Mode::InProcess => "in this process (no RSS figures)".into(),
        }
    }
}

/// A running server under test.
struct Server {
    addr: SocketAddr,
    kind: Kind,
    /// More smsflow instances sharing its store (`--instances`), sent
    /// requests round robin with it.
    others: Vec<Server>,
}

enum Kind {
    Child(Child),
    /// The runtime is kept so the server keeps running; dropping it stops it.
    InProcess {
        rt: tokio::runtime::Runtime,
        stop: oneshot::Sender<()>,
        done: tokio::task::JoinHandle<()>,
    },
}

impl Server {
    fn smsflow(
        mode: &Mode,
        flows: &Path,
        data: &Path,
        durability: DurabilityArg,
        sends: bool,
        call_budget_ms: Option<u64>,
    ) -> Server {
        match mode {
            Mode::Child(bin) => {
                let mut cmd = Command::new(bin);
                cmd.args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--public-url",
                    PUBLIC_URL,
                ])
                .arg("--flows")
                .arg(flows)
                .arg("--data")
                .arg(data)
                .args(["--durability", durability_name(durability)])
                // Simulated senders text far faster than people: with the
                // loop guard on, a long run would measure cheap
                // `rate_limited` silences instead of the flow.
                .env("SMSFLOW_CONFIG", server_config(data, sends, call_budget_ms))
                .env("TWILIO_AUTH_TOKEN", TOKEN)
                .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("RUST_LOG", "info");
                if sends {
                    cmd.env("TWILIO_ACCOUNT_SID", PLACEHOLDER_ACCOUNT);
                }
                Server::child(cmd)
            }
            Mode::InProcess => {
                let mut config = Config::for_test(flows, data, TOKEN);
                config.public_url = PUBLIC_URL.into();
                config.admin_token = Some(smsflow::config::AuthToken::new(ADMIN_TOKEN));
                // What `serve` uses by default.
                config.cache_bytes = 8 * 1024 * 1024;
                config.watch = true;
                if sends {
                    config.outbound.credentials = Some(
                        smsflow::outbound::Credentials::with_auth_token(PLACEHOLDER_ACCOUNT, TOKEN),
                    );
                    config.outbound.api_base = CLOSED_API_BASE.into();
                }
                if let Some(ms) = call_budget_ms {
                    config.http_allow = vec!["127.0.0.1".into()];
                    config.call_budget = Duration::from_millis(ms);
                }
                config.durability = match durability {
                    DurabilityArg::Flush => Durability::Flush,
                    DurabilityArg::Relaxed => Durability::Relaxed,
                };
                let rt = tokio::runtime::Runtime::new().expect("server runtime");
                let app = rt.block_on(App::build(config)).expect("app builds");
                let addr = app.local_addr();
                let (stop, rx) = oneshot::channel::<()>();
                let done = rt.spawn(async move {
                    let _ = app
                        .run_until(async {
                            let _ = rx.await;
                        })
                        .await;
                });
                Server {
                    addr,
                    kind: Kind::InProcess { rt, stop, done },
                    others: Vec::new(),
                }
            }
        }
    }

    fn bare(mode: &Mode) -> Server {
        match mode {
            Mode::Child(_) => {
                let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
                cmd.arg("--bare-server");
                Server::child(cmd)
            }
            Mode::InProcess => {
                let rt = tokio::runtime::Runtime::new().expect("server runtime");
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                let (stop, rx) = oneshot::channel::<()>();
                let done = rt.spawn(async move {
                    let _ = axum::serve(listener, bare_router())
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
                Server {
                    addr,
                    kind: Kind::InProcess { rt, stop, done },
                    others: Vec::new(),
                }
            }
        }
    }

    /// Spawn `cmd` and read `addr=` from the first log line that has it;
    /// the rest of its log is drained (errors echoed) so it never blocks.
    fn child(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("addr=") {
                    if let Some(tx) = tx.take() {
                        let addr: String = line[i + 5..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect();
                        let _ = tx.send(addr);
                    }
                } else if line.contains("ERROR") || line.starts_with("error") {
                    eprintln!("server: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server printed its address");
        Server {
            addr: addr.parse().expect("a socket address"),
            kind: Kind::Child(child),
            others: Vec::new(),
        }
    }

    /// The server process's CPU time so far, its other instances'
    /// included (child processes only).
    fn cpu_time(&self) -> Option<Duration> {
        self.summed(cpu_time, |a, b| a + b)
    }

    /// The server process's context switches so far, its other
    /// instances' included (child processes only).
    fn switches(&self) -> Option<Switches> {
        self.summed(switches, Switches::add)
    }

    /// The server process's on-CPU time by thread so far, its other
    /// instances' included (child processes only).
    fn threads(&self) -> Option<ThreadCpu> {
        self.summed(thread_cpu, ThreadCpu::add)
    }

    /// `of` the server process, added up over its other instances'
    /// (child processes only).
    fn summed<T>(&self, of: fn(u32) -> Option<T>, add: fn(T, T) -> T) -> Option<T> {
        let own = match &self.kind {
            Kind::Child(child) => of(child.id()),
            Kind::InProcess { .. } => None,
        };
        self.others
            .iter()
            .try_fold(own?, |sum, o| Some(add(sum, o.summed(of, add)?)))
    }

    /// Resident set high-water mark in bytes (child processes only).
    fn peak_rss(&self) -> Option<u64> {
        self.proc_status("VmHWM:")
    }

    fn rss(&self) -> Option<u64> {
        self.proc_status("VmRSS:")
    }

    fn proc_status(&self, field: &str) -> Option<u64> {
        let Kind::Child(child) = &self.kind else {
            return None;
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
        Some(status_field(&status, field)? * 1024)
    }

    /// Graceful stop (SIGTERM for a child: the store is flushed), bounded.
    fn stop(self) {
        for other in self.others {
            other.stop();
        }
        match self.kind {
            Kind::Child(mut child) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let started = Instant::now();
                while child.try_wait().ok().flatten().is_none() {
                    if started.elapsed() > Duration::from_secs(10) {
                        let _ = child.kill();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.wait();
            }
            Kind::InProcess { rt, stop, done } => {
                let _ = stop.send(());
                let _ = rt.block_on(done);
            }
        }
    }
}

/// The `calls` scenarios' upstream: answers `GET /orders/...` with JSON
/// after a fixed delay, on this program's client runtime (a sleeping
/// request costs it nothing).
struct Upstream {
    addr: SocketAddr,
    /// Requests received so far.
    received: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(delay_ms: u64) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let app = axum::Router::new().fallback(move || async move {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"state": "baking"}"#,
            )
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, received }
    }
}

/// A config file turning the loop guard off, written beside the data dir.
/// Placeholder outbound credentials for scenarios whose flows send on
/// their own, and an API base nothing listens on: no timer comes due
/// during a run, and nothing could leave the machine if one did.
const PLACEHOLDER_ACCOUNT: &str = "AC00000000000000000000000000000000";
const CLOSED_API_BASE: &str = "http://127.0.0.1:1";

/// The server's config file: the loop guard off; for a scenario that
/// sends on its own, the closed API base; for one that calls, the
/// upstream's address allowed and the call budget. Written beside the
/// store `data`, creating the directory they are in.
fn server_config(data: &Path, sends: bool, call_budget_ms: Option<u64>) -> PathBuf {
    let path = data.with_extension("toml");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the loadgen config's directory");
    }
    let mut text = String::from("loop_max_replies = 0\n");
    if sends {
        text.push_str(&format!("twilio_api_base = \"{CLOSED_API_BASE}\"\n"));
    }
    if let Some(ms) = call_budget_ms {
        text.push_str(&format!(
            "http_allow = [\"127.0.0.1\"]\ncall_budget_ms = {ms}\n"
        ));
    }
    std::fs::write(&path, text).expect("write loadgen config");
    path
}

fn durability_name(d: DurabilityArg) -> &'static str {
    match d {
        DurabilityArg::Flush => "flush",
        DurabilityArg::Relaxed => "relaxed",
    }
}

fn mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        None => "n/a".into(),
    }
}

// --------------------------------------------------------- bare handler

/// The ceiling: parse the form like the real server, answer fixed TwiML.
async fn bare_handler(body: Bytes) -> impl IntoResponse {
    let twiml = if smsflow::twilio::parse_form(&body).is_ok() {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message><Body>ok</Body></Message></Response>"
    } else {
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"
    };
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], twiml)
}

fn bare_router() -> axum::Router {
    axum::Router::new().route("/twilio/sms", axum::routing::post(bare_handler))
}

/// `--bare-server`: the bare handler on the same kind of runtime as
/// `smsflow serve` (tokio's default multi-thread), until killed.
fn serve_bare() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        eprintln!(
            "bare handler listening addr={}",
            listener.local_addr().expect("addr")
        );
        let serve = axum::serve(listener, bare_router());
        tokio::select! {
            _ = serve => {}
            _ = smsflow::app::shutdown_signal() => {}
        }
    });
}

// `cargo test --example loadgen`
#[cfg(test)]
mod tests {
    use super::*;

    /// Every proper prefix of `response` is incomplete; the whole is `want`.
    fn parses_only_whole(response: &[u8], want: RawResponse) {
        for end in 0..response.len() {
            assert_eq!(
                parse_response(&response[..end]),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(parse_response(response), Ok(Some(want)));
    }

    #[test]
    fn the_engine_only_scenarios_complete_their_conversations() {
        // Otherwise --engine-only would time a flow answering its fallback.
        for name in ["multistep", "rhai"] {
            let sc = scenario(name).unwrap();
            let run = run_engine(&sc, 10, 60);
            assert_eq!(run.completed, 20, "{name}: two conversations per sender");
            assert!(
                run.conversations.iter().all(|c| c.run.is_none()),
                "{name}: every run ended"
            );
        }
        let keyword = run_engine(&scenario("keyword").unwrap(), 10, 20);
        assert_eq!(keyword.completed, 0);
    }

    #[test]
    fn a_response_with_content_length_ends_after_its_body() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-type: text/xml; charset=utf-8\r\ncontent-length: 5\r\ndate: x\r\n\r\nhello";
        parses_only_whole(
            r,
            RawResponse {
                status: 200,
                len: r.len(),
                close: false,
            },
        );
        let r = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        parses_only_whole(
            r,
            RawResponse {
                status: 403,
                len: r.len(),
                close: false,
            },
        );
    }

    #[test]
    fn a_chunked_response_ends_after_its_last_chunk_and_trailers() {
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\n";
        parses_only_whole(
            r,
            RawResponse {
                status: 200,
                len: r.len(),
                close: false,
            },
        );
        let r =
            b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: Chunked\r\n\r\n0\r\n\r\n";
        parses_only_whole(
            r,
            RawResponse {
                status: 500,
                len: r.len(),
                close: false,
            },
        );
    }

    /// `ok` requests in `secs` seconds at `cpu_us` µs of server CPU each.
    fn measured(ok: usize, secs: f64, cpu_us: f64) -> Report {
        Report {
            ok,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs_f64(secs),
            latencies: vec![Duration::from_millis(1); ok.min(10)],
            server_cpu: Some(Duration::from_secs_f64(ok as f64 * cpu_us / 1e6)),
            client_cpu: Duration::ZERO,
            server_switches: None,
            client_switches: None,
            server_threads: None,
            machine: None,
        }
    }

    fn round(bare: Report, ours: Report, fsyncs: u64) -> Round {
        Round {
            bare,
            bare_rss: None,
            ours,
            our_rss: None,
            fsyncs: Some(fsyncs),
            stored: "1000".into(),
        }
    }

    #[test]
    fn one_round_is_reported_as_before() {
        let lines = report(&[round(
            measured(1000, 0.01, 10.0),
            measured(1000, 0.04, 40.0),
            100,
        )]);
        assert!(lines[1].starts_with("bare axum "), "{lines:?}");
        assert!(lines[2].starts_with("smsflow "), "{lines:?}");
        assert_eq!(
            lines[3],
            "ratio      25.0% of the bare handler's requests/s; 1000 conversations stored at the end"
        );
        assert_eq!(
            lines[4],
            "cpu        smsflow spent 4.00x the bare handler's CPU per message (40.0 vs 10.0 µs)"
        );
        assert_eq!(
            lines[5],
            "flushes    100 grouped fsyncs, 10.0 messages per fsync"
        );
        assert_eq!(lines.len(), 6);
        // Relaxed durability: no syncs, and no figure made up for them.
        let lines = report(&[round(
            measured(1000, 0.01, 10.0),
            measured(1000, 0.02, 20.0),
            0,
        )]);
        assert_eq!(lines[5], "flushes    0 grouped fsyncs");
    }

    #[test]
    fn rounds_are_summed_up_by_the_median_of_their_ratios() {
        // CPU ratios 5.0, 6.0 and 1.5: their median (5.0) is not the
        // ratio of the medians (40 over 10); requests/s ratios 20, 50, 10%.
        let mut third = measured(1000, 0.1, 30.0);
        third.errors = 1;
        third.first_error = Some("status 503".into());
        let lines = report(&[
            round(measured(1000, 0.01, 8.0), measured(1000, 0.05, 40.0), 100),
            round(measured(1000, 0.01, 10.0), measured(1000, 0.02, 60.0), 50),
            round(measured(1000, 0.01, 20.0), third, 200),
        ]);
        let rows: Vec<&str> = lines[1..7].iter().map(|l| &l[..10]).collect();
        assert_eq!(
            rows,
            [
                "bare r1   ",
                "smsflow r1",
                "bare r2   ",
                "smsflow r2",
                "bare r3   ",
                "smsflow r3"
            ]
        );
        assert_eq!(
            lines[7],
            "ratio      20.0% of the bare handler's requests/s (median of the 3 rounds' ratios; from 10.0% to 50.0%); 1000 conversations stored at the end of the last round"
        );
        assert!(
            lines[8].starts_with(
                "cpu        smsflow spent 5.00x the bare handler's CPU per message (median of the 3 rounds' ratios; from 1.50x to 6.00x); medians"
            ),
            "{}",
            lines[8]
        );
        assert_eq!(
            lines[9],
            "p99        smsflow 1.00 ms, the bare handler 1.00 ms (medians of the 3 rounds)"
        );
        assert_eq!(
            lines[10],
            "flushes    100 grouped fsyncs, 10.0 messages per fsync (medians of the 3 rounds)"
        );
        assert_eq!(lines[11], "first error from smsflow in round 3: status 503");
        assert_eq!(lines.len(), 12);
        // The flushes line for rounds alike but for their fsyncs.
        let flushes = |fsyncs: &[u64]| {
            let rounds: Vec<Round> = fsyncs
                .iter()
                .map(|&n| round(measured(10, 0.01, 8.0), measured(10, 0.02, 20.0), n))
                .collect();
            report(&rounds).pop().unwrap()
        };
        // Relaxed durability: no syncs, and no figure made up for them.
        assert_eq!(
            flushes(&[0, 0]),
            "flushes    0 grouped fsyncs in each round"
        );
        // A checkpoint's sync in one round of three: no made-up
        // "messages per fsync" from the rounds without.
        assert_eq!(
            flushes(&[0, 1, 0]),
            "flushes    0 grouped fsyncs (median of the 3 rounds; at most 1 in one)"
        );
        // Most rounds synced: messages per fsync over those that did.
        assert_eq!(
            flushes(&[4, 0, 5]),
            "flushes    4 grouped fsyncs (median of the 3 rounds), 2.2 messages per fsync (median of the 2 rounds with fsyncs)"
        );
    }

    #[test]
    fn switches_are_counted_per_message_for_both_servers_and_the_client() {
        let counted = |mut r: Report, server: (u64, u64), client: u64| {
            r.server_switches = Some(Switches::new(server.0, server.1));
            r.client_switches = Some(Switches::new(client, 0));
            r
        };
        let one = |ours: (u64, u64), client: u64| {
            round(
                counted(measured(1000, 0.01, 10.0), (16, 22), 43),
                counted(measured(1000, 0.04, 40.0), ours, client),
                100,
            )
        };
        let lines = report(&[one((90, 270), 330)]);
        assert_eq!(
            lines[5],
            "switches   per message: smsflow 0.090 to sleep and 0.270 preempted, the bare handler 0.016 and 0.022; the client slept 0.330 and 0.043 times per request"
        );
        assert_eq!(lines.len(), 7);
        let lines = report(&[
            one((90, 270), 330),
            one((50, 210), 230),
            one((80, 250), 300),
        ]);
        assert_eq!(
            lines[9],
            "switches   per message: smsflow 0.080 to sleep and 0.250 preempted, the bare handler 0.016 and 0.022; the client slept 0.300 and 0.043 times per request (medians of the 3 rounds)"
        );
        // A round without the counts (a server in this process): no line.
        let mut partial = vec![one((90, 270), 330)];
        partial.push(round(
            measured(1000, 0.01, 10.0),
            measured(1000, 0.04, 40.0),
            100,
        ));
        assert!(!report(&partial).iter().any(|l| l.starts_with("switches")));
    }

    #[test]
    fn a_process_s_switches_are_read_from_its_threads() {
        let before = switches(std::process::id()).expect("this process's threads");
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let after = switches(std::process::id()).expect("this process's threads");
        let slept = after.since(before).sleeping();
        assert!(slept >= 5, "five sleeps, {slept} switches to sleep counted");
        assert_eq!(switches(u32::MAX), None, "no such process");
    }

    #[test]
    fn smsflow_s_cpu_is_split_per_message_by_thread() {
        let timed = |workers: u64, store: u64, other: u64| {
            let mut r = measured(1000, 0.04, 40.0);
            r.server_threads = Some(ThreadCpu::new(workers, store, other));
            round(measured(1000, 0.01, 10.0), r, 100)
        };
        // 1,000 requests: 27.3 ms of the workers' is 27.3 µs a message.
        let lines = report(&[timed(27_300_000, 10_000_000, 900_000)]);
        assert!(
            lines.contains(&"threads    smsflow's on-CPU time per message: async workers 27.3 µs, the store's thread 10.0 µs, other threads 0.9 µs".to_string()),
            "{lines:#?}"
        );
        let lines = report(&[
            timed(27_300_000, 10_000_000, 900_000),
            timed(30_000_000, 9_000_000, 1_000_000),
            timed(25_000_000, 12_000_000, 800_000),
        ]);
        assert!(
            lines.contains(&"threads    smsflow's on-CPU time per message: async workers 27.3 µs, the store's thread 10.0 µs, other threads 0.9 µs (medians of the 3 rounds)".to_string()),
            "{lines:#?}"
        );
        // A round without the times (a server in this process): no line.
        let partial = [
            timed(27_300_000, 10_000_000, 900_000),
            round(measured(1000, 0.01, 10.0), measured(1000, 0.04, 40.0), 100),
        ];
        assert!(!report(&partial).iter().any(|l| l.starts_with("threads")));
    }

    #[test]
    fn the_machine_s_cpu_is_split_into_busy_idle_disk_and_steal() {
        // A `cpu` line as Linux writes it: user nice system idle iowait
        // irq softirq steal guest guest_nice.
        let stat = "cpu  600 10 200 900 80 5 45 60 0 0\ncpu0 300 5 100 450 40 2 22 30 0 0\n";
        let before = Machine::parse(stat).unwrap();
        assert_eq!(before, Tally([860, 900, 80, 60]));
        let after = Machine::parse("cpu  1200 10 400 1100 180 5 45 160 0 0\n").unwrap();
        // 800 busy, 200 idle, 100 waiting for the disk, 100 stolen.
        assert_eq!(
            after.since(before).shares(),
            Some([
                66.66666666666667,
                16.666666666666668,
                8.333333333333334,
                8.333333333333334
            ])
        );
        // No tick passed: no shares. No `cpu` line, or one not numbers: nothing.
        assert_eq!(before.since(before).shares(), None);
        assert_eq!(Machine::parse("intr 1 2 3\n"), None);
        assert_eq!(Machine::parse("cpu  1 x 3\n"), None);
        // This machine's own, read twice: the counts only grow.
        let (a, b) = (Machine::now().unwrap(), Machine::now().unwrap());
        assert!(
            b.0.iter().zip(a.0).all(|(b, a)| *b >= a),
            "{a:?} then {b:?}"
        );

        let spent = |bare: [u64; 4], ours: [u64; 4]| {
            let (mut b, mut o) = (measured(1000, 0.01, 10.0), measured(1000, 0.04, 40.0));
            b.machine = Some(Tally(bare));
            o.machine = Some(Tally(ours));
            round(b, o, 100)
        };
        let lines = report(&[spent([90, 8, 0, 2], [70, 10, 15, 5])]);
        assert!(
            lines.contains(&"machine    all CPUs during the bare handler's run: 90% busy, 8% idle, 0% waiting for the disk, 2% stolen by the host; during smsflow's: 70%, 10%, 15%, 5%".to_string()),
            "{lines:#?}"
        );
        let lines = report(&[
            spent([90, 8, 0, 2], [70, 10, 15, 5]),
            spent([180, 20, 0, 0], [120, 40, 20, 20]),
            spent([85, 10, 1, 4], [75, 5, 10, 10]),
        ]);
        assert!(
            lines.contains(&"machine    all CPUs during the bare handler's run: 90% busy, 10% idle, 0% waiting for the disk, 2% stolen by the host; during smsflow's: 70%, 10%, 10%, 10% (medians of the 3 rounds)".to_string()),
            "{lines:#?}"
        );
        // A round without the machine's counts: no line.
        let partial = [
            spent([90, 8, 0, 2], [70, 10, 15, 5]),
            round(measured(1000, 0.01, 10.0), measured(1000, 0.04, 40.0), 100),
        ];
        assert!(!report(&partial).iter().any(|l| l.starts_with("machine")));
    }

    #[test]
    fn a_process_s_cpu_is_read_by_thread_name() {
        // A thread named as smsflow's store thread runs until it has had
        // 30 ms of CPU by its own count (however busy the machine), then
        // waits to be read (a thread that has ended is not counted).
        let (spun, spun_rx) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let store = std::thread::Builder::new()
            .name("smsflow-store".into())
            .spawn(move || {
                let own = || -> u64 {
                    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
                    stat.split_whitespace().next().unwrap().parse().unwrap()
                };
                while own() < 30_000_000 {
                    std::hint::spin_loop();
                }
                spun.send(()).unwrap();
                let _ = done_rx.recv();
            })
            .unwrap();
        spun_rx.recv().unwrap();
        let read = thread_cpu(std::process::id()).expect("this process's threads");
        done.send(()).unwrap();
        store.join().unwrap();
        assert!(
            read.store() >= 30_000_000,
            "30 ms of CPU, {} ns counted for the store's thread",
            read.store()
        );
        assert_eq!(thread_cpu(u32::MAX), None, "no such process");
    }

    #[test]
    fn the_server_config_goes_beside_a_store_in_a_new_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("round1").join("data");
        let path = server_config(&data, true, Some(250));
        assert_eq!(path, tmp.path().join("round1").join("data.toml"));
        let text = std::fs::read_to_string(&path).expect("config written");
        assert!(text.starts_with("loop_max_replies = 0\n"), "{text}");
        assert!(text.contains("call_budget_ms = 250"), "{text}");
    }

    /// Two rounds, both servers in this process (a test cannot re-execute
    /// itself as the bare handler): each round's smsflow on its own store.
    #[test]
    fn two_rounds_each_measure_both_servers_on_a_store_of_their_own() {
        let args = Args::parse_from([
            "loadgen",
            "--in-process",
            "--senders",
            "20",
            "--requests",
            "50",
            "--concurrency",
            "4",
            "--rounds",
            "2",
        ]);
        let rounds = load(&client_runtime(), &Mode::from_args(&args), &args);
        assert_eq!(rounds.len(), 2);
        for r in &rounds {
            assert_eq!(
                (r.bare.ok, r.bare.errors),
                (50, 0),
                "{:?}",
                r.bare.first_error
            );
            assert_eq!(
                (r.ours.ok, r.ours.errors),
                (50, 0),
                "{:?}",
                r.ours.first_error
            );
            // 50 messages from 20 senders, in the warm-up and again in the
            // measured run (other numbers): in each, 10 senders have sent
            // the three messages that end the flow and 10 are mid-way.
            // Each round's store holds its own 20, not the last round's too.
            assert_eq!(r.stored, "20");
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn close_is_read_from_the_version_and_the_connection_header() {
        let closes = |r: &[u8]| parse_response(r).unwrap().unwrap().close;
        assert!(closes(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(closes(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!closes(
            b"HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!closes(b"HTTP/1.1 204 No Content\r\n\r\n"));
    }

    #[test]
    fn what_cannot_be_delimited_for_sure_is_an_error() {
        for r in [
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nbody to the end"[..],
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
        ] {
            assert!(
                parse_response(r).is_err(),
                "{:?} should not parse",
                String::from_utf8_lossy(r)
            );
        }
    }

    /// A server that answers each request (read up to its Content-Length)
    /// with `response`, written a few bytes at a time.
    async fn trickling_server(response: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            loop {
                // One whole request at the start of `buf`?
                let whole = find(&buf, b"\r\n\r\n").and_then(|head| {
                    let text = std::str::from_utf8(&buf[..head]).ok()?;
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))?
                        .parse()
                        .ok()?;
                    (buf.len() >= head + 4 + len).then_some(head + 4 + len)
                });
                match whole {
                    Some(n) => {
                        buf.drain(..n);
                        for piece in response.chunks(7) {
                            s.write_all(piece).await.unwrap();
                            s.flush().await.unwrap();
                            tokio::task::yield_now().await;
                        }
                    }
                    None => {
                        if s.read_buf(&mut buf).await.unwrap() == 0 {
                            return;
                        }
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_raw_client_reads_responses_in_pieces_on_one_connection() {
        const CHUNKED: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let addr = trickling_server(CHUNKED).await;
        let mut conn = RawConn::new(addr);
        for i in 0..3 {
            let request = raw_request(addr, &format!("Body={i}"), "sig");
            assert_eq!(conn.exchange(&request).await, Ok(200));
        }
        // The server accepts one connection only: all three went over it.
    }

    #[tokio::test]
    async fn the_bare_handler_answers_the_raw_client_with_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, bare_router()).await });
        let signer = Signer::new();
        let load = Load {
            phase: 1,
            from_prefix: "+1555",
            requests: 3,
            senders: 2,
            prefilled: 0,
        };
        let sc = scenario("multistep").unwrap();
        let mut conn = RawConn::new(addr);
        for n in 0..3 {
            let (body, sig) = load.request(&sc, &signer, n);
            assert_eq!(
                conn.exchange(&raw_request(addr, &body, &sig)).await,
                Ok(200)
            );
        }
        // An error status is read whole too: the connection goes on.
        let wrong = b"PATCH /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(conn.exchange(wrong).await, Ok(405));
        let (body, sig) = load.request(&sc, &signer, 0);
        assert_eq!(
            conn.exchange(&raw_request(addr, &body, &sig)).await,
            Ok(200)
        );
    }
}
