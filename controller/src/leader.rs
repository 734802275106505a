//! Leader election on a coordination.k8s.io/v1 Lease: only one `vmdisk-controller` replica
//! runs the controllers. [`decide`] and [`released`] are the pure rules; [`LeaderElector`]
//! does the I/O.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use vmdisk_crds::{AccessScope, ApiAccess};

use crate::time::{from_timestamp, to_timestamp};

/// What leader election asks of the API server: its Lease, in vmdisk's namespace.
pub const API_ACCESS: &[ApiAccess] = &[ApiAccess::new(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
    AccessScope::InstallNamespace,
)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderAction {
    /// No lease yet: create it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Someone else's but expired: take it over.
    TakeOver,
    /// Someone else holds it.
    Follow,
}

pub fn decide(
    lease: Option<&Lease>,
    me: &str,
    now: DateTime<Utc>,
    duration: Duration,
) -> LeaderAction {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaderAction::TakeOver
        } else {
            LeaderAction::Create
        };
    };
    if spec.holder_identity.as_deref() == Some(me) {
        return LeaderAction::Renew;
    }
    let seconds = spec
        .lease_duration_seconds
        .map_or(duration.as_secs() as i64, i64::from);
    let expired = match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(MicroTime(t)) => from_timestamp(t) + chrono::Duration::seconds(seconds) < now,
        None => true,
    };
    if expired || spec.holder_identity.is_none() {
        LeaderAction::TakeOver
    } else {
        LeaderAction::Follow
    }
}

/// The Lease handed back by `me` when it stops: no holder (which [`decide`] lets anyone take
/// over at once), as client-go's `ReleaseOnCancel` leaves it. `None` when `me` does not hold
/// it: a Lease taken over by another replica is not ours to clear.
pub fn released(lease: &Lease, me: &str, now: DateTime<Utc>) -> Option<Lease> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(me) {
        return None;
    }
    Some(Lease {
        metadata: ObjectMeta {
            name: lease.metadata.name.clone(),
            resource_version: lease.metadata.resource_version.clone(),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(to_timestamp(now))),
            ..spec.clone()
        }),
    })
}

pub struct LeaderElector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn lease(&self, previous: Option<&Lease>, now: DateTime<Utc>, acquire: bool) -> Lease {
        let mut spec = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
        if acquire {
            spec.acquire_time = Some(MicroTime(to_timestamp(now)));
            spec.lease_transitions =
                Some(spec.lease_transitions.unwrap_or(0) + i32::from(previous.is_some()));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        spec.renew_time = Some(MicroTime(to_timestamp(now)));
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec { ..spec }),
        }
    }

    /// One round: returns whether this replica leads now. Conflicts (another replica won the
    /// race) count as not leading.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let now = Utc::now();
        let result = match decide(current.as_ref(), &self.identity, now, self.duration) {
            LeaderAction::Follow => return Ok(false),
            LeaderAction::Create => {
                self.api
                    .create(&PostParams::default(), &self.lease(None, now, true))
                    .await
            }
            LeaderAction::Renew => {
                self.api
                    .replace(
                        &self.name,
                        &PostParams::default(),
                        &self.lease(current.as_ref(), now, false),
                    )
                    .await
            }
            LeaderAction::TakeOver => {
                self.api
                    .replace(
                        &self.name,
                        &PostParams::default(),
                        &self.lease(current.as_ref(), now, true),
                    )
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Hands the Lease back if this replica holds it, so a standby leads at its next round.
    /// A conflict means another replica wrote it meanwhile: nothing to release.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(lease) = released(&current, &self.identity, Utc::now()) else {
            return Ok(());
        };
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kube::client::Body;

    fn lease(holder: Option<&str>, renewed: DateTime<Utc>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(to_timestamp(renewed))),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now = Utc::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", now, d), LeaderAction::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), now)), "a", now, d),
            LeaderAction::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), now)), "a", now, d),
            LeaderAction::Follow
        );
        assert_eq!(
            decide(
                Some(&lease(Some("b"), now - chrono::Duration::seconds(16))),
                "a",
                now,
                d
            ),
            LeaderAction::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, now)), "a", now, d),
            LeaderAction::TakeOver
        );
    }

    #[test]
    fn a_released_lease_has_no_holder_and_is_taken_over_at_once() {
        let now = Utc::now();
        let d = Duration::from_secs(15);
        let mut ours = lease(Some("a"), now);
        ours.metadata.resource_version = Some("7".into());
        let released = released(&ours, "a", now).expect("ours to release");
        let spec = released.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity, None);
        assert_eq!(released.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(decide(Some(&released), "b", now, d), LeaderAction::TakeOver);
        assert_eq!(super::released(&lease(Some("b"), now), "a", now), None);
        assert_eq!(super::released(&lease(None, now), "a", now), None);
    }

    #[tokio::test]
    async fn missing_lease_is_created_with_our_identity() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let elector = LeaderElector::new(
            Client::new(service, "default"),
            "vmdisk-system",
            "vmdisk-controller",
            "pod-1",
            Duration::from_secs(15),
        );
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.unwrap();
            assert_eq!((request.method().as_str(), request.uri().path()), ("GET", "/apis/coordination.k8s.io/v1/namespaces/vmdisk-system/leases/vmdisk-controller"));
            let not_found = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
            send.send_response(
                http::Response::builder()
                    .status(404)
                    .body(Body::from(serde_json::to_vec(&not_found).unwrap()))
                    .unwrap(),
            );
            let (request, send) = handle.next_request().await.unwrap();
            assert_eq!(
                (request.method().as_str(), request.uri().path()),
                (
                    "POST",
                    "/apis/coordination.k8s.io/v1/namespaces/vmdisk-system/leases"
                )
            );
            let body: serde_json::Value =
                serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            assert_eq!(body["spec"]["holderIdentity"], "pod-1");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            send.send_response(
                http::Response::builder()
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        });
        assert!(elector.try_lead().await.unwrap());
        server.await.unwrap();
    }
}
