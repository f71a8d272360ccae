//! The evidence report: what a compliance team hands an auditor (`keyctl report --format
//! html|pdf|json`).
//!
//! keyd builds it from its own audit log and state, in one pass over the records
//! ([`collect::Collector`], memory bounded by keys, namespaces and listed exceptions, never by
//! the record count), renders it ([`html`]; a PDF is that HTML printed by headless Chromium,
//! [`pdf`]) and signs the exact bytes with the audit log's ed25519 key: a detached
//! [`ReportSignature`] that `keyctl audit verify-report` checks offline. keyd signs only what it
//! rendered itself, so the signature is no oracle for arbitrary documents, and every report it
//! hands out is audited (`report.generated`, with the file's digest).

pub mod collect;
pub mod html;
pub mod judge;
pub mod pdf;
pub mod svg;

use std::collections::BTreeMap;

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::rules::PolicyDataplane;
use keyd_proto::{Bounds, ClassReport, KeyClass, Schedule, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The JSON report's `format`.
pub const FORMAT: &str = "keyd-evidence-report-v1";
/// A detached signature's `format`.
pub const SIGNATURE_FORMAT: &str = "keyd-report-signature-v1";

/// How the report is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    Json,
    Html,
    Pdf,
}

impl ReportFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "html" => Some(Self::Html),
            "pdf" => Some(Self::Pdf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Html => "html",
            Self::Pdf => "pdf",
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Html => "text/html; charset=utf-8",
            Self::Pdf => "application/pdf",
        }
    }
}

/// The whole report; the JSON format is this, and HTML and PDF show the same numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceReport {
    pub format: String,
    pub generated_at: Timestamp,
    /// Who asked for it (the admin certificate's identity).
    pub generated_by: String,
    pub since: Timestamp,
    pub until: Timestamp,
    /// Every class and every policy compliant over the period.
    pub compliant: bool,
    /// Why not, one line per finding (empty when compliant).
    pub findings: Vec<String>,
    pub classes: Vec<ClassEvidence>,
    pub policies: Vec<PolicyEvidence>,
    pub custody: CustodyEvidence,
    pub admission: AdmissionEvidence,
    pub dataplane: DataplaneEvidence,
    pub integrity: IntegrityEvidence,
}

/// One key class over the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassEvidence {
    pub class: KeyClass,
    pub compliant: bool,
    pub reasons: Vec<String>,
    /// The schedule and bounds in force at the end of the period.
    pub schedule: Schedule,
    pub bounds: Bounds,
    /// A key may be in use this long before it counts as overdue: the period, the overlap and
    /// a rollout's allowed wait (as `keyctl report` counts it), plus the wait for the
    /// maintenance window's next opening when the schedule has one.
    pub overdue_after_secs: u64,
    /// Keys in use at some time in the period, oldest first.
    pub keys: Vec<KeyLife>,
    /// Rotations that took effect in the period, and how many of them came in time.
    pub rotations: u64,
    pub rotations_on_schedule: u64,
    pub rotations_late: u64,
    /// Seconds in the period during which a key in use was overdue, or beyond the bounds.
    pub overdue_secs: u64,
    pub beyond_bounds_secs: u64,
    /// Schedule changes, pauses and resumptions in the period.
    pub schedule_changes: Vec<ScheduleChange>,
    /// IPsec rollouts that ran in the period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<Rollout>,
    /// keyd's own view at the report's end, when the period ends now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<ClassReport>,
}

/// One key's life, as the audit log tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLife {
    /// `SPI 3`, `epoch 7`, a KEK's description.
    pub label: String,
    pub created: Option<Timestamp>,
    /// IPsec: handed to nodes for inbound before it was used.
    pub staged: Option<Timestamp>,
    /// Began protecting traffic (`None`: before the audit log's first record).
    pub active_from: Option<Timestamp>,
    /// A newer key took over.
    pub superseded: Option<Timestamp>,
    /// Left the nodes (IPsec) or the store.
    pub retired: Option<Timestamp>,
    /// Past its schedule from here (while still the key in use).
    pub overdue_from: Option<Timestamp>,
    /// Past the class's `max_period` bound from here.
    pub beyond_bounds_from: Option<Timestamp>,
    /// Replaced within its schedule (`None` while it is the key in use).
    pub on_schedule: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleChange {
    pub at: Timestamp,
    pub action: String,
    pub actor: String,
    pub period_secs: Option<u64>,
    pub paused: Option<bool>,
}

/// An IPsec rollout: staged on every node, then made outbound, then the old key retired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub from_spi: Option<u8>,
    pub to_spi: u8,
    pub staged: Timestamp,
    pub activated: Option<Timestamp>,
    pub retired: Option<Timestamp>,
    /// Seconds from staged to activated (every node held the new key inbound).
    pub stage_wait_secs: Option<u64>,
    /// Seconds from activated to retired (every node sent with it, and the overlap passed).
    pub activate_wait_secs: Option<u64>,
    /// Stuck alarms: which phase waited for which nodes.
    pub stuck: Vec<RolloutStuck>,
    /// Nodes an admin told keyd to stop waiting for.
    pub skipped: Vec<SkippedNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStuck {
    pub at: Timestamp,
    pub phase: String,
    pub waiting_for: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedNode {
    pub at: Timestamp,
    pub node: String,
    pub by: String,
}

/// One EncryptionPolicy over the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEvidence {
    pub name: String,
    pub compliant: bool,
    pub reasons: Vec<String>,
    /// Admission decisions naming the policy, by outcome.
    pub admissions: BTreeMap<String, u64>,
    /// Packets and bytes strict mode dropped rather than send in the clear (period).
    pub strict_drop_packets: u64,
    pub strict_drop_bytes: u64,
    /// The nodes' latest counters (cumulative), when nodes report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<PolicyDataplane>,
    /// keyd refused to compile it (why), at the report's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// The key-encryption key's custody over the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyEvidence {
    pub backend: String,
    pub key_id: String,
    /// `ok`, or why the custodian cannot be used now.
    pub health_now: String,
    /// Initialisation, rotations and migrations.
    pub events: Vec<CustodyEvent>,
    /// Times the custodian could not be used and keyd served the keys it held.
    pub outages: Vec<Outage>,
    /// Seconds of outage inside the period.
    pub outage_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyEvent {
    pub at: Timestamp,
    pub action: String,
    pub actor: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    pub from: Timestamp,
    /// `None`: still down at the report's end.
    pub to: Option<Timestamp>,
    pub secs: u64,
    pub backend: String,
    pub reason: String,
}

/// The webhook's admission decisions over the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionEvidence {
    pub totals: BTreeMap<String, u64>,
    pub by_namespace: Vec<NamespaceAdmissions>,
    /// Namespaces past the listed ones, summed.
    pub other_namespaces: BTreeMap<String, u64>,
    /// Decisions per outcome over time, in buckets of `bucket_secs` from `since`.
    pub bucket_secs: u64,
    pub buckets: Vec<BTreeMap<String, u64>>,
    /// Break-glass, warn-mode and audit-mode admissions: who, what and why.
    pub exceptions: Vec<AdmissionException>,
    /// Exceptions in the period (more than listed when the list is full).
    pub exceptions_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceAdmissions {
    pub namespace: String,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionException {
    pub at: Timestamp,
    pub outcome: String,
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub user: String,
    pub reason: String,
    pub policies: Vec<String>,
}

/// What the nodes' data planes reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneEvidence {
    /// False when no node reports counters; `note` says why the section is empty.
    pub available: bool,
    pub note: String,
    pub nodes_reporting: u64,
    /// Strict-mode drops reported in the period, per node.
    pub strict_drops_by_node: BTreeMap<String, u64>,
}

/// The audit log behind the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrityEvidence {
    /// The records inside the period.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub records_in_period: u64,
    /// Records read and verified (from the log's start, for the keys' history).
    pub records_verified: u64,
    /// Every record's hash and link checked out, and the checkpoints' signatures.
    pub chain_verified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<String>,
    pub checkpoints_verified: u64,
    /// The signed checkpoint that vouches for the period's last record (and through the chain
    /// for every record before it).
    pub last_checkpoint: Option<CheckpointRef>,
    /// The audit key: ed25519, base64, and its fingerprint.
    pub public_key: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub seq: u64,
    pub hash: String,
    pub at: Timestamp,
}

/// A detached signature over a report file's exact bytes (`FILE.sig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSignature {
    pub format: String,
    pub report_format: ReportFormat,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    pub bytes: u64,
    pub generated_at: Timestamp,
    pub since: Timestamp,
    pub until: Timestamp,
    /// The audit key's fingerprint and the key (base64); trust it only as far as it matches
    /// the copy you keep (`keyctl audit public-key`).
    pub key_id: String,
    pub public_key: String,
    /// Base64 ed25519 over [`ReportSignature::message`].
    pub signature: String,
}

impl ReportSignature {
    /// What the audit key signs: every field but the signature, in a fixed order.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "{SIGNATURE_FORMAT}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.report_format.as_str(),
            self.sha256,
            self.bytes,
            self.generated_at.0,
            self.since.0,
            self.until.0,
            self.key_id
        )
        .into_bytes()
    }

    /// Checks `file` against this signature, with `trusted_key` (raw ed25519) when given, else
    /// with the key the signature names. Says what does not match.
    pub fn verify(&self, file: &[u8], trusted_key: Option<&[u8]>) -> Result<(), String> {
        if self.format != SIGNATURE_FORMAT {
            return Err(format!(
                "not a report signature (format {:?}, expected {SIGNATURE_FORMAT:?})",
                self.format
            ));
        }
        let embedded = STANDARD
            .decode(&self.public_key)
            .map_err(|_| "the signature's public key is not base64".to_owned())?;
        if let Some(k) = trusted_key
            && k != embedded.as_slice()
        {
            return Err(format!(
                "signed with key {}, not with the trusted audit key {}",
                self.key_id,
                crate::audit::key_id(k)
            ));
        }
        if crate::audit::key_id(&embedded) != self.key_id {
            return Err("the signature's key id does not match its public key".into());
        }
        let digest = hex::encode(Sha256::digest(file));
        if file.len() as u64 != self.bytes || digest != self.sha256 {
            return Err(format!(
                "the file was changed after signing: {} bytes with SHA-256 {digest}, signed {} \
                 bytes with SHA-256 {}",
                file.len(),
                self.bytes,
                self.sha256
            ));
        }
        let sig = STANDARD
            .decode(&self.signature)
            .map_err(|_| "the signature is not base64".to_owned())?;
        UnparsedPublicKey::new(&ED25519, &embedded)
            .verify(&self.message(), &sig)
            .map_err(|_| "the signature does not verify: the signature file was altered".into())
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Formats seconds as `3d 4h`, `5h 12m`, `40s` for people.
pub fn human_secs(s: u64) -> String {
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// One line of `GET /v1/report/evidence`'s answer (JSON lines): progress while keyd reads the
/// log, then the signed report or what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportLine {
    Progress {
        done: u64,
        total: u64,
    },
    Report {
        signature: ReportSignature,
        /// The file, base64.
        content: String,
        compliant: bool,
    },
    Error {
        status: u16,
        error: String,
        message: String,
    },
}
