//! Who a verified peer is: the one `spiffe://keyd/...` URI in its certificate.

use keyd_proto::identity::Identity;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The identity the connection's client certificate proved, or why it names none. The accept
/// loop ([`crate::server::serve_tls_router`]) attaches one to every request as an extension.
pub type PeerIdentity = Result<Identity, PeerIdentityError>;

/// Why a verified peer certificate does not name exactly one keyd identity.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PeerIdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate cannot be parsed")]
    Unparsable,
    #[error("the peer certificate carries no spiffe://keyd/ URI")]
    NoIdentity,
    #[error("the peer certificate names {} identities ({}); exactly one is allowed", .0.len(), join(.0))]
    Ambiguous(Vec<Identity>),
    #[error("the peer certificate carries an invalid keyd identity: {0}")]
    Invalid(String),
}

fn join(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The identity of a verified peer, from its end-entity certificate (`chain[0]`): its URI SANs
/// must hold exactly one `spiffe://keyd/...` identity. Other URIs are ignored; a malformed keyd
/// URI is an error rather than skipped, so a typo never silently falls back to another URI.
///
/// This reads names only; the chain must already have been verified (by the TLS handshake).
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, PeerIdentityError> {
    let end_entity = chain.first().ok_or(PeerIdentityError::NoCertificate)?;
    let (rest, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|_| PeerIdentityError::Unparsable)?;
    if !rest.is_empty() {
        return Err(PeerIdentityError::Unparsable);
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerIdentityError::Unparsable)?;
    let mut found = Vec::new();
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            match Identity::parse_uri(uri) {
                Ok(Some(id)) => found.push(id),
                Ok(None) => {}
                Err(e) => return Err(PeerIdentityError::Invalid(e.to_string())),
            }
        }
    }
    match found.len() {
        0 => Err(PeerIdentityError::NoIdentity),
        1 => Ok(found.remove(0)),
        _ => Err(PeerIdentityError::Ambiguous(found)),
    }
}

/// The validity of a verified peer's end-entity certificate (seconds since the epoch), which the
/// accept loop attaches to every request next to its [`PeerIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerValidity {
    pub not_before: u64,
    pub not_after: u64,
}

/// [`PeerValidity`] of `chain[0]`, if it parses.
pub fn peer_validity(chain: &[CertificateDer<'_>]) -> Option<PeerValidity> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let v = cert.validity();
    Some(PeerValidity {
        not_before: u64::try_from(v.not_before.timestamp()).ok()?,
        not_after: u64::try_from(v.not_after.timestamp()).ok()?,
    })
}

/// Certificates refused although they chain to the CA: keyd's removed nodes. Asked during the
/// TLS handshake, after the chain verified, so a refused certificate never gets a connection
/// (the client sees the `certificate_revoked` alert); requests on connections opened before a
/// refusal are checked again by the service.
pub trait DenyList: Send + Sync + std::fmt::Debug {
    /// Why the certificate of `identity` issued at `not_before` (seconds since the epoch) is
    /// refused, or `None`.
    fn refused(&self, identity: &Identity, not_before: u64) -> Option<String>;
}
