//! mTLS as cluster-autoscaler speaks it: the client presents a certificate, verifies the server
//! against a CA bundle using the address's host as server name, and requires ALPN `h2`.

mod support;

use std::{path::Path, sync::Arc};

use flotilla::proto::externalgrpc::{self as pb, cloud_provider_client::CloudProviderClient};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    let authority = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, san: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()]).unwrap().signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let ca = authority("flotilla test ca");
    let other = authority("someone else");
    Pki {
        ca: ca.pem(),
        server: leaf(&ca, "127.0.0.1"),
        client: leaf(&ca, "cluster-autoscaler"),
        stranger: leaf(&other, "cluster-autoscaler"),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn call(addr: std::net::SocketAddr, ca: &str, identity: Option<&(String, String)>) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().domain_name("127.0.0.1").ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint =
        Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    CloudProviderClient::new(channel).node_groups(pb::NodeGroupsRequest {}).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn mtls_accepts_ca_signed_clients_offers_h2_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let text = format!(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 1\n\
         [server]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"off\"\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        write(dir.path(), "server.crt", &pki.server.0),
        write(dir.path(), "server.key", &pki.server.1),
        write(dir.path(), "ca.crt", &pki.ca),
    );
    let config = support::config(&text);
    let drivers = flotilla::build_drivers(&config).unwrap();
    let server = flotilla::start(config, drivers).await.unwrap();
    let addr = server.grpc_addr;

    call(addr, &pki.ca, Some(&pki.client)).await.expect("a client with a CA-signed certificate is served");
    assert!(call(addr, &pki.ca, None).await.is_err(), "a client without a certificate is refused");
    assert!(call(addr, &pki.ca, Some(&pki.stranger)).await.is_err(), "a certificate from another CA is refused");
    let plaintext = CloudProviderClient::connect(format!("http://{addr}")).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(mut c) => c.node_groups(pb::NodeGroupsRequest {}).await.is_err(),
    };
    assert!(refused, "plaintext is refused on a TLS listener");

    // grpc-go (and so CA) rejects a TLS server that does not negotiate ALPN h2.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let der = rustls_pemfile_der(&pki.ca);
    roots.add(der).unwrap();
    let client_cert = rustls_pemfile_der(&pki.client.0);
    let client_key = tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(pem_body(&pki.client.1)).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert], client_key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    server.stop().await.unwrap();
}

/// The DER bytes of the first PEM block.
fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&b64)
}

fn rustls_pemfile_der(pem: &str) -> tokio_rustls::rustls::pki_types::CertificateDer<'static> {
    tokio_rustls::rustls::pki_types::CertificateDer::from(pem_body(pem))
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | T.iter().position(|t| *t == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
