//! Prints the CRDs as YAML: `cargo run -p vmdisk-crds --bin vmdisk-crdgen > deploy/crds.yaml`.
fn main() {
    print!("{}", vmdisk_crds::crds_yaml());
}
