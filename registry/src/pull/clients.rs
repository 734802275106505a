//! One registry client per way of talking to a registry, reused across requests: building an
//! oci-client `Client` builds a TLS client (root store, connection pool), which per resolve of
//! thousands of images costs CPU and connections for nothing.
//!
//! A client remembers the first credentials it was used with for a registry and caches tokens,
//! so clients are shared only between requests that agree on the registry, TLS settings
//! (`insecure`, CA bundle), platform and credentials; the key is a hash of all of them, so no
//! secret is kept in it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest, Sha256};

use crate::options::RegistryOptions;

/// Clients kept at most; beyond, one is dropped (and rebuilt when next needed).
pub const MAX_CLIENTS: usize = 256;

/// What decides whether two requests may share a client.
pub fn client_key(registry: &str, options: &RegistryOptions) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(registry.as_bytes());
    field(&[u8::from(options.insecure)]);
    field(options.ca_bundle_pem.as_deref().unwrap_or_default());
    field(options.platform.os.as_bytes());
    field(options.platform.architecture.as_bytes());
    match &options.auth {
        RegistryAuth::Anonymous => field(b"anonymous"),
        RegistryAuth::Basic(user, password) => {
            field(b"basic");
            field(user.as_bytes());
            field(password.as_bytes());
        }
        RegistryAuth::Bearer(token) => {
            field(b"bearer");
            field(token.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The clients built so far, by [`client_key`].
#[derive(Default)]
pub struct Clients {
    by_key: Mutex<HashMap<String, Client>>,
    built: AtomicU64,
}

impl Clients {
    /// The client for `key`, built with `build` the first time.
    pub fn get_or_build<E>(
        &self,
        key: String,
        build: impl FnOnce() -> Result<Client, E>,
    ) -> Result<Client, E> {
        if let Some(c) = self.lock().get(&key) {
            return Ok(c.clone());
        }
        let client = build()?;
        self.built.fetch_add(1, Ordering::Relaxed);
        let mut clients = self.lock();
        if clients.len() >= MAX_CLIENTS {
            if let Some(old) = clients.keys().next().cloned() {
                clients.remove(&old);
            }
        }
        Ok(clients.entry(key).or_insert(client).clone())
    }

    /// Clients built (not reused), for tests of sharing.
    pub fn built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Client>> {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_share_a_client_only_when_they_agree_on_everything() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let anonymous = RegistryOptions::default();
        let basic = |password: &str| RegistryOptions {
            auth: RegistryAuth::Basic("u".into(), password.into()),
            ..RegistryOptions::default()
        };
        let key = client_key("r.io", &anonymous);
        assert_eq!(key, client_key("r.io", &RegistryOptions::default()));
        assert_ne!(key, client_key("other.io", &anonymous));
        assert_ne!(key, client_key("r.io", &basic("p")));
        assert_ne!(
            client_key("r.io", &basic("p")),
            client_key("r.io", &basic("q"))
        );
        let insecure = RegistryOptions {
            insecure: true,
            ..RegistryOptions::default()
        };
        assert_ne!(key, client_key("r.io", &insecure));
        let with_ca = RegistryOptions {
            ca_bundle_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            ..RegistryOptions::default()
        };
        assert_ne!(key, client_key("r.io", &with_ca));
        assert!(
            key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()),
            "a hash, no secret: {key}"
        );

        let clients = Clients::default();
        for _ in 0..3 {
            clients
                .get_or_build(key.clone(), || Ok::<_, ()>(Client::default()))
                .unwrap();
        }
        clients
            .get_or_build(client_key("r.io", &basic("p")), || {
                Ok::<_, ()>(Client::default())
            })
            .unwrap();
        assert_eq!(clients.built(), 2);
        assert!(clients
            .get_or_build("x".into(), || Err::<Client, _>("refused"))
            .is_err());
        assert_eq!(clients.built(), 2);
    }
}
