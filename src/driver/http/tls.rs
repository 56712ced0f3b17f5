//! How a driver trusts a cloud API's certificate: one rustls configuration per [`Trust`].
//!
//! * [`Trust::PublicRoots`]: the public web PKI roots plus the host's own trust store (a private
//!   CA installed on the host is honoured, as by the clouds' own CLIs).
//! * [`Trust::CaPem`]: exactly the CAs of a PEM bundle, as `requests`' `verify=<file>` (the
//!   OpenStack CLI's `--os-cacert`) and PVE's cluster CA (`/etc/pve/pve-root-ca.pem`) need.
//! * [`Trust::Fingerprint`]: one pinned SHA-256 digest of the server's own certificate, what the
//!   PVE GUI shows under Certificates (a fresh PVE node's certificate names the node, not the
//!   address used).
//! * [`Trust::Insecure`]: no check of the server's identity at all, only where a driver has an
//!   explicit opt-in for it (OpenStack's `insecure = true`, the CLI's `--insecure`).
//!
//! Hand-written verifiers (pin, insecure) because reqwest offers neither a pin nor an
//! "accept anything" switch that composes with a preconfigured rustls config; both still check
//! the handshake signature against the presented certificate's key.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate found in the CA file")]
    NoCertificate,
    #[error("cannot parse the CA file: {0}")]
    Pem(String),
    #[error("cannot use a CA certificate: {0}")]
    BadCa(#[source] rustls::Error),
    #[error("cannot set up TLS: {0}")]
    Rustls(#[source] rustls::Error),
}

/// What a driver trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The public web PKI roots and the host's trust store.
    PublicRoots,
    /// Certificates (PEM) of the CA that signed the server's certificate.
    CaPem(Vec<u8>),
    /// The SHA-256 digest of the server's own (leaf) certificate.
    Fingerprint([u8; 32]),
    /// Any certificate (the handshake signature is still checked). Only behind an explicit
    /// opt-in of the user.
    Insecure,
}

/// Parses a SHA-256 fingerprint written as 64 hex digits, with or without `:` separators.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `trust`.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Rustls)?;
    let config = match trust {
        Trust::PublicRoots => {
            let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            // The host's store may be missing or partly unreadable: the public roots still apply.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaPem(pem) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Pem(e.to_string()))?;
                roots.add(cert).map_err(Error::BadCa)?;
            }
            if roots.is_empty() {
                return Err(Error::NoCertificate);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: *pin,
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate {
                algorithms: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Accepts exactly the certificate whose SHA-256 digest is pinned. The pin replaces chain and
/// host-name checks (PVE's self-signed certificates name the node, not the address used), but
/// the handshake signature is still verified against that certificate's key, so only the
/// holder of its private key passes.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("server certificate does not match the pinned fingerprint".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any certificate, for `Trust::Insecure`; the handshake signature is still verified
/// against the presented certificate, so the connection is at least to its key's holder.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["pve1".into()]).unwrap()
    }

    fn fingerprint(der: &[u8]) -> [u8; 32] {
        ring::digest::digest(&ring::digest::SHA256, der).as_ref().try_into().unwrap()
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let colons = "AB:".repeat(31) + "CD";
        assert_eq!(parse_fingerprint(&colons).unwrap()[0], 0xab);
        assert_eq!(parse_fingerprint(&colons).unwrap()[31], 0xcd);
        assert_eq!(parse_fingerprint(&colons.replace(':', "")), parse_fingerprint(&colons));
        assert_eq!(parse_fingerprint("ab:cd"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn a_pinned_verifier_accepts_only_the_pinned_certificate() {
        let ours = cert();
        let other = cert();
        let verifier = PinnedVerifier {
            pin: fingerprint(ours.cert.der()),
            algorithms: provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let now = UnixTime::now();
        assert!(verifier.verify_server_cert(ours.cert.der(), &[], &name, &[], now).is_ok());
        let err = verifier.verify_server_cert(other.cert.der(), &[], &name, &[], now).unwrap_err();
        assert!(err.to_string().contains("pinned fingerprint"));
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        assert!(matches!(client_config(&Trust::CaPem(b"not a pem".to_vec())), Err(Error::NoCertificate)));
        let ca = cert();
        assert!(client_config(&Trust::CaPem(ca.cert.pem().into_bytes())).is_ok());
        assert!(client_config(&Trust::PublicRoots).is_ok());
    }

    /// A real HTTPS server on loopback with a self-signed certificate, as a fresh PVE node has.
    async fn https_server(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> std::net::SocketAddr {
        https_server_with(cert.cert.der().clone(), &cert.signing_key).await
    }

    async fn https_server_with(der: CertificateDer<'static>, key: &rcgen::KeyPair) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let body = r#"{"data":{"version":"8.2.4"}}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    async fn get_version(trust: Trust, addr: std::net::SocketAddr) -> Result<u16, String> {
        let client = reqwest::Client::builder().use_preconfigured_tls(client_config(&trust).unwrap()).build().unwrap();
        match client.get(format!("https://{addr}/api2/json/version")).send().await {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    #[tokio::test]
    async fn https_works_with_the_pinned_certificate_and_fails_with_any_other_trust() {
        let server_cert = cert();
        let addr = https_server(&server_cert).await;
        let pin = fingerprint(server_cert.cert.der());
        assert_eq!(get_version(Trust::Fingerprint(pin), addr).await, Ok(200));
        let wrong = get_version(Trust::Fingerprint([7u8; 32]), addr).await.unwrap_err();
        assert!(wrong.contains("pinned fingerprint"), "{wrong}");
        // A self-signed certificate is not trusted by the public roots, nor by an unrelated CA.
        assert!(get_version(Trust::PublicRoots, addr).await.is_err());
        let other_ca = cert();
        assert!(get_version(Trust::CaPem(other_ca.cert.pem().into_bytes()), addr).await.is_err());
        // The explicit opt-out accepts it.
        assert_eq!(get_version(Trust::Insecure, addr).await, Ok(200));
    }

    #[tokio::test]
    async fn https_works_with_the_ca_that_signed_the_server_certificate() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
            .unwrap();
        let addr = https_server_with(leaf.der().clone(), &leaf_key).await;
        assert_eq!(get_version(Trust::CaPem(ca_cert.pem().into_bytes()), addr).await, Ok(200));
        // The CA does not vouch for another name: connecting by a name the certificate lacks fails.
        let by_name = reqwest::Client::builder()
            .use_preconfigured_tls(client_config(&Trust::CaPem(ca_cert.pem().into_bytes())).unwrap())
            .resolve("pve.invalid", addr)
            .build()
            .unwrap()
            .get(format!("https://pve.invalid:{}/api2/json/version", addr.port()))
            .send()
            .await;
        assert!(by_name.is_err());
    }
}
