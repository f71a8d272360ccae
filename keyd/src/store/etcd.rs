//! The replicated backend: keyd's tables and audit log as keys in an etcd cluster.
//!
//! Layout under the configured prefix `P` (e.g. `/keyd/`):
//! - `P t/<table>/<key>`: one entry of a [`Table`] (so a table is a key range, scanned in the
//!   same byte order as redb's);
//! - `P audit/<seq, 20 digits>`: one [`AuditRecord`];
//! - `P audit-head`: the newest record's sequence number and hash, which every append reads and
//!   compares, so that appends from several keyd processes serialise and the chain never forks.
//!
//! Every [`Txn`] is one etcd transaction: its guards become compares (`value ==` for an expected
//! value, `version == 0` for "absent"), the audit head's `mod_revision` is compared when records
//! are appended, and the writes run only when every compare holds. When the transaction fails,
//! the same round trip reads back the guarded keys and the head: a guard that no longer holds
//! is a [`StoreError::Conflict`]; a head that moved (another writer appended) makes the commit
//! re-chain its records on the new head and try again. etcd acknowledges a write once a quorum
//! of members has it on disk.
//!
//! The [`Store`] trait is synchronous (redb is), and etcd's client is async: the store owns a
//! small runtime of its own, and each call runs its future there and waits for the answer, the
//! way a redb call waits for its fsync. Callers on keyd's runtime are never asked to nest one.
//!
//! When etcd cannot be reached or has no quorum, operations fail after the configured timeout
//! with [`StoreError::Unavailable`] (503 `store_unavailable` to clients); nothing is written, and
//! the client reconnects by itself.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    SortOrder, SortTarget, TlsOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};
use keyd_proto::Timestamp;
use serde::{Deserialize, Serialize};

use super::{
    AuditRecord, Change, EtcdSettings, GENESIS_HASH, Store, StoreError, Table, Txn, decode_audit,
};

/// Entries read per range request when scanning a table.
const PAGE: i64 = 512;

/// Times an append is re-chained after another writer moved the audit head, before the commit
/// gives up (each attempt is one round trip; a loser retries at once).
const HEAD_RETRIES: usize = 64;
/// How often each member is asked whether it answers (see [`tend_endpoints`]), and how long it
/// has to.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_WITHIN: Duration = Duration::from_secs(1);
/// The least time between two rounds of probes, however often requests ask for one (during a
/// quorum loss every request does).
const PROBE_GAP: Duration = Duration::from_millis(150);
/// How many times a request that never left this process (see [`never_sent`]) is sent again.
const UNSENT_RETRIES: u32 = 4;

/// Raw entries as etcd returns them: full key, value.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The audit chain's head, as stored at `P audit-head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

pub struct EtcdStore {
    /// The store's own runtime.
    rt: OwnedRuntime,
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
    max_txn_ops: usize,
    max_unavailable: Duration,
    /// Set once this process leads: every write then also compares the leader key's lease, so
    /// that a deposed leader's writes fail whole ([`StoreError::Deposed`]).
    fence: std::sync::Mutex<Option<Fence>>,
    /// Why this process stopped being the leader; `None` while it leads (or never led).
    lost: tokio::sync::watch::Sender<Option<String>>,
    /// Asks the store watch for a progress report (see [`Store::request_progress`]).
    progress_wanted: std::sync::Arc<tokio::sync::Notify>,
    /// Asks [`tend_endpoints`] to check the members now: a request found one down.
    probe_wanted: std::sync::Arc<tokio::sync::Notify>,
    /// Tells the store watch to start again: [`tend_endpoints`] took a member out, and the
    /// watch's stream may be on it (a stream outlives its connection's removal from the set,
    /// and one on a member that hangs would stay silent until HTTP/2 keep-alive gives up).
    rewatch: std::sync::Arc<tokio::sync::Notify>,
}

#[derive(Debug, Clone)]
struct Fence {
    key: Vec<u8>,
    lease: i64,
    /// This process, as written in the leader key.
    holder: String,
}

/// This process leads the store: the scheduler, rollouts and every write are its alone until
/// `lost` says otherwise, which happens before its lease can expire on the etcd side.
#[derive(Debug)]
pub struct Leadership {
    /// Who leads (this process), as written in the leader key.
    pub holder: String,
    /// The leader lease's ID: it names this term of leadership (a new leader, a new lease).
    pub term: i64,
    /// Becomes `Some(reason)` when leadership is lost: keep-alives unanswered for two thirds of
    /// the lease, the lease gone, or a write refused by the fence.
    pub lost: tokio::sync::watch::Receiver<Option<String>>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A runtime that may be dropped anywhere: dropping a runtime blocks, which tokio forbids
/// inside another runtime (where keyd drops its store, and where a failed connect returns), so
/// its threads finish in the background instead.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn get(&self) -> Option<&tokio::runtime::Runtime> {
        self.0.as_ref()
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Waits for `rx` without stalling the caller's runtime: on a multi-thread runtime the worker
/// hands its other tasks to another thread first (a stalled etcd would otherwise freeze every
/// task on the worker for up to the timeout).
fn wait_for<T>(rx: &std::sync::mpsc::Receiver<T>) -> Result<T, std::sync::mpsc::RecvError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rx.recv())
        }
        _ => rx.recv(),
    }
}

fn unavailable(
    op: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::Unavailable {
        op,
        source: source.into(),
    }
}

/// Sorts an etcd client error: what a retry may fix (no connection, no leader, a timeout) is
/// [`StoreError::Unavailable`]; anything else (a request etcd refuses) is a backend error.
fn classify(op: &'static str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match &e {
        E::TransportError(_) | E::IoError(_) => unavailable(op, e),
        E::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
            ) =>
        {
            unavailable(op, e)
        }
        // etcd reports a lost leader and a request timeout as Unknown on some paths.
        E::GRpcStatus(s)
            if s.code() == Code::Unknown
                && ["no leader", "timed out", "leader changed", "connection"]
                    .iter()
                    .any(|m| s.message().contains(m)) =>
        {
            unavailable(op, e)
        }
        // etcd's space quota (its alarm is raised): like a full disk, writes fail until an
        // operator compacts and defragments.
        E::GRpcStatus(s) if s.message().contains("database space exceeded") => StoreError::Full {
            op,
            source: format!("{e} (etcd's space quota is exhausted: compact and defragment)").into(),
        },
        E::GRpcStatus(s) if s.message().contains("too many requests") => unavailable(op, e),
        E::GRpcStatus(s) if s.message().contains("too many operations in txn request") => {
            StoreError::Backend {
                op,
                source: format!(
                    "{e} (etcd's --max-txn-ops is below keyd's store.etcd.max_txn_ops: raise the \
                     server's flag or lower keyd's setting to match)"
                )
                .into(),
            }
        }
        _ => StoreError::Backend {
            op,
            source: Box::new(e),
        },
    }
}

/// Whether `e` failed before its request left this process: no connection could be made to the
/// member it was routed to (stopped, refusing, unreachable, or its TLS handshake failed). Such a
/// request can be sent again as it is, even a write: etcd never saw it. (A request that failed after it was sent may have
/// applied, and is never sent again here.)
fn never_sent(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(c) = cause {
        // tonic's connector (TCP, then TLS) fails with this, before HTTP/2 exists.
        if c.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        // hyper-util's connector, which wraps the socket's error in its own type.
        if c.to_string().starts_with("tcp connect error") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Sends a request made by `make` (from a clone of `state`) until it is answered, or has failed
/// after it was sent, or failed unsent [`UNSENT_RETRIES`] times; asks for the members to be
/// checked at once when one is found down. Another try goes to another member: the balanced
/// channel picks afresh, and [`tend_endpoints`] takes the down member out.
async fn send<S, T, F>(
    state: S,
    make: impl Fn(S) -> F,
    probe: &tokio::sync::Notify,
) -> Result<T, etcd_client::Error>
where
    S: Clone,
    F: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        match make(state.clone()).await {
            Err(e) if never_sent(&e) => {
                probe.notify_one();
                tries += 1;
                if tries > UNSENT_RETRIES {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(20) * tries).await;
            }
            r => return r,
        }
    }
}

/// Keeps the client's requests on the members that answer. etcd-client balances requests over
/// every endpoint, and a stopped member's endpoint still counts as ready there (each request to
/// it fails at once), so a third of the requests would fail while one member of three is down.
/// Every [`PROBE_EVERY`], or at once when a request found a member down, each member is asked
/// for its status on a connection of its own; a member that does not answer within
/// [`PROBE_WITHIN`], or answers without a raft leader, leaves the balanced set, and comes back
/// once it answers with one. When no member answers, every endpoint stays in the set, so that
/// requests fail fast with the real cause.
async fn tend_endpoints(
    client: Client,
    endpoints: Vec<String>,
    options: ConnectOptions,
    wanted: std::sync::Arc<tokio::sync::Notify>,
    rewatch: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut probes: Vec<Option<Client>> = vec![None; endpoints.len()];
    let mut active = vec![true; endpoints.len()];
    loop {
        let mut checks = tokio::task::JoinSet::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let probe = probes[i].take();
            let (ep, options) = (ep.clone(), options.clone());
            checks.spawn(async move {
                let answered = tokio::time::timeout(PROBE_WITHIN, async {
                    let mut c = match probe {
                        Some(c) => c,
                        None => Client::connect([ep.as_str()], Some(options)).await?,
                    };
                    let status = c.status().await;
                    Ok::<_, etcd_client::Error>((status, c))
                })
                .await;
                match answered {
                    Ok(Ok((Ok(st), c))) => (i, st.leader() != 0, Some(c)),
                    Ok(Ok((Err(_), c))) => (i, false, Some(c)),
                    _ => (i, false, None),
                }
            });
        }
        let mut healthy = vec![false; endpoints.len()];
        while let Some(done) = checks.join_next().await {
            if let Ok((i, ok, c)) = done {
                healthy[i] = ok;
                probes[i] = c;
            }
        }
        let want: Vec<bool> = if healthy.iter().any(|h| *h) {
            healthy
        } else {
            vec![true; endpoints.len()]
        };
        for (i, ep) in endpoints.iter().enumerate() {
            if active[i] && !want[i] {
                if client.remove_endpoint(ep).await.is_ok() {
                    tracing::warn!(
                        endpoint = ep,
                        "etcd member does not answer (or has no leader); sending requests to the others"
                    );
                    active[i] = false;
                    rewatch.notify_waiters();
                }
            } else if !active[i] && want[i] && client.add_endpoint(ep).await.is_ok() {
                tracing::info!(endpoint = ep, "etcd member answers again");
                active[i] = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            () = async {
                wanted.notified().await;
                tokio::time::sleep(PROBE_GAP).await;
            } => {}
        }
    }
}

/// What a request run on the store's runtime came to: its answer, a timeout, or (`None`) a
/// task that never answered.
fn outcome<T>(
    op: &'static str,
    timeout: Duration,
    answer: Option<Result<Result<T, etcd_client::Error>, tokio::time::error::Elapsed>>,
) -> Result<T, StoreError> {
    match answer {
        Some(Ok(r)) => r.map_err(|e| classify(op, e)),
        Some(Err(_)) => Err(unavailable(
            op,
            format!(
                "etcd did not answer within {}",
                humantime::format_duration(timeout)
            ),
        )),
        None => Err(unavailable(op, "the etcd client task stopped")),
    }
}

/// Watches every key under `root` (the store's prefix) and reports which table entries change,
/// and at which revision, until the receiver is dropped. The audit log, the leader key and the
/// replicas are watched too, though no cache holds them: every write of every keyd moves the
/// reported revision, so a replica catching up with the store's revision gets there on the
/// events alone, without asking for progress reports (which etcd before 3.4.24 and 3.5.8 may
/// send ahead of the events they cover). Every time a watch is (re)established it first
/// reports [`Change::Resync`] at the revision it starts from: whatever happened while there was
/// none (etcd unreachable, the member lost, the watch cancelled by a compaction) must be read
/// again. When `progress` is notified it asks etcd for a progress report, which comes back as
/// [`Change::Progress`]: every change up to that revision has been reported.
async fn follow_tables(
    client: Client,
    root: Vec<u8>,
    tx: tokio::sync::mpsc::UnboundedSender<Change>,
    progress: std::sync::Arc<tokio::sync::Notify>,
    rewatch: std::sync::Arc<tokio::sync::Notify>,
) {
    let parse = |key: &[u8]| -> Option<(Table, String)> {
        let rest = std::str::from_utf8(key.strip_prefix(root.as_slice())?).ok()?;
        let (table, key) = rest.strip_prefix("t/")?.split_once('/')?;
        Some((Table::from_name(table)?, key.to_owned()))
    };
    let revision_of = |r: i64| u64::try_from(r).unwrap_or(0);
    let mut failures = 0u32;
    // Reported once per outage, when a watch that ran breaks or the first one cannot start.
    let mut lost_reported = false;
    let lost = |why: String, reported: &mut bool| {
        if !std::mem::replace(reported, true) {
            let _ = tx.send(Change::Lost { why });
        }
    };
    while !tx.is_closed() {
        if failures > 0 {
            // Quickly at first (a member restarting), then at most every 2 s.
            tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
        }
        let mut watch = client.watch_client();
        let mut stream = match watch
            .watch(root.clone(), Some(WatchOptions::new().with_prefix()))
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "cannot watch the etcd store; retrying");
                lost(format!("cannot watch etcd: {e}"), &mut lost_reported);
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = progress.notified() => {
                    if let Err(e) = stream.request_progress().await {
                        failures += 1;
                        lost(format!("the etcd watch failed: {e}"), &mut lost_reported);
                        break;
                    }
                    continue;
                }
                // A member was taken out: watch again, on one that answers (the new watch
                // reports a resync, so nothing between the two is missed).
                () = rewatch.notified() => break,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    failures += 1;
                    lost("etcd ended the watch".to_owned(), &mut lost_reported);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the etcd store watch failed; watching again");
                    failures += 1;
                    lost(format!("the etcd watch failed: {e}"), &mut lost_reported);
                    break;
                }
            };
            let header = resp.header().map_or(0, |h| revision_of(h.revision()));
            if resp.canceled() {
                // Also how etcd refuses a watch it will not create (permission denied).
                tracing::warn!(
                    reason = resp.cancel_reason(),
                    "etcd cancelled the store watch; watching again"
                );
                failures += 1;
                lost(
                    format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                    &mut lost_reported,
                );
                break;
            }
            let change = if resp.created() {
                failures = 0;
                lost_reported = false;
                Some(Change::Resync { revision: header })
            } else if resp.events().is_empty() {
                // A progress report: nothing more up to `header`.
                Some(Change::Progress { revision: header })
            } else {
                let revision = resp
                    .events()
                    .iter()
                    .filter_map(|e| Some(revision_of(e.kv()?.mod_revision())))
                    .max()
                    .unwrap_or(0);
                let keys = resp
                    .events()
                    .iter()
                    .filter_map(|e| parse(e.kv()?.key()))
                    .collect();
                Some(Change::Keys { keys, revision })
            };
            if let Some(change) = change
                && tx.send(change).is_err()
            {
                return;
            }
        }
    }
}

/// etcd's revision argument: 0 reads the newest.
fn revision(at: Option<u64>) -> i64 {
    at.and_then(|r| i64::try_from(r).ok()).unwrap_or(0)
}

/// The smallest key greater than every key starting with `prefix`.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// The next key after `key` in byte order.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers (within the configured timeout).
    pub fn connect(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let rt = OwnedRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("keyd-etcd")
                .enable_all()
                .build()
                .map_err(|e| StoreError::Backend {
                    op: "start the etcd client",
                    source: Box::new(e),
                })?,
        ));
        let Some(handle) = rt.get().map(|r| r.handle().clone()) else {
            return Err(unavailable("connect to etcd", "no runtime"));
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            .with_timeout(settings.timeout)
            .with_keep_alive(Duration::from_secs(10), settings.timeout)
            // A member cut off from the others refuses at once instead of answering stale.
            .with_require_leader(true);
        if let Some(tls) = &settings.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| StoreError::Backend {
                    op: "read the etcd TLS files",
                    source: format!("{}: {e}", p.display()).into(),
                })
            };
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        let endpoints = settings.endpoints.clone();
        let timeout = settings.timeout;
        let probe_options = options.clone();
        let client = {
            let endpoints = endpoints.clone();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            handle.spawn(async move {
                let connected = tokio::time::timeout(timeout, async move {
                    let mut client = Client::connect(&endpoints, Some(options)).await?;
                    // Connecting is lazy: a status call proves a member answers.
                    client.status().await?;
                    Ok::<_, etcd_client::Error>(client)
                })
                .await;
                let _ = tx.send(connected);
            });
            match wait_for(&rx) {
                Ok(Ok(Ok(client))) => client,
                Ok(Ok(Err(e))) => return Err(classify("connect to etcd", e)),
                Ok(Err(_)) => {
                    return Err(unavailable(
                        "connect to etcd",
                        format!(
                            "no member of {} answered within {}",
                            settings.endpoints.join(","),
                            humantime::format_duration(timeout)
                        ),
                    ));
                }
                Err(_) => {
                    return Err(unavailable("connect to etcd", "the client task stopped"));
                }
            }
        };
        let probe_wanted = std::sync::Arc::new(tokio::sync::Notify::new());
        let rewatch = std::sync::Arc::new(tokio::sync::Notify::new());
        if endpoints.len() > 1 {
            handle.spawn(tend_endpoints(
                client.clone(),
                endpoints.clone(),
                probe_options,
                std::sync::Arc::clone(&probe_wanted),
                std::sync::Arc::clone(&rewatch),
            ));
        }
        Ok(Self {
            rt,
            client,
            prefix: settings.prefix.clone(),
            endpoints,
            timeout,
            max_txn_ops: settings.max_txn_ops,
            max_unavailable: settings.max_unavailable,
            fence: std::sync::Mutex::new(None),
            lost: tokio::sync::watch::channel(None).0,
            progress_wanted: std::sync::Arc::new(tokio::sync::Notify::new()),
            probe_wanted,
            rewatch,
        })
    }

    /// Sends the request `make` makes from `state` on the store's runtime and waits for the
    /// answer, bounded by the timeout (see [`send`] for when it is sent again).
    fn run<S, T, F>(
        &self,
        op: &'static str,
        state: S,
        make: impl Fn(S) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        S: Clone + Send + 'static,
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let Some(rt) = self.rt.get() else {
            return Err(unavailable(op, "the store is closing"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        let probe = std::sync::Arc::clone(&self.probe_wanted);
        rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, send(state, make, &probe)).await);
        });
        outcome(op, timeout, wait_for(&rx).ok())
    }

    /// [`Self::run`] for async callers: awaits the answer instead of blocking a thread.
    async fn call<S, T, F>(
        &self,
        op: &'static str,
        state: S,
        make: impl Fn(S) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        S: Clone + Send + 'static,
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let Some(rt) = self.rt.get() else {
            return Err(unavailable(op, "the store is closing"));
        };
        let timeout = self.timeout;
        let probe = std::sync::Arc::clone(&self.probe_wanted);
        let task =
            rt.spawn(async move { tokio::time::timeout(timeout, send(state, make, &probe)).await });
        outcome(op, timeout, task.await.ok())
    }

    fn leader_key(&self) -> Vec<u8> {
        format!("{}leader", self.prefix).into_bytes()
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks leadership lost (once) and drops the fence, so that nothing more is attempted.
    fn depose(&self, reason: String) {
        self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            tracing::error!(reason, "this keyd no longer leads the etcd store");
            *lost = Some(reason);
            true
        });
    }

    /// Who holds the leader key now, if anyone.
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        let kv = self.client.kv_client();
        let key = self.leader_key();
        let resp = self
            .call("read the leader", (kv, key), |(mut kv, key)| async move {
                kv.get(key, None).await
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Waits until this process holds the store's leader key (`PREFIX leader`, bound to a lease
    /// of `ttl`), then keeps the lease alive in the background. `waiting` is called with the
    /// current holder each time it changes (for logs and `/readyz`). Returns `None` when
    /// `shutdown` fires first. etcd being unreachable meanwhile is waited out, not an error.
    ///
    /// Exactly one process holds the key: taking it is a transaction that requires it absent.
    /// When the holder dies its lease expires after `ttl` and etcd deletes the key; a waiting
    /// process sees that within a poll (100 ms) and takes over.
    pub async fn lead(
        self: &std::sync::Arc<Self>,
        holder: &str,
        ttl: Duration,
        mut waiting: impl FnMut(&str),
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Leadership>, StoreError> {
        let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut seen: Option<String> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(None);
            }
            match self.try_lead(holder, ttl, ttl_secs).await {
                Ok(Ok(leadership)) => return Ok(Some(leadership)),
                Ok(Err(current)) => {
                    if seen.as_ref() != Some(&current) {
                        waiting(&current);
                        seen = Some(current.clone());
                    }
                    // Wait for the holder's key to go (its lease ended) or change hands.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = shutdown.changed() => return Ok(None),
                        }
                        match self.leader().await {
                            Ok(Some(h)) if h == current => {}
                            Ok(_) => break,
                            Err(e) => tracing::warn!(
                                error = %keyd_mtls::error_chain(&e),
                                "cannot read the leader key; retrying"
                            ),
                        }
                    }
                }
                Err(e) if e.is_unreachable() => {
                    tracing::warn!(error = %keyd_mtls::error_chain(&e), "etcd cannot be reached; waiting to lead");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: the leadership, or the current holder's name.
    async fn try_lead(
        self: &std::sync::Arc<Self>,
        holder: &str,
        ttl: Duration,
        ttl_secs: i64,
    ) -> Result<Result<Leadership, String>, StoreError> {
        // etcd counts the lease from when it received the grant: count from before sending it.
        let asked = std::time::Instant::now();
        let lease = self.client.lease_client();
        let granted = self
            .call("grant a lease", lease, move |mut lease| async move {
                lease.grant(ttl_secs, None).await
            })
            .await?;
        let id = granted.id();
        let key = self.leader_key();
        let take = EtcdTxn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder.as_bytes().to_vec(),
                Some(etcd_client::PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let kv = self.client.kv_client();
        let taken = self
            .call(
                "take the leader key",
                (kv, take),
                |(mut kv, take)| async move { kv.txn(take).await },
            )
            .await;
        let resp = match taken {
            Ok(r) => r,
            Err(e) => {
                self.revoke(id).await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(Fence {
                key,
                lease: id,
                holder: holder.to_owned(),
            });
            self.lost.send_replace(None);
            let me = std::sync::Arc::clone(self);
            if let Some(rt) = self.rt.get() {
                rt.spawn(async move { me.keep_alive(id, ttl, asked).await });
            }
            return Ok(Ok(Leadership {
                holder: holder.to_owned(),
                term: id,
                lost: self.lost.subscribe(),
            }));
        }
        // Someone else leads: give our lease back.
        self.revoke(id).await;
        let current = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Err(current))
    }

    async fn revoke(&self, id: i64) {
        let lease = self.client.lease_client();
        let _ = self
            .call("revoke a lease", lease, move |mut lease| async move {
                lease.revoke(id).await
            })
            .await;
    }

    /// Refreshes the lease every third of its TTL, and after a failed refresh every 250 ms. If
    /// no refresh is answered for two thirds of the TTL (counted from the last one *sent* that
    /// was answered), leadership is given up: etcd may expire the lease a third of a TTL later,
    /// and by then this process must have stopped acting.
    async fn keep_alive(
        self: std::sync::Arc<Self>,
        id: i64,
        ttl: Duration,
        taken: std::time::Instant,
    ) {
        let period = ttl / 3;
        let give_up = ttl * 2 / 3;
        let retry = Duration::from_millis(250);
        let mut last_ok = taken;
        let mut stream = None;
        loop {
            if self.lost.borrow().is_some() {
                return;
            }
            let left = give_up.saturating_sub(last_ok.elapsed());
            if left.is_zero() {
                self.depose(format!(
                    "no lease keep-alive answered for {}",
                    humantime::format_duration(last_ok.elapsed())
                ));
                return;
            }
            let sent = std::time::Instant::now();
            let mut client = self.client.clone();
            let attempt = tokio::time::timeout(left.min(period), async {
                if stream.is_none() {
                    stream = Some(client.lease_keep_alive(id).await?);
                }
                let Some((keeper, answers)) = stream.as_mut() else {
                    return Ok(None);
                };
                keeper.keep_alive().await?;
                answers.message().await
            })
            .await;
            let wait = match attempt {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    last_ok = sent;
                    period.saturating_sub(sent.elapsed())
                }
                Ok(Ok(Some(_))) => {
                    self.depose("the leader lease expired".to_owned());
                    return;
                }
                Ok(Err(etcd_client::Error::GRpcStatus(st)))
                    if st.message().contains("requested lease not found") =>
                {
                    self.depose("the leader lease no longer exists".to_owned());
                    return;
                }
                _ => {
                    stream = None; // reconnect, soon
                    retry.saturating_sub(sent.elapsed())
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Gives leadership up at once (at shutdown), so that a standby need not wait for the TTL.
    /// Nothing is written after it: the store counts as deposed.
    pub fn resign(&self) {
        self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            *lost = Some("resigned".to_owned());
            true
        });
        let Some(fence) = self.fence.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let lease = self.client.lease_client();
        let id = fence.lease;
        let _ = self.run(
            "revoke the leader lease",
            lease,
            move |mut lease| async move { lease.revoke(id).await },
        );
    }

    fn copy_marker(&self) -> Vec<u8> {
        format!("{}copy-incomplete", self.prefix).into_bytes()
    }

    /// Whether a `keyd store copy` into this prefix began and did not finish.
    pub fn copy_incomplete(&self) -> Result<bool, StoreError> {
        let kv = self.client.kv_client();
        let key = self.copy_marker();
        let resp = self.run(
            "read the copy marker",
            (kv, key),
            |(mut kv, key)| async move { kv.get(key, None).await },
        )?;
        Ok(!resp.kvs().is_empty())
    }

    /// Marks (or, done, unmarks) the prefix as the target of a copy in progress, fenced.
    pub fn set_copy_incomplete(&self, incomplete: bool, note: &str) -> Result<(), StoreError> {
        let fence = self.fenced()?;
        let mut t = EtcdTxn::new();
        if let Some(f) = &fence {
            t = t.when([Compare::lease(f.key.clone(), CompareOp::Equal, f.lease)]);
        }
        let key = self.copy_marker();
        let op = if incomplete {
            TxnOp::put(key, note.as_bytes().to_vec(), None)
        } else {
            TxnOp::delete(key, None)
        };
        let t = t.and_then([op]);
        let kv = self.client.kv_client();
        let resp = self.run("copy marker", (kv, t), |(mut kv, t)| async move {
            kv.txn(t).await
        })?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(self.deposed("copy marker"))
        }
    }

    /// `etcd:ENDPOINTS PREFIX`: where this store is.
    pub fn location(&self) -> String {
        format!("etcd:{}{}", self.endpoints.join(","), self.prefix)
    }

    /// How many keys are under the prefix (0 for an unused prefix).
    pub fn count_keys(&self) -> Result<i64, StoreError> {
        let p = self.prefix.as_bytes().to_vec();
        let options = GetOptions::new()
            .with_range(range_end(&p))
            .with_count_only();
        let kv = self.client.kv_client();
        let resp = self.run(
            "count keys",
            (kv, p, options),
            |(mut kv, p, o)| async move { kv.get(p, Some(o)).await },
        )?;
        Ok(resp.count())
    }

    /// Writes audit records exactly as they are (their numbers and hashes), after the current
    /// head, which must be `records[0].seq - 1` or absent: `keyd store copy` moves a chain
    /// without re-chaining it. Fenced like every write; at most `max_txn_ops - 1` records.
    pub fn import_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        if records.len() + 1 > self.max_txn_ops {
            return Err(StoreError::Backend {
                op: "audit import",
                source: "more records than one transaction may carry".into(),
            });
        }
        let fence = self.fenced()?;
        let (head, head_revision) = self.read_head()?;
        if let Some(h) = &head
            && (h.seq + 1 != first.seq || h.hash != first.prev_hash)
        {
            return Err(StoreError::Corrupt {
                what: format!("audit record {}", first.seq),
                why: format!("does not follow the imported head (record {})", h.seq),
            });
        }
        let mut compares = vec![if head.is_some() {
            Compare::mod_revision(self.head_key(), CompareOp::Equal, head_revision)
        } else {
            Compare::version(self.head_key(), CompareOp::Equal, 0)
        }];
        if let Some(f) = &fence {
            compares.push(Compare::lease(f.key.clone(), CompareOp::Equal, f.lease));
        }
        let mut ops = Vec::with_capacity(records.len() + 1);
        for r in records {
            let bytes = serde_json::to_vec(r).map_err(|e| StoreError::Backend {
                op: "encode audit record",
                source: Box::new(e),
            })?;
            ops.push(TxnOp::put(self.audit_key(r.seq), bytes, None));
        }
        ops.push(TxnOp::put(
            self.head_key(),
            encode_head(&Head {
                seq: last.seq,
                hash: last.hash.clone(),
            }),
            None,
        ));
        let t = EtcdTxn::new().when(compares).and_then(ops);
        let kv = self.client.kv_client();
        let resp = self.run("audit import", (kv, t), |(mut kv, t)| async move {
            kv.txn(t).await
        })?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(StoreError::Backend {
                op: "audit import",
                source: "another writer changed the audit log during the copy".into(),
            })
        }
    }

    fn replicas_prefix(&self) -> Vec<u8> {
        format!("{}replicas/", self.prefix).into_bytes()
    }

    /// Announces this process (`PREFIX replicas/NAME`, on a lease of `ttl` kept alive in the
    /// background) for as long as the store is open, re-announcing after an outage outlived the
    /// lease: what `keyctl status` lists.
    pub fn announce(&self, replica: &keyd_proto::Replica, ttl: Duration) {
        let Some(rt) = self.rt.get() else { return };
        let mut key = self.replicas_prefix();
        key.extend_from_slice(replica.name.as_bytes());
        let value = serde_json::to_vec(replica).unwrap_or_default();
        let client = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let step = ttl.max(Duration::from_secs(2));
        rt.spawn(async move {
            loop {
                let announced: Result<std::convert::Infallible, String> = async {
                    let mut c = client.clone();
                    let id = tokio::time::timeout(step, c.lease_grant(ttl_secs, None))
                        .await
                        .map_err(|_| "lease grant timed out".to_owned())?
                        .map_err(|e| e.to_string())?
                        .id();
                    let put = etcd_client::PutOptions::new().with_lease(id);
                    tokio::time::timeout(step, c.put(key.clone(), value.clone(), Some(put)))
                        .await
                        .map_err(|_| "put timed out".to_owned())?
                        .map_err(|e| e.to_string())?;
                    let (mut keeper, mut answers) =
                        tokio::time::timeout(step, c.lease_keep_alive(id))
                            .await
                            .map_err(|_| "keep-alive timed out".to_owned())?
                            .map_err(|e| e.to_string())?;
                    loop {
                        tokio::time::sleep(step / 3).await;
                        let answer = tokio::time::timeout(step, async {
                            keeper.keep_alive().await?;
                            answers.message().await
                        })
                        .await;
                        match answer {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                            Ok(Ok(_)) => return Err("the lease expired".to_owned()),
                            Ok(Err(e)) => return Err(e.to_string()),
                            Err(_) => return Err("keep-alive timed out".to_owned()),
                        }
                    }
                }
                .await;
                let Err(why) = announced;
                tracing::debug!(why, "announcing this replica again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Ends the lease without telling this process, as an expiry on the etcd side would (tests).
    #[doc(hidden)]
    pub fn resign_for_test(&self) {
        if let Some(fence) = self.fence() {
            let lease = self.client.lease_client();
            let id = fence.lease;
            let _ = self.run(
                "revoke the leader lease",
                lease,
                move |mut lease| async move { lease.revoke(id).await },
            );
        }
    }

    fn table_prefix(&self, table: Table) -> Vec<u8> {
        format!("{}t/{}/", self.prefix, table.name()).into_bytes()
    }

    fn table_key(&self, table: Table, key: &str) -> Vec<u8> {
        let mut k = self.table_prefix(table);
        k.extend_from_slice(key.as_bytes());
        k
    }

    fn audit_prefix(&self) -> Vec<u8> {
        format!("{}audit/", self.prefix).into_bytes()
    }

    fn audit_key(&self, seq: u64) -> Vec<u8> {
        format!("{}audit/{seq:020}", self.prefix).into_bytes()
    }

    fn head_key(&self) -> Vec<u8> {
        format!("{}audit-head", self.prefix).into_bytes()
    }

    /// Entries with keys in `[start, end)`, in key order, at most `limit`, read in pages at one
    /// revision (so that a scan is one consistent snapshot, as redb's is).
    fn range(
        &self,
        op: &'static str,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        self.range_at(op, start, end, limit, 0)
    }

    /// Up to `limit` entries in `[start, end)`, paged, all read at one revision: `at`, or (0)
    /// the newest when the first page is read.
    fn range_at(
        &self,
        op: &'static str,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
        at: i64,
    ) -> Result<Rows, StoreError> {
        let mut out = Vec::new();
        let start_again = start.clone();
        let mut restarts = 0;
        let mut from = start;
        let mut revision = at;
        while out.len() < limit {
            let page = PAGE.min(i64::try_from(limit - out.len()).unwrap_or(PAGE));
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(revision);
            let kv = self
                .client
                .kv_client()
                .max_decoding_message_size(usize::MAX);
            let key = from.clone();
            let read = self.run(op, (kv, key, options), |(mut kv, key, o)| async move {
                kv.get(key, Some(o)).await
            });
            let mut resp = match read {
                // The pinned revision was compacted away mid-scan: start again at the newest.
                Err(e)
                    if revision != 0
                        && at == 0
                        && restarts < 3
                        && keyd_mtls::error_chain(&e).contains("compacted") =>
                {
                    restarts += 1;
                    out.clear();
                    from = start_again.clone();
                    revision = 0;
                    continue;
                }
                other => other?,
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = successor(last.key());
            out.extend(kvs.into_iter().map(|kv| kv.into_key_value()));
            if !more {
                break;
            }
        }
        Ok(out)
    }

    fn table_entries(
        &self,
        table: Table,
        rows: Rows,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let skip = self.table_prefix(table).len();
        rows.into_iter()
            .map(|(k, v)| {
                let key =
                    String::from_utf8(k[skip..].to_vec()).map_err(|_| StoreError::Corrupt {
                        what: format!("{table:?} key"),
                        why: "not UTF-8".into(),
                    })?;
                Ok((key, v))
            })
            .collect()
    }

    fn read_head(&self) -> Result<(Option<Head>, i64), StoreError> {
        let kv = self.client.kv_client();
        let key = self.head_key();
        let resp = self.run("audit head", (kv, key), |(mut kv, key)| async move {
            kv.get(key, None).await
        })?;
        match resp.kvs().first() {
            None => Ok((None, 0)),
            Some(kv) => Ok((Some(decode_head(kv.value())?), kv.mod_revision())),
        }
    }

    fn try_commit(&self, txn: &Txn, at: Timestamp) -> Result<Attempt, StoreError> {
        let mut compares = Vec::with_capacity(txn.guards.len() + 2);
        let mut reads = Vec::with_capacity(txn.guards.len() + 2);
        let fence = self.fenced()?;
        for (table, key, expected) in &txn.guards {
            let k = self.table_key(*table, key);
            compares.push(match expected {
                Some(v) => Compare::value(k.clone(), CompareOp::Equal, v.clone()),
                None => Compare::version(k.clone(), CompareOp::Equal, 0),
            });
            reads.push(TxnOp::get(k, None));
        }
        // Whole tables unchanged: every key under the prefix last written at or before the
        // revision (a deleted key leaves no trace, and frees rather than takes). Read back,
        // counted, to tell this conflict from the others.
        for (table, prefix, revision) in &txn.unchanged_since {
            let p = self.table_key(*table, prefix);
            let after = i64::try_from(*revision)
                .unwrap_or(i64::MAX)
                .saturating_add(1);
            compares.push(
                Compare::mod_revision(p.clone(), CompareOp::Less, after).with_range(range_end(&p)),
            );
            reads.push(TxnOp::get(
                p.clone(),
                Some(
                    GetOptions::new()
                        .with_range(range_end(&p))
                        .with_min_mod_revision(after)
                        .with_count_only(),
                ),
            ));
        }
        // The writes, by key: etcd refuses a key twice in one transaction, and redb's order
        // (every put, then every delete) decides which one wins.
        let mut writes: std::collections::BTreeMap<Vec<u8>, Option<&[u8]>> = Default::default();
        for (table, key, value) in &txn.puts {
            writes.insert(self.table_key(*table, key), Some(value));
        }
        for (table, key) in &txn.deletes {
            writes.insert(self.table_key(*table, key), None);
        }
        let mut ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v.to_vec(), None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        let mut new_head = None;
        if !txn.audit.is_empty() {
            let (head, head_revision) = self.read_head()?;
            let (mut seq, mut prev) = match &head {
                Some(h) => (h.seq + 1, h.hash.clone()),
                None => (1, GENESIS_HASH.to_owned()),
            };
            compares.push(if head.is_some() {
                Compare::mod_revision(self.head_key(), CompareOp::Equal, head_revision)
            } else {
                Compare::version(self.head_key(), CompareOp::Equal, 0)
            });
            reads.push(TxnOp::get(self.head_key(), None));
            for event in &txn.audit {
                let rec = AuditRecord::chain(seq, at, event.clone(), prev);
                let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Backend {
                    op: "encode audit record",
                    source: Box::new(e),
                })?;
                ops.push(TxnOp::put(self.audit_key(seq), bytes, None));
                prev = rec.hash;
                seq += 1;
            }
            let h = Head {
                seq: seq - 1,
                hash: prev,
            };
            ops.push(TxnOp::put(self.head_key(), encode_head(&h), None));
            new_head = Some(h);
        }
        if ops.is_empty() && compares.is_empty() {
            return Ok(Attempt::Done(0));
        }
        if let Some(f) = &fence {
            compares.push(Compare::lease(f.key.clone(), CompareOp::Equal, f.lease));
            reads.push(TxnOp::get(f.key.clone(), None));
        }
        // etcd counts compares, writes and reads separately, each against --max-txn-ops.
        let most = compares.len().max(ops.len()).max(reads.len());
        if most > self.max_txn_ops {
            return Err(StoreError::Backend {
                op: "commit",
                source: format!(
                    "the transaction needs {most} operations, more than store.etcd.max_txn_ops \
                     ({}); nothing was written",
                    self.max_txn_ops
                )
                .into(),
            });
        }
        let etxn = EtcdTxn::new().when(compares).and_then(ops).or_else(reads);
        let kv = self.client.kv_client();
        let resp = self.run("commit", (kv, etxn), |(mut kv, t)| async move {
            kv.txn(t).await
        })?;
        if resp.succeeded() {
            return Ok(Attempt::Done(resp.header().map_or(0, |h| h.revision())));
        }
        // Which compare failed: the fence first (a deposed leader must stop), then the first
        // guard whose stored value differs, else the head.
        let answers = resp.op_responses();
        if let (Some(f), Some(TxnOpResponse::Get(g))) = (&fence, answers.last())
            && g.kvs().first().map(|kv| kv.lease()) != Some(f.lease)
        {
            return Err(self.deposed("commit"));
        }
        for ((table, key, expected), answer) in txn.guards.iter().zip(&answers) {
            let current = match answer {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            };
            if current.as_deref() != expected.as_deref() {
                return Err(StoreError::Conflict {
                    table: *table,
                    key: key.clone(),
                });
            }
        }
        let ranges = answers.iter().skip(txn.guards.len());
        for ((table, prefix, _), answer) in txn.unchanged_since.iter().zip(ranges) {
            if let TxnOpResponse::Get(g) = answer
                && g.count() > 0
            {
                return Err(StoreError::Conflict {
                    table: *table,
                    key: format!("{prefix}*"),
                });
            }
        }
        if new_head.is_some() {
            return Ok(Attempt::HeadMoved);
        }
        // Every guard held when etcd looked again: one changed and changed back in between.
        match txn.guards.first() {
            Some((table, key, _)) => Err(StoreError::Conflict {
                table: *table,
                key: key.clone(),
            }),
            None => Err(StoreError::Backend {
                op: "commit",
                source: "etcd refused an unconditional transaction".into(),
            }),
        }
    }
}

impl EtcdStore {
    /// The fence to add to a write, or `Deposed` if leadership was lost.
    fn fenced(&self) -> Result<Option<Fence>, StoreError> {
        if self.lost.borrow().is_some() {
            return Err(StoreError::Deposed { op: "commit" });
        }
        Ok(self.fence())
    }

    fn deposed(&self, op: &'static str) -> StoreError {
        self.depose("another keyd holds the leader key now".to_owned());
        StoreError::Deposed { op }
    }
}

enum Attempt {
    /// Committed at this store revision (0: nothing to write).
    Done(i64),
    HeadMoved,
}

fn encode_head(h: &Head) -> Vec<u8> {
    serde_json::to_vec(h).unwrap_or_default()
}

fn decode_head(bytes: &[u8]) -> Result<Head, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: "audit head".into(),
        why: e.to_string(),
    })
}

impl Store for EtcdStore {
    /// `etcd:ENDPOINTS PREFIX`, and ` (leader: HOLDER)` while this process leads it.
    fn describe(&self) -> String {
        let leading = match (self.fence(), self.lost.borrow().as_ref()) {
            (Some(f), None) => format!(" (leader: {})", f.holder),
            _ => String::new(),
        };
        format!("{}{leading}", self.location())
    }

    /// etcd's bound less what the store adds to a transaction: the audit head and the fence.
    fn max_txn_ops(&self) -> usize {
        self.max_txn_ops.saturating_sub(2)
    }

    fn shared(&self) -> bool {
        true
    }

    fn max_unavailable(&self) -> Option<Duration> {
        Some(self.max_unavailable)
    }

    fn replicas(&self) -> Result<Option<Vec<keyd_proto::Replica>>, StoreError> {
        let kv = self.client.kv_client();
        let from = self.replicas_prefix();
        let leader = self.leader_key();
        let (listed, led) = self.run(
            "list the replicas",
            (kv, from, leader),
            |(mut kv, from, leader)| async move {
                let listed = kv.get(from, Some(GetOptions::new().with_prefix())).await?;
                let led = kv.get(leader, None).await?;
                Ok((listed, led))
            },
        )?;
        let leader = led.kvs().first().map(|kv| kv.value().to_vec());
        let mut replicas = Vec::new();
        for kv in listed.kvs() {
            let mut r: keyd_proto::Replica =
                serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                    what: String::from_utf8_lossy(kv.key()).into_owned(),
                    why: e.to_string(),
                })?;
            r.leader = leader.as_deref() == Some(r.name.as_bytes());
            replicas.push(r);
        }
        Ok(Some(replicas))
    }

    /// An etcd watch on every table: what any replica writes reaches every replica's cache.
    fn follow(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        let rt = self.rt.get()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let root = self.prefix.clone().into_bytes();
        rt.spawn(follow_tables(
            self.client.clone(),
            root,
            tx,
            std::sync::Arc::clone(&self.progress_wanted),
            std::sync::Arc::clone(&self.rewatch),
        ));
        Some(rx)
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_at(table, key, None)
    }

    fn get_at(
        &self,
        table: Table,
        key: &str,
        at: Option<u64>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let kv = self
            .client
            .kv_client()
            .max_decoding_message_size(usize::MAX);
        let k = self.table_key(table, key);
        let options = GetOptions::new().with_revision(revision(at));
        let mut resp = self.run("get", (kv, k, options), |(mut kv, k, o)| async move {
            kv.get(k, Some(o)).await
        })?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_from_at(table, "", usize::MAX, None)
    }

    fn current_revision(&self) -> Result<Option<u64>, StoreError> {
        let kv = self.client.kv_client();
        let key = self.leader_key();
        let resp =
            self.run(
                "read the store revision",
                (kv, key),
                |(mut kv, key)| async move {
                    kv.get(key, Some(GetOptions::new().with_count_only())).await
                },
            )?;
        Ok(resp.header().and_then(|h| u64::try_from(h.revision()).ok()))
    }

    fn request_progress(&self) {
        self.progress_wanted.notify_one();
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        self.commit_at(txn).map(drop)
    }

    fn commit_at(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        let at = txn.at.unwrap_or_else(Timestamp::now);
        for _ in 0..HEAD_RETRIES {
            match self.try_commit(&txn, at)? {
                Attempt::Done(0) => return Ok(None),
                Attempt::Done(revision) => return Ok(u64::try_from(revision).ok()),
                Attempt::HeadMoved => continue,
            }
        }
        Err(unavailable(
            "audit append",
            format!("other writers moved the audit head {HEAD_RETRIES} times in a row"),
        ))
    }

    fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let p = self.audit_prefix();
        let rows = self.range("audit range", self.audit_key(from), range_end(&p), limit)?;
        rows.iter()
            .map(|(k, v)| decode_audit(String::from_utf8_lossy(k), v))
            .collect()
    }

    fn scan_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan_from_at(table, from, limit, None)
    }

    fn scan_from_at(
        &self,
        table: Table,
        from: &str,
        limit: usize,
        at: Option<u64>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let p = self.table_prefix(table);
        let rows = self.range_at(
            "scan",
            self.table_key(table, from),
            range_end(&p),
            limit,
            revision(at),
        )?;
        self.table_entries(table, rows)
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let p = self.table_prefix(table);
        let options = GetOptions::new()
            .with_range(range_end(&p))
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let kv = self
            .client
            .kv_client()
            .max_decoding_message_size(usize::MAX);
        let mut resp = self.run("last", (kv, p, options), |(mut kv, p, o)| async move {
            kv.get(p, Some(o)).await
        })?;
        let rows = resp
            .take_kvs()
            .into_iter()
            .map(|kv| kv.into_key_value())
            .collect();
        Ok(self.table_entries(table, rows)?.into_iter().next())
    }

    fn audit_last(&self) -> Result<Option<AuditRecord>, StoreError> {
        let p = self.audit_prefix();
        let options = GetOptions::new()
            .with_range(range_end(&p))
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let kv = self.client.kv_client();
        let resp = self.run(
            "audit tail",
            (kv, p, options),
            |(mut kv, p, o)| async move { kv.get(p, Some(o)).await },
        )?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(decode_audit(
                String::from_utf8_lossy(kv.key()),
                kv.value(),
            )?)),
            None => Ok(None),
        }
    }

    fn audit_delete_through(&self, through: u64, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let p = self.audit_prefix();
        // The keys to delete: the oldest `limit` with seq <= through ...
        let options = GetOptions::new()
            .with_range(self.audit_key(through.saturating_add(1)))
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .with_keys_only();
        let kv = self.client.kv_client();
        let start = p.clone();
        let resp = self.run(
            "audit range",
            (kv, start, options),
            |(mut kv, s, o)| async move { kv.get(s, Some(o)).await },
        )?;
        let Some(last) = resp.kvs().last() else {
            return Ok(0);
        };
        // ... removed by one range delete, one etcd transaction (fenced like every write).
        let end = successor(last.key());
        let fence = self.fenced()?;
        let mut t = EtcdTxn::new();
        if let Some(f) = &fence {
            t = t.when([Compare::lease(f.key.clone(), CompareOp::Equal, f.lease)]);
        }
        let t = t.and_then([TxnOp::delete(p, Some(DeleteOptions::new().with_range(end)))]);
        let kv = self.client.kv_client();
        let resp = self.run("audit delete", (kv, t), |(mut kv, t)| async move {
            kv.txn(t).await
        })?;
        if !resp.succeeded() {
            return Err(self.deposed("audit delete"));
        }
        Ok(resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => usize::try_from(d.deleted()).unwrap_or(0),
                _ => 0,
            })
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends_cover_exactly_the_prefix() {
        assert_eq!(range_end(b"/keyd/t/nodes/"), b"/keyd/t/nodes0".to_vec());
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff\xff"), vec![0]);
        assert_eq!(successor(b"k"), b"k\0".to_vec());
    }

    #[test]
    fn audit_keys_sort_by_sequence() {
        let k = |seq: u64| format!("/p/audit/{seq:020}");
        assert!(k(9) < k(10));
        assert!(k(99_999) < k(100_000));
        assert!(k(u64::MAX).len() == k(1).len());
    }

    /// A request to an address where nothing listens fails before it is sent, and is known as
    /// such (so it may go to another member); a request that got an answer is not.
    #[tokio::test]
    async fn a_refused_connection_is_known_as_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        let client = Client::connect([format!("http://127.0.0.1:{port}")], Some(options))
            .await
            .unwrap();
        let e = client.kv_client().get("k", None).await.unwrap_err();
        assert!(never_sent(&e), "{e:?}");
        let answered = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader"));
        assert!(!never_sent(&answered));
    }
}
