//! TLS for client connections, with Redis's own settings: `tls-port`,
//! `tls-cert-file`, `tls-key-file`, `tls-ca-cert-file` and
//! `tls-auth-clients` (rustls; PEM files as Redis takes them).
//!
//! As in Redis, a client certificate is required by default once a CA is
//! given (`tls-auth-clients yes`); `optional` checks one only if the client
//! offers it, `no` never asks. Without a CA no client certificate is asked
//! for. `port 0` turns the plain port off, so only TLS is served.
//!
//! `tls-replication yes` runs a replicated cluster's links between nodes over
//! TLS too ([`peer_connector`]): a node checks its peer's certificate against
//! `tls-ca-cert-file` and shows its own (`tls-client-cert-file`, else
//! `tls-cert-file`), so with `tls-auth-clients yes` both sides are
//! authenticated by certificate, beside the cluster secret's challenge.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsAuthClients};

/// The acceptor for `tls-port`, or `None` when TLS is off (`tls-port 0`).
/// Errors name the setting and the file at fault.
pub fn acceptor(config: &Config) -> anyhow::Result<Option<TlsAcceptor>> {
    if config.tls_port == 0 {
        return Ok(None);
    }
    let (Some(cert_file), Some(key_file)) = (&config.tls_cert_file, &config.tls_key_file) else {
        anyhow::bail!("tls-port needs tls-cert-file and tls-key-file");
    };
    let certs = certificates(cert_file, "tls-cert-file")?;
    let key = private_key(key_file, "tls-key-file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    let builder = match (&config.tls_ca_cert_file, config.tls_auth_clients) {
        (Some(ca_file), auth) if auth != TlsAuthClients::No => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_file)?), provider);
            let verifier = match auth {
                TlsAuthClients::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            }
            .build()
            .map_err(|e| anyhow::anyhow!("tls-ca-cert-file {}: {e}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let server = builder
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls-cert-file / tls-key-file: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// The CA certificates of `tls-ca-cert-file`, as a root store.
fn roots(ca_file: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_file, "tls-ca-cert-file")? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("tls-ca-cert-file {}: {e}", ca_file.display()))?;
    }
    Ok(roots)
}

fn private_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))
}

fn certificates(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{setting} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The connector a node's links to its peers use with `tls-replication yes`
/// (`None` without it).
pub fn peer_connector(config: &Config) -> anyhow::Result<Option<tokio_rustls::TlsConnector>> {
    if !config.tls_replication {
        return Ok(None);
    }
    let Some(ca_file) = &config.tls_ca_cert_file else {
        anyhow::bail!(
            "tls-replication needs tls-ca-cert-file (the CA peers' certificates are checked against)"
        );
    };
    let roots = roots(ca_file)?;
    let (cert_file, key_file) = match (&config.tls_client_cert_file, &config.tls_client_key_file) {
        (Some(c), Some(k)) => (c, k),
        _ => match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(c), Some(k)) => (c, k),
            _ => anyhow::bail!("tls-replication needs tls-client-cert-file and tls-client-key-file (or tls-cert-file and tls-key-file)"),
        },
    };
    let certs = certificates(cert_file, "tls-client-cert-file")?;
    let key = private_key(key_file, "tls-client-key-file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls-client-cert-file / tls-client-key-file: {e}"))?;
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(client))))
}
