//! A development CA and certificate issuance (rcgen, ECDSA P-256).
//!
//! keyd's production certificates come from the cluster's own PKI; this module makes a small
//! one for development and tests: a CA, a server certificate, an admin client certificate and
//! one client certificate per node, each carrying its [`Identity`] as its only URI SAN.
//!
//! Private keys are written with mode 0600, atomically (temporary file, fsync, rename, fsync of
//! the directory), so a crash leaves either the old file or the new one.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyd_proto::identity::{Identity, IdentityError, validate_name};
use rcgen::string::{Ia5String, PrintableString, TeletexString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;
use zeroize::Zeroizing;

/// How long the CA made by [`CertificateAuthority::generate`] is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the leaf certificates made by [`ensure_dev_pki`] are valid.
const DEV_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before "now", so a peer whose clock is a little behind
/// accepts a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Longer validity is refused: it is surely a unit mistake, and date arithmetic stays in range.
const MAX_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} failed")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a PEM certificate", path.display())]
    CertificatePem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} must hold exactly one certificate; it holds {found}", path.display())]
    CertificateCount { path: PathBuf, found: usize },
    #[error("{} is not a valid X.509 certificate", path.display())]
    CertificateParse {
        path: PathBuf,
        #[source]
        source: X509Error,
    },
    #[error("{} is not a CA certificate (needs basicConstraints CA:true and keyCertSign)", path.display())]
    NotCa { path: PathBuf },
    #[error(
        "the subject name of {} cannot be reproduced as an issuer name (multi-valued RDN, repeated attribute or unsupported string type)",
        path.display()
    )]
    UnsupportedCaSubject { path: PathBuf },
    #[error("{} is not a usable private key", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("private key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{} exists but {} does not; refusing to replace half of a CA", present.display(), missing.display())]
    IncompleteCa { present: PathBuf, missing: PathBuf },
    #[error("certificate validity {validity:?} must be more than zero and at most 100 years")]
    InvalidValidity { validity: Duration },
    #[error("the system clock is before 1970")]
    Clock,
    #[error("the random number generator failed")]
    Random,
    #[error("a server certificate needs at least one name")]
    NoServerNames,
    #[error("server name {name:?} is neither an IP address nor a DNS name")]
    InvalidServerName {
        name: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("invalid identity name")]
    InvalidIdentity(#[source] IdentityError),
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// A CA that can issue certificates. It holds the CA's private key; `Debug` shows only the
/// CA's name.
pub struct CertificateAuthority {
    common_name: String,
    cert_pem: String,
    /// rcgen's issuer: the CA's name, key identifier and signing key (its own `Debug` elides
    /// the key too).
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA: ECDSA P-256, CA:true with path length 0 (it signs leaves only),
    /// valid for 10 years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY)?;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-signing the CA certificate"))?;
        Ok(Self {
            common_name: common_name.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate (exactly one, PEM) and its private key (PKCS#8 PEM).
    /// The key must belong to the certificate, and the certificate must be a CA.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Self, PkiError> {
        let cert_path = cert_pem_path;
        let cert_pem = fs::read_to_string(cert_path).map_err(|source| PkiError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| PkiError::CertificatePem {
                path: cert_path.to_owned(),
                source,
            })?;
        let [der] = certs.as_slice() else {
            return Err(PkiError::CertificateCount {
                path: cert_path.to_owned(),
                found: certs.len(),
            });
        };
        let parse_err = |source| PkiError::CertificateParse {
            path: cert_path.to_owned(),
            source,
        };
        let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => parse_err(e),
            x509_parser::nom::Err::Incomplete(_) => parse_err(X509Error::InvalidCertificate),
        })?;
        if !is_ca(&x509).map_err(parse_err)? {
            return Err(PkiError::NotCa {
                path: cert_path.to_owned(),
            });
        }

        let key_pem =
            keyd_mtls::tls::read_secret(key_pem_path).map_err(|source| PkiError::Read {
                path: key_pem_path.to_owned(),
                source,
            })?;
        let key = std::str::from_utf8(&key_pem)
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)
            .and_then(KeyPair::from_pem)
            .map_err(|source| PkiError::Key {
                path: key_pem_path.to_owned(),
                source,
            })?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(PkiError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_pem_path.to_owned(),
            });
        }

        // Leaves name their issuer by the CA's subject, and verifiers compare those names byte
        // for byte, so the subject is rebuilt exactly (same attributes, order, string types).
        let mut params = CertificateParams::default();
        params.distinguished_name =
            issuer_name(x509.subject()).ok_or_else(|| PkiError::UnsupportedCaSubject {
                path: cert_path.to_owned(),
            })?;
        // Leaves' authority key identifier must match the CA's subject key identifier.
        if let Some(ski) = subject_key_id(&x509) {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        let common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            common_name,
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key, PKCS#8 PEM (for a Secret that holds the CA).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    /// Writes the CA's key (mode 0600) and then its certificate, each atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        let key_pem = Zeroizing::new(self.issuer.key().serialize_pem());
        write_atomic(key_path, key_pem.as_bytes(), KEY_MODE)?;
        write_atomic(cert_path, self.cert_pem.as_bytes(), CERT_MODE)
    }

    /// A server certificate for `names` (each an IP address if it parses as one, otherwise a
    /// DNS name), CN = the first name, serverAuth EKU.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let first = names.first().ok_or(PkiError::NoServerNames)?;
        let mut params = leaf_params(first, validity)?;
        for name in names {
            let invalid = |source| PkiError::InvalidServerName {
                name: name.clone(),
                source,
            };
            let san = match ServerName::try_from(name.as_str()) {
                Ok(ServerName::IpAddress(ip)) => SanType::IpAddress(ip.into()),
                Ok(ServerName::DnsName(dns)) => SanType::DnsName(
                    Ia5String::try_from(dns.as_ref()).map_err(rcgen_err("encoding a DNS name"))?,
                ),
                // `ServerName` is non-exhaustive; a future kind of name is not one we can encode.
                Ok(_) => return Err(invalid(rustls_pki_types::InvalidDnsNameError)),
                Err(source) => return Err(invalid(source)),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&params)
    }

    /// A client certificate whose only URI SAN is `identity.uri()`, CN = the identity's name,
    /// clientAuth EKU.
    pub fn issue_client(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let name = identity.name();
        // Checked here so that every certificate issued is one `peer_identity` accepts.
        validate_name(name).map_err(PkiError::InvalidIdentity)?;
        let mut params = leaf_params(name, validity)?;
        let uri =
            Ia5String::try_from(identity.uri()).map_err(rcgen_err("encoding the identity URI"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&params)
    }

    /// A node client certificate (as [`issue_client`](Self::issue_client)) for the public key
    /// of `csr_pem`, a PKCS#10 request whose signature proves its sender holds the key. The
    /// names the request asks for are ignored: the certificate names `identity` only. Its
    /// `notBefore` is backdated for clock skew, but never before `not_before_floor` (unix
    /// seconds, not in the future): a readmitted node's new certificate must not predate its
    /// removal.
    pub fn issue_client_for_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        validity: Duration,
        not_before_floor: Option<u64>,
    ) -> Result<IssuedForCsr, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(rcgen_err("parsing the CSR"))?;
        let name = identity.name();
        validate_name(name).map_err(PkiError::InvalidIdentity)?;
        let mut params = leaf_params(name, validity)?;
        let uri =
            Ia5String::try_from(identity.uri()).map_err(rcgen_err("encoding the identity URI"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(floor) = not_before_floor {
            let want = i64::try_from(floor).unwrap_or(i64::MAX);
            let have = params.not_before.unix_timestamp();
            if have < want {
                params.not_before += Duration::from_secs(want.abs_diff(have));
            }
        }
        let not_before = keyd_proto::Timestamp(params.not_before.unix_timestamp().max(0) as u64);
        let not_after = keyd_proto::Timestamp(params.not_after.unix_timestamp().max(0) as u64);
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rcgen_err("signing a certificate"))?;
        Ok(IssuedForCsr {
            cert_pem: cert.pem(),
            serial,
            not_before,
            not_after,
        })
    }

    fn issue(&self, params: &CertificateParams) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generating a certificate key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("signing a certificate"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// A certificate issued for a CSR's key (which stays with the requester).
#[derive(Debug, Clone)]
pub struct IssuedForCsr {
    pub cert_pem: String,
    /// The certificate's serial number, in hex: what the audit record names it by.
    pub serial: String,
    pub not_before: keyd_proto::Timestamp,
    pub not_after: keyd_proto::Timestamp,
}

/// A certificate and its private key, both PEM. `Debug` omits the key.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes the key (mode 0600) and then the certificate, each atomically. Key first: a
    /// certificate on disk always has its key next to it, even after a crash in between.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_atomic(key_path, self.key_pem.as_bytes(), KEY_MODE)?;
        write_atomic(cert_path, self.cert_pem.as_bytes(), CERT_MODE)
    }
}

/// The files of a development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The directory holding every file below (`<dir>/pki`, mode 0700); the CA key is
    /// `ca-key.pem` in it.
    pub dir: PathBuf,
    /// The CA certificate.
    pub ca: PathBuf,
    pub server: TlsPathsPair,
    /// Client certificate for `Identity::Admin("admin")`.
    pub admin: TlsPathsPair,
    /// Client certificate for `Identity::Webhook("webhook")`, for the admission webhook.
    pub webhook: TlsPathsPair,
    /// Client certificate for each `Identity::Node(name)`, in the order given.
    pub nodes: Vec<(String, TlsPathsPair)>,
}

#[derive(Debug, Clone)]
pub struct TlsPathsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates, where absent, a development PKI under `dir/pki` (mode 0700):
/// `ca.pem`/`ca-key.pem`; `server.pem`/`server-key.pem` (SANs `server_names`);
/// `admin.pem`/`admin-key.pem` (`Identity::Admin("admin")`); `webhook.pem`/`webhook-key.pem`
/// (`Identity::Webhook("webhook")`); `node-<name>.pem`/
/// `node-<name>-key.pem` per node.
///
/// Existing files are left untouched, so a restart keeps its certificates. A leaf whose
/// certificate or key is missing is issued anew (both files) from the existing CA; a CA with
/// only one of its two files is an error, since replacing it would invalidate every leaf.
/// Names are validated before anything is written.
pub fn ensure_dev_pki(
    dir: &Path,
    server_names: &[String],
    node_names: &[&str],
) -> Result<DevPki, PkiError> {
    if server_names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    for name in server_names {
        ServerName::try_from(name.as_str()).map_err(|source| PkiError::InvalidServerName {
            name: name.clone(),
            source,
        })?;
    }
    // Node names become file names, so they are checked before any path is built from them.
    for name in node_names {
        validate_name(name).map_err(PkiError::InvalidIdentity)?;
    }

    let pki_dir = dir.join("pki");
    fs::create_dir_all(&pki_dir)
        .and_then(|()| fs::set_permissions(&pki_dir, fs::Permissions::from_mode(DIR_MODE)))
        .map_err(|source| PkiError::CreateDir {
            path: pki_dir.clone(),
            source,
        })?;

    let pair = |stem: &str| TlsPathsPair {
        cert: pki_dir.join(format!("{stem}.pem")),
        key: pki_dir.join(format!("{stem}-key.pem")),
    };
    let ca_files = pair("ca");
    let ca = match (ca_files.cert.exists(), ca_files.key.exists()) {
        (true, true) => CertificateAuthority::load(&ca_files.cert, &ca_files.key)?,
        (false, false) => {
            let ca = CertificateAuthority::generate("keyd development CA")?;
            ca.write(&ca_files.cert, &ca_files.key)?;
            ca
        }
        (true, false) => {
            return Err(PkiError::IncompleteCa {
                present: ca_files.cert,
                missing: ca_files.key,
            });
        }
        (false, true) => {
            return Err(PkiError::IncompleteCa {
                present: ca_files.key,
                missing: ca_files.cert,
            });
        }
    };

    let ensure = |files: &TlsPathsPair, issue: &dyn Fn() -> Result<IssuedCert, PkiError>| {
        if files.cert.exists() && files.key.exists() {
            return Ok(());
        }
        issue()?.write(&files.cert, &files.key)
    };

    let server = pair("server");
    ensure(&server, &|| {
        ca.issue_server(server_names, DEV_LEAF_VALIDITY)
    })?;
    let admin = pair("admin");
    let admin_id = Identity::Admin("admin".to_owned());
    ensure(&admin, &|| ca.issue_client(&admin_id, DEV_LEAF_VALIDITY))?;
    let webhook = pair("webhook");
    let webhook_id = Identity::Webhook("webhook".to_owned());
    ensure(&webhook, &|| {
        ca.issue_client(&webhook_id, DEV_LEAF_VALIDITY)
    })?;
    let mut nodes = Vec::with_capacity(node_names.len());
    for name in node_names {
        let files = pair(&format!("node-{name}"));
        let id = Identity::Node((*name).to_owned());
        ensure(&files, &|| ca.issue_client(&id, DEV_LEAF_VALIDITY))?;
        nodes.push(((*name).to_owned(), files));
    }

    Ok(DevPki {
        dir: pki_dir,
        ca: ca_files.cert,
        server,
        admin,
        webhook,
        nodes,
    })
}

/// What a certificate says, as far as deciding whether to renew it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The certificate, DER (what `openssl x509 -fingerprint` hashes).
    pub der: Vec<u8>,
    /// The serial number, in hex (as audit records name certificates).
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
    /// DNS names and IP addresses (as text) of the subject alternative names.
    pub server_names: Vec<String>,
    /// URI subject alternative names.
    pub uris: Vec<String>,
    pub subject_key_id: Option<Vec<u8>>,
    pub authority_key_id: Option<Vec<u8>>,
    /// The DER of the subject public key info, to match a private key against.
    pub public_key: Vec<u8>,
}

/// Reads the one certificate in `cert_pem`. The error says what is wrong, without content.
pub fn inspect(cert_pem: &str) -> Result<CertificateInfo, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    let [der] = certs.as_slice() else {
        return Err(format!("holds {} certificates, not one", certs.len()));
    };
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate ({e})"))?;
    let mut server_names = Vec::new();
    let mut uris = Vec::new();
    let mut subject_key_id = None;
    let mut authority_key_id = None;
    for ext in x509.iter_extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    use x509_parser::extensions::GeneralName;
                    match name {
                        GeneralName::DNSName(d) => server_names.push((*d).to_owned()),
                        GeneralName::URI(u) => uris.push((*u).to_owned()),
                        GeneralName::IPAddress(b) => {
                            let ip = match b.len() {
                                4 => <[u8; 4]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                                16 => <[u8; 16]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                                _ => None,
                            };
                            if let Some(ip) = ip {
                                server_names.push(ip.to_string());
                            }
                        }
                        _ => {}
                    }
                }
            }
            ParsedExtension::SubjectKeyIdentifier(id) => subject_key_id = Some(id.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
            }
            _ => {}
        }
    }
    Ok(CertificateInfo {
        der: der.to_vec(),
        serial: hex::encode(x509.raw_serial()),
        not_after: x509.validity().not_after.timestamp().max(0) as u64,
        server_names,
        uris,
        subject_key_id,
        authority_key_id,
        public_key: x509.public_key().raw.to_vec(),
    })
}

/// Whether `key_pem` is the private key of the certificate `info` describes.
pub fn key_matches(info: &CertificateInfo, key_pem: &str) -> bool {
    KeyPair::from_pem(key_pem).is_ok_and(|key| key.subject_public_key_info() == info.public_key)
}

/// Parameters shared by every leaf: CN, validity, random serial, not a CA, digitalSignature
/// (all ECDSA needs), authority key identifier.
fn leaf_params(common_name: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity)?;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Valid from a little before now until `validity` after now.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    if validity.is_zero() || validity > MAX_VALIDITY {
        return Err(PkiError::InvalidValidity { validity });
    }
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Clock)?;
    // rcgen takes `time::OffsetDateTime`; building it from the epoch avoids a direct dependency
    // on `time`. In range: now is after 1970 and at most 100 years are added.
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    Ok(())
}

/// 128 random bits, positive and without a leading zero byte (RFC 5280: at most 20 octets).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    keyd_mtls::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, X509Error> {
    let ca = cert.basic_constraints()?.is_some_and(|bc| bc.value.ca);
    // No keyUsage extension means no restriction.
    let may_sign = cert.key_usage()?.is_none_or(|ku| ku.value.key_cert_sign());
    Ok(ca && may_sign)
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// Rebuilds an X.509 name as rcgen's `DistinguishedName`, or `None` when rcgen cannot encode
/// it identically: rcgen writes one attribute per RDN and keeps one value per attribute type.
fn issuer_name(name: &X509Name<'_>) -> Option<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return None;
        };
        let oid: Vec<u64> = attr.attr_type().iter()?.collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return None;
        }
        let data = attr.attr_value().data;
        let text = std::str::from_utf8(data).ok()?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(PrintableString::try_from(text).ok()?),
            Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text).ok()?),
            Tag::T61String => DnValue::TeletexString(TeletexString::try_from(text).ok()?),
            _ => return None,
        };
        dn.push(ty, value);
    }
    Some(dn)
}

/// [`crate::fsutil::write_atomic`] with this module's error.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    crate::fsutil::write_atomic(path, bytes, mode).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    use super::*;
    use keyd_mtls::identity::peer_identity;
    use keyd_mtls::tls::provider;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// Verifies `leaf` as a client certificate against `ca`, as the server's verifier would.
    fn verify_client(ca: &CertificateAuthority, leaf: &str) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(der(&ca.cert_pem())).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&der(leaf), &[], UnixTime::now())
            .map(|_| ())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn all_files(pki: &DevPki) -> Vec<PathBuf> {
        let mut files = vec![pki.ca.clone(), pki.dir.join("ca-key.pem")];
        for pair in [&pki.server, &pki.admin, &pki.webhook]
            .into_iter()
            .chain(pki.nodes.iter().map(|(_, p)| p))
        {
            files.push(pair.cert.clone());
            files.push(pair.key.clone());
        }
        files
    }

    fn read_all(files: &[PathBuf]) -> Vec<Vec<u8>> {
        files.iter().map(|f| fs::read(f).unwrap()).collect()
    }

    #[test]
    fn ensure_dev_pki_is_idempotent_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "10.0.0.1".to_owned()];
        let first = ensure_dev_pki(dir.path(), &names, &["n1", "n2"]).unwrap();
        let files = all_files(&first);
        assert_eq!(files.len(), 12);
        let before = read_all(&files);

        assert_eq!(mode(&first.dir), 0o700);
        for key in files
            .iter()
            .filter(|f| f.to_string_lossy().ends_with("-key.pem"))
        {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        assert_eq!(mode(&first.ca), 0o644);
        assert_eq!(first.nodes[1].1.cert, dir.path().join("pki/node-n2.pem"));
        assert_eq!(first.nodes[1].1.key, dir.path().join("pki/node-n2-key.pem"));
        assert_eq!(first.admin.cert, dir.path().join("pki/admin.pem"));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&first.dir).unwrap().count(), 12);

        let second = ensure_dev_pki(dir.path(), &names, &["n1", "n2"]).unwrap();
        assert_eq!(read_all(&all_files(&second)), before);
    }

    #[test]
    fn a_missing_leaf_is_reissued_from_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        let pki = ensure_dev_pki(dir.path(), &names, &["n1"]).unwrap();
        let ca_before = fs::read(&pki.ca).unwrap();
        let old_node = fs::read(&pki.nodes[0].1.cert).unwrap();
        fs::remove_file(&pki.nodes[0].1.key).unwrap();

        let pki = ensure_dev_pki(dir.path(), &names, &["n1", "n2"]).unwrap();
        assert_eq!(fs::read(&pki.ca).unwrap(), ca_before);
        let new_node = fs::read_to_string(&pki.nodes[0].1.cert).unwrap();
        assert_ne!(new_node.as_bytes(), old_node.as_slice());

        // The reissued and the added leaves chain to the CA loaded from disk.
        let ca = CertificateAuthority::load(&pki.ca, &pki.dir.join("ca-key.pem")).unwrap();
        verify_client(&ca, &new_node).unwrap();
        let n2 = fs::read_to_string(&pki.nodes[1].1.cert).unwrap();
        verify_client(&ca, &n2).unwrap();
        assert_eq!(
            peer_identity(&[der(&n2)]).unwrap(),
            Identity::Node("n2".into())
        );
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        let pki = ensure_dev_pki(dir.path(), &names, &[]).unwrap();
        fs::remove_file(pki.dir.join("ca-key.pem")).unwrap();
        assert!(matches!(
            ensure_dev_pki(dir.path(), &names, &[]),
            Err(PkiError::IncompleteCa { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        assert!(matches!(
            ensure_dev_pki(dir.path(), &names, &["../escape"]),
            Err(PkiError::InvalidIdentity(_))
        ));
        assert!(matches!(
            ensure_dev_pki(dir.path(), &[], &[]),
            Err(PkiError::NoServerNames)
        ));
        assert!(matches!(
            ensure_dev_pki(dir.path(), &["bad name!".to_owned()], &[]),
            Err(PkiError::InvalidServerName { .. })
        ));
        assert!(!dir.path().join("pki").exists());
    }

    #[test]
    fn issued_certificates_carry_the_requested_names() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let names = vec![
            "keyd.example".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let server = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        let server_der = der(&server.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        let sans = &x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans.len(), 3);
        assert!(matches!(sans[0], GeneralName::DNSName("keyd.example")));
        assert!(matches!(sans[1], GeneralName::IPAddress(ip) if ip == [127, 0, 0, 1]));
        let v6: IpAddr = "::1".parse().unwrap();
        assert!(
            matches!(sans[2], GeneralName::IPAddress(ip) if IpAddr::V6(<[u8; 16]>::try_from(ip).unwrap().into()) == v6)
        );
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!x509.is_ca());
        let left = x509
            .validity()
            .time_to_expiration()
            .unwrap()
            .whole_seconds();
        assert!(left > 3500 && left <= 3600, "{left}");

        let node = ca
            .issue_client(
                &Identity::Node("worker-7".into()),
                Duration::from_secs(3600),
            )
            .unwrap();
        let node_der = der(&node.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&node_der).unwrap();
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "worker-7");
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(
            peer_identity(&[node_der]).unwrap(),
            Identity::Node("worker-7".into())
        );
        verify_client(&ca, &node.cert_pem).unwrap();
        // A server certificate is not a client certificate.
        assert!(verify_client(&ca, &server.cert_pem).is_err());

        let ca_der = der(&ca.cert_pem());
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca_x509.is_ca());
        let days = ca_x509
            .validity()
            .time_to_expiration()
            .unwrap()
            .whole_days();
        assert!((3649..=3650).contains(&days), "{days}");
    }

    #[test]
    fn issuing_refuses_bad_input() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            ca.issue_client(&Identity::Node("Bad/Name".into()), hour),
            Err(PkiError::InvalidIdentity(_))
        ));
        assert!(matches!(
            ca.issue_server(&[], hour),
            Err(PkiError::NoServerNames)
        ));
        assert!(matches!(
            ca.issue_server(&["a b".to_owned()], hour),
            Err(PkiError::InvalidServerName { .. })
        ));
        let id = Identity::Admin("a".into());
        assert!(matches!(
            ca.issue_client(&id, Duration::ZERO),
            Err(PkiError::InvalidValidity { .. })
        ));
        assert!(matches!(
            ca.issue_client(&id, Duration::MAX),
            Err(PkiError::InvalidValidity { .. })
        ));
    }

    #[test]
    fn load_round_trips_and_checks_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        let ca = CertificateAuthority::generate("round trip CA").unwrap();
        ca.write(&cert, &key).unwrap();
        assert_eq!(mode(&key), 0o600);

        let loaded = CertificateAuthority::load(&cert, &key).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let leaf = loaded
            .issue_client(&Identity::Admin("ops".into()), Duration::from_secs(60))
            .unwrap();
        // Issued by the loaded copy, verified against the original: names and key ids match.
        verify_client(&ca, &leaf.cert_pem).unwrap();
        let (leaf_der, ca_der) = (der(&leaf.cert_pem), der(&ca.cert_pem()));
        let (_, leaf_x509) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(leaf_x509.issuer().as_raw(), ca_x509.subject().as_raw());

        // Another CA's key does not fit this certificate.
        let other = CertificateAuthority::generate("other").unwrap();
        let other_key = dir.path().join("other-key.pem");
        other
            .write(&dir.path().join("other.pem"), &other_key)
            .unwrap();
        assert!(matches!(
            CertificateAuthority::load(&cert, &other_key),
            Err(PkiError::KeyMismatch { .. })
        ));

        // A leaf is not a CA.
        let leaf_cert = dir.path().join("leaf.pem");
        leaf.write(&leaf_cert, &dir.path().join("leaf-key.pem"))
            .unwrap();
        assert!(matches!(
            CertificateAuthority::load(&leaf_cert, &key),
            Err(PkiError::NotCa { .. })
        ));
        // Two certificates in the CA file are ambiguous.
        let bundle = dir.path().join("bundle.pem");
        fs::write(&bundle, format!("{}{}", ca.cert_pem(), other.cert_pem())).unwrap();
        assert!(matches!(
            CertificateAuthority::load(&bundle, &key),
            Err(PkiError::CertificateCount { found: 2, .. })
        ));
    }

    #[test]
    fn debug_never_shows_private_keys() {
        let ca = CertificateAuthority::generate("debug CA").unwrap();
        let leaf = ca
            .issue_client(&Identity::Admin("a".into()), Duration::from_secs(60))
            .unwrap();
        let key_body = leaf.key_pem.lines().nth(1).unwrap().to_owned();
        let ca_key = Zeroizing::new(ca.issuer.key().serialize_pem());
        let ca_key_body = ca_key.lines().nth(1).unwrap();
        let shown = format!("{ca:?} {leaf:?} {ca:#?} {leaf:#?}");
        assert!(!shown.contains("PRIVATE KEY"));
        assert!(!shown.contains(&key_body));
        assert!(!shown.contains(ca_key_body));
        assert!(shown.contains("debug CA"));
    }
}
