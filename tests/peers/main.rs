//! A layer download that asks peers before its registry, against a real registry and peers
//! that serve well, stop half-way, flip a byte, refuse or stall: whatever a peer does, the
//! layer handed to the consumer is the published one, the registry serves only what the
//! peers did not, and a peer whose bytes fail the digest is named.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use vmdisk_registry::pull::{
    BlobSink, Downloaded, LayerSources, Peer, PeerClient, PeerConnect, PullError, Puller,
    PullerConfig, ResolvedImage,
};
use vmdisk_tests::disks::pseudo_random;
use vmdisk_tests::push::{options_for, push_layers, LayerSpec, TAR};
use vmdisk_tests::registry::TestRegistry;

/// What a test peer does with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Serves,
    /// Sends the first half of what was asked, then ends the answer.
    StopsHalfWay,
    /// Serves every byte, one of them flipped.
    FlipsAByte,
    /// 403.
    Refuses,
    /// Sends the headers, then nothing.
    Stalls,
    /// 503 to the first request (serving as many as it may), then serves.
    BusyAtFirst,
    /// 503 to every request.
    AlwaysBusy,
}

struct TestPeer {
    blob: Vec<u8>,
    digest: String,
    behaviour: Behaviour,
    /// The token every request must show.
    token: String,
    requests: AtomicUsize,
}

async fn serve_blob(
    State(peer): State<Arc<TestPeer>>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let nth = peer.requests.fetch_add(1, Ordering::SeqCst);
    if (peer.behaviour == Behaviour::BusyAtFirst && nth == 0)
        || peer.behaviour == Behaviour::AlwaysBusy
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    let shown = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if shown != Some(&format!("Bearer {}", peer.token)) || peer.behaviour == Behaviour::Refuses {
        return (StatusCode::FORBIDDEN, "not for you").into_response();
    }
    if digest != peer.digest {
        return (StatusCode::NOT_FOUND, "no such blob").into_response();
    }
    let size = peer.blob.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| http_range_header::parse_range_header(v).ok())
        .and_then(|r| r.validate(size).ok())
        .and_then(|r| r.first().cloned())
        .unwrap_or(0..=size - 1);
    let (start, end) = (*range.start(), *range.end());
    let mut body = peer.blob[start as usize..=end as usize].to_vec();
    match peer.behaviour {
        Behaviour::StopsHalfWay => body.truncate(body.len() / 2),
        Behaviour::FlipsAByte => {
            let middle = body.len() / 2;
            body[middle] ^= 0x01;
        }
        _ => {}
    }
    let stream: Body = if peer.behaviour == Behaviour::Stalls {
        Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>())
    } else {
        Body::from(body)
    };
    (
        StatusCode::PARTIAL_CONTENT,
        [(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))],
        stream,
    )
        .into_response()
}

async fn start_peer(peer: Arc<TestPeer>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/blobs/{digest}", get(serve_blob))
        .with_state(peer);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A copy of the blob, as a node keeps it for its own peers.
#[derive(Default, Clone)]
struct Copy {
    bytes: Arc<Mutex<Vec<u8>>>,
    verified: Arc<Mutex<Option<bool>>>,
}

impl BlobSink for Copy {
    fn write(&mut self, offset: u64, chunk: &[u8]) {
        let mut bytes = self.bytes.lock().unwrap();
        assert_eq!(bytes.len() as u64, offset, "the copy is written in order");
        bytes.extend_from_slice(chunk);
    }
    fn finish(self: Box<Self>, verified: bool) {
        *self.verified.lock().unwrap() = Some(verified);
    }
}

struct Setup {
    registry: TestRegistry,
    reference: String,
    /// The disk the image holds.
    disk: Vec<u8>,
    image: ResolvedImage,
    blob: Vec<u8>,
    puller: Puller,
}

async fn setup() -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = TestRegistry::start_plain();
    let mut disk = vec![0u8; 4 << 20];
    pseudo_random(7, &mut disk);
    let (reference, _) = push_layers(
        &registry,
        "disks/peers",
        "v1",
        &[LayerSpec {
            entries: vec![("disk/disk.img".into(), disk.clone())],
            media_type: TAR,
        }],
    )
    .await;
    let puller = Puller::new(PullerConfig::default());
    let image = puller
        .resolve(&reference, &options_for(&registry))
        .await
        .unwrap();
    let blob = std::fs::read(registry.blob_path(&image.layers[0].digest)).unwrap();
    Setup {
        registry,
        reference,
        disk,
        image,
        blob,
        puller,
    }
}

fn client(token: &str) -> PeerClient {
    let token = token.to_string();
    PeerClient {
        connect: PeerConnect::Client(
            reqwest::Client::builder()
                .use_preconfigured_tls(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
                .build()
                .unwrap(),
        ),
        token: Arc::new(move || Ok(token.clone())),
        stall: Duration::from_secs(2),
    }
}

/// Downloads the layer with `peers` in front of the registry; returns the outcome, what the
/// consumer read (or where its reader failed), and the copy.
async fn download(
    s: &Setup,
    peers: Vec<Peer>,
) -> (Result<Downloaded, PullError>, Result<Vec<u8>, String>, Copy) {
    download_with(s, peers, None).await
}

async fn download_with(
    s: &Setup,
    peers: Vec<Peer>,
    refresh: Option<vmdisk_registry::pull::peers::RefreshFn>,
) -> (Result<Downloaded, PullError>, Result<Vec<u8>, String>, Copy) {
    let copy = Copy::default();
    let sources = LayerSources {
        peers,
        client: Some(client("agent-token")),
        sink: Some(Box::new(copy.clone())),
        refresh,
    };
    let (mut reader, task) = s.puller.stream_layer(
        &s.image,
        &s.image.layers[0],
        &options_for(&s.registry),
        sources,
        Arc::new(|_| {}),
    );
    let read = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut out)
            .map(|_| out)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    (task.await.unwrap(), read, copy)
}

async fn peer(s: &Setup, node: &str, behaviour: Behaviour) -> (Peer, Arc<TestPeer>) {
    let state = Arc::new(TestPeer {
        blob: s.blob.clone(),
        digest: s.image.layers[0].digest.clone(),
        behaviour,
        token: "agent-token".into(),
        requests: AtomicUsize::new(0),
    });
    let addr = start_peer(Arc::clone(&state)).await;
    (
        Peer {
            node: node.into(),
            url: format!("http://{addr}"),
        },
        state,
    )
}

/// Bytes the registry sent of the layer, from its access log.
fn registry_bytes(s: &Setup) -> u64 {
    s.registry
        .blob_responses(&s.image.layers[0].digest)
        .iter()
        .map(|(_, bytes)| bytes)
        .sum()
}

#[tokio::test]
async fn a_peer_that_holds_the_blob_serves_it_all_and_the_registry_nothing() {
    let s = setup().await;
    let (good, state) = peer(&s, "node-b", Behaviour::Serves).await;
    let (outcome, read, copy) = download(&s, vec![good]).await;
    let size = s.blob.len() as u64;
    assert_eq!(
        outcome.unwrap(),
        Downloaded {
            bytes: size,
            from_peers: size
        }
    );
    assert!(
        read.unwrap() == s.blob,
        "the consumer read the published blob"
    );
    assert!(*copy.bytes.lock().unwrap() == s.blob);
    assert_eq!(*copy.verified.lock().unwrap(), Some(true));
    assert_eq!(state.requests.load(Ordering::SeqCst), 1);
    assert_eq!(s.registry.blob_gets(&s.image.layers[0].digest), 0);
}

#[tokio::test]
async fn a_peer_that_stops_half_way_is_followed_by_the_registry_from_where_it_stopped() {
    let s = setup().await;
    let (half, _) = peer(&s, "node-b", Behaviour::StopsHalfWay).await;
    let (outcome, read, copy) = download(&s, vec![half]).await;
    let size = s.blob.len() as u64;
    let outcome = outcome.unwrap();
    assert_eq!(outcome.bytes, size);
    assert_eq!(outcome.from_peers, size / 2);
    assert!(read.unwrap() == s.blob);
    assert_eq!(*copy.verified.lock().unwrap(), Some(true));
    // The registry sent the rest, not the whole blob again.
    assert_eq!(registry_bytes(&s), size - size / 2);
}

#[tokio::test]
async fn peers_that_refuse_or_stall_are_dropped_for_the_next_source() {
    let s = setup().await;
    let (refuses, refused) = peer(&s, "node-b", Behaviour::Refuses).await;
    let (stalls, stalled) = peer(&s, "node-c", Behaviour::Stalls).await;
    let (good, served) = peer(&s, "node-d", Behaviour::Serves).await;
    let (outcome, read, _) = download(&s, vec![refuses, stalls, good]).await;
    let size = s.blob.len() as u64;
    assert_eq!(outcome.unwrap().from_peers, size);
    assert!(read.unwrap() == s.blob);
    for (name, state) in [
        ("refusing", refused),
        ("stalling", stalled),
        ("good", served),
    ] {
        assert_eq!(
            state.requests.load(Ordering::SeqCst),
            1,
            "{name} peer asked"
        );
    }
    assert_eq!(s.registry.blob_gets(&s.image.layers[0].digest), 0);
}

#[tokio::test]
async fn a_peer_that_flips_a_byte_is_named_and_nothing_is_handed_over_as_complete() {
    let s = setup().await;
    let (flips, _) = peer(&s, "node-evil", Behaviour::FlipsAByte).await;
    let (outcome, read, copy) = download(&s, vec![flips]).await;
    match outcome {
        Err(PullError::PeerCorrupt { digest, peers }) => {
            assert_eq!(digest, s.image.layers[0].digest);
            assert_eq!(peers, vec!["node-evil".to_string()]);
        }
        other => panic!("expected PeerCorrupt, got {other:?}"),
    }
    // The consumer's reader failed instead of ending: it never saw a complete layer.
    let failed = read.expect_err("the reader fails where the data would have ended");
    assert!(failed.contains("node-evil"), "{failed}");
    assert_eq!(
        *copy.verified.lock().unwrap(),
        Some(false),
        "the copy is not kept for other peers"
    );
}

#[tokio::test]
async fn without_peers_the_registry_serves_the_blob_as_before() {
    let s = setup().await;
    let (outcome, read, copy) = download(&s, vec![]).await;
    let size = s.blob.len() as u64;
    assert_eq!(
        outcome.unwrap(),
        Downloaded {
            bytes: size,
            from_peers: 0
        }
    );
    assert!(read.unwrap() == s.blob);
    assert!(*copy.bytes.lock().unwrap() == s.blob);
    assert_eq!(registry_bytes(&s), size);
}

#[tokio::test]
async fn a_busy_peer_is_asked_again_before_the_registry() {
    let s = setup().await;
    let (busy, state) = peer(&s, "node-b", Behaviour::BusyAtFirst).await;
    let (outcome, read, _) = download(&s, vec![busy]).await;
    assert_eq!(outcome.unwrap().from_peers, s.blob.len() as u64);
    assert!(read.unwrap() == s.blob);
    assert_eq!(state.requests.load(Ordering::SeqCst), 2);
    assert_eq!(s.registry.blob_gets(&s.image.layers[0].digest), 0);
}

#[tokio::test]
async fn while_every_peer_is_busy_a_fresh_list_is_asked_before_the_registry() {
    let s = setup().await;
    let (busy, _) = peer(&s, "node-b", Behaviour::AlwaysBusy).await;
    let (good, served) = peer(&s, "node-c", Behaviour::Serves).await;
    let refresh: vmdisk_registry::pull::peers::RefreshFn = Arc::new(move || {
        let good = good.clone();
        Box::pin(async move { vec![good] })
    });
    let (outcome, read, _) = download_with(&s, vec![busy], Some(refresh)).await;
    assert_eq!(outcome.unwrap().from_peers, s.blob.len() as u64);
    assert!(read.unwrap() == s.blob);
    assert_eq!(served.requests.load(Ordering::SeqCst), 1);
    assert_eq!(s.registry.blob_gets(&s.image.layers[0].digest), 0);
}

/// The warm's side of a flipped byte: the peer is named, left out, and the image streamed
/// again from the registry; the committed entry is the published disk.
#[tokio::test]
async fn a_warm_fed_a_flipped_byte_streams_again_without_that_peer() {
    use futures::future::BoxFuture;
    use vmdisk_cache_agent::store::{Budget, CacheStore};
    use vmdisk_cache_agent::warm::extract::ExtractLimits;
    use vmdisk_cache_agent::warm::{LayerSourcing, WarmRequest, Warmer};
    use vmdisk_registry::pull::LayerDescriptor;

    struct OnePeer {
        peer: Peer,
        /// The nodes left out at each call.
        calls: Mutex<Vec<Vec<String>>>,
    }
    impl LayerSourcing for OnePeer {
        fn sources<'a>(
            &'a self,
            _image: &'a ResolvedImage,
            _layer: &'a LayerDescriptor,
            excluded: &'a [String],
        ) -> BoxFuture<'a, LayerSources> {
            self.calls.lock().unwrap().push(excluded.to_vec());
            let peers = if excluded.contains(&self.peer.node) {
                vec![]
            } else {
                vec![self.peer.clone()]
            };
            Box::pin(async move {
                LayerSources {
                    peers,
                    client: Some(client("agent-token")),
                    sink: None,
                    refresh: None,
                }
            })
        }
    }

    let s = setup().await;
    let (evil, asked) = peer(&s, "node-evil", Behaviour::FlipsAByte).await;
    let sourcing = Arc::new(OnePeer {
        peer: evil,
        calls: Mutex::default(),
    });
    let cache = tempfile::tempdir().unwrap();
    let (store, _) = CacheStore::open(cache.path(), Budget::Bytes(1 << 30)).unwrap();
    let warmer = Warmer::new(
        Arc::new(store),
        Puller::new(PullerConfig::default()),
        ExtractLimits::default(),
    )
    .with_peers(Arc::clone(&sourcing) as Arc<dyn LayerSourcing>);
    let outcome = warmer
        .warm(
            WarmRequest {
                reference: s.reference.clone(),
                format: vmdisk_crds::DiskFormat::Raw,
                registry: options_for(&s.registry),
            },
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
    assert!(
        std::fs::read(&outcome.entry.disk_path).unwrap() == s.disk,
        "the entry is the published disk"
    );
    assert_eq!(
        *sourcing.calls.lock().unwrap(),
        vec![vec![], vec!["node-evil".to_string()]],
        "streamed again without the peer whose bytes failed the digest"
    );
    assert_eq!(outcome.bytes_from_peers, 0);
    assert_eq!(asked.requests.load(Ordering::SeqCst), 1);
}
