//! Peers: other nodes' cache agents that hold a layer's blob, or are downloading it, asked
//! before the registry. A peer serves `GET {url}/v1/blobs/{digest}` with HTTP Range requests,
//! also while its own download is still running (it sends bytes as they arrive).
//!
//! Nothing a peer sends is trusted: its bytes feed the same SHA-256 as the registry's, and a
//! layer is handed to its consumer as complete only once that digest matched. A peer that
//! fails, refuses, or sends nothing for [`PeerClient::stall`] is dropped and the download goes
//! on from the same offset with the next peer or the registry; a blob whose digest does not
//! match after a peer contributed to it ends in [`PullError::PeerCorrupt`], naming the peers,
//! so the caller can stream again without them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// The path under a peer's URL where it serves blobs.
pub const PEER_BLOBS_PATH: &str = "/v1/blobs";

/// A node's agent that holds or is pulling a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node it runs on (for logs, metrics and exclusion).
    pub node: String,
    /// `https://<address>:<port>`.
    pub url: String,
}

/// The bearer token shown to peers, read anew for every request (the kubelet rotates it).
pub type TokenFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// How this process asks peers.
#[derive(Clone)]
pub struct PeerClient {
    pub connect: PeerConnect,
    pub token: TokenFn,
    /// A peer that sends nothing for this long is dropped.
    pub stall: Duration,
}

/// How a peer's address becomes a connection.
#[derive(Clone)]
pub enum PeerConnect {
    /// Every peer's certificate names `name` (peers share one, from the cluster's CA): the
    /// connection goes to the address in the peer's URL and checks the certificate for
    /// `name` with `tls`.
    Named {
        name: String,
        tls: Arc<rustls::ClientConfig>,
    },
    /// A client as it is (tests with plain HTTP peers).
    Client(reqwest::Client),
}

impl PeerConnect {
    /// The client and URL for `path` on `peer`.
    fn request(&self, peer: &Peer, path: &str) -> Result<(reqwest::Client, String), PeerFailure> {
        let base = peer.url.trim_end_matches('/');
        match self {
            Self::Client(client) => Ok((client.clone(), format!("{base}{path}"))),
            Self::Named { name, tls } => {
                let addr: std::net::SocketAddr = base
                    .strip_prefix("https://")
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| {
                        PeerFailure::Request(format!("{base} is not https://<address>:<port>"))
                    })?;
                let client = reqwest::Client::builder()
                    .use_preconfigured_tls((**tls).clone())
                    .resolve(name, addr)
                    .build()
                    .map_err(|e| PeerFailure::Request(e.to_string()))?;
                Ok((client, format!("https://{name}:{}{path}", addr.port())))
            }
        }
    }
}

/// Where a copy of the blob goes while it downloads (for this node to serve to its peers).
/// Best effort: a sink that cannot write stops copying; the download goes on.
pub trait BlobSink: Send {
    /// The bytes at `offset`, in order.
    fn write(&mut self, offset: u64, chunk: &[u8]);
    /// The download ended: `verified` when the whole blob matched its digest.
    fn finish(self: Box<Self>, verified: bool);
}

/// A fresh list of peers, asked when every peer of the last one was busy (503).
pub type RefreshFn = Arc<dyn Fn() -> futures::future::BoxFuture<'static, Vec<Peer>> + Send + Sync>;

/// A layer's other sources and its copy: peers asked first, in order, then the registry.
#[derive(Default)]
pub struct LayerSources {
    pub peers: Vec<Peer>,
    pub client: Option<PeerClient>,
    pub sink: Option<Box<dyn BlobSink>>,
    /// Where more peers come from while the first ones are busy; without it, the busy ones
    /// are asked again.
    pub refresh: Option<RefreshFn>,
}

impl LayerSources {
    /// The registry alone, nothing copied.
    pub fn registry_only() -> Self {
        Self::default()
    }
}

/// Why a peer was dropped (logged; the download goes on elsewhere).
#[derive(Debug, thiserror::Error)]
pub enum PeerFailure {
    #[error("no token to show peers: {0}")]
    Token(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("answered a range that does not start at byte {wanted}")]
    WrongRange { wanted: u64 },
}

/// A peer's answer, read chunk by chunk.
pub(super) struct PeerBody {
    response: reqwest::Response,
    stall: Duration,
}

impl PeerBody {
    /// The next chunk; `None` once the peer ended its answer.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, PeerFailure> {
        tokio::time::timeout(self.stall, self.response.chunk())
            .await
            .map_err(|_| PeerFailure::Stalled(self.stall))?
            .map_err(|e| PeerFailure::Request(e.to_string()))
    }
}

/// Asks `peer` for `digest` from `offset` on.
pub(super) async fn open(
    client: &PeerClient,
    peer: &Peer,
    digest: &str,
    offset: u64,
) -> Result<PeerBody, PeerFailure> {
    let token = (client.token)().map_err(PeerFailure::Token)?;
    let (http, url) = client
        .connect
        .request(peer, &format!("{PEER_BLOBS_PATH}/{digest}"))?;
    let request = http
        .get(&url)
        .bearer_auth(token)
        .header(reqwest::header::RANGE, format!("bytes={offset}-"))
        .send();
    let response = tokio::time::timeout(client.stall, request)
        .await
        .map_err(|_| PeerFailure::Stalled(client.stall))?
        .map_err(|e| PeerFailure::Request(e.to_string()))?;
    let status = response.status().as_u16();
    match status {
        206 => {
            let starts_at_offset = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok())
                == Some(offset);
            if !starts_at_offset {
                return Err(PeerFailure::WrongRange { wanted: offset });
            }
        }
        200 if offset == 0 => {}
        200 => return Err(PeerFailure::WrongRange { wanted: offset }),
        _ => {
            let message = tokio::time::timeout(client.stall, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(PeerFailure::Refused {
                status,
                message: message.chars().take(512).collect(),
            });
        }
    }
    Ok(PeerBody {
        response,
        stall: client.stall,
    })
}
