//! vmdisk registry access, shared by the image controller (tag → digest) and the cache agents
//! (pulls): [`pull`] resolves references and streams verified blobs with resume, [`auth`]
//! reads docker `config.json` and `dockerconfigjson` credentials, [`options`] builds the
//! per-registry options of an image in one place.

pub mod auth;
pub mod options;
pub mod pull;

pub use auth::{credential_identity, registry_auth_for, AuthError, DockerConfig};
pub use options::RegistryOptions;
pub use pull::{PlatformSpec, PullError, Puller, PullerConfig, RetryPolicy};
