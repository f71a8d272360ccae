//! Wire types shared by keyd, its CLI `keyctl`, the admission webhook and node-shim.
//!
//! Everything here is plain data with serde derives; the JSON shapes are the keyd HTTP API
//! (`/v1/...`). Request types reject unknown fields so that a typo in a client is an error rather
//! than a silently ignored setting. Key material travels only inside [`SecretBytes`], which
//! zeroizes on drop and never prints its bytes through `Debug`.
#![forbid(unsafe_code)]

pub mod identity;
pub mod kek;
pub mod rules;
mod secret;
pub mod time;

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use secret::{SecretBytes, SecretString, constant_time_eq};
pub use time::Timestamp;

/// Body of every non-2xx response from keyd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `forbidden`, `invalid_body`, `not_found`.
    pub error: String,
    /// What was wrong, for a person.
    pub message: String,
}

/// `PUT /v1/nodes/{name}`: a node registers itself or refreshes its facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRegistration {
    /// The node's address that peers send encrypted traffic to.
    pub endpoint: IpAddr,
    /// Pod CIDRs routed to this node.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// The node's WireGuard (x25519) public key, base64 as `wg` prints it. The private key never
    /// leaves the node.
    #[serde(default)]
    pub wireguard_public_key: Option<String>,
    /// The node-key epoch the posted public key answers (see [`WireguardBundle::node_key_epoch`]).
    #[serde(default)]
    pub wireguard_key_epoch: Option<u64>,
    /// The kernel boot ID (`/proc/sys/kernel/random/boot_id`); per-tunnel IPsec keys are derived
    /// with both ends' boot IDs, as Cilium does.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// What keyd knows about a node (never secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub endpoint: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub wireguard_public_key: Option<String>,
    /// The node-key epoch of that public key.
    #[serde(default)]
    pub wireguard_key_epoch: Option<u64>,
    /// When the current WireGuard public key was registered.
    #[serde(default)]
    pub wireguard_key_since: Option<Timestamp>,
    pub boot_id: Option<String>,
    pub registered_at: Timestamp,
    pub last_seen: Timestamp,
    /// What the node last acknowledged as programmed.
    pub acked: Acked,
}

/// `POST /v1/nodes/{name}/ack`: the key versions a node has programmed into its kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// IPsec SPIs (key IDs) whose states are installed.
    #[serde(default)]
    pub ipsec_spis: Vec<u8>,
    /// The SPI used for outbound traffic.
    #[serde(default)]
    pub ipsec_outbound_spi: Option<u8>,
    /// The WireGuard preshared-key epoch programmed.
    #[serde(default)]
    pub wireguard_epoch: Option<u64>,
}

/// A node's last acknowledgement as keyd recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    #[serde(flatten)]
    pub ack: Ack,
    /// When keyd received it; absent if the node never acknowledged.
    pub at: Option<Timestamp>,
}

/// `GET /v1/nodes/{name}/bundle`: everything a node needs to program its kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBundle {
    pub node: String,
    /// Changes whenever any part of the bundle changes; also sent as the `ETag` header, so a node
    /// can poll with `If-None-Match` and get `304 Not Modified`.
    pub revision: String,
    /// Absent until an IPsec key exists (generated or imported).
    pub ipsec: Option<IpsecBundle>,
    pub wireguard: WireguardBundle,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecBundle {
    /// The SPI to use for outbound traffic.
    pub outbound_spi: u8,
    /// Every key the node must hold for inbound traffic, newest first.
    pub keys: Vec<IpsecKey>,
    /// Every other registered node: where its ESP comes from and goes to, the pod CIDRs behind
    /// it, and its boot ID, which per-tunnel keys are derived with. Absent from bundles of keyd
    /// versions that did not send it.
    #[serde(default)]
    pub peers: Vec<IpsecPeer>,
}

/// Another node as an IPsec peer (never secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecPeer {
    pub node: String,
    /// The node's address: the outer destination of ESP sent to it and the outer source of ESP
    /// received from it.
    pub endpoint: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    /// `None` until the node registers one; per-tunnel (`+`) keys cannot be derived without it.
    pub boot_id: Option<String>,
}

/// Where a key stands in the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// Staged by a rollout: install it for inbound traffic only, and acknowledge it.
    Next,
    /// In use for outbound traffic.
    Current,
    /// Replaced by a newer key, still accepted inbound during the overlap.
    Previous,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecKey {
    /// The key ID, used as the SPI: 1..=15.
    pub spi: u8,
    pub role: KeyRole,
    /// Per-tunnel keys (Cilium's `+`): each node pair derives its own key from this one.
    pub per_tunnel: bool,
    pub algorithm: IpsecAlgorithm,
}

/// The two key forms Cilium accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IpsecAlgorithm {
    /// `rfc4106(gcm(aes))`: `key` is the AES key followed by the 4-byte salt.
    Aead {
        name: String,
        key: SecretBytes,
        icv_bits: u16,
    },
    /// `hmac(sha256)` authentication with `cbc(aes)` encryption.
    AuthEnc {
        auth_name: String,
        auth_key: SecretBytes,
        enc_name: String,
        enc_key: SecretBytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardBundle {
    /// The preshared-key epoch.
    pub epoch: u64,
    /// The node-key epoch keyd asks for: when it is higher than the epoch of the key this node
    /// registered, the node generates a new keypair and registers the new public key with
    /// `wireguard_key_epoch` set to this value.
    #[serde(default)]
    pub node_key_epoch: u64,
    /// Every other node with a registered public key.
    pub peers: Vec<WireguardPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardPeer {
    pub node: String,
    pub public_key: String,
    pub endpoint: IpAddr,
    pub allowed_ips: Vec<IpNet>,
    /// HKDF-derived for this node pair and epoch; both ends get the same key.
    pub preshared_key: SecretBytes,
}

/// Non-secret description of one IPsec key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecKeyInfo {
    pub spi: u8,
    pub role: KeyRole,
    /// e.g. `rfc4106(gcm(aes))` or `hmac(sha256) cbc(aes)`.
    pub algorithm: String,
    /// Encryption key length in bits (without the GCM salt).
    pub key_bits: u16,
    /// ICV length for AEAD keys.
    pub icv_bits: Option<u16>,
    pub per_tunnel: bool,
    pub created_at: Timestamp,
    /// `generated` or `imported`.
    pub origin: String,
}

/// `GET /v1/ipsec`, and the answer to a rotation or an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpsecStatus {
    pub outbound_spi: Option<u8>,
    pub keys: Vec<IpsecKeyInfo>,
    /// The rollout in progress, if any.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub from_spi: u8,
    pub to_spi: u8,
    /// `staged` (new key inbound only) or `active` (new key outbound, old key still accepted).
    pub phase: String,
    pub started_at: Timestamp,
    pub phase_since: Timestamp,
    /// Live nodes that have not yet acknowledged what this phase needs.
    pub waiting_for: Vec<String>,
    /// Nodes not seen within the liveness timeout: they no longer block the rollout.
    pub not_live: Vec<String>,
    /// Nodes an administrator excused from this rollout (`keyctl rollout skip`).
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Set when the rollout has waited longer than the configured limit.
    pub stuck: bool,
}

/// The key classes that rotate on schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyClass {
    /// The IPsec PSK (rolled out staged -> active -> retired).
    Ipsec,
    /// Each node's WireGuard keypair (nodes generate new ones when asked).
    WireguardNodeKeys,
    /// The pairwise WireGuard preshared keys (a new epoch).
    WireguardPsk,
    /// The key-encryption key (every sealed record is rewrapped).
    Kek,
}

impl KeyClass {
    pub const ALL: [KeyClass; 4] = [
        KeyClass::Ipsec,
        KeyClass::WireguardNodeKeys,
        KeyClass::WireguardPsk,
        KeyClass::Kek,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyClass::Ipsec => "ipsec",
            KeyClass::WireguardNodeKeys => "wireguard-node-keys",
            KeyClass::WireguardPsk => "wireguard-psk",
            KeyClass::Kek => "kek",
        }
    }

    pub fn parse(s: &str) -> Option<KeyClass> {
        KeyClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A rotation schedule. Durations are humantime strings on the wire (`"30d"`, `"12h"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Time between rotations.
    #[serde(with = "time::duration")]
    pub period: std::time::Duration,
    /// How long the old key stays accepted after the new one is in use.
    #[serde(with = "time::duration")]
    pub overlap: std::time::Duration,
    /// Rotations start only inside this window, if set.
    #[serde(default)]
    pub window: Option<MaintenanceWindow>,
    #[serde(default)]
    pub paused: bool,
}

/// Days of the week and hours (UTC) inside which rotations may start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// `mon` .. `sun`; empty means every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// First hour (0..=23, UTC) of the window.
    pub start_hour: u8,
    /// Hour at which the window closes (1..=24, UTC); may be lower than `start_hour` to wrap
    /// past midnight.
    pub end_hour: u8,
}

/// Compliance bounds on a class's period, set by an administrator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    #[serde(
        default,
        with = "time::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_period: Option<std::time::Duration>,
    #[serde(
        default,
        with = "time::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_period: Option<std::time::Duration>,
}

/// `GET /v1/schedules`: every class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSchedule {
    pub class: KeyClass,
    pub schedule: Schedule,
    pub bounds: Bounds,
}

/// `PUT /v1/schedules/{class}`: any field left out keeps its value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleUpdate {
    #[serde(
        default,
        with = "time::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub period: Option<std::time::Duration>,
    #[serde(
        default,
        with = "time::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub overlap: Option<std::time::Duration>,
    /// `Some(None)` (JSON `null`) removes the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Option<MaintenanceWindow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// One line of `keyctl report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassReport {
    pub class: KeyClass,
    pub last_rotation: Option<Timestamp>,
    pub next_due: Option<Timestamp>,
    /// Age in seconds of the oldest key of this class still in use.
    pub oldest_key_age_secs: Option<u64>,
    pub paused: bool,
    /// The oldest key is younger than period + overlap (+ the wait for the window).
    pub within_schedule: bool,
    /// The schedule respects the bounds and no key in use is older than `max_period`.
    pub within_bounds: bool,
    pub overdue: bool,
    /// Why not within schedule or bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /v1/report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub at: Timestamp,
    pub classes: Vec<ClassReport>,
    /// True when any class is overdue.
    pub overdue: bool,
}

/// The answer to `DELETE /v1/nodes/{name}`: what followed the removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoval {
    pub node: String,
    /// What happened to the IPsec key the node held (a rollout started, or why not).
    pub ipsec: String,
    /// The new WireGuard preshared-key epoch, if one was started.
    pub wireguard_psk_epoch: Option<u64>,
}

/// An administrator's allocation for one node (`PUT /v1/nodes/{name}/allocation`, `keyctl
/// nodes allow`): the only endpoint addresses and pod CIDRs the node may register. Where keyd has
/// no Kubernetes API to read the Node object from, this is what a node's claims are checked
/// against; where it has one, an allocation takes precedence over the Node object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAllocation {
    /// Addresses the node may register as its endpoint (at least one).
    pub endpoints: Vec<IpAddr>,
    /// CIDRs the node's registered pod CIDRs must lie inside (none: it may claim no pod CIDR).
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Who set it and when (filled in by keyd; ignored in a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_at: Option<Timestamp>,
}

/// The answer to `PUT /v1/nodes/{name}/allocation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationSet {
    pub node: String,
    pub allocation: NodeAllocation,
    /// Set when the node's current registration lies outside the new allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `POST /v1/ipsec/rollout/skip`: stop waiting for a node in the rollout in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipRequest {
    pub node: String,
}

/// `POST /v1/ipsec/rotate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Only for the first key: which form to generate. Later rotations keep the algorithm and
    /// key length fixed, as Cilium requires.
    #[serde(default)]
    pub algorithm: Option<KeySpec>,
}

/// The key forms keyd generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySpec {
    /// `rfc4106(gcm(aes))`, 128-bit key, ICV 128.
    Gcm128,
    /// `rfc4106(gcm(aes))`, 256-bit key, ICV 128.
    Gcm256,
    /// `hmac(sha256)` with a 256-bit auth key, `cbc(aes)` with a 256-bit key.
    HmacSha256CbcAes256,
}

/// `POST /v1/ipsec/import`: a Cilium `keys` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub keys: SecretString,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub store: String,
    /// The key-encryption-key backend, e.g. `local`.
    pub kek_backend: String,
    pub kek_id: String,
    pub nodes: usize,
    pub ipsec: IpsecStatus,
    pub wireguard: WireguardStatus,
    /// The KEK custodian's health and any KEK rotation or migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custody: Option<kek::KekStatus>,
    /// On a store that several keyd share (etcd): the replica that answered, and every replica
    /// serving the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

/// The keyd replicas over one etcd store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The replica that answered this request.
    pub this: String,
    /// Every replica that announces itself in the store, the leader marked; empty when the
    /// store could not be read (`error` says why).
    pub replicas: Vec<Replica>,
    /// Why the replicas could not be listed (the store is unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One keyd process serving a shared store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// `host/pid/nonce`, as in the leader key.
    pub name: String,
    /// Its API listener.
    pub api: String,
    /// When it started serving.
    pub since: Timestamp,
    /// Whether it holds the leader key (runs schedules, rollouts and checkpoints).
    #[serde(default)]
    pub leader: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardStatus {
    pub psk_epoch: u64,
    pub nodes_with_public_key: usize,
}

/// The encryption modes a policy can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionMode {
    Wireguard,
    Ipsec,
}

/// `GET /v1/enforcement`: whether each mode can be relied on, for the admission webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementStatus {
    /// When keyd computed this.
    pub at: Timestamp,
    pub ipsec: ModeStatus,
    pub wireguard: ModeStatus,
    /// Policies keyd's rule compiler left out of at least one node's rules (a malformed selector,
    /// more policies concerning a node than its maps hold), by name (`EncryptionPolicy NS/NAME`,
    /// `ClusterEncryptionPolicy NAME`), with why: the data plane does not enforce them there, so
    /// they cover no pod. Empty without a `[policy]` section (keyd then compiles no rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_policies: Vec<rules::RejectedPolicy>,
    /// keyd compiles rules (`[policy]`) but has not yet since it started, so it cannot say yet
    /// which policies it leaves out: the webhook treats its status as unknown meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rules_pending: bool,
}

impl EnforcementStatus {
    pub fn mode(&self, mode: EncryptionMode) -> &ModeStatus {
        match mode {
            EncryptionMode::Ipsec => &self.ipsec,
            EncryptionMode::Wireguard => &self.wireguard,
        }
    }

    /// Why keyd's rules leave out the policy named `name`, if they do.
    pub fn rejection(&self, name: &str) -> Option<&str> {
        self.rejected_policies
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.reason.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeStatus {
    /// Keys exist and nodes have them (e.g. a current IPsec key; WireGuard node keys registered).
    pub active: bool,
    /// Every key of this mode is within its rotation schedule (none overdue).
    pub within_schedule: bool,
    /// Why `active` or `within_schedule` is false, for the denial message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One admission decision, as the webhook reports it to keyd's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionDecision {
    pub at: Timestamp,
    /// `allowed`, `denied`, `warned`, `audited` or `break_glass`.
    pub outcome: String,
    /// The enforcement mode in force: `enforce`, `warn` or `audit`.
    pub enforcement: String,
    /// Kubernetes operation: `CREATE` or `UPDATE`.
    pub operation: String,
    /// e.g. `Pod`, `Deployment`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The requesting Kubernetes user.
    pub user: String,
    /// Policies that selected the object.
    #[serde(default)]
    pub policies: Vec<String>,
    pub reason: String,
}

/// `POST /v1/audit/admission`: a batch of decisions (the webhook buffers them off the request
/// path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionDecisions {
    pub decisions: Vec<AdmissionDecision>,
}

/// `POST /v1/bootstrap/node` on keyd's bootstrap listener (server-authenticated TLS, no client
/// certificate): a node agent trades a projected ServiceAccount token for a short-lived node
/// client certificate, as SPIRE's `k8s_psat` attestor does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRequest {
    /// The node the agent says it runs on; keyd checks the token's pod is scheduled there.
    pub node: String,
    /// The projected ServiceAccount token (audience `keyd`).
    pub token: SecretString,
    /// A PKCS#10 request (PEM) for the key the agent generated; keyd ignores its names and
    /// issues a certificate for `spiffe://keyd/node/{node}` only.
    pub csr: String,
}

/// The answer to a [`BootstrapRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapResponse {
    /// The node certificate (PEM), issued by keyd's CA.
    pub certificate: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_rejects_unknown_fields() {
        let err =
            serde_json::from_str::<NodeRegistration>(r#"{"endpoint":"10.0.0.1","podCidrs":[]}"#)
                .expect_err("unknown field must be refused");
        assert!(err.to_string().contains("podCidrs"), "{err}");
    }

    #[test]
    fn bundle_debug_never_shows_key_bytes() {
        let key = SecretBytes::new(vec![0xAB; 20]);
        let bundle = IpsecAlgorithm::Aead {
            name: "rfc4106(gcm(aes))".into(),
            key,
            icv_bits: 128,
        };
        let json = serde_json::to_string(&bundle).expect("serializes");
        assert!(
            json.contains("q6urq6urq6urq6urq6urq6urq6s="),
            "wire form carries the key: {json}"
        );
        let debug = format!("{bundle:?}");
        assert!(
            !debug.contains("171") && !debug.to_lowercase().contains("ab"),
            "{debug}"
        );
    }
}
