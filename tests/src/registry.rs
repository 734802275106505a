//! A real OCI registry (Debian's `docker-registry`, CNCF distribution v2) on a free 127.0.0.1
//! port with a temporary storage directory, plain HTTP or TLS with htpasswd auth.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::certs::TestCa;

const BINARY: &str = "/usr/bin/docker-registry";

pub struct TestRegistry {
    /// `127.0.0.1:<port>`
    pub addr: String,
    dir: TempDir,
    child: Option<Child>,
    tls: Option<TestCa>,
    pub credentials: Option<(String, String)>,
}

fn free_port(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestRegistry {
    pub fn start_plain() -> Self {
        Self::start(false, None)
    }

    /// A plain-HTTP registry that is already running at `addr` (host:port), e.g. one the
    /// cluster's nodes can pull from.
    pub fn running_at(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls: None,
            credentials: None,
        }
    }

    /// A plain-HTTP registry listening on `host` (an address of this machine that pods reach,
    /// such as a bridge's gateway).
    pub fn start_plain_on(host: &str) -> Self {
        Self::start_on(host, false, None)
    }

    /// TLS (a fresh CA; see [`TestRegistry::ca_pem`]) and htpasswd basic auth.
    pub fn start_tls_htpasswd(user: &str, password: &str) -> Self {
        Self::start(true, Some((user.to_string(), password.to_string())))
    }

    /// [`TestRegistry::start_tls_htpasswd`] listening on `host` (an address pods reach), with a
    /// certificate for that address.
    pub fn start_tls_htpasswd_on(host: &str, user: &str, password: &str) -> Self {
        Self::start_on(host, true, Some((user.to_string(), password.to_string())))
    }

    /// Plain HTTP with htpasswd basic auth, listening on `host`: a private registry a node's
    /// container runtime pulls from (it trusts no test CA).
    pub fn start_plain_htpasswd_on(host: &str, user: &str, password: &str) -> Self {
        Self::start_on(host, false, Some((user.to_string(), password.to_string())))
    }

    fn start(tls: bool, credentials: Option<(String, String)>) -> Self {
        Self::start_on("127.0.0.1", tls, credentials)
    }

    fn start_on(host: &str, tls: bool, credentials: Option<(String, String)>) -> Self {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} missing: install docker-registry (apt-get install docker-registry; .ci/setup does it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = tls.then(|| TestCa::new("registry CA"));
        let mut registry = Self {
            addr: String::new(),
            dir,
            child: None,
            tls: ca,
            credentials,
        };
        for _ in 0..5 {
            registry.addr = format!("{host}:{}", free_port(host));
            registry.write_config();
            if registry.spawn_and_wait() {
                return registry;
            }
        }
        panic!("docker-registry did not start: {}", registry.log());
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn write_config(&self) {
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n",
            self.storage_dir().display(),
            self.addr
        );
        if let Some(ca) = &self.tls {
            let host = self.addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
            let mut names = vec![host, "127.0.0.1", "localhost"];
            names.dedup();
            let pair = ca.issue(&names);
            let cert = self.dir.path().join("tls.crt");
            let key = self.dir.path().join("tls.key");
            std::fs::write(&cert, pair.cert_pem).unwrap();
            std::fs::write(&key, pair.key_pem).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = &self.credentials {
            let hash = bcrypt::hash(password, 5).unwrap();
            let htpasswd = self.dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: vmdisk-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(self.config_path(), config).unwrap();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The registry's own log (access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn_and_wait(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let _ = status;
                self.child = None;
                return false; // e.g. the port was taken meanwhile
            }
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGKILL: the registry vanishes mid-whatever.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn_and_wait(),
            "registry restart failed: {}",
            self.log()
        );
    }

    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|ca| ca.cert_pem())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// How many times the access log shows a GET of `digest`'s blob.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    }

    /// (HTTP status, bytes sent) of every completed GET of `digest`'s blob, from the access
    /// log.
    pub fn blob_responses(&self, digest: &str) -> Vec<(u16, u64)> {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .filter_map(|l| {
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                let mut fields = after.split_whitespace();
                Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
            })
            .collect()
    }

    /// The file holding a blob in the registry's storage (to corrupt it in tests).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
