//! TLS for the uplink (rustls): trust roots from `ca_file` or the system store, an optional
//! client certificate for mutual TLS (PKCS#8, PKCS#1 or SEC1 key), and ALPN, which AWS IoT Core
//! needs to speak MQTT on port 443.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{self, Url};

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
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("ca_file {}: no certificates in it", path.display()));
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
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect())
                    .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!(
                        "cert_file {}: no certificates in it",
                        cert.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "key_file {}: {e} (PKCS#8, PKCS#1 or SEC1 PEM expected)",
                        key.display()
                    )
                })?;
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
