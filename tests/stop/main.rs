//! SIGTERM ends each shipped binary (built by `cargo build --workspace --bins`) with exit
//! status 0, without a panic, within the 5 s a rollout may wait: the webhook with a file
//! catalog and with the API server's (10,000 VMDiskImages); the controller and the cache agent against a stand-in API server holding 10,000
//! VMDiskImages whose registry accepts connections and never answers, so reconciles and warms
//! are in flight when the signal comes. The controller also hands its Lease back, and a
//! standby replica leads next. Each stop's time is printed (`--nocapture`), not asserted
//! beyond the bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdisk_tests::certs::{write_secret_dir, TestCa};
use vmdisk_tests::fake_api::{images_at, FakeApi};
use vmdisk_tests::https::{client_config, Connection};
use vmdisk_tests::webhook::sample_catalog_yaml;

/// What the issue allows a stop.
const STOP_BOUND: Duration = Duration::from_secs(5);
/// How long a binary may take to get going.
const START_BOUND: Duration = Duration::from_secs(60);
const IMAGES: usize = 10_000;

/// A workspace binary: `target/<profile>/deps/stop-<hash>` → `target/<profile>/<name>`.
fn binary(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join(name)))
        .expect("the test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A running binary with its output in a file.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(mut command: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit, at most [`STOP_BOUND`]: asserts status 0 and no
    /// panic; returns how long the stop took.
    fn terminate(mut self, name: &str) -> Duration {
        let started = Instant::now();
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > STOP_BOUND {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{name} still ran {STOP_BOUND:?} after SIGTERM\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = started.elapsed();
        let log = self.log();
        println!("{name}: stopped {took:?} after SIGTERM ({status})");
        assert_eq!(status.code(), Some(0), "{name} exit status\n{log}");
        assert!(
            !log.contains("panicked"),
            "{name} panicked on the way out\n{log}"
        );
        took
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registry that accepts connections and never answers: pulls and resolutions hang.
struct SilentRegistry {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentRegistry {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for SilentRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `check` until it says yes, failing with `what` and the log after [`START_BOUND`].
async fn wait_until(what: &str, running: &Running, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_BOUND;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` over plain HTTP/1.0: the body, or `None` when nothing answers yet.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the webhook with the catalog `catalog` sets up (a directory, or the API server's),
/// waits for `/readyz` on a keep-alive connection left open, and sends SIGTERM: the drain
/// must not wait for that idle connection.
async fn webhook_stops(name: &str, catalog: impl FnOnce(&mut Command, &std::path::Path)) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = dir.path().join("tls");
    std::fs::create_dir_all(&cert_dir).unwrap();
    let ca = TestCa::new("vmdisk stop test CA");
    write_secret_dir(&cert_dir, &ca.issue(&["localhost", "127.0.0.1"]), 1);
    let addr = free_addr();
    let mut command = Command::new(binary("vmdisk-webhook"));
    command
        .args(["--listen", &addr.to_string(), "--cert-dir"])
        .arg(&cert_dir);
    catalog(&mut command, dir.path());
    let webhook = Running::spawn(command, dir.path().join("webhook.log"));
    let deadline = Instant::now() + START_BOUND;
    let mut connection = loop {
        if let Ok(c) = Connection::open(addr, "localhost", client_config(&ca.cert_pem())).await {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never listened\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    loop {
        let reply = connection
            .request("GET", "/readyz", None, "")
            .await
            .unwrap();
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never became ready: {}\n{}",
            reply.text(),
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = name.to_string();
    let took = tokio::task::spawn_blocking(move || webhook.terminate(&name))
        .await
        .unwrap();
    assert!(took <= STOP_BOUND);
    drop(connection);
}

#[tokio::test]
async fn the_webhook_stops_on_sigterm() {
    webhook_stops("vmdisk-webhook (file catalog)", |command, dir| {
        let catalog_dir = dir.join("catalog");
        std::fs::create_dir_all(&catalog_dir).unwrap();
        std::fs::write(catalog_dir.join("catalog.yaml"), sample_catalog_yaml()).unwrap();
        command.arg("--catalog-dir").arg(&catalog_dir);
    })
    .await;
}

#[tokio::test]
async fn the_webhook_with_a_catalog_of_10_000_images_stops_on_sigterm() {
    let api = FakeApi::start(images_at("registry.invalid:5000", IMAGES)).await;
    webhook_stops("vmdisk-webhook (10,000 images)", |command, dir| {
        command.env("KUBECONFIG", api.kubeconfig(dir));
    })
    .await;
}

#[tokio::test]
async fn the_controller_stops_on_sigterm_under_load_and_hands_its_lease_back() {
    let registry = SilentRegistry::start().await;
    let api = FakeApi::start(images_at(&registry.addr.to_string(), IMAGES)).await;
    let dir = tempfile::tempdir().unwrap();
    let (controller, metrics) = start_controller(&api, dir.path(), "stop-test");
    wait_until("the controller leading", &controller, || {
        http_get(metrics, "/readyz").as_deref() == Some("leading")
    })
    .await;
    let holder = |api: &FakeApi| api.lease().map(|l| l["spec"]["holderIdentity"].clone());
    assert_eq!(holder(&api), Some(serde_json::json!("stop-test")));
    wait_until(
        "image reconciles reaching the registry",
        &controller,
        || registry.accepted.load(Ordering::Relaxed) >= 1,
    )
    .await;
    println!(
        "vmdisk-controller: {} registry connections in flight, {} API writes before SIGTERM",
        registry.accepted.load(Ordering::Relaxed),
        api.writes()
    );
    let took = tokio::task::spawn_blocking(move || controller.terminate("vmdisk-controller"))
        .await
        .unwrap();
    assert!(took <= STOP_BOUND);
    assert_eq!(
        holder(&api),
        Some(serde_json::Value::Null),
        "the Lease was not handed back: {:?}",
        api.lease()
    );
}

#[tokio::test]
async fn the_cache_agent_stops_on_sigterm_with_warms_in_flight() {
    let registry = SilentRegistry::start().await;
    let api = FakeApi::start(images_at(&registry.addr.to_string(), IMAGES)).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut command = Command::new(binary("vmdisk-cache-agent"));
    command
        .args(["run", "--node-name", "node-a", "--budget", "1Gi"])
        .args(["--metrics-listen", "127.0.0.1:0", "--cache-dir"])
        .arg(&cache)
        .env("KUBECONFIG", api.kubeconfig(dir.path()))
        .env("RUST_LOG", "info");
    let agent = Running::spawn(command, dir.path().join("agent.log"));
    wait_until("a warm reaching the registry", &agent, || {
        registry.accepted.load(Ordering::Relaxed) >= 1
    })
    .await;
    let took = tokio::task::spawn_blocking(move || agent.terminate("vmdisk-cache-agent"))
        .await
        .unwrap();
    assert!(took <= STOP_BOUND);
    // The dropped warms took their staging with them (the next start would clean it anyway).
    let staging: Vec<_> = std::fs::read_dir(cache.join("staging"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    println!("vmdisk-cache-agent: staging after the stop: {staging:?}");
}

/// Starts a controller named `name` against `api`, serving its probes on a free port.
fn start_controller(api: &FakeApi, dir: &std::path::Path, name: &str) -> (Running, SocketAddr) {
    let metrics = free_addr();
    let mut command = Command::new(binary("vmdisk-controller"));
    command
        .args(["--metrics-listen", &metrics.to_string()])
        .env("KUBECONFIG", api.kubeconfig(dir))
        .env("POD_NAME", name)
        .env("RUST_LOG", "info");
    let log = dir.join(format!("{name}.log"));
    (Running::spawn(command, log), metrics)
}

#[tokio::test]
async fn a_standby_controller_leads_once_the_leader_stopped() {
    let api = FakeApi::start(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let (leader, leader_probes) = start_controller(&api, dir.path(), "first");
    wait_until("the first controller leading", &leader, || {
        http_get(leader_probes, "/readyz").as_deref() == Some("leading")
    })
    .await;
    let (standby, standby_probes) = start_controller(&api, dir.path(), "second");
    wait_until("the second controller standing by", &standby, || {
        http_get(standby_probes, "/readyz").as_deref() == Some("standby")
    })
    .await;
    let stopped = Instant::now();
    let took = tokio::task::spawn_blocking(move || leader.terminate("vmdisk-controller (leader)"))
        .await
        .unwrap();
    assert!(took <= STOP_BOUND);
    wait_until("the standby leading", &standby, || {
        http_get(standby_probes, "/readyz").as_deref() == Some("leading")
    })
    .await;
    println!(
        "vmdisk-controller: the standby led {:?} after SIGTERM to the leader (the Lease lasts 15 s)",
        stopped.elapsed()
    );
    let holder = api.lease().map(|l| l["spec"]["holderIdentity"].clone());
    assert_eq!(holder, Some(serde_json::json!("second")));
}
