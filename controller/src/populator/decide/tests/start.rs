//! A populator pod that never starts (an image that cannot be pulled, a configuration error)
//! ends as a failed attempt at its start deadline: retried, then given up, never waited on for
//! ever. Other waits (the volume mounting, the container being made) are not cut short.

use super::*;

fn waiting_pod(reason: &str, age: chrono::Duration, attempt: u32) -> Pod {
    let created = crate::time::to_timestamp(now() - age);
    serde_json::from_value(json!({
        "metadata": {"name": "populate-u-1", "namespace": "vmdisk-system",
                     "creationTimestamp": created,
                     "annotations": {vmdisk_crds::ATTEMPT_ANNOTATION: attempt.to_string()}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "populate", "ready": false,
            "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": reason, "message": "Back-off pulling image \"x\""}}}]},
    }))
    .unwrap()
}

/// The claim after the status writes `decide` asks for (at most three).
fn populating(w: &World) -> World {
    let mut w = w.clone();
    for _ in 0..3 {
        let Step::Annotate { status, .. } = w.step() else {
            break;
        };
        w.pvc = with_status(
            w.pvc.clone(),
            status.phase,
            &status.message,
            status.progress.as_deref(),
        );
        if status.progress.is_none() {
            if let Some(a) = w.pvc.metadata.annotations.as_mut() {
                a.remove(PROGRESS_ANNOTATION);
            }
        }
    }
    w
}

#[test]
fn a_pod_that_cannot_pull_its_image_fails_at_its_start_deadline() {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    w.pod = Some(waiting_pod(
        "ImagePullBackOff",
        chrono::Duration::seconds(60),
        1,
    ));
    let w = populating(&w);
    assert!(
        current_status(&w.pvc)
            .unwrap()
            .message
            .contains("ImagePullBackOff"),
        "the claim says why it waits"
    );
    assert_eq!(
        w.step(),
        Step::Wait {
            requeue: Some(Duration::from_secs(240))
        },
        "looked at again at the deadline"
    );

    let mut late = w.clone();
    late.pod = Some(waiting_pod(
        "ErrImagePull",
        chrono::Duration::seconds(301),
        1,
    ));
    let Step::RecordFailure { attempt: 1, note } = late.step() else {
        panic!("{:?}", late.step())
    };
    assert!(
        note.message
            .contains("did not start within 300 s: an image could not be pulled (ErrImagePull)"),
        "{}",
        note.message
    );
    // Counted: the retry waits its backoff from the deadline, then the pod goes.
    late.prime = Some(provisioned(prime(false, 1, "Pending")));
    let late = populating(&late);
    assert_eq!(
        current_status(&late.pvc).unwrap().phase,
        PopulatePhase::Retrying
    );
    assert_eq!(
        late.step(),
        Step::Wait {
            requeue: Some(Duration::from_secs(9))
        }
    );
    let mut later = late.clone();
    later.pod = Some(waiting_pod(
        "ImagePullBackOff",
        chrono::Duration::seconds(311),
        1,
    ));
    assert_eq!(later.step(), Step::DeletePod { retry: true });

    // The last attempt gives up, saying why.
    let mut last = w.clone();
    last.pod = Some(waiting_pod(
        "ImagePullBackOff",
        chrono::Duration::seconds(400),
        4,
    ));
    let Step::Annotate {
        status,
        outcome: Some(Outcome::Failed),
        ..
    } = last.step()
    else {
        panic!("{:?}", last.step())
    };
    assert!(
        status.message.contains("did not start within 300 s"),
        "{status:?}"
    );
}

#[test]
fn other_waits_are_not_cut_short() {
    let mut w = World::new(with_finalizer(claim(json!({}))));
    w.prime = Some(provisioned(prime(false, 0, "Pending")));
    w.pod = Some(waiting_pod(
        "ContainerCreating",
        chrono::Duration::hours(1),
        1,
    ));
    let w = populating(&w);
    assert_eq!(w.step(), Step::Wait { requeue: None });
}
