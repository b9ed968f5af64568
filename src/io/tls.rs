//! TLS (rustls), both ways. For the uplink: trust roots from `ca_file` or the system store, an
//! optional client certificate for mutual TLS (PKCS#8, PKCS#1 or SEC1 key), and ALPN, which AWS
//! IoT Core needs to speak MQTT on port 443. For `mqtts` and `wss` listeners: the server's
//! certificate and key, and `client_ca` for mutual TLS, in a slot a reload can swap while
//! connections stay up.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{self, Url};

/// A listener's TLS settings, loaded. `accept` uses whatever is in the slot at that moment, so
/// a reload that swaps it changes only new connections.
pub struct ServerSlot {
    config: std::sync::RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerSlot {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        ServerSlot {
            config: std::sync::RwLock::new(config),
        }
    }

    pub fn swap(&self, config: Arc<rustls::ServerConfig>) {
        if let Ok(mut c) = self.config.write() {
            *c = config;
        }
    }

    /// The TLS handshake of an accepted connection.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let config = match self.config.read() {
            Ok(c) => c.clone(),
            Err(_) => return Err(std::io::Error::other("TLS settings are unavailable")),
        };
        tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
    }
}

/// Loads the files an `mqtts` or `wss` listener names. Errors say which file and why.
pub fn server_config(l: &config::Listener) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&l.cert_file, &l.key_file) else {
        return Err(TlsError::at(
            "cert_file",
            "a TLS listener needs cert_file and key_file",
        ));
    };
    let chain = read_chain("cert_file", cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::at("cert_file", format!("TLS: {e}")))?;
    let builder = match &l.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_chain("client_ca", ca)? {
                roots.add(c).map_err(|e| {
                    TlsError::at("client_ca", format!("client_ca {}: {e}", ca.display()))
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if l.require_certificate == Some(false) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| {
                TlsError::at("client_ca", format!("client_ca {}: {e}", ca.display()))
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::at("key_file", format!("cert_file/key_file: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Every certificate in a PEM file; at least one.
fn read_chain(
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| TlsError::at(what, format!("{what} {}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(TlsError::at(
            what,
            format!("{what} {}: no certificates in it", path.display()),
        ));
    }
    if what == "cert_file" && chain.first().is_some_and(|c| is_x509_v1(c)) {
        // rustls peers (and the uplink's own verifier) refuse these at the handshake with an
        // error nobody can read; OpenSSL peers accept them. Say so now, in plain words.
        tracing::warn!(file = %path.display(), "{}", V1_ADVICE);
    }
    Ok(chain)
}

fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        TlsError::at(
            "key_file",
            format!(
                "key_file {}: {e} (PKCS#8, PKCS#1 or SEC1 PEM expected)",
                path.display()
            ),
        )
    })
}

/// A TLS file or setting that cannot be used: the config key that names it, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    /// The key in the listener or `[uplink]` table (`cert_file`, `key_file`, `ca_file`...).
    pub key: &'static str,
    pub message: String,
}

impl TlsError {
    fn at(key: &'static str, message: impl Into<String>) -> Self {
        TlsError {
            key,
            message: message.into(),
        }
    }
}

/// What to tell someone whose certificate is X.509 version 1.
pub const V1_ADVICE: &str = "the certificate is X.509 version 1 (as `openssl x509 -req` makes     without extensions, and mosquitto's TLS recipe does); rustls accepts only version 3.     Reissue it with an extension, which makes it v3: `openssl x509 -req -in server.csr -CA ca.crt     -CAkey ca.key -CAcreateserial -days 3650 -out server.crt -extfile <(printf     'subjectAltName=DNS:broker.example.com')`";

/// Whether a DER certificate is X.509 version 1: its TBSCertificate has no `[0]` version field.
pub fn is_x509_v1(der: &[u8]) -> bool {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] EXPLICIT version OPTIONAL, ...
    fn header_len(b: &[u8]) -> Option<usize> {
        let first = *b.get(1)?;
        Some(if first < 0x80 {
            2
        } else {
            2 + (first & 0x7F) as usize
        })
    }
    let Some(outer) = header_len(der) else {
        return false;
    };
    let Some(tbs) = der.get(outer..) else {
        return false;
    };
    let Some(inner) = header_len(tbs) else {
        return false;
    };
    der.first() == Some(&0x30) && tbs.first() == Some(&0x30) && tbs.get(inner) != Some(&0xA0)
}

/// A handshake error in plain words where rustls's are not (a version 1 certificate).
pub fn explain(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    if text.contains("UnsupportedCertVersion") {
        format!("{text}: {V1_ADVICE}")
    } else {
        text
    }
}

/// A ready TLS client configuration for one server.
pub struct Connector {
    inner: TlsConnector,
    name: ServerName<'static>,
}

impl Connector {
    /// Loads the files `[uplink]` names. Errors say which file and why.
    pub fn new(c: &config::Uplink, url: &Url) -> Result<Connector, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &c.ca_file {
            Some(path) => {
                for cert in read_chain("ca_file", path)? {
                    roots.add(cert).map_err(|e| {
                        TlsError::at("ca_file", format!("ca_file {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "reading a system CA certificate failed");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::at(
                        "ca_file",
                        "no ca_file given and no system CA certificates found (install ca-certificates)",
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::at("url", format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut cfg = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_chain("cert_file", cert)?;
                let key = read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::at("key_file", format!("cert_file/key_file: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = c.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let host = c.server_name.clone().unwrap_or_else(|| url.host.clone());
        let name = ServerName::try_from(host.clone())
            .map_err(|e| TlsError::at("server_name", format!("server name {host:?}: {e}")))?
            .to_owned();
        Ok(Connector {
            inner: TlsConnector::from(Arc::new(cfg)),
            name,
        })
    }

    /// The TLS handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.inner.connect(self.name.clone(), tcp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19: what mosquitto's TLS recipe makes (`openssl x509 -req`, no extensions) is a
    /// version 1 certificate. openssl makes both here; the test is skipped without it.
    #[test]
    fn version_1_certificates_are_recognised_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !run(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-subj", "/CN=x", "-out",
            "x.csr",
        ]) {
            eprintln!("skipped: no openssl");
            return;
        }
        assert!(run(&[
            "x509", "-req", "-in", "x.csr", "-signkey", "k.pem", "-days", "2", "-out", "v1.pem"
        ]));
        assert!(run(&[
            "req", "-x509", "-key", "k.pem", "-subj", "/CN=x", "-days", "2", "-out", "v3.pem"
        ]));
        let der = |f: &str| {
            read_chain("cert_file", &dir.path().join(f))
                .unwrap()
                .remove(0)
        };
        assert!(is_x509_v1(&der("v1.pem")));
        assert!(!is_x509_v1(&der("v3.pem")));
        assert!(!is_x509_v1(&[0x30]), "short input is no panic and no v1");
        let e = "invalid peer certificate: Other(OtherError(UnsupportedCertVersion))";
        let said = explain(&e);
        assert!(
            said.contains("X.509 version 1") && said.contains("-extfile"),
            "{said}"
        );
        assert_eq!(explain(&"connection refused"), "connection refused");
    }
}
