//! Who is calling, when a cache agent calls the controller's agent API or another node's
//! agent (peers): it shows a ServiceAccount token issued for the server's audience
//! ([`AGENT_API_AUDIENCE`], [`PEER_AUDIENCE`]) and bound to its pod; the API server's
//! TokenReview says whose token it is and, since the token is bound to a pod, which node that
//! pod runs on. That node, not anything the caller says, decides what the caller may fetch. A
//! token for one audience is refused by the other, so a server that sees an agent's token
//! cannot replay it elsewhere.
//!
//! [`identify`] is the pure reading of a review; [`TokenReviewer`] asks the API server and
//! remembers a positive answer for [`REMEMBER`] (keyed by the token's SHA-256, never the
//! token), so a node's burst of requests costs one review. A token stops working within that
//! time once its pod is deleted.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use lru::LruCache;
use sha2::{Digest, Sha256};
use thiserror::Error;
use vmdisk_crds::CACHE_AGENT_SERVICE_ACCOUNT;
pub use vmdisk_crds::{AGENT_API_AUDIENCE, PEER_AUDIENCE};

/// How long a reviewed token is trusted without asking again.
pub const REMEMBER: Duration = Duration::from_secs(30);
/// Tokens remembered at once (one per node's agent, with room for rotation).
const REMEMBERED_TOKENS: usize = 4096;
/// Where the API server records the node of a pod-bound ServiceAccount token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// A cache agent, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub node: String,
    pub pod: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no bearer token: agents send their pod's projected ServiceAccount token for audience {audience}")]
    NoToken { audience: &'static str },
    #[error("the API server did not accept the token{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotAuthenticated { reason: Option<String> },
    #[error("the token is not for audience {audience}")]
    WrongAudience { audience: &'static str },
    #[error("{username} is not a vmdisk cache agent (expected {expected})")]
    NotAnAgent { username: String, expected: String },
    #[error("the token of {username} is not bound to a pod on a node; agents use their pod's projected token")]
    NotBoundToANode { username: String },
    #[error("the TokenReview failed: {0}")]
    Review(String),
}

impl IdentityError {
    /// 401 for a token that proves nothing, 403 for someone who is not an agent, 503 when the
    /// API server could not be asked.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoToken { .. } | Self::NotAuthenticated { .. } | Self::WrongAudience { .. } => {
                401
            }
            Self::NotAnAgent { .. } | Self::NotBoundToANode { .. } => 403,
            Self::Review(_) => 503,
        }
    }
}

/// The ServiceAccount user name of the agents installed in `namespace`.
pub fn agent_user(namespace: &str) -> String {
    format!("system:serviceaccount:{namespace}:{CACHE_AGENT_SERVICE_ACCOUNT}")
}

/// Reads a TokenReview's answer: authenticated, for `audience`, the agents' account, bound
/// to a pod on a node.
pub fn identify(
    status: &TokenReviewStatus,
    expected_user: &str,
    audience: &'static str,
) -> Result<AgentIdentity, IdentityError> {
    if status.authenticated != Some(true) {
        return Err(IdentityError::NotAuthenticated {
            reason: status.error.clone().filter(|e| !e.is_empty()),
        });
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(IdentityError::WrongAudience { audience });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != expected_user {
        return Err(IdentityError::NotAnAgent {
            username,
            expected: expected_user.to_string(),
        });
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    match (first(NODE_NAME_EXTRA), first(POD_NAME_EXTRA)) {
        (Some(node), Some(pod)) => Ok(AgentIdentity { node, pod }),
        _ => Err(IdentityError::NotBoundToANode { username }),
    }
}

/// Asks the API server who a token belongs to, remembering positive answers briefly.
pub struct TokenReviewer {
    client: Client,
    expected_user: String,
    audience: &'static str,
    remembered: Mutex<LruCache<[u8; 32], (AgentIdentity, Instant)>>,
}

impl TokenReviewer {
    /// Reviews tokens of the agents installed in `install_namespace`, for `audience`.
    pub fn new(client: Client, install_namespace: &str, audience: &'static str) -> Self {
        Self {
            client,
            expected_user: agent_user(install_namespace),
            audience,
            remembered: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED_TOKENS).expect("not zero"),
            )),
        }
    }

    /// [`review`](Self::review) of the bearer token in a request's `Authorization` header.
    pub async fn review_bearer(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<AgentIdentity, IdentityError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .trim();
        self.review(token).await
    }

    pub async fn review(&self, token: &str) -> Result<AgentIdentity, IdentityError> {
        if token.is_empty() {
            return Err(IdentityError::NoToken {
                audience: self.audience,
            });
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((identity, at)) = self.remembered.lock().expect("poisoned").get(&key) {
            if at.elapsed() < REMEMBER {
                return Ok(identity.clone());
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.to_string()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| IdentityError::Review(e.to_string()))?;
        let identity = identify(
            &answer.status.unwrap_or_default(),
            &self.expected_user,
            self.audience,
        )?;
        self.remembered
            .lock()
            .expect("poisoned")
            .put(key, (identity.clone(), Instant::now()));
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn reviewed(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    const AGENT: &str = "system:serviceaccount:vmdisk-system:vmdisk-cache-agent";
    const BOUND: &[(&str, &str)] = &[(NODE_NAME_EXTRA, "node-1"), (POD_NAME_EXTRA, "agent-x")];

    #[test]
    fn an_agent_token_bound_to_a_pod_names_its_node() {
        assert_eq!(agent_user("vmdisk-system"), AGENT);
        assert_eq!(
            identify(
                &reviewed(AGENT, &[AGENT_API_AUDIENCE], BOUND),
                AGENT,
                AGENT_API_AUDIENCE
            ),
            Ok(AgentIdentity {
                node: "node-1".into(),
                pod: "agent-x".into()
            })
        );
    }

    #[test]
    fn everything_else_is_refused_with_its_reason() {
        let rejected = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..Default::default()
        };
        let e = identify(&rejected, AGENT, AGENT_API_AUDIENCE).unwrap_err();
        assert_eq!(e.status(), 401);
        assert!(e.to_string().ends_with(": token has expired"), "{e}");
        let e = identify(&TokenReviewStatus::default(), AGENT, AGENT_API_AUDIENCE).unwrap_err();
        assert_eq!(e.to_string(), "the API server did not accept the token");
        // The API server's own audience: a token lifted from a pod's default mount.
        let e = identify(
            &reviewed(AGENT, &["https://kubernetes.default.svc"], BOUND),
            AGENT,
            AGENT_API_AUDIENCE,
        );
        assert_eq!(
            e,
            Err(IdentityError::WrongAudience {
                audience: AGENT_API_AUDIENCE
            })
        );
        // A token an agent showed a peer is no good at the agent API, and the other way round.
        let e = identify(
            &reviewed(AGENT, &[PEER_AUDIENCE], BOUND),
            AGENT,
            AGENT_API_AUDIENCE,
        );
        assert!(matches!(e, Err(IdentityError::WrongAudience { .. })));
        let e = identify(
            &reviewed(AGENT, &[AGENT_API_AUDIENCE], BOUND),
            AGENT,
            PEER_AUDIENCE,
        );
        assert!(matches!(e, Err(IdentityError::WrongAudience { .. })));
        let populator = "system:serviceaccount:vmdisk-system:vmdisk-populator";
        let e = identify(
            &reviewed(populator, &[AGENT_API_AUDIENCE], BOUND),
            AGENT,
            AGENT_API_AUDIENCE,
        )
        .unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(e.to_string().contains(populator), "{e}");
        // A token of the agents' account that is not bound to a pod says no node.
        let e = identify(
            &reviewed(AGENT, &[AGENT_API_AUDIENCE], &[]),
            AGENT,
            AGENT_API_AUDIENCE,
        )
        .unwrap_err();
        assert!(matches!(e, IdentityError::NotBoundToANode { .. }), "{e}");
        let e = identify(
            &reviewed(AGENT, &[AGENT_API_AUDIENCE], &[(NODE_NAME_EXTRA, "")]),
            AGENT,
            AGENT_API_AUDIENCE,
        );
        assert!(matches!(e, Err(IdentityError::NotBoundToANode { .. })));
    }
}
