//! The AWS KMS custodian (aws-sdk-kms): data keys from `GenerateDataKey`, unwrapped with
//! `Decrypt`, existing data keys wrapped with `Encrypt` (a migration to KMS), and moved between
//! KMS keys with `ReEncrypt` so that the plaintext stays inside KMS.
//!
//! Every call carries the record's [`SealContext::pairs`] as the KMS *encryption context*: KMS
//! authenticates it, so a wrapped key moved to another record does not decrypt, and CloudTrail
//! shows which record each `Decrypt` was for. Credentials come from the AWS default chain
//! (environment, shared files, web identity for IRSA, container and instance credentials), or
//! from the profile and files the spec names; `endpoint` points at a KMS-compatible server.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;

use async_trait::async_trait;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use keyd_proto::kek::AwsKmsSpec;
use zeroize::Zeroizing;

use super::spec::CustodySettings;
use crate::seal::{
    FailureKind, Key256, KeyWrapper, SealContext, SealError, SealedRecord, WrappedKey,
};

const BACKEND: &str = "aws-kms";

pub struct AwsKms {
    client: aws_sdk_kms::Client,
    /// As configured: an ARN, key id or alias.
    configured: String,
    /// The key ARN, learnt from KMS's first answer; records name it.
    arn: RwLock<Option<String>>,
    region: String,
    endpoint: Option<String>,
    profile: Option<String>,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("key_id", &self.key_id())
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl AwsKms {
    /// Loads the AWS configuration (no call to KMS yet).
    pub async fn connect(spec: &AwsKmsSpec, settings: &CustodySettings) -> Result<Self, SealError> {
        use aws_config::retry::RetryConfig;
        use aws_config::timeout::TimeoutConfig;

        let misconfigured = |detail: String| SealError::Custodian {
            backend: BACKEND,
            key_id: spec.key_id.clone(),
            op: "load AWS configuration",
            kind: FailureKind::Misconfigured,
            detail,
        };
        let arn_region = spec
            .key_id
            .strip_prefix("arn:")
            .and_then(|r| r.split(':').nth(2))
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.call_timeout.min(std::time::Duration::from_secs(3)))
                    .operation_attempt_timeout(settings.call_timeout)
                    .operation_timeout(settings.call_timeout * 2)
                    .build(),
            )
            // One retry: an outage must be noticed within a bounded time, and keyd's own health
            // checks do the longer retrying.
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(region) = spec.region.clone().or(arn_region) {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(ep) = &spec.endpoint {
            loader = loader.endpoint_url(ep.clone());
        }
        if spec.credentials_file.is_some() || spec.config_file.is_some() {
            loader = loader.profile_files(profile_files(spec));
        }
        if let Some(p) = &spec.profile {
            loader = loader.profile_name(p.clone());
        }
        let conf = loader.load().await;
        let region = conf.region().map(|r| r.to_string()).ok_or_else(|| {
            misconfigured(
                "no AWS region: set kek.aws_kms.region, use a key ARN, or set AWS_REGION".into(),
            )
        })?;
        Ok(Self {
            client: aws_sdk_kms::Client::new(&conf),
            configured: spec.key_id.clone(),
            arn: RwLock::new(
                spec.key_id
                    .starts_with("arn:")
                    .then(|| spec.key_id.clone())
                    .filter(|a| a.contains(":key/")),
            ),
            region,
            endpoint: spec.endpoint.clone(),
            profile: spec.profile.clone(),
        })
    }

    fn learn_arn(&self, arn: Option<&str>) {
        if let Some(arn) = arn.filter(|a| a.starts_with("arn:")) {
            let mut cur = self.arn.write().unwrap_or_else(|p| p.into_inner());
            if cur.as_deref() != Some(arn) {
                *cur = Some(arn.to_owned());
            }
        }
    }

    fn context(ctx: &SealContext) -> HashMap<String, String> {
        ctx.pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    fn fail<E>(&self, op: &'static str, e: &SdkError<E, HttpResponse>) -> SealError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (kind, detail) = classify(e);
        SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind,
            detail,
        }
    }

    fn bad_answer(&self, op: &'static str, what: &str) -> SealError {
        SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind: FailureKind::Rejected,
            detail: format!("KMS answered without {what}"),
        }
    }

    fn data_key(&self, op: &'static str, blob: Option<Blob>) -> Result<Key256, SealError> {
        let bytes = Zeroizing::new(
            blob.ok_or_else(|| self.bad_answer(op, "a plaintext data key"))?
                .into_inner(),
        );
        Key256::from_slice(&bytes).ok_or_else(|| SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind: FailureKind::Rejected,
            detail: format!("KMS returned a {}-byte data key, expected 32", bytes.len()),
        })
    }
}

#[expect(
    deprecated,
    reason = "aws-config takes these aliases; their replacement lives in aws-runtime, which keyd does not depend on"
)]
fn profile_files(spec: &AwsKmsSpec) -> aws_config::profile::profile_file::ProfileFiles {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    let mut b = ProfileFiles::builder();
    match &spec.credentials_file {
        Some(p) => b = b.with_file(ProfileFileKind::Credentials, p),
        None => b = b.include_default_credentials_file(true),
    }
    match &spec.config_file {
        Some(p) => b = b.with_file(ProfileFileKind::Config, p),
        None => b = b.include_default_config_file(true),
    }
    b.build()
}

/// Maps a KMS failure to its kind. KMS's error codes are documented per operation; anything
/// that never reached KMS or got no answer is `Unavailable`.
fn classify<E>(e: &SdkError<E, HttpResponse>) -> (FailureKind, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = DisplayErrorContext(e).to_string();
    let kind = match e {
        SdkError::ServiceError(se) => match se.err().code().unwrap_or_default() {
            "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "SignatureDoesNotMatch"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken" => FailureKind::PermissionDenied,
            "NotFoundException" | "IncorrectKeyException" | "InvalidKeyUsageException" => {
                FailureKind::KeyNotFound
            }
            "InvalidCiphertextException" => FailureKind::ContextMismatch,
            "DisabledException" | "KMSInvalidStateException" => FailureKind::KeyDisabled,
            "KeyUnavailableException"
            | "DependencyTimeoutException"
            | "KMSInternalException"
            | "ThrottlingException"
            | "LimitExceededException"
            | "ServiceUnavailableException"
            | "InternalFailure" => FailureKind::Unavailable,
            // An error KMS does not document, e.g. from a proxy or a KMS-compatible server.
            _ => match se.raw().status().as_u16() {
                401 | 403 => FailureKind::PermissionDenied,
                404 => FailureKind::KeyNotFound,
                429 | 500..=599 => FailureKind::Unavailable,
                _ => FailureKind::Rejected,
            },
        },
        _ if detail.to_ascii_lowercase().contains("credentials") => FailureKind::PermissionDenied,
        SdkError::ConstructionFailure(_) => FailureKind::Rejected,
        _ => FailureKind::Unavailable,
    };
    (kind, detail)
}

#[async_trait]
impl KeyWrapper for AwsKms {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn key_id(&self) -> String {
        self.arn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| self.configured.clone())
    }

    fn holds(&self, backend: &str, kek_id: &str) -> bool {
        backend == BACKEND && (kek_id == self.key_id() || kek_id == self.configured)
    }

    fn is_current(&self, kek_id: &str) -> bool {
        kek_id == self.key_id()
    }

    fn location(&self) -> String {
        format!(
            "{}|{}|{}",
            self.region,
            self.endpoint.as_deref().unwrap_or(""),
            self.profile.as_deref().unwrap_or("")
        )
    }

    async fn generate_data_key(
        &self,
        ctx: &SealContext,
    ) -> Result<(Key256, WrappedKey), SealError> {
        const OP: &str = "GenerateDataKey";
        let out = self
            .client
            .generate_data_key()
            .key_id(self.key_id())
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail(OP, &e))?;
        self.learn_arn(out.key_id.as_deref());
        let wrapped = out
            .ciphertext_blob
            .ok_or_else(|| self.bad_answer(OP, "a ciphertext blob"))?
            .into_inner();
        Ok((self.data_key(OP, out.plaintext)?, WrappedKey(wrapped)))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        const OP: &str = "Decrypt";
        let out = self
            .client
            .decrypt()
            .key_id(self.key_id())
            .ciphertext_blob(Blob::new(wrapped.0.clone()))
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail(OP, &e))?;
        self.data_key(OP, out.plaintext)
    }

    async fn wrap_data_key(
        &self,
        dek: &Key256,
        ctx: &SealContext,
    ) -> Result<WrappedKey, SealError> {
        const OP: &str = "Encrypt";
        let out = self
            .client
            .encrypt()
            .key_id(self.key_id())
            .plaintext(Blob::new(dek.expose().to_vec()))
            .set_encryption_context(Some(Self::context(ctx)))
            .send()
            .await
            .map_err(|e| self.fail(OP, &e))?;
        self.learn_arn(out.key_id.as_deref());
        Ok(WrappedKey(
            out.ciphertext_blob
                .ok_or_else(|| self.bad_answer(OP, "a ciphertext blob"))?
                .into_inner(),
        ))
    }

    /// `ReEncrypt` from another KMS key reachable the same way (same region, endpoint and
    /// credentials). Without `kms:ReEncrypt*` permissions, `None`: keyd then decrypts and
    /// encrypts, which needs only `kms:Decrypt` on the old key and `kms:Encrypt` on the new.
    async fn rewrap_from(
        &self,
        source: &dyn KeyWrapper,
        record: &SealedRecord,
        ctx: &SealContext,
    ) -> Option<Result<WrappedKey, SealError>> {
        const OP: &str = "ReEncrypt";
        if source.backend() != BACKEND || source.location() != self.location() {
            return None;
        }
        let context = Self::context(ctx);
        let result = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(record.wrapped_key.0.clone()))
            .source_key_id(record.kek_id.clone())
            .set_source_encryption_context(Some(context.clone()))
            .destination_key_id(self.key_id())
            .set_destination_encryption_context(Some(context))
            .send()
            .await;
        match result {
            Ok(out) => Some(
                out.ciphertext_blob
                    .map(|b| WrappedKey(b.into_inner()))
                    .ok_or_else(|| self.bad_answer(OP, "a ciphertext blob")),
            ),
            Err(e) => {
                let err = self.fail(OP, &e);
                if err.kind() == Some(FailureKind::PermissionDenied) {
                    tracing::info!(error = %err, "ReEncrypt refused; rewrapping with Decrypt and Encrypt instead");
                    None
                } else {
                    Some(Err(err))
                }
            }
        }
    }
}
