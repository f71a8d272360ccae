//! Envelope encryption of key records.
//!
//! Every record is encrypted under its own fresh 256-bit data key (AES-256-GCM); the data key is
//! wrapped by a key-encryption key held by a [`KeyWrapper`] (the local KEK file here; AWS KMS
//! and Vault transit implement the same trait). Both layers authenticate the [`SealContext`]
//! (record id, purpose, version) as associated data, so a sealed record copied over another
//! record's slot, or a wrapped data key moved between records, fails to open.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const NONCE_LEN: usize = 12;

/// A 256-bit symmetric key (a data key or the local KEK): zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key256([u8; 32]);

impl Key256 {
    pub fn random() -> Result<Self, SealError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| SealError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256(<redacted>)")
    }
}

/// What a sealed record is bound to. Changing any field makes the record unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealContext {
    pub record_id: String,
    /// A constant in keyd's code, or (when a KEK rotation rewraps a record) the record's own.
    pub purpose: Cow<'static, str>,
    pub version: u64,
}

impl SealContext {
    /// The first version of a record. Records are immutable, so every record keyd writes today
    /// is version 1; the field exists so that a record rewritten in place would change its AAD.
    pub fn new(record_id: String, purpose: &'static str) -> Self {
        Self {
            record_id,
            purpose: Cow::Borrowed(purpose),
            version: 1,
        }
    }

    /// The context a stored record claims for itself (its id is the store key). Used where
    /// keyd handles records without knowing their kind: a rewrap, a verification pass.
    pub fn of_record(record_id: &str, record: &SealedRecord) -> Self {
        Self {
            record_id: record_id.to_owned(),
            purpose: Cow::Owned(record.purpose.clone()),
            version: record.version,
        }
    }

    /// The canonical associated-data string. Fields are length-prefixed so that no two contexts
    /// share an encoding.
    pub fn aad(&self) -> Vec<u8> {
        format!(
            "keyd-seal-v1:{}:{}:{}:{}:{}",
            self.record_id.len(),
            self.record_id,
            self.purpose.len(),
            self.purpose,
            self.version
        )
        .into_bytes()
    }

    /// The same binding as key/value pairs, for backends with an encryption context (AWS KMS).
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            ("keyd:record", self.record_id.clone()),
            ("keyd:purpose", self.purpose.to_string()),
            ("keyd:version", self.version.to_string()),
        ]
    }
}

/// A data key as wrapped by the custodian; opaque to keyd.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey(#[serde(with = "b64")] pub Vec<u8>);

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

/// A data key wrapped by a custodian, and which KEK wrapped it (for the record).
#[derive(Debug, Clone)]
pub struct Wrapped {
    pub key: WrappedKey,
    pub backend: &'static str,
    pub kek_id: String,
}

/// The custodian of the key-encryption key.
///
/// Implementations: [`LocalKek`], `kms::aws::AwsKms`, `kms::vault::VaultTransit`, and
/// `kms::Custody`, the keyring that holds the active custodian and the ones records may still be
/// wrapped under during a KEK rotation. Errors name the backend and key and say what went wrong
/// in a way an operator can act on ([`SealError::kind`]).
#[async_trait]
pub trait KeyWrapper: Send + Sync + fmt::Debug + 'static {
    /// Short backend name for status and records, e.g. `local`.
    fn backend(&self) -> &'static str;
    /// Identifies the wrapping key (a fingerprint, a KMS key ARN, a Vault key name), never secret.
    fn key_id(&self) -> String;
    /// The KEK id recorded for a data key this custodian wrapped. Vault transit records the
    /// key version it used, so that a rotation can find what is not yet on the newest one.
    fn kek_id_of(&self, _wrapped: &WrappedKey) -> String {
        self.key_id()
    }
    /// Whether records sealed under `(backend, kek_id)` are this custodian's to unwrap.
    fn holds(&self, backend: &str, kek_id: &str) -> bool {
        backend == self.backend() && kek_id == self.key_id()
    }
    /// Whether a record this custodian holds is wrapped under its newest key (a KEK rotation
    /// rewraps those that are not).
    fn is_current(&self, kek_id: &str) -> bool {
        kek_id == self.key_id()
    }
    /// Where the custodian lives (region and endpoint, Vault address and namespace), so that two
    /// wrappers can tell whether a server-side rewrap between them is possible.
    fn location(&self) -> String {
        String::new()
    }
    /// A fresh data key and its wrapped form, bound to `ctx`.
    async fn generate_data_key(&self, ctx: &SealContext)
    -> Result<(Key256, WrappedKey), SealError>;
    /// Recovers a data key; fails if `ctx` differs from the one it was wrapped with.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError>;
    /// Wraps an existing data key under this custodian's key (a migration from another one).
    async fn wrap_data_key(&self, dek: &Key256, ctx: &SealContext)
    -> Result<WrappedKey, SealError>;

    /// A fresh data key, wrapped, with the KEK that wrapped it. A keyring overrides this so that
    /// the KEK recorded is the one that actually wrapped the key.
    async fn generate(&self, ctx: &SealContext) -> Result<(Key256, Wrapped), SealError> {
        let (dek, key) = self.generate_data_key(ctx).await?;
        let kek_id = self.kek_id_of(&key);
        Ok((
            dek,
            Wrapped {
                key,
                backend: self.backend(),
                kek_id,
            },
        ))
    }

    /// Recovers the data key of a stored record, refusing records this custodian does not hold.
    async fn unwrap_record(
        &self,
        record: &SealedRecord,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        if !self.holds(&record.backend, &record.kek_id) {
            return Err(SealError::NoCustodian {
                backend: record.backend.clone(),
                kek_id: record.kek_id.clone(),
            });
        }
        self.unwrap_data_key(&record.wrapped_key, ctx).await
    }

    /// Re-wraps, inside the custodian, a data key that `source` wrapped, so that its plaintext
    /// never leaves the custodian (Vault `rewrap`, KMS `ReEncrypt`). `None` when this custodian
    /// cannot do that for `source`; the caller then unwraps and wraps.
    async fn rewrap_from(
        &self,
        _source: &dyn KeyWrapper,
        _record: &SealedRecord,
        _ctx: &SealContext,
    ) -> Option<Result<WrappedKey, SealError>> {
        None
    }

    /// Creates a new version of this custodian's key in place (Vault transit `rotate`). `None`
    /// where a rotation means moving to another key instead.
    async fn rotate_key_version(&self) -> Option<Result<(), SealError>> {
        None
    }

    /// The start-up and health check: a wrap and unwrap round trip, which also proves that the
    /// custodian enforces the context (a wrapped key does not unwrap under another record).
    async fn check(&self) -> Result<(), SealError> {
        check_round_trip(self).await
    }
}

/// The context of the round trip that [`KeyWrapper::check`] makes; never a real record's.
pub fn probe_context() -> SealContext {
    SealContext {
        record_id: "keyd/custody-probe".into(),
        purpose: Cow::Borrowed("custody-probe"),
        version: 1,
    }
}

/// Wraps and unwraps a fresh data key under [`probe_context`] (the periodic health probe).
pub async fn round_trip<W: KeyWrapper + ?Sized>(w: &W) -> Result<(), SealError> {
    round_trip_keeping(w).await.map(drop)
}

async fn round_trip_keeping<W: KeyWrapper + ?Sized>(w: &W) -> Result<WrappedKey, SealError> {
    let ctx = probe_context();
    let (dek, wrapped) = w.generate_data_key(&ctx).await?;
    let back = w.unwrap_data_key(&wrapped, &ctx).await?;
    if !keyd_proto::constant_time_eq(dek.expose(), back.expose()) {
        return Err(SealError::Custodian {
            backend: w.backend(),
            key_id: w.key_id(),
            op: "unwrap",
            kind: FailureKind::Misconfigured,
            detail: "the unwrapped data key differs from the one generated".into(),
        });
    }
    Ok(wrapped)
}

/// [`round_trip`], then checks that the wrapped key does not unwrap under another context (the
/// start-up check, and the check of a new custodian before a migration).
pub async fn check_round_trip<W: KeyWrapper + ?Sized>(w: &W) -> Result<(), SealError> {
    let wrapped = round_trip_keeping(w).await?;
    let ctx = probe_context();
    let other = SealContext {
        record_id: "keyd/custody-probe-other".into(),
        ..ctx
    };
    match w.unwrap_data_key(&wrapped, &other).await {
        Err(e) if e.kind() == Some(FailureKind::ContextMismatch) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(SealError::Custodian {
            backend: w.backend(),
            key_id: w.key_id(),
            op: "unwrap",
            kind: FailureKind::Misconfigured,
            detail: "a data key wrapped for one record unwrapped under another record's context: \
                     the custodian ignores the context (a Vault transit key must be created with \
                     derived=true)"
                .into(),
        }),
    }
}

/// A record as stored: nothing in it is readable without the KEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRecord {
    pub backend: String,
    pub kek_id: String,
    pub purpose: String,
    pub version: u64,
    pub wrapped_key: WrappedKey,
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
}

impl SealedRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data (strings, numbers, byte vectors) to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        serde_json::from_slice(bytes).map_err(|e| SealError::Corrupt(e.to_string()))
    }
}

/// Seals `plaintext` under a fresh data key.
pub async fn seal(
    wrapper: &dyn KeyWrapper,
    ctx: &SealContext,
    plaintext: &[u8],
) -> Result<SealedRecord, SealError> {
    let (dek, wrapped) = wrapper.generate(ctx).await?;
    let (nonce, ciphertext) = aead_encrypt(&dek, &ctx.aad(), plaintext)?;
    Ok(SealedRecord {
        backend: wrapped.backend.to_owned(),
        kek_id: wrapped.kek_id,
        purpose: ctx.purpose.to_string(),
        version: ctx.version,
        wrapped_key: wrapped.key,
        nonce,
        ciphertext,
    })
}

/// Opens a sealed record; the result is zeroized when dropped.
pub async fn open(
    wrapper: &dyn KeyWrapper,
    ctx: &SealContext,
    record: &SealedRecord,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if record.purpose != ctx.purpose || record.version != ctx.version {
        return Err(SealError::ContextMismatch {
            record_id: ctx.record_id.clone(),
        });
    }
    let dek = wrapper.unwrap_record(record, ctx).await?;
    open_with(&dek, ctx, record)
}

/// Opens a record with its data key already unwrapped. A rewrap uses it to prove that a newly
/// wrapped data key is the record's: AES-GCM authenticates the ciphertext under it.
pub fn open_with(
    dek: &Key256,
    ctx: &SealContext,
    record: &SealedRecord,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if record.purpose != ctx.purpose || record.version != ctx.version {
        return Err(SealError::ContextMismatch {
            record_id: ctx.record_id.clone(),
        });
    }
    aead_decrypt(dek, &ctx.aad(), &record.nonce, &record.ciphertext).map_err(|_| {
        SealError::ContextMismatch {
            record_id: ctx.record_id.clone(),
        }
    })
}

fn aead_encrypt(
    key: &Key256,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), SealError> {
    let cipher = Aes256Gcm::new(key.expose().into());
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SealError::Encrypt)?;
    Ok((nonce.to_vec(), ct))
}

fn aead_decrypt(
    key: &Key256,
    aad: &[u8],
    nonce: &[u8],
    ct: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| SealError::Corrupt("nonce length".into()))?;
    let cipher = Aes256Gcm::new(key.expose().into());
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| SealError::Decrypt)
}

/// The embedded default custodian: a 256-bit KEK in a 0600 file in the data directory.
pub struct LocalKek {
    kek: Key256,
    id: String,
    path: PathBuf,
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek")
            .field("id", &self.id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl LocalKek {
    /// Loads the KEK at `path`, creating it (mode 0600, written atomically) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let kek = match std::fs::read(path) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                let raw = Zeroizing::new(STANDARD.decode(text.trim_ascii()).map_err(|_| {
                    SealError::KekFile {
                        path: path.to_owned(),
                        why: "not base64".into(),
                    }
                })?);
                Key256::from_slice(&raw).ok_or_else(|| SealError::KekFile {
                    path: path.to_owned(),
                    why: format!("holds {} bytes, expected 32", raw.len()),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kek = Key256::random()?;
                let encoded = Zeroizing::new(STANDARD.encode(kek.expose()) + "\n");
                crate::fsutil::write_private(path, encoded.as_bytes()).map_err(|source| {
                    SealError::KekFileWrite {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                tracing::info!(path = %path.display(), "created a new local key-encryption key");
                kek
            }
            Err(e) => {
                return Err(SealError::KekFile {
                    path: path.to_owned(),
                    why: e.to_string(),
                });
            }
        };
        crate::fsutil::check_private(path).map_err(|why| SealError::KekFile {
            path: path.to_owned(),
            why,
        })?;
        Ok(Self::from_key(kek, path.to_owned()))
    }

    pub fn from_key(kek: Key256, path: PathBuf) -> Self {
        // The id is a fingerprint: a hash under a fixed label, which reveals nothing of the key.
        let digest = Sha256::new_with_prefix(b"keyd local kek id v1\0")
            .chain_update(kek.expose())
            .finalize();
        let id = format!("local:{}", hex::encode(&digest[..8]));
        Self { kek, id, path }
    }
}

#[async_trait]
impl KeyWrapper for LocalKek {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn key_id(&self) -> String {
        self.id.clone()
    }

    async fn generate_data_key(
        &self,
        ctx: &SealContext,
    ) -> Result<(Key256, WrappedKey), SealError> {
        let dek = Key256::random()?;
        let wrapped = self.wrap_data_key(&dek, ctx).await?;
        Ok((dek, wrapped))
    }

    async fn wrap_data_key(
        &self,
        dek: &Key256,
        ctx: &SealContext,
    ) -> Result<WrappedKey, SealError> {
        let (nonce, mut ct) = aead_encrypt(&self.kek, &ctx.aad(), dek.expose())?;
        let mut wrapped = nonce;
        wrapped.append(&mut ct);
        Ok(WrappedKey(wrapped))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        if wrapped.0.len() < NONCE_LEN {
            return Err(SealError::Corrupt("wrapped data key too short".into()));
        }
        let (nonce, ct) = wrapped.0.split_at(NONCE_LEN);
        let dek =
            aead_decrypt(&self.kek, &ctx.aad(), nonce, ct).map_err(|_| SealError::Unwrap {
                backend: "local",
                key_id: self.id.clone(),
                why: "authentication failed: wrong KEK or the record was moved or altered".into(),
            })?;
        Key256::from_slice(&dek).ok_or_else(|| SealError::Corrupt("data key length".into()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error("encryption failed")]
    Encrypt,
    #[error("decryption failed: the ciphertext or its associated data was altered")]
    Decrypt,
    #[error("sealed record {record_id:?} does not belong at this id, purpose and version")]
    ContextMismatch { record_id: String },
    #[error("sealed record is corrupt: {0}")]
    Corrupt(String),
    #[error("{backend} KEK {key_id}: cannot unwrap data key: {why}")]
    Unwrap {
        backend: &'static str,
        key_id: String,
        why: String,
    },
    #[error("local KEK file {path}: {why}")]
    KekFile { path: PathBuf, why: String },
    /// A new local KEK file could not be written (nothing is left behind: the write is atomic).
    #[error("cannot write the new local KEK file {path}")]
    KekFileWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A remote custodian refused or failed a call; `kind` says which way.
    #[error("{backend} key {key_id}: {op} failed: {kind}: {detail}")]
    Custodian {
        backend: &'static str,
        key_id: String,
        /// The custodian call, e.g. `GenerateDataKey` or `transit/decrypt`.
        op: &'static str,
        kind: FailureKind,
        detail: String,
    },
    #[error(
        "record is sealed under {backend} KEK {kek_id}, which no configured custodian holds: \
         keep that custodian configured until a KEK migration has moved every record off it"
    )]
    NoCustodian { backend: String, kek_id: String },
}

impl SealError {
    /// How a custodian failure should be handled; `None` for errors that are not about the
    /// custodian (randomness, corrupt records).
    /// The filesystem had no space (ENOSPC or a quota) for a file keyd writes.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SealError::KekFileWrite { source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ))
    }

    pub fn kind(&self) -> Option<FailureKind> {
        match self {
            SealError::Custodian { kind, .. } => Some(*kind),
            SealError::Unwrap { .. } | SealError::ContextMismatch { .. } => {
                Some(FailureKind::ContextMismatch)
            }
            SealError::NoCustodian { .. } => Some(FailureKind::KeyNotFound),
            SealError::KekFile { .. } | SealError::KekFileWrite { .. } => {
                Some(FailureKind::KeyNotFound)
            }
            _ => None,
        }
    }
}

/// Why a custodian call failed. Each kind has its own remedy, and only some of them mean the
/// custodian as a whole cannot be used ([`FailureKind::is_custodian_down`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Unreachable, timed out, throttled, a server error, a sealed Vault. Transient: keyd
    /// retries, and serves the keys it holds meanwhile.
    Unavailable,
    /// The credentials are refused, expired, or lack a permission on the key.
    PermissionDenied,
    /// The key, key version or mount does not exist (a wrong key id).
    KeyNotFound,
    /// The key is disabled, pending deletion, or the key version is below
    /// `min_decryption_version`.
    KeyDisabled,
    /// The wrapped key does not belong to this context: it was moved from another record,
    /// altered, or wrapped by another key.
    ContextMismatch,
    /// The custodian is set up in a way keyd cannot rely on (a check caught it).
    Misconfigured,
    /// The custodian refused the request for another reason.
    Rejected,
}

impl FailureKind {
    /// Stable name, for status, metrics labels and API error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Unavailable => "unavailable",
            FailureKind::PermissionDenied => "permission_denied",
            FailureKind::KeyNotFound => "key_not_found",
            FailureKind::KeyDisabled => "key_disabled",
            FailureKind::ContextMismatch => "context_mismatch",
            FailureKind::Misconfigured => "misconfigured",
            FailureKind::Rejected => "rejected",
        }
    }

    /// Whether the failure is about the custodian rather than one record: keyd then treats the
    /// custodian as unavailable (fails fast, probes until it answers, serves held keys for
    /// `kek.max_unavailable`).
    pub fn is_custodian_down(self) -> bool {
        matches!(
            self,
            FailureKind::Unavailable
                | FailureKind::PermissionDenied
                | FailureKind::KeyNotFound
                | FailureKind::KeyDisabled
                | FailureKind::Misconfigured
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Unavailable => "custodian unavailable (retried; check the network path and the server)",
            FailureKind::PermissionDenied => "permission denied (the credentials are refused or lack a permission on this key)",
            FailureKind::KeyNotFound => "key not found (check the configured key id, mount and region)",
            FailureKind::KeyDisabled => "key disabled (the key or key version is disabled, pending deletion, or below min_decryption_version)",
            FailureKind::ContextMismatch => "wrong encryption context (the wrapped key belongs to another record, or was altered)",
            FailureKind::Misconfigured => "custodian misconfigured",
            FailureKind::Rejected => "request rejected",
        })
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <&str>::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> LocalKek {
        LocalKek::from_key(Key256::random().unwrap(), PathBuf::from("/nonexistent"))
    }

    fn ctx(id: &str, version: u64) -> SealContext {
        SealContext {
            record_id: id.into(),
            purpose: "ipsec-psk".into(),
            version,
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let w = kek();
        let sealed = seal(&w, &ctx("ipsec/1", 1), b"secret material")
            .await
            .unwrap();
        assert!(!sealed.to_bytes().windows(6).any(|x| x == b"secret"));
        let back = SealedRecord::from_bytes(&sealed.to_bytes()).unwrap();
        assert_eq!(
            &open(&w, &ctx("ipsec/1", 1), &back).await.unwrap()[..],
            b"secret material"
        );
    }

    #[tokio::test]
    async fn a_record_cannot_be_swapped_for_another() {
        let w = kek();
        let a = seal(&w, &ctx("ipsec/1", 1), b"a").await.unwrap();
        let b = seal(&w, &ctx("ipsec/2", 1), b"b").await.unwrap();
        // The whole record under another id, another version, another purpose.
        assert!(open(&w, &ctx("ipsec/2", 1), &a).await.is_err());
        assert!(open(&w, &ctx("ipsec/1", 2), &a).await.is_err());
        let other_purpose = SealContext {
            purpose: "wireguard-master".into(),
            ..ctx("ipsec/1", 1)
        };
        assert!(open(&w, &other_purpose, &a).await.is_err());
        // Only the wrapped key moved: the data key does not unwrap under a's context.
        let mut spliced = a.clone();
        spliced.wrapped_key = b.wrapped_key.clone();
        assert!(matches!(
            open(&w, &ctx("ipsec/1", 1), &spliced).await,
            Err(SealError::Unwrap { .. })
        ));
        // A flipped ciphertext bit.
        let mut flipped = a.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(open(&w, &ctx("ipsec/1", 1), &flipped).await.is_err());
    }

    #[tokio::test]
    async fn another_kek_cannot_open() {
        let a = kek();
        let sealed = seal(&a, &ctx("x", 1), b"x").await.unwrap();
        // The record names its KEK, so the refusal says which one is missing.
        let err = open(&kek(), &ctx("x", 1), &sealed).await.unwrap_err();
        assert_eq!(err.kind(), Some(FailureKind::KeyNotFound));
        assert!(err.to_string().contains(&a.key_id()), "{err}");
        // A record relabelled with the other KEK's id still does not open under it.
        let b = kek();
        let mut relabelled = sealed.clone();
        relabelled.kek_id = b.key_id();
        let err = open(&b, &ctx("x", 1), &relabelled).await.unwrap_err();
        assert!(err.to_string().contains("cannot unwrap"), "{err}");
        assert_eq!(err.kind(), Some(FailureKind::ContextMismatch));
    }

    #[tokio::test]
    async fn local_kek_passes_the_round_trip_check_and_rewraps() {
        let a = kek();
        a.check().await.unwrap();
        let (dek, wrapped) = a.generate_data_key(&ctx("r", 1)).await.unwrap();
        let b = kek();
        let moved = b
            .wrap_data_key(
                &a.unwrap_data_key(&wrapped, &ctx("r", 1)).await.unwrap(),
                &ctx("r", 1),
            )
            .await
            .unwrap();
        assert_eq!(
            b.unwrap_data_key(&moved, &ctx("r", 1))
                .await
                .unwrap()
                .expose(),
            dek.expose()
        );
    }

    #[test]
    fn kek_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.key");
        let a = LocalKek::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = LocalKek::load_or_create(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert!(!format!("{a:?}").contains(&STANDARD.encode(a.kek.expose())));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalKek::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("0644"), "{err}");
    }
}
