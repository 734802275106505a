//! `vmdisk-cache-agent` command lines (`warm`, `ls`, `populate`) against a real registry,
//! including a docker config.json with credentials and deliberately wrong input.

use std::path::Path;

use clap::Parser;
use vmdisk_cache_agent::cli::{run, Cli};
use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_tests::disks::{allocated, make_ext4_raw, same_content};
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;

fn cli(args: &[&str]) -> Cli {
    let mut argv = vec!["vmdisk-cache-agent"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap()
}

fn docker_config(dir: &Path, prefix: &str, registry: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join(format!("{prefix}config.json"));
    std::fs::write(
        &path,
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn warm_ls_and_populate_through_the_command_line() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = TestRegistry::start_tls_htpasswd("ci", "s3cret");
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "cli", 32, 4, 77);
    let (reference, digest) = push_container_disk(&registry, "disks/cli", "1", &raw).await;
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, registry.ca_pem().unwrap()).unwrap();
    let cache = work.path().join("cache");
    let cache_s = cache.display().to_string();
    let good = docker_config(work.path(), "good-", &registry.addr, "ci", "s3cret");
    let ca_s = ca.display().to_string();

    run(cli(&[
        "warm",
        &reference,
        "--cache-dir",
        &cache_s,
        "--format",
        "raw",
        "--ca-bundle",
        &ca_s,
        "--docker-config",
        &good,
    ]))
    .await
    .unwrap();
    let (store, _) = CacheStore::open(&cache, Budget::Bytes(1 << 40)).unwrap();
    let entries = store.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key.digest, digest);
    drop(store);
    run(cli(&["ls", "--cache-dir", &cache_s])).await.unwrap();
    run(cli(&["ls", "--cache-dir", &cache_s, "--json"]))
        .await
        .unwrap();

    // Populate from the warm cache into a file, grown to the PVC size.
    let target = work.path().join("pvc.img");
    let pinned = format!("{}@{digest}", reference.rsplit_once(':').unwrap().0);
    run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        &target.display().to_string(),
        "--size",
        "64Mi",
        "--ca-bundle",
        &ca_s,
        "--docker-config",
        &good,
    ]))
    .await
    .unwrap();
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 64 << 20);
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&target).unwrap()[..32 << 20]).unwrap();
    assert!(same_content(&raw, &head));
    assert!(
        allocated(&target) < 24 << 20,
        "populated volume is not sparse"
    );

    // A warm entry is served only to requesters the registry lets pull it. Without
    // credentials, under another repository, from a registry that lacks the image: refused,
    // naming why, and the target untouched. (The entry stays.)
    let empty = work.path().join("empty-config.json");
    std::fs::write(&empty, "{}").unwrap();
    let empty_s = empty.display().to_string();
    let other_registry = TestRegistry::start_plain();
    let elsewhere = format!("{}/someone-else/nothing@{digest}", registry.addr);
    let lacking = format!("{}/disks/cli@{digest}", other_registry.addr);
    for (what, image, config, insecure) in [
        ("no credentials", pinned.as_str(), &empty_s, false),
        ("another repository", elsewhere.as_str(), &good, false),
        (
            "a registry without the image",
            lacking.as_str(),
            &empty_s,
            true,
        ),
    ] {
        let target = work.path().join("refused.img");
        std::fs::write(&target, b"untouched").unwrap();
        let mut argv = vec![
            "populate",
            image,
            "--cache-dir",
            &cache_s,
            "--target",
            target.to_str().unwrap(),
            "--docker-config",
            config,
        ];
        if insecure {
            argv.push("--insecure");
        } else {
            argv.extend(["--ca-bundle", &ca_s]);
        }
        let err = run(cli(&argv)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("did not confirm that these credentials may pull it"),
            "{what}: {err:#}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched", "{what}");
        let mut argv = vec![
            "warm",
            image,
            "--cache-dir",
            &cache_s,
            "--docker-config",
            config,
        ];
        if insecure {
            argv.push("--insecure");
        } else {
            argv.extend(["--ca-bundle", &ca_s]);
        }
        let err = run(cli(&argv)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("did not confirm"),
            "warm, {what}: {err:#}"
        );
    }

    // A requester verified before needs no registry within the records' TTL: the registry
    // down, the same credentials still fill a volume; with a TTL of 0 they are refused.
    let mut registry = registry;
    registry.stop();
    let target3 = work.path().join("pvc3.img");
    run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        &target3.display().to_string(),
        "--docker-config",
        &good,
        "--ca-bundle",
        &ca_s,
    ]))
    .await
    .unwrap();
    assert!(same_content(&raw, &target3));
    let err = run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        &work.path().join("pvc3b.img").display().to_string(),
        "--docker-config",
        &good,
        "--ca-bundle",
        &ca_s,
        "--verified-pull-ttl-seconds",
        "0",
    ]))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("did not confirm"), "{err:#}");
    // NeverVerify: anyone naming the digest gets the disk, no credentials read at all.
    let unreadable = work
        .path()
        .join("missing/config.json")
        .display()
        .to_string();
    let target5 = work.path().join("pvc5.img");
    run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        &target5.display().to_string(),
        "--docker-config",
        &unreadable,
        "--pull-verification",
        "NeverVerify",
    ]))
    .await
    .unwrap();
    assert!(same_content(&raw, &target5));
    // With verification, credentials that cannot be read are an error of their own.
    let err = run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        &work.path().join("pvc4.img").display().to_string(),
        "--docker-config",
        &unreadable,
    ]))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("docker config"), "{err:#}");
    registry.restart();

    // Populate with a cold cache pulls first.
    let cold = work.path().join("cold-cache");
    let target2 = work.path().join("pvc2.img");
    run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cold.display().to_string(),
        "--target",
        &target2.display().to_string(),
        "--ca-bundle",
        &ca_s,
        "--docker-config",
        &good,
    ]))
    .await
    .unwrap();
    assert!(same_content(&raw, &target2));

    // Wrong input: wrong password, bad reference, bad budget, bad size. Clear errors, nothing cached.
    let bad = docker_config(work.path(), "bad-", &registry.addr, "ci", "nope");
    let bad_dir = work.path().join("bad-cache");
    let err = run(cli(&[
        "warm",
        &reference,
        "--cache-dir",
        &bad_dir.display().to_string(),
        "--ca-bundle",
        &ca_s,
        "--docker-config",
        &bad,
    ]))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("credentials"), "{err:#}");
    let (store, _) = CacheStore::open(&bad_dir, Budget::Bytes(1 << 40)).unwrap();
    assert!(store.entries().is_empty());
    let err = run(cli(&["warm", "fedora", "--cache-dir", &cache_s]))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("registry host"), "{err:#}");
    let err = run(cli(&["ls", "--cache-dir", &cache_s, "--budget", "500%"]))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("budget"), "{err:#}");
    let err = run(cli(&[
        "populate",
        &pinned,
        "--cache-dir",
        &cache_s,
        "--target",
        "/nonexistent/dir/x",
        "--size",
        "lots",
    ]))
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("--size"), "{err:#}");
    assert!(Cli::try_parse_from(["vmdisk-cache-agent", "warm", "x", "--format", "vhd"]).is_err());
}
