//! Key custody: the custodians of the key-encryption key (the local file, AWS KMS, Vault
//! transit), and [`Custody`], the keyring keyd seals and unseals through.
//!
//! The keyring holds the *active* custodian, which wraps every new data key, and the custodians
//! records may still be wrapped under while a KEK rotation or migration moves them
//! ([`crate::rewrap`]); each record names its KEK, so an unwrap goes to the custodian that holds
//! it. The keyring also tracks the active custodian's health: after a failure that is about the
//! custodian (unreachable, permission denied, disabled key) it fails fast instead of waiting on
//! timeouts, probes until the custodian answers again, and tells keyd how long it may keep
//! serving the keys it already holds (`kek.max_unavailable`).

use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use keyd_proto::Timestamp;
use keyd_proto::kek::{CustodianHealth, KekSpec, KekStatus, MigrationStatus};
use keyd_proto::time::format_duration;
use tokio::time::Instant;

use crate::seal::{
    FailureKind, Key256, KeyWrapper, LocalKek, SealContext, SealError, SealedRecord, Wrapped,
    WrappedKey,
};
use crate::telemetry::CustodyMetrics;

#[cfg(feature = "aws-kms")]
pub mod aws;
pub mod doc;
pub mod spec;
#[cfg(feature = "vault")]
pub mod vault;

pub use spec::CustodySettings;

/// The most often keyd retries a custodian that is down.
const DOWN_RETRY: Duration = Duration::from_secs(5);

/// Connects to the custodian `spec` names. Remote custodians log in here (Vault) or load their
/// credentials (AWS); nothing is wrapped yet: [`KeyWrapper::check`] is the round trip.
pub async fn connect(
    spec: &KekSpec,
    settings: &CustodySettings,
) -> Result<Arc<dyn KeyWrapper>, SealError> {
    match spec {
        KekSpec::Local { path } => {
            let path = path.clone();
            let kek = tokio::task::spawn_blocking(move || LocalKek::load_or_create(&path))
                .await
                .map_err(|e| SealError::Random(format!("loading the local KEK: {e}")))??;
            Ok(Arc::new(kek))
        }
        #[cfg(feature = "aws-kms")]
        KekSpec::AwsKms(a) => Ok(Arc::new(aws::AwsKms::connect(a, settings).await?)),
        #[cfg(feature = "vault")]
        KekSpec::VaultTransit(v) => Ok(Arc::new(vault::VaultTransit::connect(v, settings).await?)),
        #[allow(
            unreachable_patterns,
            reason = "reachable when a backend feature is off"
        )]
        other => {
            let _ = settings;
            Err(SealError::Custodian {
                backend: other.backend(),
                key_id: other.describe(),
                op: "connect",
                kind: FailureKind::Misconfigured,
                detail: format!(
                    "this keyd was built without the `{}` feature",
                    spec::feature_of(other.backend())
                ),
            })
        }
    }
}

/// A custodian in the keyring, with the spec it was built from (absent for a wrapper handed in
/// directly, as tests do).
#[derive(Clone)]
pub struct Member {
    pub spec: Option<KekSpec>,
    pub wrapper: Arc<dyn KeyWrapper>,
}

impl Member {
    pub fn new(spec: Option<KekSpec>, wrapper: Arc<dyn KeyWrapper>) -> Self {
        Self { spec, wrapper }
    }

    pub fn describe(&self) -> String {
        match &self.spec {
            Some(s) => s.describe(),
            None => format!("{} {}", self.wrapper.backend(), self.wrapper.key_id()),
        }
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("spec", &self.spec)
            .field("wrapper", &self.wrapper)
            .finish()
    }
}

#[derive(Debug)]
struct Ring {
    active: Member,
    others: Vec<Member>,
}

impl Ring {
    fn holder(&self, backend: &str, kek_id: &str) -> Option<&Member> {
        std::iter::once(&self.active)
            .chain(&self.others)
            .find(|m| m.wrapper.holds(backend, kek_id))
    }
}

/// A change of the active custodian's health, for the audit log: keyd went from using the
/// custodian to serving held keys without it, or back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The custodian stopped answering; keyd serves the keys it holds.
    Down {
        since: Timestamp,
        kind: FailureKind,
        reason: String,
    },
    /// It answers again after an outage that began at `since` and lasted `seconds`.
    Up { since: Timestamp, seconds: u64 },
}

/// Pending transitions kept for the audit task at most; beyond, the oldest are counted as lost.
const TRANSITIONS_KEPT: usize = 256;

/// The active custodian's health, as a small state machine over (mockable) time.
#[derive(Debug, Clone, Default)]
pub struct Health {
    down: Option<Down>,
    last_check: Option<Timestamp>,
}

#[derive(Debug, Clone)]
struct Down {
    since: Instant,
    since_wall: Timestamp,
    kind: FailureKind,
    reason: String,
    last_attempt: Instant,
}

impl Health {
    /// A call or check succeeded: the custodian is up.
    pub fn record_ok(&mut self) {
        self.down = None;
    }

    /// A call failed. Failures about one record (a wrong context) say nothing about the
    /// custodian and are ignored here.
    pub fn record_failure(&mut self, now: Instant, err: &SealError) {
        let Some(kind) = err.kind().filter(|k| k.is_custodian_down()) else {
            return;
        };
        match &mut self.down {
            Some(d) => {
                d.kind = kind;
                d.reason = err.to_string();
                d.last_attempt = now;
            }
            None => {
                self.down = Some(Down {
                    since: now,
                    since_wall: Timestamp::now(),
                    kind,
                    reason: err.to_string(),
                    last_attempt: now,
                })
            }
        }
    }

    /// While the custodian is down and was tried less than `retry` ago, the known failure,
    /// so that callers fail at once instead of waiting for a timeout.
    pub fn fail_fast(&self, now: Instant, retry: Duration) -> Option<(FailureKind, &str)> {
        self.down
            .as_ref()
            .filter(|d| now.saturating_duration_since(d.last_attempt) < retry)
            .map(|d| (d.kind, d.reason.as_str()))
    }

    /// Whether keyd may still hand out the keys it holds.
    pub fn serving(&self, now: Instant, max_unavailable: Duration) -> bool {
        self.down
            .as_ref()
            .is_none_or(|d| now.saturating_duration_since(d.since) <= max_unavailable)
    }

    pub fn is_down(&self) -> bool {
        self.down.is_some()
    }

    fn report(&self, now: Instant, max_unavailable: Duration) -> CustodianHealth {
        match &self.down {
            None => CustodianHealth {
                state: "ok".into(),
                reason: None,
                since: None,
                serving_until: None,
                serving: true,
                last_check: self.last_check,
            },
            Some(d) => CustodianHealth {
                state: d.kind.as_str().into(),
                reason: Some(d.reason.clone()),
                since: Some(d.since_wall),
                serving_until: Some(Timestamp(
                    d.since_wall.0.saturating_add(max_unavailable.as_secs()),
                )),
                serving: self.serving(now, max_unavailable),
                last_check: self.last_check,
            },
        }
    }
}

/// The keyring keyd seals and unseals through; see the module documentation.
pub struct Custody {
    ring: RwLock<Ring>,
    health: Mutex<Health>,
    settings: CustodySettings,
    migration: Mutex<Option<MigrationStatus>>,
    config_note: Mutex<Option<String>>,
    drained: Mutex<Vec<(&'static str, String)>>,
    /// Serializes KEK rotations and migrations (one at a time).
    pub(crate) migration_lock: tokio::sync::Mutex<()>,
    metrics: CustodyMetrics,
    /// Health changes not yet audited, and how many were dropped because nobody drained them.
    transitions: Mutex<(Vec<Transition>, u64)>,
    transitions_ready: tokio::sync::Notify,
    /// Held from taking the changes until they are written (or put back), so that two
    /// writers never reorder them.
    pub(crate) transitions_audit: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Custody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Custody")
            .field("ring", &*read(&self.ring))
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock means a panic while replacing plain values, which leaves them intact.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

impl Custody {
    pub fn new(active: Member, others: Vec<Member>, settings: CustodySettings) -> Self {
        Self {
            ring: RwLock::new(Ring { active, others }),
            health: Mutex::new(Health::default()),
            settings,
            migration: Mutex::new(None),
            config_note: Mutex::new(None),
            drained: Mutex::new(Vec::new()),
            migration_lock: tokio::sync::Mutex::new(()),
            metrics: CustodyMetrics::default(),
            transitions: Mutex::new((Vec::new(), 0)),
            transitions_ready: tokio::sync::Notify::new(),
            transitions_audit: tokio::sync::Mutex::new(()),
        }
    }

    /// Health changes since the last call (oldest first), and how many were lost in between
    /// because more than a few hundred piled up undrained.
    pub fn take_transitions(&self) -> (Vec<Transition>, u64) {
        std::mem::take(&mut *lock(&self.transitions))
    }

    /// Puts back changes that could not be audited (the store failed), ahead of newer ones.
    pub fn requeue_transitions(&self, mut older: Vec<Transition>, lost: u64) {
        let mut q = lock(&self.transitions);
        older.append(&mut q.0);
        let excess = older.len().saturating_sub(TRANSITIONS_KEPT);
        older.drain(..excess);
        q.0 = older;
        q.1 += lost + excess as u64;
    }

    /// Waits until a health change is pending (see [`Custody::take_transitions`]).
    pub async fn transition_pending(&self) {
        self.transitions_ready.notified().await;
    }

    /// Applies `f` to the health and queues the change if it went down or came back.
    fn update_health(&self, f: impl FnOnce(&mut Health)) {
        let mut h = lock(&self.health);
        let before = h.down.as_ref().map(|d| (d.since, d.since_wall));
        f(&mut h);
        let change = match (before, &h.down) {
            (None, Some(d)) => Some(Transition::Down {
                since: d.since_wall,
                kind: d.kind,
                reason: d.reason.clone(),
            }),
            (Some((since, since_wall)), None) => Some(Transition::Up {
                since: since_wall,
                seconds: since.elapsed().as_secs(),
            }),
            _ => None,
        };
        self.metrics.custodian_up.set(i64::from(!h.is_down()));
        if let Some(t) = change {
            // Queued under the health lock, so changes are queued in the order they happened.
            let mut q = lock(&self.transitions);
            if q.0.len() >= TRANSITIONS_KEPT {
                q.0.remove(0);
                q.1 += 1;
            }
            q.0.push(t);
            drop(q);
            drop(h);
            self.transitions_ready.notify_one();
        }
    }

    /// A keyring of one custodian with default settings (tests, and `Keyd::open`).
    pub fn single(wrapper: Arc<dyn KeyWrapper>) -> Self {
        Self::new(
            Member::new(None, wrapper),
            vec![],
            CustodySettings::default(),
        )
    }

    pub fn settings(&self) -> &CustodySettings {
        &self.settings
    }

    pub fn metrics(&self) -> &CustodyMetrics {
        &self.metrics
    }

    pub fn active(&self) -> Member {
        read(&self.ring).active.clone()
    }

    pub fn others(&self) -> Vec<Member> {
        read(&self.ring).others.clone()
    }

    /// The custodian holding records sealed under `(backend, kek_id)`.
    pub fn holder(&self, backend: &str, kek_id: &str) -> Option<Member> {
        read(&self.ring).holder(backend, kek_id).cloned()
    }

    /// Makes `target` the custodian new data keys are wrapped under; the previous one stays in
    /// the keyring so that records not yet rewrapped still open.
    pub fn activate(&self, target: Member) {
        let mut ring = write(&self.ring);
        let previous = std::mem::replace(&mut ring.active, target);
        ring.others.retain(|m| {
            !(m.wrapper.backend() == previous.wrapper.backend()
                && m.wrapper.key_id() == previous.wrapper.key_id())
        });
        ring.others.insert(0, previous);
        drop(ring);
        self.update_health(Health::record_ok);
    }

    /// Adds a custodian that only unwraps (a retired KEK some records may still be under).
    pub fn add_retired(&self, member: Member) {
        write(&self.ring).others.push(member);
    }

    /// Drops the non-active custodians for which `keep` is false (no record refers to them).
    pub fn retain_others(&self, keep: impl Fn(&Member) -> bool) {
        write(&self.ring).others.retain(|m| keep(m));
    }

    /// Marks the non-active custodians for which `keep` is false as drained: no stored record
    /// refers to them any more. They stay in the keyring until the process ends, because a
    /// reader may still hold a record's bytes from before its rewrap; they no longer show as
    /// retired in the status, and the next start does not connect to them.
    pub fn mark_drained(&self, keep: impl Fn(&Member) -> bool) {
        let ring = read(&self.ring);
        let mut drained = lock(&self.drained);
        for m in ring.others.iter().filter(|m| !keep(m)) {
            drained.push((m.wrapper.backend(), m.wrapper.key_id()));
        }
    }

    fn is_drained(&self, m: &Member) -> bool {
        lock(&self.drained)
            .iter()
            .any(|(b, k)| *b == m.wrapper.backend() && *k == m.wrapper.key_id())
    }

    pub fn set_migration(&self, m: Option<MigrationStatus>) {
        *lock(&self.migration) = m;
    }

    pub fn update_migration(&self, f: impl FnOnce(&mut MigrationStatus)) {
        if let Some(m) = lock(&self.migration).as_mut() {
            f(m);
        }
    }

    pub fn migration(&self) -> Option<MigrationStatus> {
        lock(&self.migration).clone()
    }

    pub fn set_config_note(&self, note: Option<String>) {
        *lock(&self.config_note) = note;
    }

    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    /// Whether keyd may hand out the keys it holds; the error says why not and since when.
    pub fn serving_check(&self) -> Result<(), SealError> {
        let health = lock(&self.health);
        if health.serving(Instant::now(), self.settings.max_unavailable) {
            return Ok(());
        }
        let active = self.active();
        let (kind, reason) = health
            .down
            .as_ref()
            .map(|d| (d.kind, format!("{} since {}", d.reason, d.since_wall)))
            .unwrap_or((FailureKind::Unavailable, String::new()));
        Err(SealError::Custodian {
            backend: active.wrapper.backend(),
            key_id: active.wrapper.key_id(),
            op: "serve held keys",
            kind,
            detail: format!(
                "longer than kek.max_unavailable ({}): keyd no longer hands out keys until the \
                 custodian answers again; last failure: {reason}",
                format_duration(self.settings.max_unavailable)
            ),
        })
    }

    pub fn status(&self) -> KekStatus {
        let (active, others) = {
            let ring = read(&self.ring);
            (ring.active.clone(), ring.others.clone())
        };
        let retired = others
            .iter()
            .filter(|m| !self.is_drained(m))
            .map(Member::describe)
            .collect();
        KekStatus {
            backend: active.wrapper.backend().to_owned(),
            key_id: active.wrapper.key_id(),
            spec: active.describe(),
            health: lock(&self.health).report(Instant::now(), self.settings.max_unavailable),
            retired,
            migration: self.migration(),
            config_note: lock(&self.config_note).clone(),
        }
    }

    /// Checks the active custodian now (a wrap and unwrap round trip) and records the outcome.
    pub async fn probe(&self) -> Result<(), SealError> {
        let active = self.active().wrapper;
        let check = crate::seal::round_trip(&*active);
        let result = match tokio::time::timeout(self.probe_timeout(), check).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout_error(&*active, "check")),
        };
        self.update_health(|h| {
            h.last_check = Some(Timestamp::now());
            match &result {
                Ok(()) => h.record_ok(),
                Err(e) => h.record_failure(Instant::now(), e),
            }
        });
        self.observe("check", &result);
        result
    }

    /// Probes the active custodian for as long as `shutdown` is false: every `probe_interval`
    /// while it answers, more often while it does not, so that keyd recovers by itself.
    pub fn spawn_monitor(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let wait = if me.health().is_down() {
                    me.settings.probe_interval.min(DOWN_RETRY)
                } else {
                    me.settings.probe_interval
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let was_down = me.health().is_down();
                match me.probe().await {
                    Ok(()) if was_down => {
                        tracing::info!(
                            custodian = me.active().describe(),
                            "the KEK custodian answers again"
                        )
                    }
                    Ok(()) => {}
                    Err(e) if !was_down => {
                        tracing::warn!(error = %e, "the KEK custodian cannot be used; serving held keys meanwhile")
                    }
                    Err(e) => tracing::debug!(error = %e, "the KEK custodian is still down"),
                }
            }
        })
    }

    fn probe_timeout(&self) -> Duration {
        // A check is a few calls, each bounded by the call timeout (plus one retry).
        self.settings.call_timeout * 6
    }

    fn timeout_error(&self, w: &dyn KeyWrapper, op: &'static str) -> SealError {
        SealError::Custodian {
            backend: w.backend(),
            key_id: w.key_id(),
            op,
            kind: FailureKind::Unavailable,
            detail: "no answer in time".into(),
        }
    }

    /// The active custodian for a call, or at once the known failure while it is down and was
    /// tried moments ago (instead of waiting on a timeout).
    fn before(&self, op: &'static str) -> Result<Arc<dyn KeyWrapper>, SealError> {
        let active = self.active().wrapper;
        let retry = self.settings.probe_interval.min(DOWN_RETRY);
        let known = lock(&self.health)
            .fail_fast(Instant::now(), retry)
            .map(|(kind, reason)| (kind, reason.to_owned()));
        match known {
            None => Ok(active),
            Some((kind, reason)) => {
                let result = Err(SealError::Custodian {
                    backend: active.backend(),
                    key_id: active.key_id(),
                    op,
                    kind,
                    detail: format!(
                        "not tried: the custodian failed moments ago and is being re-checked \
                         ({reason})"
                    ),
                });
                self.observe::<()>(op, &result);
                result.map(|()| active)
            }
        }
    }

    /// Records the outcome of a call on the active custodian (health and metrics).
    fn after<T>(&self, op: &'static str, result: Result<T, SealError>) -> Result<T, SealError> {
        self.update_health(|h| match &result {
            Ok(_) => h.record_ok(),
            Err(e) => h.record_failure(Instant::now(), e),
        });
        self.observe(op, &result);
        result
    }

    fn observe<T>(&self, op: &'static str, result: &Result<T, SealError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind().map_or("error", FailureKind::as_str),
        };
        self.metrics.record_call(op, outcome);
    }
}

#[async_trait]
impl KeyWrapper for Custody {
    fn backend(&self) -> &'static str {
        self.active().wrapper.backend()
    }

    fn key_id(&self) -> String {
        self.active().wrapper.key_id()
    }

    fn kek_id_of(&self, wrapped: &WrappedKey) -> String {
        self.active().wrapper.kek_id_of(wrapped)
    }

    fn holds(&self, backend: &str, kek_id: &str) -> bool {
        read(&self.ring).holder(backend, kek_id).is_some()
    }

    fn is_current(&self, kek_id: &str) -> bool {
        self.active().wrapper.is_current(kek_id)
    }

    async fn generate_data_key(
        &self,
        ctx: &SealContext,
    ) -> Result<(Key256, WrappedKey), SealError> {
        let (dek, w) = self.generate(ctx).await?;
        Ok((dek, w.key))
    }

    async fn generate(&self, ctx: &SealContext) -> Result<(Key256, Wrapped), SealError> {
        // One custodian does both the wrapping and the naming, even if a migration switches
        // the active one meanwhile.
        let w = self.before("generate")?;
        let result = w.generate(ctx).await;
        self.after("generate", result)
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        let w = self.before("unwrap")?;
        let result = w.unwrap_data_key(wrapped, ctx).await;
        self.after("unwrap", result)
    }

    async fn wrap_data_key(
        &self,
        dek: &Key256,
        ctx: &SealContext,
    ) -> Result<WrappedKey, SealError> {
        let w = self.before("wrap")?;
        let result = w.wrap_data_key(dek, ctx).await;
        self.after("wrap", result)
    }

    async fn unwrap_record(
        &self,
        record: &SealedRecord,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        let holder = self
            .holder(&record.backend, &record.kek_id)
            .ok_or_else(|| SealError::NoCustodian {
                backend: record.backend.clone(),
                kek_id: record.kek_id.clone(),
            })?;
        let active = self.active().wrapper;
        if Arc::ptr_eq(&holder.wrapper, &active) {
            let w = self.before("unwrap")?;
            let result = w.unwrap_data_key(&record.wrapped_key, ctx).await;
            self.after("unwrap", result)
        } else {
            let result = holder
                .wrapper
                .unwrap_data_key(&record.wrapped_key, ctx)
                .await;
            self.observe("unwrap", &result);
            result
        }
    }

    async fn check(&self) -> Result<(), SealError> {
        self.probe().await
    }
}

/// Why keyd could not set up its custodians at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading the custody state from the store")]
    Store(#[from] crate::store::StoreError),
    #[error("connecting to the KEK custodian ({spec})")]
    Connect {
        spec: String,
        #[source]
        source: SealError,
    },
    #[error("start-up check of the KEK custodian {spec} (a wrap and unwrap round trip)")]
    Check {
        spec: String,
        #[source]
        source: SealError,
    },
}

/// Builds the keyring `keyd serve` runs with and checks it.
///
/// The store's custody document is the record of which custodians its records are under: the
/// configuration's `[kek]` seeds it on a new store, and later names the active custodian's
/// connection details (endpoint, credentials, auth). A configuration that names *another* key
/// does not move the records; keyd keeps the store's custodian, says so in its status, and
/// changes custodians only through `keyctl kek migrate` (which keeps every record readable).
pub async fn bootstrap(
    configured: &KekSpec,
    settings: &CustodySettings,
    store: &Arc<dyn crate::store::Store>,
) -> Result<Arc<Custody>, BootstrapError> {
    let doc = doc::read_doc(store.as_ref())?.map(|(d, _)| d);
    let (active_spec, note) = match &doc {
        None => (configured.clone(), None),
        Some(d) if d.active.same_key(configured) => (configured.clone(), None),
        Some(d) => (
            d.active.clone(),
            Some(format!(
                "kek in the configuration names {}, but the store's records are under {}; keyd \
                 uses the latter. Change custodians with `keyctl kek migrate`, then update the \
                 configuration to match",
                configured.describe(),
                d.active.describe()
            )),
        ),
    };
    if let Some(n) = &note {
        tracing::warn!("{n}");
    }
    let connect_one = async |spec: &KekSpec| {
        connect(spec, settings)
            .await
            .map_err(|source| BootstrapError::Connect {
                spec: spec.describe(),
                source,
            })
    };
    let active = connect_one(&active_spec).await?;
    active
        .check()
        .await
        .map_err(|source| BootstrapError::Check {
            spec: active_spec.describe(),
            source,
        })?;
    let mut others = Vec::new();
    for spec in doc.iter().flat_map(|d| &d.retired) {
        match connect_one(spec).await {
            Ok(w) => others.push(Member::new(Some(spec.clone()), w)),
            // Records under it cannot be opened; the start-up verification (or the migration)
            // names them.
            Err(e) => tracing::error!(error = %e, "a retired KEK custodian cannot be reached"),
        }
    }
    if doc.is_none() {
        doc::initialise(store, &active_spec).await?;
    }
    let custody = Custody::new(
        Member::new(Some(active_spec), active),
        others,
        settings.clone(),
    );
    custody.set_config_note(note);
    custody.metrics.custodian_up.set(1);
    lock(&custody.health).last_check = Some(Timestamp::now());
    Ok(Arc::new(custody))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> SealError {
        SealError::Custodian {
            backend: "aws-kms",
            key_id: "k".into(),
            op: "Decrypt",
            kind: FailureKind::Unavailable,
            detail: "connection refused".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn health_fails_fast_then_retries_and_bounds_serving() {
        let max = Duration::from_secs(60);
        let retry = Duration::from_secs(5);
        let mut h = Health::default();
        let t0 = Instant::now();
        assert!(h.serving(t0, max) && h.fail_fast(t0, retry).is_none());
        h.record_failure(t0, &unavailable());
        // Right after a failure, callers are refused at once with the known reason.
        let (kind, reason) = h.fail_fast(t0 + Duration::from_secs(1), retry).unwrap();
        assert_eq!(kind, FailureKind::Unavailable);
        assert!(reason.contains("connection refused"));
        // After the retry interval a real call is tried again.
        assert!(h.fail_fast(t0 + Duration::from_secs(6), retry).is_none());
        h.record_failure(t0 + Duration::from_secs(6), &unavailable());
        // Held keys are served for max_unavailable from the first failure, not the last.
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(h.serving(Instant::now(), max));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.serving(Instant::now(), max));
        let report = h.report(Instant::now(), max);
        assert_eq!(report.state, "unavailable");
        assert!(!report.serving);
        h.record_ok();
        assert!(h.serving(Instant::now(), max) && !h.is_down());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_context_is_not_a_custodian_outage() {
        let mut h = Health::default();
        h.record_failure(
            Instant::now(),
            &SealError::ContextMismatch {
                record_id: "r".into(),
            },
        );
        assert!(!h.is_down());
    }

    #[tokio::test]
    async fn the_keyring_unwraps_with_the_custodian_that_holds_the_record() {
        let old: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
            Key256::random().unwrap(),
            "/nonexistent/a".into(),
        ));
        let new: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
            Key256::random().unwrap(),
            "/nonexistent/b".into(),
        ));
        let custody = Custody::single(Arc::clone(&old));
        let ctx = SealContext {
            record_id: "r".into(),
            purpose: "p".into(),
            version: 1,
        };
        let before = crate::seal::seal(&custody, &ctx, b"x").await.unwrap();
        custody.activate(Member::new(None, Arc::clone(&new)));
        let after = crate::seal::seal(&custody, &ctx, b"y").await.unwrap();
        assert_eq!(before.kek_id, old.key_id());
        assert_eq!(after.kek_id, new.key_id());
        assert_eq!(
            &crate::seal::open(&custody, &ctx, &before).await.unwrap()[..],
            b"x"
        );
        assert_eq!(
            &crate::seal::open(&custody, &ctx, &after).await.unwrap()[..],
            b"y"
        );
        custody.retain_others(|_| false);
        let err = crate::seal::open(&custody, &ctx, &before)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), Some(FailureKind::KeyNotFound));
    }
}
