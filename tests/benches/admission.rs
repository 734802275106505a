//! `cargo bench --bench admission`: throughput and latency of the webhook over TLS with
//! keep-alive at fixed concurrency, beside a bare server on the identical stack (same accept
//! loop, rustls config and client) whose handler returns a fixed AdmissionReview without
//! reading the request. Each round runs the two back to back (which one goes first
//! alternates), so drift on a shared machine hits both alike; the figures are over all rounds.
//! There is no goal on the difference: the API server adds milliseconds to any webhook call
//! (the e2e suite's `latency` case measures what a PVC create gains there).
//!
//! It runs twice: on the captured PVC review as kube-apiserver sends it (compact JSON), then on
//! the same review as stored, indented for reading.
//!
//! Env: VMDISK_BENCH_CONCURRENCY (default 16), VMDISK_BENCH_ROUND_SECS (default 2),
//! VMDISK_BENCH_ROUNDS (default 9).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use vmdisk_support::https::serve_tls;
use vmdisk_support::tls::{server_config, CertPaths, ReloadingCertResolver};
use vmdisk_tests::bench::env_or;
use vmdisk_tests::https::{client_config, Connection};
use vmdisk_tests::webhook::{as_sent, fixtures, sample_catalog_yaml, TestWebhook};

struct RoundResult {
    requests: u64,
    latencies_us: Vec<u32>,
    secs: f64,
}

async fn drive(
    addr: SocketAddr,
    ca_pem: &str,
    path: &'static str,
    body: bytes::Bytes,
    concurrency: usize,
    duration: Duration,
) -> RoundResult {
    let config = client_config(ca_pem);
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        conns.push(
            Connection::open(addr, "localhost", config.clone())
                .await
                .unwrap(),
        );
    }
    // Warm each connection so handshakes are not counted.
    for c in conns.iter_mut() {
        let r = c.post_json(path, body.clone()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c.post_json(path, body.clone()).await.unwrap();
                    lat.push(t.elapsed().as_micros() as u32);
                    assert_eq!(r.status, 200);
                }
                lat
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap());
    }
    RoundResult {
        requests: latencies_us.len() as u64,
        latencies_us,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async_main());
}

async fn async_main() {
    let concurrency = env_or("VMDISK_BENCH_CONCURRENCY", 16) as usize;
    let round = Duration::from_secs(env_or("VMDISK_BENCH_ROUND_SECS", 2));
    let rounds = env_or("VMDISK_BENCH_ROUNDS", 9);

    let webhook = TestWebhook::start(&sample_catalog_yaml(), None).await;
    let stored = fixtures()
        .into_iter()
        .find(|(n, _)| n == "pvc-create-annotation-form.json")
        .unwrap()
        .1;

    // Bare: the same TLS stack and accept loop, a handler that returns a fixed answer.
    let fixed: bytes::Bytes = {
        let mut conn = webhook.connect().await;
        conn.post_json("/mutate-pvc", stored.clone())
            .await
            .unwrap()
            .body
    };
    let resolver = ReloadingCertResolver::load(CertPaths::in_dir(&webhook.cert_dir())).unwrap();
    let baseline_router = Router::new().route(
        "/mutate-pvc",
        post(move || {
            let fixed = fixed.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    fixed,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baseline_addr = listener.local_addr().unwrap();
    tokio::spawn(serve_tls(
        listener,
        server_config(Arc::clone(&resolver) as _),
        baseline_router,
        std::future::pending(),
        Duration::from_secs(1),
        vmdisk_support::https::DEFAULT_MAX_CONNECTIONS,
    ));

    let targets = Targets {
        webhook: webhook.addr,
        baseline: baseline_addr,
        ca: webhook.ca.cert_pem(),
        concurrency,
        round,
        rounds,
    };
    // The review as kube-apiserver sends it (compact), then as stored, indented: what
    // whitespace alone costs the decoder.
    targets.compare("as-sent", as_sent(&stored).into()).await;
    targets.compare("indented", stored.into()).await;
}

struct Targets {
    webhook: SocketAddr,
    baseline: SocketAddr,
    ca: String,
    concurrency: usize,
    round: Duration,
    rounds: u64,
}

impl Targets {
    /// Rounds of baseline and webhook back to back on `body`, then one RESULT line.
    async fn compare(&self, label: &str, body: bytes::Bytes) {
        let (concurrency, round) = (self.concurrency, self.round);
        let (mut web, mut base) = (Vec::new(), Vec::new());
        let (mut web_req, mut base_req, mut web_secs, mut base_secs) = (0u64, 0u64, 0f64, 0f64);
        for i in 0..self.rounds {
            let run_baseline = || {
                drive(
                    self.baseline,
                    &self.ca,
                    "/mutate-pvc",
                    body.clone(),
                    concurrency,
                    round,
                )
            };
            let run_webhook = || {
                drive(
                    self.webhook,
                    &self.ca,
                    "/mutate-pvc?timeout=10s",
                    body.clone(),
                    concurrency,
                    round,
                )
            };
            let (b, w) = if i % 2 == 0 {
                let b = run_baseline().await;
                (b, run_webhook().await)
            } else {
                let w = run_webhook().await;
                (run_baseline().await, w)
            };
            let (w_rps, b_rps) = (w.requests as f64 / w.secs, b.requests as f64 / b.secs);
            println!(
                "{label} round {}: webhook {w_rps:.0} req/s, bare {b_rps:.0} req/s",
                i + 1
            );
            web_req += w.requests;
            web_secs += w.secs;
            web.extend(w.latencies_us);
            base_req += b.requests;
            base_secs += b.secs;
            base.extend(b.latencies_us);
        }
        web.sort_unstable();
        base.sort_unstable();
        let rps = web_req as f64 / web_secs;
        let baseline_rps = base_req as f64 / base_secs;
        println!(
            "{label}: concurrency={concurrency}, {} rounds of {}s",
            self.rounds,
            round.as_secs()
        );
        println!(
            "RESULT admission body={label} bytes={} rps={:.0} p50_us={} p99_us={} bare_rps={:.0} bare_p50_us={} bare_p99_us={}",
            body.len(),
            rps,
            percentile(&web, 0.5),
            percentile(&web, 0.99),
            baseline_rps,
            percentile(&base, 0.5),
            percentile(&base, 0.99),
        );
    }
}
