//! Prints the CRDs as YAML: `cargo run -p vmdisk-crds --bin vmdisk-crdgen > deploy/crds.yaml`.

use clap::Parser;

/// Prints vmdisk's CustomResourceDefinitions (VMDiskImage, NodeDiskCache) as one YAML stream,
/// what `deploy/crds.yaml` holds.
#[derive(Parser)]
#[command(name = "vmdisk-crdgen", version)]
struct Args {}

fn main() {
    Args::parse();
    print!("{}", vmdisk_crds::crds_yaml());
}
