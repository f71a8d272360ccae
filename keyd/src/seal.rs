//! Envelope encryption of key records.
//!
//! Every record is encrypted under its own fresh 256-bit data key (AES-256-GCM); the data key is
//! wrapped by a key-encryption key held by a [`KeyWrapper`] (the local KEK file here; AWS KMS
//! and Vault transit implement the same trait). Both layers authenticate the [`SealContext`]
//! (record id, purpose, version) as associated data, so a sealed record copied over another
//! record's slot, or a wrapped data key moved between records, fails to open.

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
    pub purpose: &'static str,
    pub version: u64,
}

impl SealContext {
    /// The first version of a record. Records are immutable, so every record keyd writes today
    /// is version 1; the field exists so that a record rewritten in place would change its AAD.
    pub fn new(record_id: String, purpose: &'static str) -> Self {
        Self {
            record_id,
            purpose,
            version: 1,
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
            ("keyd:purpose", self.purpose.to_owned()),
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

/// The custodian of the key-encryption key.
#[async_trait]
pub trait KeyWrapper: Send + Sync + fmt::Debug + 'static {
    /// Short backend name for status and records, e.g. `local`.
    fn backend(&self) -> &'static str;
    /// Identifies the wrapping key (a fingerprint, a KMS key ARN, a Vault key name), never secret.
    fn key_id(&self) -> String;
    /// A fresh data key and its wrapped form, bound to `ctx`.
    async fn generate_data_key(&self, ctx: &SealContext)
    -> Result<(Key256, WrappedKey), SealError>;
    /// Recovers a data key; fails if `ctx` differs from the one it was wrapped with.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError>;
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
    let (dek, wrapped_key) = wrapper.generate_data_key(ctx).await?;
    let (nonce, ciphertext) = aead_encrypt(&dek, &ctx.aad(), plaintext)?;
    Ok(SealedRecord {
        backend: wrapper.backend().to_owned(),
        kek_id: wrapper.key_id(),
        purpose: ctx.purpose.to_owned(),
        version: ctx.version,
        wrapped_key,
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
    let dek = wrapper.unwrap_data_key(&record.wrapped_key, ctx).await?;
    aead_decrypt(&dek, &ctx.aad(), &record.nonce, &record.ciphertext).map_err(|_| {
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
                crate::fsutil::write_private(path, encoded.as_bytes()).map_err(|e| {
                    SealError::KekFile {
                        path: path.to_owned(),
                        why: e.to_string(),
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
        let (nonce, mut ct) = aead_encrypt(&self.kek, &ctx.aad(), dek.expose())?;
        let mut wrapped = nonce;
        wrapped.append(&mut ct);
        Ok((dek, WrappedKey(wrapped)))
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
            purpose: "ipsec-psk",
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
            purpose: "wireguard-master",
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
        let sealed = seal(&kek(), &ctx("x", 1), b"x").await.unwrap();
        let err = open(&kek(), &ctx("x", 1), &sealed).await.unwrap_err();
        assert!(err.to_string().contains("cannot unwrap"), "{err}");
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
