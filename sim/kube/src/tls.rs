//! HTTPS for a kube-sim that authenticates users. kubectl (client-go) sends bearer tokens only
//! over TLS, so an API server that checks tokens must serve HTTPS, as every real one does. A fresh
//! CA and a serving certificate for the listen address are made at start-up; the CA goes into the
//! kubeconfig as `certificate-authority-data`, so kubectl, helm and kube-rs verify the server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types};

/// The serving side: the CA (PEM) clients trust and the acceptor holding the server certificate.
pub struct Tls {
    pub ca_pem: String,
    pub acceptor: TlsAcceptor,
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("kube-sim TLS: {e}"))
}

/// A CA named `kube-sim-ca` and a certificate it signs for `addr`'s IP, `localhost` and
/// `kubernetes.default.svc`, offering HTTP/2 and HTTP/1.1 as the API server does.
pub fn generate(addr: SocketAddr) -> std::io::Result<Tls> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kube-sim-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(other)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(other)?;
    let issuer = Issuer::new(ca, ca_key);

    let names = vec![addr.ip().to_string(), "localhost".into(), "kubernetes.default.svc".into()];
    let mut leaf = CertificateParams::new(names).map_err(other)?;
    leaf.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().map_err(other)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(other)?;

    let key = pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .map_err(other)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls { ca_pem: ca_cert.pem(), acceptor: TlsAcceptor::from(Arc::new(config)) })
}

/// Serves `app` over TLS on `listener`, one task per connection, until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "kube-sim accept failed");
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let service = TowerToHyperService::new(app);
            if let Err(e) = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(error = %e, "kube-sim connection ended");
            }
        });
    }
}
