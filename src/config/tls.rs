//! Checks of the TLS files `[server.tls]` names, so `check-config` finds what the server would
//! only find when it starts: files that are not PEM, of the wrong kind, or a key that does not
//! belong to the certificate.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{Problems, TlsConfig};

/// Reports every problem of the three files under `path` (`server.tls`).
pub(super) fn check(tls: &TlsConfig, path: &str, p: &mut Problems) {
    let certs = certificates(&tls.cert_file, &format!("{path}.cert_file"), p);
    let key = match PrivateKeyDer::from_pem_file(&tls.key_file) {
        Ok(key) => Some(key),
        Err(e) => {
            p.push(format!("{path}.key_file"), format!("{} holds no PEM private key ({e})", tls.key_file.display()));
            None
        }
    };
    let cas = certificates(&tls.client_ca_file, &format!("{path}.client_ca_file"), p);
    if let (Some(certs), Some(key)) = (certs, key) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let built = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_no_client_auth())
            .and_then(|b| b.with_single_cert(certs, key));
        if let Err(e) = built {
            let why = match e {
                rustls::Error::InconsistentKeys(_) => "does not match the certificate in cert_file".to_owned(),
                other => format!("cannot be used with the certificate in cert_file: {other}"),
            };
            p.push(format!("{path}.key_file"), format!("{} {why}", tls.key_file.display()));
        }
    }
    if let Some(cas) = cas {
        let mut roots = rustls::RootCertStore::empty();
        let (_, rejected) = roots.add_parsable_certificates(cas);
        if rejected > 0 {
            p.push(
                format!("{path}.client_ca_file"),
                format!("{} holds {rejected} certificates that cannot be parsed", tls.client_ca_file.display()),
            );
        }
    }
}

/// The certificates of a PEM file, or a problem at `key` when it holds none.
fn certificates(file: &std::path::Path, key: &str, p: &mut Problems) -> Option<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = match CertificateDer::pem_file_iter(file) {
        Ok(iter) => iter.collect(),
        Err(e) => Err(e),
    };
    match certs {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            p.push(key, format!("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", file.display()));
            None
        }
        Err(e) => {
            p.push(key, format!("{} is not a PEM certificate file ({e})", file.display()));
            None
        }
    }
}
