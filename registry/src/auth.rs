//! Registry credentials from a docker `config.json` or a `kubernetes.io/dockerconfigjson`
//! Secret (oci-client has no parser for either).

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use k8s_openapi::ByteString;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config is not valid JSON: {0}")]
    Json(String),
    #[error("credentials for {registry}: `auth` is not base64: {message}")]
    BadBase64 { registry: String, message: String },
    #[error("credentials for {registry}: `auth` must decode to user:password")]
    NoColon { registry: String },
    #[error("the pull secret has no `.dockerconfigjson` key (is it of type kubernetes.io/dockerconfigjson?)")]
    NotDockerConfigJson,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Credentials by registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    auths: BTreeMap<String, Credential>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    Basic(String, String),
    Bearer(String),
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; docker.io aliases folded together.
fn normalise_host(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

impl DockerConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self, AuthError> {
        let parsed: ConfigJson =
            serde_json::from_slice(bytes).map_err(|e| AuthError::Json(e.to_string()))?;
        let mut auths = BTreeMap::new();
        for (key, entry) in parsed.auths {
            let registry = normalise_host(&key);
            let credential = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Some(Credential::Bearer(token))
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| AuthError::BadBase64 {
                        registry: registry.clone(),
                        message: e.to_string(),
                    })?;
                let text = String::from_utf8_lossy(&decoded).into_owned();
                let (user, password) = text.split_once(':').ok_or_else(|| AuthError::NoColon {
                    registry: registry.clone(),
                })?;
                Some(Credential::Basic(user.to_string(), password.to_string()))
            } else {
                match (entry.username, entry.password) {
                    (Some(u), Some(p)) => Some(Credential::Basic(u, p)),
                    _ => None,
                }
            };
            if let Some(c) = credential {
                auths.insert(registry, c);
            }
        }
        Ok(Self { auths })
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// From the data of a `kubernetes.io/dockerconfigjson` Secret.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, AuthError> {
        let bytes = data
            .get(".dockerconfigjson")
            .ok_or(AuthError::NotDockerConfigJson)?;
        Self::from_json(&bytes.0)
    }
}

impl DockerConfig {
    /// Only the credentials for `registry` (host[:port]): what a node needs to pull one image,
    /// and nothing it could use elsewhere.
    pub fn restricted_to(&self, registry: &str) -> Self {
        let host = normalise_host(registry);
        Self {
            auths: self
                .auths
                .get(&host)
                .map(|c| BTreeMap::from([(host, c.clone())]))
                .unwrap_or_default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.auths.is_empty()
    }

    /// As a `.dockerconfigjson` document.
    pub fn to_json(&self) -> Vec<u8> {
        let auths: serde_json::Map<String, serde_json::Value> = self
            .auths
            .iter()
            .map(|(host, credential)| {
                let entry = match credential {
                    Credential::Basic(user, password) => serde_json::json!({
                        "auth": base64::engine::general_purpose::STANDARD
                            .encode(format!("{user}:{password}"))
                    }),
                    Credential::Bearer(token) => serde_json::json!({"identitytoken": token}),
                };
                (host.clone(), entry)
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "auths": auths }))
            .expect("a docker config serializes")
    }
}

/// The credentials for `registry` (host[:port]), anonymous when there are none.
pub fn registry_auth_for(config: &DockerConfig, registry: &str) -> RegistryAuth {
    match config.auths.get(&normalise_host(registry)) {
        Some(Credential::Basic(u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        Some(Credential::Bearer(t)) => RegistryAuth::Bearer(t.clone()),
        None => RegistryAuth::Anonymous,
    }
}

/// Who a requester is, as far as a registry can tell: `anonymous`, or a SHA-256 of the
/// credentials it presents. Records of verified pulls are kept under this name, so the same
/// credentials are recognised again without being stored.
pub fn credential_identity(auth: &RegistryAuth) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    match auth {
        RegistryAuth::Anonymous => return "anonymous".to_string(),
        RegistryAuth::Basic(user, password) => {
            hash.update(b"basic\0");
            hash.update(user.as_bytes());
            hash.update(b"\0");
            hash.update(password.as_bytes());
        }
        RegistryAuth::Bearer(token) => {
            hash.update(b"bearer\0");
            hash.update(token.as_bytes());
        }
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_identities_tell_requesters_apart_without_holding_secrets() {
        let a = credential_identity(&RegistryAuth::Basic("alice".into(), "pw".into()));
        assert_eq!(
            a,
            credential_identity(&RegistryAuth::Basic("alice".into(), "pw".into()))
        );
        assert!(!a.contains("alice") && !a.contains("pw"), "{a}");
        for other in [
            RegistryAuth::Anonymous,
            RegistryAuth::Basic("alice".into(), "pw2".into()),
            RegistryAuth::Basic("alic".into(), "epw".into()),
            RegistryAuth::Bearer("alice\0pw".into()),
        ] {
            assert_ne!(a, credential_identity(&other), "{other:?}");
        }
        assert_eq!(credential_identity(&RegistryAuth::Anonymous), "anonymous");
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parses_auth_username_password_and_tokens() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "quay.io": {{"username": "u", "password": "p"}},
                "registry.example.com:5000": {{"identitytoken": "tok"}},
                "empty.example.com": {{}}
            }}}}"#,
            b64("alice:s3cr:et")
        );
        let c = DockerConfig::from_json(json.as_bytes()).unwrap();
        assert!(
            matches!(registry_auth_for(&c, "docker.io"), RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cr:et")
        );
        assert!(matches!(
            registry_auth_for(&c, "registry-1.docker.io"),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(registry_auth_for(&c, "quay.io"), RegistryAuth::Basic(u, _) if u == "u"));
        assert!(
            matches!(registry_auth_for(&c, "registry.example.com:5000"), RegistryAuth::Bearer(t) if t == "tok")
        );
        assert!(matches!(
            registry_auth_for(&c, "empty.example.com"),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            registry_auth_for(&c, "other.io"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn bad_credentials_are_specific_errors() {
        assert!(matches!(
            DockerConfig::from_json(b"{"),
            Err(AuthError::Json(_))
        ));
        let bad = r#"{"auths": {"quay.io": {"auth": "%%%"}}}"#;
        assert!(matches!(
            DockerConfig::from_json(bad.as_bytes()),
            Err(AuthError::BadBase64 { .. })
        ));
        let no_colon = format!(
            r#"{{"auths": {{"quay.io": {{"auth": "{}"}}}}}}"#,
            b64("nocolon")
        );
        let err = DockerConfig::from_json(no_colon.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("quay.io"), "{err}");
    }

    #[test]
    fn restricted_config_keeps_one_host_and_round_trips() {
        let json = format!(
            r#"{{"auths": {{"a.io": {{"auth": "{}"}}, "b.io": {{"identitytoken": "t"}}}}}}"#,
            b64("u:p")
        );
        let c = DockerConfig::from_json(json.as_bytes()).unwrap();
        let only_a = c.restricted_to("a.io");
        let again = DockerConfig::from_json(&only_a.to_json()).unwrap();
        assert_eq!(again, only_a);
        assert!(
            matches!(registry_auth_for(&again, "a.io"), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(matches!(
            registry_auth_for(&again, "b.io"),
            RegistryAuth::Anonymous
        ));
        let only_b = DockerConfig::from_json(&c.restricted_to("b.io").to_json()).unwrap();
        assert!(matches!(registry_auth_for(&only_b, "b.io"), RegistryAuth::Bearer(t) if t == "t"));
        assert!(c.restricted_to("c.io").is_empty());
    }

    #[test]
    fn secret_data_needs_the_dockerconfigjson_key() {
        let mut data = BTreeMap::new();
        assert!(matches!(
            DockerConfig::from_secret_data(&data),
            Err(AuthError::NotDockerConfigJson)
        ));
        data.insert(
            ".dockerconfigjson".to_string(),
            ByteString(
                format!(r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#, b64("a:b")).into_bytes(),
            ),
        );
        let c = DockerConfig::from_secret_data(&data).unwrap();
        assert!(matches!(
            registry_auth_for(&c, "r.io"),
            RegistryAuth::Basic(..)
        ));
    }
}
