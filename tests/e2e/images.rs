//! Phase `images`: the three container images built by `deploy/images/build.sh` (buildah with vfs
//! storage and chroot isolation, FROM scratch, a debootstrap root filesystem for the agent),
//! pushed to a real local registry, pulled back and run. Needs root, buildah and debootstrap;
//! skipped with the reason otherwise.

use std::sync::Arc;

use vmdisk_tests::images::{build_and_push, cannot_build, run_in_image, size_of, BuiltImages};
use vmdisk_tests::registry::TestRegistry;

use crate::{cases, Case, Phase};

pub fn phase() -> Phase<ImagesFixture> {
    Phase {
        name: "images",
        cases: cases![images_are_pushed_and_run_their_binaries],
        exclusive: vec![],
        benchmark: false,
    }
}

pub struct ImagesFixture {
    pub registry: TestRegistry,
    pub images: BuiltImages,
}

impl ImagesFixture {
    pub async fn setup() -> Result<Self, String> {
        if let Some(reason) = cannot_build() {
            return Err(reason);
        }
        let (root, bin_dir) = crate::support::workspace();
        let registry = TestRegistry::start_plain();
        let images = tokio::task::spawn_blocking({
            let addr = registry.addr.clone();
            move || build_and_push(&root, &bin_dir, &addr, crate::support::image_tag())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("building the images: {e}"));
        Ok(Self { registry, images })
    }
}

async fn images_are_pushed_and_run_their_binaries(fx: Arc<ImagesFixture>, _case: Case) {
    let images = fx.images.clone();
    tokio::task::spawn_blocking(move || {
        for (image, binary) in images.with_binaries() {
            let help = run_in_image(image, &[binary, "--help"]).unwrap();
            assert!(
                help.contains(&format!("Usage: {binary}")),
                "{image}: {help}"
            );
            println!("{image}: {}", size_of(image).unwrap());
        }
        // The webhook and controller images run their binaries as a non-root user; the agent
        // image carries qemu-img.
        let id = run_in_image(&images.webhook, &["vmdisk-webhook", "--version"]).unwrap();
        assert!(id.contains("vmdisk-webhook"), "{id}");
        let id = run_in_image(&images.controller, &["vmdisk-controller", "--version"]).unwrap();
        assert!(id.contains("vmdisk-controller"), "{id}");
        let qemu = run_in_image(&images.cache_agent, &["qemu-img", "--version"]).unwrap();
        assert!(qemu.contains("qemu-img version"), "{qemu}");
        let user = run_in_image(&images.cache_agent, &["id", "-u"]).unwrap();
        assert_eq!(user.trim(), "0");
    })
    .await
    .unwrap();
    for name in ["webhook", "controller", "cache-agent"] {
        assert!(
            fx.registry.log().contains(&format!(
                "/v2/vmdisk/{name}/manifests/{}",
                crate::support::image_tag()
            )),
            "the {name} image was pulled from the registry"
        );
    }
}
