//! The web configuration file of Prometheus exporters (the exporter toolkit's format): TLS,
//! client certificates and basic auth for every endpoint.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt            # or `cert:` with the PEM inline
//!   key_file: server.key             # or `key:`
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: ca.crt
//!   min_version: TLS12
//! basic_auth_users:
//!   prometheus: $2y$10$...           # bcrypt
//! ```
//!
//! Relative paths are relative to the file's directory. Anything leak cannot honour is an
//! error at start-up, never silently ignored.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use serde::Deserialize;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("web config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("web config {path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("web config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    http_server_config: Option<HttpFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_ca: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    /// HTTP/2 is not served (HTTP/1.1 only): `true` is an error, `false` is accepted.
    http2: Option<bool>,
    /// Headers added to every response.
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// What the file asks for, ready to serve with; the default serves plain HTTP to anyone.
#[derive(Default)]
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<BasicAuth>>,
    pub headers: Vec<(String, String)>,
}

impl WebConfig {
    /// Reads and checks `path`: certificates, keys and CA load, every bcrypt hash parses.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: File = serde_yaml::from_str::<Option<File>>(&text)
            .map_err(|source| WebConfigError::Yaml {
                path: path.to_owned(),
                source,
            })?
            .unwrap_or_default();
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|tls| tls_config(&tls, dir).map(Arc::new))
            .transpose()
            .map_err(invalid)?;
        let auth = match file.basic_auth_users.is_empty() {
            true => None,
            false => Some(Arc::new(
                BasicAuth::new(file.basic_auth_users).map_err(invalid)?,
            )),
        };
        let http = file.http_server_config.unwrap_or_default();
        if http.http2 == Some(true) {
            return Err(invalid(
                "http_server_config.http2: leak serves HTTP/1.1 only".into(),
            ));
        }
        let headers = http.headers.into_iter().collect::<Vec<_>>();
        for (name, value) in &headers {
            http::HeaderName::try_from(name.as_str())
                .map_err(|_| invalid(format!("http_server_config.headers: bad name {name:?}")))?;
            http::HeaderValue::try_from(value.as_str()).map_err(|_| {
                invalid(format!("http_server_config.headers: bad value for {name}"))
            })?;
        }
        Ok(Self { tls, auth, headers })
    }
}

/// The PEM text of `inline`, else of `file` (relative to `dir`).
fn pem(
    inline: &Option<String>,
    file: &Option<PathBuf>,
    dir: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("both {what} and {what}_file are set")),
        (Some(text), None) => Ok(Some(text.as_bytes().to_vec())),
        (None, Some(file)) => {
            let path = dir.join(file);
            std::fs::read(&path)
                .map(Some)
                .map_err(|err| format!("{what}_file {}: {err}", path.display()))
        }
        (None, None) => Ok(None),
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{what}: {err}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    Ok(certs)
}

fn tls_version(name: &str) -> Result<&'static rustls::SupportedProtocolVersion, String> {
    match name {
        "TLS12" => Ok(&rustls::version::TLS12),
        "TLS13" => Ok(&rustls::version::TLS13),
        "TLS10" | "TLS11" => Err(format!("{name}: leak serves TLS 1.2 and 1.3 only")),
        other => Err(format!("unknown TLS version {other:?} (TLS12 or TLS13)")),
    }
}

fn tls_config(tls: &TlsFile, dir: &Path) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = pem(&tls.cert, &tls.cert_file, dir, "cert")?
        .ok_or("tls_server_config needs cert_file (or cert)")?;
    let key = pem(&tls.key, &tls.key_file, dir, "key")?
        .ok_or("tls_server_config needs key_file (or key)")?;
    let certs = certificates(&cert, "cert")?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|err| format!("key: {err}"))?;

    let all = [&rustls::version::TLS12, &rustls::version::TLS13];
    let min = tls.min_version.as_deref().map(tls_version).transpose()?;
    let max = tls.max_version.as_deref().map(tls_version).transpose()?;
    let rank =
        |v: &rustls::SupportedProtocolVersion| all.iter().position(|a| a.version == v.version);
    let versions: Vec<_> = all
        .into_iter()
        .filter(|v| min.is_none_or(|min| rank(v) >= rank(min)))
        .filter(|v| max.is_none_or(|max| rank(v) <= rank(max)))
        .collect();
    if versions.is_empty() {
        return Err("min_version is above max_version".into());
    }

    let ca = pem(&tls.client_ca, &tls.client_ca_file, dir, "client_ca")?;
    let mode = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let roots = |ca: &Option<Vec<u8>>| -> Result<Arc<RootCertStore>, String> {
        let ca = ca
            .as_ref()
            .ok_or_else(|| format!("client_auth_type {mode} needs client_ca_file"))?;
        let mut store = RootCertStore::empty();
        for cert in certificates(ca, "client_ca")? {
            store.add(cert).map_err(|err| format!("client_ca: {err}"))?;
        }
        Ok(Arc::new(store))
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|err| err.to_string())?;
    let builder = match mode {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider.clone());
            let verifier = match mode {
                "VerifyClientCertIfGiven" => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|err| err.to_string())?)
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(format!(
                "client_auth_type {mode}: leak only accepts client certificates it can verify \
                 (RequireAndVerifyClientCert or VerifyClientCertIfGiven, with client_ca_file)"
            ))
        }
        other => return Err(format!("unknown client_auth_type {other:?}")),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|err| format!("cert and key: {err}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Users and their bcrypt hashes; a verified `Authorization` value is remembered (a few of
/// them), so a scrape every few seconds does not pay bcrypt's deliberate cost each time.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
    /// At most two bcrypt verifications run at once: wrong passwords cannot take every core.
    verifying: tokio::sync::Semaphore,
}

/// Verified `Authorization` values kept.
const VERIFIED_CAPACITY: usize = 64;

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<Self, String> {
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(format!("basic_auth_users: {user:?} contains ':'"));
            }
            hash.parse::<bcrypt::HashParts>()
                .map_err(|err| format!("basic_auth_users.{user}: not a bcrypt hash ({err})"))?;
        }
        Ok(Self {
            users,
            verified: Mutex::new(HashSet::new()),
            verifying: tokio::sync::Semaphore::new(2),
        })
    }

    /// Whether `authorization` (the header's value) names a user with the right password.
    pub async fn allows(self: &Arc<Self>, authorization: Option<&str>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        if self
            .verified
            .lock()
            .is_ok_and(|verified| verified.contains(value))
        {
            return true;
        }
        let Some((user, password)) = decode_basic(value) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let Ok(_permit) = self.verifying.acquire().await else {
            return false;
        };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .is_ok_and(|result| result.unwrap_or(false));
        if ok {
            if let Ok(mut verified) = self.verified.lock() {
                if verified.len() >= VERIFIED_CAPACITY {
                    verified.clear();
                }
                verified.insert(value.to_owned());
            }
        }
        ok
    }
}

/// `Basic base64(user:password)` to its parts.
fn decode_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("leak-webconfig-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let dir = temp_dir("reject");
        let cases = [
            ("unknown: 1\n", "unknown field"),
            ("tls_server_config:\n  key_file: k\n", "needs cert_file"),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: k\n",
                "missing.crt",
            ),
            (
                "basic_auth_users:\n  alice: plaintext\n",
                "not a bcrypt hash",
            ),
            ("http_server_config:\n  http2: true\n", "HTTP/1.1 only"),
        ];
        for (text, expected) in cases {
            let path = write(&dir, "web.yml", text);
            let err = WebConfig::load(&path).err().expect(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_file_serves_plain_http() {
        let dir = temp_dir("empty");
        let config = WebConfig::load(&write(&dir, "web.yml", "")).expect("empty config");
        assert!(config.tls.is_none() && config.auth.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn basic_auth_checks_the_bcrypt_hash() {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let auth =
            Arc::new(BasicAuth::new(BTreeMap::from([("alice".to_owned(), hash)])).expect("auth"));
        let header = |user: &str, password: &str| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {encoded}")
        };
        assert!(auth.allows(Some(&header("alice", "s3cret"))).await);
        // Remembered, and still right.
        assert!(auth.allows(Some(&header("alice", "s3cret"))).await);
        assert!(!auth.allows(Some(&header("alice", "wrong"))).await);
        assert!(!auth.allows(Some(&header("bob", "s3cret"))).await);
        assert!(!auth.allows(Some("Bearer abc")).await);
        assert!(!auth.allows(Some("Basic !!!")).await);
        assert!(!auth.allows(None).await);
    }
}
