//! TLS 1.3 mutual authentication by Ed25519 identity.
//!
//! Every node presents a self-signed certificate carrying its Ed25519 public
//! key. There is no certificate authority: the key in the certificate *is* the
//! identity, and the TLS 1.3 CertificateVerify signature proves the peer holds
//! the matching secret key. The dialer states the [`PeerId`] it expects; its
//! verifier rejects any other key during the handshake. The listener accepts
//! any well-formed Ed25519 certificate and learns the dialer's `PeerId` from it.

use std::sync::{Arc, LazyLock, Mutex};

use reach_proto::{Keypair, PeerId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::Error;
use crate::handshake::{self, PostQuantum};

/// ALPN protocol id of reach's QUIC connections.
pub const ALPN: &[u8] = b"reach/2";

/// The server name the dialer puts in its ClientHello. Identity is checked by
/// key, not by name, so it is a constant that reveals nothing.
pub const SERVER_NAME: &str = "reach";

/// DER-encoded object identifier of Ed25519 (1.3.101.112).
const OID_ED25519: &str = "1.3.101.112";

/// Extracts the peer's identity from its end-entity certificate.
///
/// The certificate must parse as X.509, carry an Ed25519 public key and
/// nothing may trail the DER structure.
pub fn peer_id_from_cert(der: &[u8]) -> Result<PeerId, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after certificate".into());
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != OID_ED25519 {
        return Err(format!(
            "certificate key is not Ed25519 (algorithm {})",
            spki.algorithm.algorithm.to_id_string()
        ));
    }
    PeerId::from_slice(&spki.subject_public_key.data).map_err(|e| e.to_string())
}

/// Builds the node's self-signed certificate and its private key.
fn certificate(
    keypair: &Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    let pkcs8 = PrivatePkcs8KeyDer::from(keypair.to_pkcs8_der());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| Error::Tls(format!("loading identity key: {e}")))?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| Error::Tls(format!("certificate parameters: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Tls(format!("self-signing certificate: {e}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// The one crypto provider of the workspace (aws-lc-rs: it has the hybrid
/// post-quantum group; ring's releases have no ML-KEM), with the key
/// exchange groups of `pq`.
fn provider(pq: PostQuantum) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: pq.kx_groups(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// Only Ed25519 is offered and accepted: it is the identity algorithm.
/// Built once: a verification must not rebuild a provider.
fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> = LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    });
    &ALGORITHMS
}

/// Server-side config: present our certificate, require and check the
/// client's. Post-quantum key exchange preferred ([`PostQuantum::Prefer`]).
pub fn server_config(keypair: &Keypair) -> Result<rustls::ServerConfig, Error> {
    server_config_with(keypair, PostQuantum::default())
}

/// [`server_config`] with the given post-quantum mode.
pub fn server_config_with(
    keypair: &Keypair,
    pq: PostQuantum,
) -> Result<rustls::ServerConfig, Error> {
    let (cert, key) = certificate(keypair)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider(pq))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(ClientVerifier))
        .with_single_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    no_resumption_server(&mut cfg);
    Ok(cfg)
}

/// No session tickets, no session cache: a resumed TLS 1.3 session skips
/// the certificate check, and every reach handshake must prove both
/// identities afresh. (With one client config shared by all dials, a
/// ticket from peer A would be offered to whoever answers a dial to B,
/// e.g. the relay in between, and accepted without B's key.)
fn no_resumption_server(cfg: &mut rustls::ServerConfig) {
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// Where the dialer's verifier records the key it was actually shown, so a
/// failed handshake can be reported as a typed PeerId mismatch.
pub type SeenPeer = Arc<Mutex<Option<PeerId>>>;

/// Client-side config for dialing `expected`: present our certificate and
/// accept only a server whose key is `expected`. With `None` (bootstrapping
/// from a bare address) any well-formed Ed25519 identity is accepted and
/// learned from the handshake through the returned [`SeenPeer`].
/// Post-quantum key exchange preferred ([`PostQuantum::Prefer`]).
///
/// A node builds its configs once and reuses them for every dial; this
/// function is for using reach's TLS outside a node (tests, benchmarks).
pub fn client_config(
    keypair: &Keypair,
    expected: impl Into<Option<PeerId>>,
) -> Result<(rustls::ClientConfig, SeenPeer), Error> {
    client_config_with(keypair, expected, PostQuantum::default())
}

/// [`client_config`] with the given post-quantum mode.
pub fn client_config_with(
    keypair: &Keypair,
    expected: impl Into<Option<PeerId>>,
    pq: PostQuantum,
) -> Result<(rustls::ClientConfig, SeenPeer), Error> {
    let accept = match expected.into() {
        Some(peer) => Accept::Peer(peer),
        None => Accept::Any,
    };
    client_config_accepting(keypair, accept, pq)
}

/// Whom a client config accepts as the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Exactly this peer.
    Peer(PeerId),
    /// Any well-formed reach identity: bootstrapping from a bare address,
    /// and TCP links (the QUIC connection inside a link authenticates the
    /// peer that matters).
    Any,
    /// Whom the current dial's handshake context names (a node's QUIC
    /// config, shared by all its dials). Without a context the handshake
    /// is refused: this verifier fails closed.
    PerDial,
}

pub(crate) fn client_config_accepting(
    keypair: &Keypair,
    accept: Accept,
    pq: PostQuantum,
) -> Result<(rustls::ClientConfig, SeenPeer), Error> {
    let (cert, key) = certificate(keypair)?;
    let seen = SeenPeer::default();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider(pq))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            accept,
            seen: (accept != Accept::PerDial).then(|| seen.clone()),
        }))
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // See `no_resumption_server`.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok((cfg, seen))
}

/// A server config without client authentication: only for measuring
/// what mutual authentication costs (`reach bench connect`); reach itself
/// always authenticates both ends.
pub fn server_config_without_client_auth(keypair: &Keypair) -> Result<rustls::ServerConfig, Error> {
    let (cert, key) = certificate(keypair)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider(PostQuantum::default()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    no_resumption_server(&mut cfg);
    Ok(cfg)
}

/// The client half of [`server_config_without_client_auth`]: the server's
/// key is pinned (`expected`), no client certificate is sent.
pub fn client_config_without_client_auth(expected: PeerId) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider(PostQuantum::default()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            accept: Accept::Peer(expected),
            seen: None,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

fn bad_cert(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(CertRejected(reason)),
    )))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CertRejected(String);

/// The identity in a peer's certificate chain: exactly one Ed25519
/// certificate, checked the same way on both sides of the handshake.
fn presented_identity(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(bad_cert(
            "reach peers present exactly one certificate".into(),
        ));
    }
    peer_id_from_cert(end_entity).map_err(bad_cert)
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
}

/// Checks that the server is the peer the dialer asked for.
#[derive(Debug)]
struct ServerVerifier {
    accept: Accept,
    /// Where a config built for one dial records who answered.
    seen: Option<SeenPeer>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = presented_identity(end_entity, intermediates)?;
        if let Some(seen) = &self.seen
            && let Ok(mut seen) = seen.lock()
        {
            *seen = Some(actual);
        }
        let expected = match self.accept {
            Accept::Peer(peer) => Some(peer),
            Accept::Any => None,
            // A node's dials share one config: each states its expected
            // peer in its handshake context (`None`: a bootstrap dial).
            Accept::PerDial => match handshake::report_seen(actual) {
                Some(expected) => expected,
                None => return Err(bad_cert("no dial context for this handshake".into())),
            },
        };
        if let Some(expected) = expected
            && actual != expected
        {
            return Err(bad_cert(format!(
                "expected peer {expected} but the remote presented {actual}"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepts any client presenting a well-formed Ed25519 certificate; the
/// connection then learns the client's [`PeerId`] from it.
#[derive(Debug)]
struct ClientVerifier;

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let actual = presented_identity(end_entity, intermediates)?;
        handshake::report_seen(actual);
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity() {
        let kp = Keypair::generate();
        let (cert, _) = certificate(&kp).unwrap();
        assert_eq!(peer_id_from_cert(&cert).unwrap(), kp.peer_id());
    }

    #[test]
    fn garbage_certificates_are_rejected() {
        assert!(peer_id_from_cert(b"").is_err());
        assert!(peer_id_from_cert(&[0x30, 0x82, 0xff, 0xff]).is_err());
        let kp = Keypair::generate();
        let (cert, _) = certificate(&kp).unwrap();
        let mut trailing = cert.to_vec();
        trailing.push(0);
        assert!(peer_id_from_cert(&trailing).is_err());
    }
}
