//! End-to-end tests against a real cluster. They run only when `VMDISK_E2E_KUBECONFIG` points
//! at a kubeconfig of a disposable cluster (they create CRDs, namespaces and objects), and
//! print why they skip otherwise.

mod cache;
mod support;
mod webhook;
