//! A TCP proxy that slows what a server sends, so a test can act while a pull is under way
//! (kill an agent mid-warm, delete a PVC mid-populate) instead of racing a local registry that
//! answers in milliseconds, and counts what the server sent (how many bytes left a registry).
//! TLS passes through untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct ThrottledProxy {
    /// `host:port` to use instead of the target's.
    pub addr: String,
    bytes_per_second: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ThrottledProxy {
    /// Listens on `listen_host` (port chosen by the system) and forwards to `target`
    /// (`host:port`), sending the server's bytes back at most `bytes_per_second`.
    pub async fn start(listen_host: &str, target: &str, bytes_per_second: u64) -> Self {
        let listener = TcpListener::bind((listen_host, 0)).await.unwrap();
        let addr = format!("{listen_host}:{}", listener.local_addr().unwrap().port());
        let rate = Arc::new(AtomicU64::new(bytes_per_second));
        let target = target.to_string();
        let shared = Arc::clone(&rate);
        let sent = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&sent);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let rate = Arc::clone(&shared);
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    });
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                        let limit = rate.load(Ordering::Relaxed).max(1);
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / limit as f64)).await;
                    }
                    let _ = client_write.shutdown().await;
                    upstream.abort();
                });
            }
        });
        Self {
            addr,
            bytes_per_second: rate,
            sent,
            task,
        }
    }

    /// Bytes the server sent through the proxy so far (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Changes the rate for data sent from now on (e.g. to let a test finish quickly).
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.bytes_per_second
            .store(bytes_per_second, Ordering::Relaxed);
    }
}

impl Drop for ThrottledProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
