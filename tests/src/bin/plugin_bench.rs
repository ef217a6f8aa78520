//! Plugin host benchmark: upload-to-ready (Winch) and optimised (Cranelift)
//! compile times, load-from-artifact
//! (ready after restart) times, per-invocation latency of a pass-through
//! plugin (also built without WASI imports), a JSON-rewriting one
//! (`redact`: parse, change, print) next to
//! the same rewrite in native Rust, and an envelope (`cloudevents`),
//! invocations per second over two threads (and as the gateway runs them:
//! many tasks on a two-thread runtime), and how fast a runaway plugin
//! is stopped. Needs the plugins built by `scripts/test`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use wasmhook::plugin::{PluginEvent, PluginHost, PluginLimits, Ready};
use wasmhook_tests::plugin_wasm;

#[derive(Parser)]
struct Args {
    /// Invocations per latency measurement.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Seconds of the two-thread throughput run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Only call this plugin (passthrough, redact or cloudevents) in a
    /// loop: a steady workload to profile with `perf`.
    #[arg(long)]
    only: Option<String>,
}

fn event() -> PluginEvent {
    // A realistic ~1 KB invoice event.
    let payload = serde_json::json!({
        "invoice": {"id": "in_1MtHbELkdIwHu7ixl4OzzPMv", "amount_due": 4200, "amount_paid": 4200, "currency": "eur",
                    "status": "paid", "number": "ACME-0042", "hosted_invoice_url": "https://pay.example.com/i/acme/0042"},
        "customer": {"id": "cus_NffrFeUfNV2Hib", "email": "billing@acme.example", "name": "Acme Corporation",
                     "address": {"line1": "1 Main Street", "city": "Springfield", "postal_code": "12345", "country": "US"}},
        "lines": [
            {"id": "il_1", "description": "Pro plan (monthly)", "amount": 4000, "quantity": 1, "period": {"start": 1700000000, "end": 1702592000}},
            {"id": "il_2", "description": "Extra seat", "amount": 100, "quantity": 2, "period": {"start": 1700000000, "end": 1702592000}}
        ],
        "metadata": {"order_id": "ord_7731", "channel": "web", "campaign": "autumn-2026"},
        "payment": {"method": "card", "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030},
        "tax": {"rate": 0.19, "amount": 798, "jurisdiction": "DE", "exempt": false, "reverse_charge": false},
        "notes": "Thank you for your business. Questions? Write to billing@acme.example."
    })
    .to_string();
    PluginEvent {
        id: "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W".into(),
        event_type: "invoice.paid".into(),
        app_id: "app_01J".into(),
        app_uid: Some("acme".into()),
        webhook_id: "wh_01J".into(),
        attempt: 1,
        timestamp: "2026-11-29T10:00:00.000Z".into(),
        payload,
    }
}

/// The JSON rewrite measured: `redact` removing one field and masking
/// another, so the payload is parsed, changed and printed again.
const REWRITE_CONFIG: &str =
    r#"{"remove": ["/customer/email"], "mask": ["/payment/last4"], "keep_last": 2}"#;

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn measure(label: &str, iterations: usize, mut call: impl FnMut()) {
    for _ in 0..iterations / 10 {
        call();
    }
    let samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed()
        })
        .collect();
    let (p50, p99) = percentiles(samples);
    println!(
        "{label:<44} p50 {:>8.1} µs   p99 {:>8.1} µs",
        us(p50),
        us(p99)
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs one invocation to completion on a single-threaded runtime, as a
/// gateway worker thread would.
fn call(
    rt: &tokio::runtime::Runtime,
    host: &PluginHost,
    plugin: &Ready,
    event: &PluginEvent,
    config: &str,
) -> wasmhook::plugin::Invocation {
    rt.block_on(host.run(plugin, event.clone(), config.to_owned(), "bench"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    let args = Args::parse();
    let rt = runtime();
    let limits = PluginLimits::default();
    let host = PluginHost::new(limits.clone(), 4).expect("plugin host");
    let event = event();
    println!(
        "payload {} bytes; wasmtime pooling allocator, fresh instance per call",
        event.payload.len()
    );

    if let Some(name) = &args.only {
        return profile_one(&host, &rt, name, &event, args.iterations);
    }
    let mut compiled = Vec::new();
    for name in ["passthrough", "redact", "cloudevents"] {
        let wasm = plugin_wasm(name);
        let start = Instant::now();
        host.compile_quick(&wasm, name).expect("compiles");
        println!(
            "{:<44} {:>8.1} ms ({} KB component)",
            format!("upload-to-ready (Winch) {name}"),
            start.elapsed().as_secs_f64() * 1e3,
            wasm.len() / 1024
        );
        let start = Instant::now();
        let c = host.compile(&wasm, name).expect("compiles");
        println!(
            "{:<44} {:>8.1} ms",
            format!("optimised code ready (Cranelift, background) {name}"),
            start.elapsed().as_secs_f64() * 1e3,
        );
        compiled.push((name, wasm, c));
    }
    // A new host has an empty cache, as after a restart.
    let restarted = PluginHost::new(limits.clone(), 4).expect("plugin host");
    for (name, wasm, c) in &compiled {
        let start = Instant::now();
        let (_, recompiled) = restarted
            .load(name, wasm, Some((&c.artifact, &c.artifact_key)))
            .expect("loads");
        assert!(recompiled.is_none(), "the artifact was not used");
        println!(
            "{:<44} {:>8.3} ms",
            format!("ready after restart (artifact) {name}"),
            start.elapsed().as_secs_f64() * 1e3
        );
    }

    let ready = |name: &str| -> Ready { host.cached(name).expect("cached") };
    for (name, label, config) in [
        ("passthrough", "pass-through plugin", "null"),
        ("redact", "JSON rewrite plugin (redact)", REWRITE_CONFIG),
        ("cloudevents", "envelope plugin (cloudevents)", "null"),
    ] {
        let plugin = ready(name);
        let check = call(&rt, &host, &plugin, &event, config);
        assert!(check.result.is_ok(), "{:?}", check.result);
        measure(
            &format!("{label}, fresh instance + call"),
            args.iterations,
            || {
                let out = call(&rt, &host, &plugin, &event, config);
                std::hint::black_box(out);
            },
        );
    }
    // A guest built for wasm32-unknown-unknown and componentized imports
    // only the plugin log: what instantiating without WASI costs.
    let bare = host
        .compile(
            &wasmhook_tests::plugin_component_from_core("passthrough"),
            "passthrough-bare",
        )
        .expect("compiles")
        .ready;
    measure(
        "pass-through plugin without WASI imports",
        args.iterations,
        || {
            let out = call(&rt, &host, &bare, &event, "null");
            std::hint::black_box(out);
        },
    );
    // Until Cranelift's code is ready, an upload runs on Winch's.
    let quick_host = PluginHost::new(limits.clone(), 4).expect("plugin host");
    let quick = quick_host
        .compile_quick(&plugin_wasm("redact"), "redact")
        .expect("compiles");
    measure(
        "JSON rewrite plugin, Winch tier (first ~0.1 s)",
        args.iterations,
        || {
            let out = call(&rt, &quick_host, &quick, &event, REWRITE_CONFIG);
            std::hint::black_box(out);
        },
    );
    let native_event = wasmhook_sdk_event(&event);
    let native_config: serde_json::Value = serde_json::from_str(REWRITE_CONFIG).expect("JSON");
    measure(
        "JSON rewrite in native Rust (same code)",
        args.iterations,
        || {
            let out = wasmhook_plugin_redact::transform(
                native_event.clone(),
                wasmhook_sdk::Config::new(native_config.clone()),
            );
            std::hint::black_box(out.ok());
        },
    );
    measure(
        "envelope in native Rust (same code)",
        args.iterations,
        || {
            let out = wasmhook_plugin_cloudevents::transform(
                native_event.clone(),
                wasmhook_sdk::Config::new(serde_json::Value::Null),
            );
            std::hint::black_box(out.ok());
        },
    );

    let plugin = ready("redact");
    let host = Arc::new(host);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (host, plugin, event) = (host.clone(), plugin.clone(), event.clone());
            std::thread::spawn(move || {
                let rt = runtime();
                let mut calls = 0u64;
                while Instant::now() < deadline {
                    std::hint::black_box(call(&rt, &host, &plugin, &event, REWRITE_CONFIG));
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let calls: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!(
        "{:<44} {:>8.0} calls/s",
        "JSON rewrite plugin, two threads",
        calls as f64 / args.seconds as f64
    );
    many_tasks(&host, &plugin, &event, args.seconds);

    let hostile = plugin_wasm("hostile");
    let runaway = host.compile(&hostile, "hostile").expect("compiles").ready;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let out = call(&rt, &host, &runaway, &event, r#"{"mode":"loop"}"#);
        assert_eq!(
            out.result.as_ref().err().map(|e| e.kind().as_str()),
            Some("timeout")
        );
        worst = worst.max(out.duration);
    }
    println!(
        "{:<44} {:>8.1} ms worst of 20 (deadline {} ms, tick 5 ms)",
        "runaway plugin stopped after",
        worst.as_secs_f64() * 1e3,
        limits.deadline.as_millis()
    );
}

fn profile_one(
    host: &PluginHost,
    rt: &tokio::runtime::Runtime,
    name: &str,
    event: &PluginEvent,
    iterations: usize,
) {
    let config = if name == "redact" {
        REWRITE_CONFIG
    } else {
        "null"
    };
    let plugin = host
        .compile(&plugin_wasm(name), name)
        .expect("compiles")
        .ready;
    measure(
        &format!("{name}, fresh instance + call"),
        iterations,
        || {
            std::hint::black_box(call(rt, host, &plugin, event, config));
        },
    );
}

fn wasmhook_sdk_event(event: &PluginEvent) -> wasmhook_sdk::Event {
    let mut native = wasmhook_sdk::Event::new(
        &event.event_type,
        serde_json::from_str(&event.payload).unwrap(),
    );
    native.id = event.id.clone();
    native.timestamp = event.timestamp.clone();
    native
}

/// As the gateway runs plugins: many concurrent tasks on a two-thread
/// runtime, through the host's slot limit.
fn many_tasks(host: &Arc<PluginHost>, plugin: &Ready, event: &PluginEvent, seconds: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let calls: u64 = rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (host, plugin, event) = (host.clone(), plugin.clone(), event.clone());
                tokio::spawn(async move {
                    let mut calls = 0u64;
                    while Instant::now() < deadline {
                        let out = host
                            .run(&plugin, event.clone(), REWRITE_CONFIG.into(), "bench")
                            .await;
                        std::hint::black_box(out);
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.expect("task");
        }
        total
    });
    println!(
        "{:<44} {:>8.0} calls/s",
        "JSON rewrite plugin, 64 tasks, 2-thread runtime",
        calls as f64 / seconds as f64
    );
}
