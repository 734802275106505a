//! Where a population's time went. The populator notes the moment it first sees each step of
//! a claim's way to Bound (its own writes, and what the watches bring: the pod scheduled,
//! started, succeeded, the claim bound), and when the claim is done it writes the timeline to
//! the claim (`vmdisk.io/timeline`, shown by `kubectl describe pvc`) and to a histogram per
//! step. It also counts what should not happen on a healthy path: failed steps, pod attempts
//! after the first, and calls by the safety net that found work (a change no watch delivered). Timelines live in memory: a claim taken over by a new leader mid-way shows
//! the steps from then on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use vmdisk_crds::POPULATED_ANNOTATION;

/// A step on the way from a claim to a Bound claim holding the disk, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// The populator's first look at the claim.
    Seen,
    PrimeCreated,
    /// The provisioner bound the prime to a volume (before the pod for classes that bind at
    /// once, after the pod is scheduled for WaitForFirstConsumer).
    Provisioned,
    PodCreated,
    /// The scheduler placed the pod.
    Scheduled,
    /// The pod's container runs (the copy is under way).
    Started,
    /// The copy is done (`populate` said so on the prime, or the pod succeeded).
    PodSucceeded,
    /// The filled PV was handed to the claim.
    Rebound,
    /// The PV controller bound the claim.
    Bound,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Seen => "seen",
            Stage::PrimeCreated => "prime",
            Stage::Provisioned => "provisioned",
            Stage::PodCreated => "pod",
            Stage::Scheduled => "scheduled",
            Stage::Started => "started",
            Stage::PodSucceeded => "copied",
            Stage::Rebound => "rebound",
            Stage::Bound => "bound",
        }
    }
}

/// The stages visible in the objects a reconcile reads.
pub fn visible_stages(
    pvc: &PersistentVolumeClaim,
    prime: Option<&PersistentVolumeClaim>,
    pod: Option<&Pod>,
) -> Vec<Stage> {
    let mut stages = vec![Stage::Seen];
    if let Some(prime) = prime {
        stages.push(Stage::PrimeCreated);
        if prime
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .is_some_and(|v| !v.is_empty())
        {
            stages.push(Stage::Provisioned);
        }
    }
    let populated = prime.is_some_and(|p| p.annotations().contains_key(POPULATED_ANNOTATION));
    if let Some(pod) = pod {
        stages.push(Stage::PodCreated);
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some()
        {
            stages.push(Stage::Scheduled);
        }
        match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            _ if populated => stages.extend([Stage::Started, Stage::PodSucceeded]),
            Some("Running") => stages.push(Stage::Started),
            Some("Succeeded") => stages.extend([Stage::Started, Stage::PodSucceeded]),
            _ => {}
        }
    }
    if pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        stages.push(Stage::Bound);
    }
    stages
}

/// One claim's timeline.
#[derive(Debug, Clone)]
pub struct Timeline {
    origin: Instant,
    marks: Vec<(Stage, Duration)>,
    /// When the safety net will call the claim's reconcile if no watched change does first.
    net_due: Option<Instant>,
    pub errors: u32,
    /// What the API server said the last time it refused a step.
    pub last_error: Option<String>,
    pub extra_attempts: u32,
    pub missed_changes: u32,
}

impl Timeline {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            marks: Vec::new(),
            net_due: None,
            errors: 0,
            last_error: None,
            extra_attempts: 0,
            missed_changes: 0,
        }
    }

    /// Notes the first time each stage is seen.
    pub fn mark(&mut self, stage: Stage, now: Instant) {
        if self.marks.iter().all(|(s, _)| *s != stage) {
            self.marks
                .push((stage, now.saturating_duration_since(self.origin)));
            // In the order they happened: stages seen in one look keep their own order.
            self.marks.sort_by_key(|&(stage, at)| (at, stage));
        }
    }

    /// A reconcile looked at the claim; the next safety-net call is due `safety_net` from now.
    /// Returns true when this call is the safety net's: the net's timer starts when the
    /// reconcile ends, so it fires at or after the due time, while a watched change that wakes
    /// the claim earlier comes before it. Such a call that finds work to do found a change no
    /// watch delivered: [`Self::missed_change`].
    pub fn look(&mut self, now: Instant, safety_net: Duration) -> bool {
        let by_the_net = self.net_due.is_some_and(|due| now >= due);
        self.net_due = Some(now + safety_net);
        by_the_net
    }

    /// The reconcile asked for its own delay: the safety net is not the next call.
    pub fn asked_requeue(&mut self) {
        self.net_due = None;
    }

    pub fn missed_change(&mut self) {
        self.missed_changes += 1;
    }

    /// Each stage and the time since the one before it.
    pub fn steps(&self) -> Vec<(Stage, Duration)> {
        let mut previous = Duration::ZERO;
        self.marks
            .iter()
            .map(|&(stage, at)| {
                let step = at.saturating_sub(previous);
                previous = at;
                (stage, step)
            })
            .collect()
    }

    /// `seen +0.00s, prime +0.01s, …, bound +1.84s; errors 0, extra attempts 0, missed changes
    /// 0`: offsets from the first look, then what the API server said the last time it refused
    /// a step, if it did.
    pub fn render(&self) -> String {
        let marks: Vec<String> = self
            .marks
            .iter()
            .map(|(stage, at)| format!("{} +{:.2}s", stage.as_str(), at.as_secs_f64()))
            .collect();
        let mut text = format!(
            "{}; errors {}, extra attempts {}, missed changes {}",
            marks.join(", "),
            self.errors,
            self.extra_attempts,
            self.missed_changes
        );
        if let Some(error) = &self.last_error {
            text.push_str("; last error: ");
            text.extend(error.chars().take(300));
        }
        text
    }
}

/// The timelines of the claims in flight, shared by the reconciles.
#[derive(Default)]
pub struct Timelines(Mutex<HashMap<ObjectRef<PersistentVolumeClaim>, Timeline>>);

impl Timelines {
    /// Runs `f` on the claim's timeline, started now if it has none.
    pub fn with<T>(
        &self,
        claim: &ObjectRef<PersistentVolumeClaim>,
        now: Instant,
        f: impl FnOnce(&mut Timeline) -> T,
    ) -> T {
        let mut map = self.0.lock().expect("timelines lock");
        f(map
            .entry(claim.clone())
            .or_insert_with(|| Timeline::new(now)))
    }

    /// Ends the claim's timeline and returns it.
    pub fn finish(&self, claim: &ObjectRef<PersistentVolumeClaim>) -> Option<Timeline> {
        self.0.lock().expect("timelines lock").remove(claim)
    }

    /// Keeps the timelines of claims `keep` says still exist.
    pub fn retain(&self, keep: impl Fn(&ObjectRef<PersistentVolumeClaim>) -> bool) {
        self.0
            .lock()
            .expect("timelines lock")
            .retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("timelines lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(node: Option<&str>, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "resourceVersion": "7"},
            "spec": {"containers": [], "nodeName": node}, "status": {"phase": phase}}))
        .unwrap()
    }

    fn claim(volume: Option<&str>) -> PersistentVolumeClaim {
        serde_json::from_value(json!({"metadata": {"name": "c", "resourceVersion": "3"},
            "spec": {"volumeName": volume}}))
        .unwrap()
    }

    #[test]
    fn stages_follow_the_objects() {
        let c = claim(None);
        assert_eq!(visible_stages(&c, None, None), [Stage::Seen]);
        let p = pod(None, "Pending");
        assert_eq!(
            visible_stages(&c, Some(&c), Some(&p)),
            [Stage::Seen, Stage::PrimeCreated, Stage::PodCreated]
        );
        let p = pod(Some("n"), "Succeeded");
        assert_eq!(
            visible_stages(&claim(Some("pv")), Some(&c), Some(&p)),
            [
                Stage::Seen,
                Stage::PrimeCreated,
                Stage::PodCreated,
                Stage::Scheduled,
                Stage::Started,
                Stage::PodSucceeded,
                Stage::Bound
            ]
        );
        let bound_prime = claim(Some("pv-prime"));
        assert_eq!(
            visible_stages(&c, Some(&bound_prime), None),
            [Stage::Seen, Stage::PrimeCreated, Stage::Provisioned]
        );
    }

    /// WaitForFirstConsumer provisions after the pod is placed: the timeline says so.
    #[test]
    fn marks_are_in_the_order_they_happened() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        t.mark(Stage::Seen, t0);
        t.mark(Stage::Scheduled, t0 + Duration::from_millis(300));
        t.mark(Stage::Provisioned, t0 + Duration::from_millis(700));
        t.mark(Stage::Started, t0 + Duration::from_millis(700));
        assert_eq!(
            t.render(),
            "seen +0.00s, scheduled +0.30s, provisioned +0.70s, started +0.70s; errors 0, extra attempts 0, missed changes 0"
        );
    }

    #[test]
    fn marks_keep_the_first_sighting_and_steps_are_the_gaps() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        t.mark(Stage::Seen, t0);
        t.mark(Stage::PrimeCreated, t0 + Duration::from_millis(100));
        t.mark(Stage::PrimeCreated, t0 + Duration::from_millis(900));
        t.mark(Stage::PodCreated, t0 + Duration::from_millis(250));
        assert_eq!(
            t.steps(),
            [
                (Stage::Seen, Duration::ZERO),
                (Stage::PrimeCreated, Duration::from_millis(100)),
                (Stage::PodCreated, Duration::from_millis(150)),
            ]
        );
        assert_eq!(
            t.render(),
            "seen +0.00s, prime +0.10s, pod +0.25s; errors 0, extra attempts 0, missed changes 0"
        );
        t.errors += 1;
        t.last_error = Some("adding the finalizer: 409 Conflict".into());
        assert!(t.render().ends_with(
            "errors 1, extra attempts 0, missed changes 0; last error: adding the finalizer: 409 Conflict"
        ));
    }

    #[test]
    fn only_a_call_when_the_net_is_due_is_the_safety_nets() {
        let net = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        assert!(!t.look(t0, net), "the first look");
        assert!(
            !t.look(t0 + Duration::from_secs(5), net),
            "a watched change"
        );
        assert!(
            t.look(t0 + Duration::from_secs(65), net),
            "60 s later: the net"
        );
        t.asked_requeue();
        assert!(
            !t.look(t0 + Duration::from_secs(190), net),
            "a delay the populator asked for"
        );
        assert!(!t.look(t0 + Duration::from_secs(200), net), "too early");
    }
}
