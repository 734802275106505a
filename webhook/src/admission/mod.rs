//! Admission: an AdmissionReview body in, an answer out.
//!
//! [`review`] decodes the envelope and the request with serde (the object kept as raw JSON);
//! [`policy`] decides whether the request is one vmdisk mutates; [`view`] decodes the object
//! into the parts the mutation reads; [`crate::mutate`] turns those into a plan and its
//! `json_patch::Patch`; [`answer`] encodes the reply. A review whose envelope is sound always
//! gets an answer carrying its own uid: envelope errors are HTTP 400 (there is no uid to
//! answer), and an object that does not fit its view is answered allowed, unchanged, with a
//! warning, per the webhook contract.

pub mod answer;
pub mod policy;
pub mod review;
pub mod view;

use std::sync::Arc;

pub use answer::{decode_patch_field, AdmissionAnswer};
pub use review::{
    decode_review, AdmissionRequest, GroupVersionResource, ReviewError, API_VERSION, KIND,
};

use crate::catalog::{ClaimFetch, ImageCatalog};
use crate::metrics::{Outcome, Resource};
use crate::mutate::pod::mutate_pod;
use crate::mutate::pvc::mutate_pvc;
use crate::mutate::{ClaimMisses, ImageLookup, Mutation, MutationConfig};
use policy::Skip;
use view::{decode_object, PodView, PvcView};

/// How a sound review was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub answer: AdmissionAnswer,
    pub outcome: Outcome,
    /// What asking the catalog's source about unknown claims found, if it was asked.
    pub claims_fetched: Option<ClaimFetch>,
}

/// The admission decisions of both endpoints, over a catalog.
pub struct Admission {
    catalog: Arc<dyn ImageCatalog>,
    config: MutationConfig,
}

impl Admission {
    pub fn new(catalog: Arc<dyn ImageCatalog>, config: MutationConfig) -> Self {
        Self { catalog, config }
    }

    pub fn catalog(&self) -> &dyn ImageCatalog {
        self.catalog.as_ref()
    }

    /// Answers one body for `resource`'s endpoint from the catalog as it is. Never panics on
    /// input.
    pub fn review(&self, resource: Resource, body: &[u8]) -> Result<Admitted, ReviewError> {
        let request = decode_review(body)?;
        Ok(self.decide(resource, &request, self.catalog()))
    }

    /// As [`Self::review`], except that a pod naming claims the catalog has not seen yet (a
    /// pod created right after its PVC) is decided again once the catalog asked its source.
    pub async fn review_fetching(
        &self,
        resource: Resource,
        body: &[u8],
    ) -> Result<Admitted, ReviewError> {
        let request = decode_review(body)?;
        let catalog = self.catalog();
        if resource == Resource::Pvc {
            return Ok(self.decide(resource, &request, catalog));
        }
        // The recorder holds a non-Sync borrow: it must not live across the await.
        let (first, missed) = {
            let lookup = ClaimMisses::new(catalog);
            let first = self.decide(resource, &request, &lookup);
            (first, lookup.into_missed())
        };
        if missed.is_empty() {
            return Ok(first);
        }
        let fetched = catalog.fetch_claims(&missed).await;
        let mut admitted = if fetched.found > 0 {
            self.decide(resource, &request, catalog)
        } else {
            first
        };
        admitted.claims_fetched = Some(fetched);
        Ok(admitted)
    }

    fn decide(
        &self,
        resource: Resource,
        request: &AdmissionRequest,
        images: &dyn ImageLookup,
    ) -> Admitted {
        let admitted = |answer, outcome| Admitted {
            answer,
            outcome,
            claims_fetched: None,
        };
        let object = match policy::object_to_mutate(resource, request) {
            Ok(object) => object,
            Err(skip) => {
                if skip == Skip::UnexpectedResource {
                    tracing::warn!(
                        uid = %request.uid,
                        resource = %request.resource.resource,
                        group = %request.resource.group,
                        endpoint = resource.as_str(),
                        "unexpected resource sent to this endpoint; check the MutatingWebhookConfiguration rules"
                    );
                }
                tracing::debug!(uid = %request.uid, reason = skip.as_str(), "allowed without patch");
                return admitted(AdmissionAnswer::allow(&request.uid), Outcome::Skipped);
            }
        };
        let namespace = request.namespace.as_deref().unwrap_or("default");
        let config = &self.config;
        let mutation = match resource {
            Resource::Pvc => decode_object::<PvcView>(object)
                .map(|pvc| mutate_pvc(pvc.object(), namespace, images, config)),
            Resource::Pod => decode_object::<PodView>(object)
                .map(|pod| mutate_pod(pod.spec.as_ref(), namespace, images, config)),
        };
        let Mutation { patch, warnings } = match mutation {
            Ok(m) => m,
            Err(why) => {
                let warning = format!(
                    "vmdisk: object is not a valid {}, left unchanged: {why}",
                    policy::kind_name(resource)
                );
                tracing::warn!(uid = %request.uid, %namespace, %warning, "object not decodable");
                let answer = AdmissionAnswer {
                    uid: request.uid.to_string(),
                    patch: None,
                    warnings: vec![warning],
                };
                return admitted(answer, Outcome::Skipped);
            }
        };
        let outcome = if patch.is_some() {
            Outcome::Patched
        } else {
            Outcome::Unchanged
        };
        // Every admission at info would cost more than the admission itself; warnings are
        // what an operator needs to see.
        if !warnings.is_empty() {
            tracing::info!(
                uid = %request.uid,
                %namespace,
                name = request.name.as_deref().unwrap_or(""),
                resource = resource.as_str(),
                dry_run = request.dry_run.unwrap_or(false),
                patched = patch.is_some(),
                ?warnings,
                "admitted with warnings"
            );
        } else if patch.is_some() {
            tracing::debug!(
                uid = %request.uid,
                %namespace,
                name = request.name.as_deref().unwrap_or(""),
                resource = resource.as_str(),
                dry_run = request.dry_run.unwrap_or(false),
                "admitted with patch"
            );
        }
        let answer = AdmissionAnswer {
            uid: request.uid.to_string(),
            patch,
            warnings,
        };
        admitted(answer, outcome)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mutate::tests_support::{image, Images};
    use futures::future::BoxFuture;
    use std::sync::Mutex;

    pub const POD: &str =
        include_str!("../../../tests/fixtures/admission/pod-create-virt-launcher-with-pvc.json");
    const PVC: &str =
        include_str!("../../../tests/fixtures/admission/pvc-create-annotation-form.json");
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A catalog whose watch has not delivered `vms/fedora-root` yet; its source knows it as
    /// `source_says`.
    pub struct LateCatalog {
        known: Images,
        source_says: Option<&'static str>,
        learned: Mutex<Option<String>>,
        asked: Mutex<Vec<(String, String)>>,
    }

    impl LateCatalog {
        pub fn new(source_says: Option<&'static str>) -> Arc<Self> {
            Arc::new(Self {
                known: Images::with(image("fedora-40", Some(DIGEST), None, None)),
                source_says,
                learned: Mutex::new(None),
                asked: Mutex::new(Vec::new()),
            })
        }
    }

    impl ImageLookup for LateCatalog {
        fn image(&self, namespace: &str, name: &str) -> Option<Arc<vmdisk_crds::VMDiskImage>> {
            self.known.image(namespace, name)
        }
        fn claim_image(&self, namespace: &str, claim: &str) -> Option<String> {
            let learned = self.learned.lock().unwrap();
            (namespace == "vms" && claim == "fedora-root")
                .then(|| learned.clone())
                .flatten()
        }
    }

    impl ImageCatalog for LateCatalog {
        fn is_synced(&self) -> bool {
            true
        }
        fn fetch_claims<'a>(&'a self, claims: &'a [(String, String)]) -> BoxFuture<'a, ClaimFetch> {
            self.asked.lock().unwrap().extend_from_slice(claims);
            *self.learned.lock().unwrap() = self.source_says.map(str::to_string);
            let found = usize::from(self.source_says.is_some());
            Box::pin(std::future::ready(ClaimFetch {
                found,
                absent: claims.len() - found,
                failed: 0,
            }))
        }
    }

    #[tokio::test]
    async fn a_pod_naming_a_claim_the_watch_has_not_delivered_is_decided_again_after_a_fetch() {
        let catalog = LateCatalog::new(Some("fedora-40"));
        let admission = Admission::new(catalog.clone(), MutationConfig::default());
        let before = admission.review(Resource::Pod, POD.as_bytes()).unwrap();
        assert!(
            before.answer.patch.is_none(),
            "the catalog alone does not know the claim"
        );
        assert_eq!(before.claims_fetched, None);
        *catalog.learned.lock().unwrap() = None;

        let after = admission
            .review_fetching(Resource::Pod, POD.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            *catalog.asked.lock().unwrap(),
            [("vms".to_string(), "fedora-root".to_string())]
        );
        assert_eq!(after.outcome, Outcome::Patched);
        let patch = after
            .answer
            .patch
            .expect("a preference once the claim is known");
        let key = vmdisk_crds::node_cache_label_key(DIGEST).unwrap();
        assert!(format!("{patch:?}").contains(&key), "{patch:?}");
        assert_eq!(
            after.claims_fetched,
            Some(ClaimFetch {
                found: 1,
                absent: 0,
                failed: 0
            })
        );
    }

    #[tokio::test]
    async fn a_claim_the_source_does_not_know_leaves_the_first_answer() {
        let catalog = LateCatalog::new(None);
        let admission = Admission::new(catalog.clone(), MutationConfig::default());
        let admitted = admission
            .review_fetching(Resource::Pod, POD.as_bytes())
            .await
            .unwrap();
        assert!(admitted.answer.patch.is_none());
        assert_eq!(catalog.asked.lock().unwrap().len(), 1);
        assert_eq!(
            admitted.claims_fetched,
            Some(ClaimFetch {
                found: 0,
                absent: 1,
                failed: 0
            })
        );
    }

    #[tokio::test]
    async fn pvcs_never_ask_the_source() {
        let catalog = LateCatalog::new(Some("fedora-40"));
        let admission = Admission::new(catalog.clone(), MutationConfig::default());
        let admitted = admission
            .review_fetching(Resource::Pvc, PVC.as_bytes())
            .await
            .unwrap();
        assert!(catalog.asked.lock().unwrap().is_empty());
        assert_eq!(admitted.claims_fetched, None);
    }

    /// The review with `object` in place of the fixture's object.
    fn with_object(fixture: &str, object: serde_json::Value) -> Vec<u8> {
        let mut review: serde_json::Value = serde_json::from_str(fixture).unwrap();
        review["request"]["object"] = object;
        serde_json::to_vec(&review).unwrap()
    }

    #[test]
    fn an_object_that_does_not_fit_is_answered_unchanged_with_its_uid_and_a_warning() {
        let admission = Admission::new(LateCatalog::new(None), MutationConfig::default());
        let uid = serde_json::from_str::<serde_json::Value>(PVC).unwrap()["request"]["uid"]
            .as_str()
            .unwrap()
            .to_string();
        for (fixture, resource, object) in [
            (
                PVC,
                Resource::Pvc,
                serde_json::json!({"spec": "not an object"}),
            ),
            (PVC, Resource::Pvc, serde_json::json!([1])),
            (
                POD,
                Resource::Pod,
                serde_json::json!({"spec": {"volumes": 5}}),
            ),
        ] {
            let admitted = admission
                .review(resource, &with_object(fixture, object.clone()))
                .unwrap();
            assert_eq!(admitted.outcome, Outcome::Skipped, "{object}");
            assert!(admitted.answer.patch.is_none());
            let [warning] = &admitted.answer.warnings[..] else {
                panic!("{object}: {:?}", admitted.answer.warnings)
            };
            assert!(
                warning.contains(&format!("not a valid {}", policy::kind_name(resource))),
                "{warning}"
            );
            if resource == Resource::Pvc {
                assert_eq!(admitted.answer.uid, uid);
            }
        }
        // Another endpoint's resource: unchanged, no warning.
        let admitted = admission.review(Resource::Pod, PVC.as_bytes()).unwrap();
        assert_eq!(
            (admitted.outcome, admitted.answer),
            (Outcome::Skipped, AdmissionAnswer::allow(&uid))
        );
    }

    #[test]
    fn a_dry_run_gets_the_answer_of_the_real_request() {
        let admission = Admission::new(LateCatalog::new(None), MutationConfig::default());
        let mut review: serde_json::Value = serde_json::from_str(PVC).unwrap();
        review["request"]["dryRun"] = false.into();
        let real = admission
            .review(Resource::Pvc, &serde_json::to_vec(&review).unwrap())
            .unwrap();
        review["request"]["dryRun"] = true.into();
        let dry = admission
            .review(Resource::Pvc, &serde_json::to_vec(&review).unwrap())
            .unwrap();
        assert_eq!(real.outcome, Outcome::Patched);
        assert_eq!(dry, real);
    }
}
