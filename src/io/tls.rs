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
pub fn server_config(l: &config::Listener) -> Result<Arc<rustls::ServerConfig>, String> {
    let (Some(cert), Some(key)) = (&l.cert_file, &l.key_file) else {
        return Err("a TLS listener needs cert_file and key_file".into());
    };
    let chain = read_chain("cert_file", cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &l.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_chain("client_ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if l.require_certificate == Some(false) {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("cert_file/key_file: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Every certificate in a PEM file; at least one.
fn read_chain(what: &str, path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{what} {}: no certificates in it", path.display()));
    }
    Ok(chain)
}

fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "key_file {}: {e} (PKCS#8, PKCS#1 or SEC1 PEM expected)",
            path.display()
        )
    })
}

/// A ready TLS client configuration for one server.
pub struct Connector {
    inner: TlsConnector,
    name: ServerName<'static>,
}

impl Connector {
    /// Loads the files `[uplink]` names. Errors say which file and why.
    pub fn new(c: &config::Uplink, url: &Url) -> Result<Connector, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &c.ca_file {
            Some(path) => {
                for cert in read_chain("ca_file", path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "reading a system CA certificate failed");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "no ca_file given and no system CA certificates found (install ca-certificates)"
                            .into(),
                    );
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut cfg = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_chain("cert_file", cert)?;
                let key = read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("cert_file/key_file: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = c.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let host = c.server_name.clone().unwrap_or_else(|| url.host.clone());
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("server name {host:?}: {e}"))?
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
