//! Talking to keyd, always off the request path.
//!
//! - [`KeydClient`]: mTLS HTTP/1.1 to keyd's API with the webhook's client certificate
//!   (identity `spiffe://keyd/webhook/NAME`).
//! - [`StatusCache`]: `GET /v1/enforcement`, refreshed every `keyd.refresh_interval` by
//!   [`run_status_poller`]. A review reads the cached answer; older than `keyd.max_staleness`
//!   (measured on the webhook's own monotonic clock) it counts as unknown, and the decision
//!   applies `keyd.when_unavailable`.
//! - [`AuditQueue`]: decisions for keyd's audit log (`POST /v1/audit/admission`). A review only
//!   pushes into a bounded in-memory queue; [`run_audit_flusher`] sends batches and keeps them
//!   queued while keyd is unreachable. When the queue is full the oldest record that is not a
//!   break-glass is dropped first (counted in `keyd_webhook_audit_records{result="dropped"}`).
//!   Every recorded decision is also written to the webhook's log (target `keyd_webhook::audit`)
//!   at the moment it is made, so a record lost from memory (a crash before delivery) is still
//!   in the log stream.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use keyd_proto::{AdmissionDecision, AdmissionDecisions, EnforcementStatus};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::decision::{KeydView, Outcome};
use crate::metrics::Metrics;

/// Most decisions per report (keyd accepts at most 1000).
pub const AUDIT_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum KeydError {
    #[error("keyd URL {0:?} is not like https://HOST:PORT")]
    BadUrl(String),
    #[error("cannot connect to keyd at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with keyd at {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keyd at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP exchange with keyd failed")]
    Http(#[from] hyper::Error),
    #[error("keyd answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("keyd's answer is not the expected JSON")]
    Decode(#[source] serde_json::Error),
    #[error("cannot build the request: {0}")]
    Request(String),
}

/// An mTLS client for keyd holding one keep-alive connection, re-established on failure.
/// Built [`with_reload`](Self::with_reload), it picks up a renewed certificate or CA (a
/// Secret the kubelet updated) before the next request.
pub struct KeydClient {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Mutex<tokio_rustls::TlsConnector>,
    reload: Option<Reload>,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<http1::SendRequest<Full<Bytes>>>>,
}

/// The files the client's TLS configuration came from, and their state when it was loaded.
struct Reload {
    paths: crate::tls::ClientTlsPaths,
    loaded: Mutex<FilesState>,
}

/// Each file's modification time and size (`None`: unreadable).
type FilesState = [Option<(std::time::SystemTime, u64)>; 3];

fn files_state(paths: &crate::tls::ClientTlsPaths) -> FilesState {
    [&paths.ca, &paths.cert, &paths.key].map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
}

impl fmt::Debug for KeydClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeydClient({}:{})", self.host, self.port)
    }
}

impl KeydClient {
    pub fn new(url: &str, tls: Arc<ClientConfig>, timeout: Duration) -> Result<Self, KeydError> {
        let bad = || KeydError::BadUrl(url.to_owned());
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.ends_with(':') => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (rest, 443),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        Ok(Self {
            host,
            port,
            server_name,
            tls: Mutex::new(tokio_rustls::TlsConnector::from(tls)),
            reload: None,
            timeout,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Reloads the TLS configuration from `paths` (what it was built from) when one of the
    /// files changes.
    pub fn with_reload(mut self, paths: crate::tls::ClientTlsPaths) -> Self {
        let loaded = Mutex::new(files_state(&paths));
        self.reload = Some(Reload { paths, loaded });
        self
    }

    /// Loads the files again if they changed since; true when the configuration is new. A
    /// configuration that does not load (a certificate written before its key) keeps the old
    /// one until the next change.
    fn reload_if_changed(&self) -> bool {
        let Some(r) = &self.reload else {
            return false;
        };
        let now = files_state(&r.paths);
        let mut loaded = r.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if *loaded == now {
            return false;
        }
        match crate::tls::client_config(&r.paths) {
            Ok(tls) => {
                *self.tls.lock().unwrap_or_else(PoisonError::into_inner) =
                    tokio_rustls::TlsConnector::from(tls);
                *loaded = now;
                tracing::info!("reloaded the client certificate for keyd");
                true
            }
            Err(e) => {
                tracing::warn!(error = %keyd_mtls::error_chain(&e),
                    "the client certificate for keyd changed but does not load; keeping the old one");
                false
            }
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, KeydError> {
        let addr = self.addr();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| KeydError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let connector = self
            .tls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| KeydError::Handshake { addr, source })?;
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request; on a failed connection, one retry on a fresh one. The whole exchange is
    /// bounded by the configured timeout.
    async fn send(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), KeydError> {
        let fut = async {
            let mut guard = self.conn.lock().await;
            if self.reload_if_changed() {
                // The kept connection speaks with the old certificate.
                *guard = None;
            }
            let mut retried = false;
            loop {
                let mut sender = match guard.take() {
                    Some(s) if !s.is_closed() => s,
                    _ => self.connect().await?,
                };
                let mut req = Request::builder()
                    .method(method.clone())
                    .uri(path)
                    .header(header::HOST, self.addr());
                if json.is_some() {
                    req = req.header(header::CONTENT_TYPE, "application/json");
                }
                let req = req
                    .body(Full::new(json.clone().map(Bytes::from).unwrap_or_default()))
                    .map_err(|e| KeydError::Request(e.to_string()))?;
                let sent = async {
                    sender.ready().await?;
                    let resp = sender.send_request(req).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>((status, body))
                }
                .await;
                match sent {
                    Ok(r) => {
                        *guard = Some(sender);
                        return Ok(r);
                    }
                    // A kept-alive connection that keyd closed: try once on a new one.
                    Err(e) if !retried => {
                        retried = true;
                        tracing::debug!(error = %e, "keyd connection failed; reconnecting");
                    }
                    Err(e) => return Err(KeydError::Http(e)),
                }
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| KeydError::Timeout {
                addr: self.addr(),
                timeout: self.timeout,
            })?
    }

    /// `GET /v1/enforcement`.
    pub async fn enforcement(&self) -> Result<EnforcementStatus, KeydError> {
        let (status, body) = self.send(Method::GET, "/v1/enforcement", None).await?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(KeydError::Decode)
    }

    /// `POST /v1/audit/admission`.
    pub async fn record(&self, decisions: &[AdmissionDecision]) -> Result<(), KeydError> {
        let body = serde_json::to_vec(&AdmissionDecisions {
            decisions: decisions.to_vec(),
        })
        .map_err(|e| KeydError::Request(e.to_string()))?;
        let (status, body) = self
            .send(Method::POST, "/v1/audit/admission", Some(body))
            .await?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        Ok(())
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> KeydError {
    let message = serde_json::from_slice::<keyd_proto::ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect());
    KeydError::Status { status, message }
}

/// keyd's last enforcement status and when it arrived.
#[derive(Debug)]
pub struct StatusCache {
    max_staleness: Duration,
    state: RwLock<StatusState>,
}

#[derive(Debug, Default)]
struct StatusState {
    last: Option<(Arc<EnforcementStatus>, Instant)>,
    last_error: Option<String>,
}

impl StatusCache {
    pub fn new(max_staleness: Duration) -> Self {
        Self {
            max_staleness,
            state: RwLock::default(),
        }
    }

    /// A cache that always holds `status` as fresh (tests and benchmarks).
    pub fn fixed(status: EnforcementStatus) -> Self {
        let c = Self::new(Duration::MAX);
        c.update(Ok(status), Instant::now());
        c
    }

    pub fn update(&self, result: Result<EnforcementStatus, String>, at: Instant) {
        // A poisoned lock only means a writer panicked mid-assignment of plain data; the data
        // is still a whole value.
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(status) => {
                s.last = Some((Arc::new(status), at));
                s.last_error = None;
            }
            Err(e) => s.last_error = Some(e),
        }
    }

    /// What a decision at `now` may rely on.
    pub fn view(&self, now: Instant) -> KeydView {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let error = s
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        match &s.last {
            Some((status, at)) => {
                let age = now.saturating_duration_since(*at);
                if age <= self.max_staleness {
                    KeydView::Known(Arc::clone(status))
                } else {
                    KeydView::Unknown(
                        format!(
                            "keyd's last answer is {}s old, more than keyd.max_staleness ({}s){error}",
                            age.as_secs(),
                            self.max_staleness.as_secs()
                        )
                        .into(),
                    )
                }
            }
            None => KeydView::Unknown(
                format!("keyd has not answered since the webhook started{error}").into(),
            ),
        }
    }
}

/// Refreshes `cache` every `interval` until `shutdown` turns true.
pub async fn run_status_poller(
    client: Arc<KeydClient>,
    cache: Arc<StatusCache>,
    interval: Duration,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let result = client.enforcement().await;
        let ok = result.is_ok();
        match result {
            Ok(status) => {
                Metrics::count(&metrics.keyd_status_fetches, "ok");
                let unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default();
                metrics.keyd_status_last_success.set(unix);
                cache.update(Ok(status), Instant::now());
            }
            Err(e) => {
                Metrics::count(&metrics.keyd_status_fetches, "error");
                let text = crate::ErrorChain(&e).to_string();
                if was_ok != Some(false) {
                    tracing::warn!(error = %text, "cannot read keyd's enforcement status");
                }
                cache.update(Err(text), Instant::now());
            }
        }
        if was_ok == Some(false) && ok {
            tracing::info!("keyd's enforcement status is readable again");
        }
        was_ok = Some(ok);
    }
}

/// Decisions waiting for keyd's audit log.
#[derive(Debug)]
pub struct AuditQueue {
    capacity: usize,
    queue: Mutex<VecDeque<AdmissionDecision>>,
    notify: Notify,
    metrics: Metrics,
}

impl AuditQueue {
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Self {
            capacity: capacity.max(1),
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            metrics,
        }
    }

    /// Queues one record (never blocks on keyd). Also logs it: the log is the second sink.
    pub fn push(&self, d: AdmissionDecision) {
        tracing::info!(
            target: "keyd_webhook::audit",
            outcome = %d.outcome,
            enforcement = %d.enforcement,
            operation = %d.operation,
            kind = %d.kind,
            namespace = %d.namespace,
            name = %d.name,
            user = %d.user,
            policies = ?d.policies,
            reason = %d.reason,
            "admission decision"
        );
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= self.capacity {
            let break_glass = Outcome::BreakGlass.as_str();
            let victim = q.iter().position(|r| r.outcome != break_glass).unwrap_or(0);
            q.remove(victim);
            Metrics::count(&self.metrics.audit_records, "dropped");
        }
        q.push_back(d);
        self.metrics.audit_queue_depth.set(gauge(q.len()));
        drop(q);
        self.notify.notify_one();
    }

    fn take(&self, max: usize) -> Vec<AdmissionDecision> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let n = q.len().min(max);
        let batch: Vec<_> = q.drain(..n).collect();
        self.metrics.audit_queue_depth.set(gauge(q.len()));
        batch
    }

    /// Puts an unsent batch back at the front, in order, within capacity (newer records win:
    /// the batch is the oldest).
    fn requeue(&self, batch: Vec<AdmissionDecision>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.saturating_sub(q.len());
        let skip = batch.len().saturating_sub(room);
        for _ in 0..skip {
            Metrics::count(&self.metrics.audit_records, "dropped");
        }
        for d in batch.into_iter().skip(skip).rev() {
            q.push_front(d);
        }
        self.metrics.audit_queue_depth.set(gauge(q.len()));
    }

    pub fn len(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Sends queued decisions to keyd until `shutdown`, then makes one last attempt (bounded by the
/// client's timeout) to deliver what is left.
pub async fn run_audit_flusher(
    client: Arc<KeydClient>,
    queue: Arc<AuditQueue>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let stopping = tokio::select! {
            () = queue.notify.notified() => false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        loop {
            let batch = queue.take(AUDIT_BATCH);
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            match client.record(&batch).await {
                Ok(()) => {
                    queue
                        .metrics
                        .audit_records
                        .get_or_create(&crate::metrics::ResultLabel { result: "sent" })
                        .inc_by(n);
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    queue
                        .metrics
                        .audit_records
                        .get_or_create(&crate::metrics::ResultLabel { result: "retried" })
                        .inc_by(n);
                    tracing::warn!(error = %crate::ErrorChain(&e), queued = n, "cannot send decisions to keyd's audit log; will retry");
                    queue.requeue(batch);
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    break;
                }
            }
        }
        if stopping || *shutdown.borrow() {
            if !queue.is_empty() {
                // One more pass for what arrived while stopping; a failure then is final.
                let batch = queue.take(AUDIT_BATCH * 2);
                if let Err(e) = client.record(&batch).await {
                    tracing::warn!(error = %crate::ErrorChain(&e), lost = batch.len(), "decisions not delivered to keyd at shutdown (they are in this log)");
                }
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyd_proto::{ModeStatus, Timestamp};

    fn decision(outcome: &str, name: &str) -> AdmissionDecision {
        AdmissionDecision {
            at: Timestamp::now(),
            outcome: outcome.into(),
            enforcement: "enforce".into(),
            operation: "CREATE".into(),
            kind: "Pod".into(),
            namespace: "ns".into(),
            name: name.into(),
            user: "alice".into(),
            policies: vec![],
            reason: "r".into(),
        }
    }

    fn status() -> EnforcementStatus {
        let m = ModeStatus {
            active: true,
            within_schedule: true,
            reason: None,
        };
        EnforcementStatus {
            at: Timestamp::now(),
            ipsec: m.clone(),
            wireguard: m,
            rejected_policies: Vec::new(),
            rules_pending: false,
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_record_that_is_not_break_glass() {
        let q = AuditQueue::new(3, Metrics::default());
        q.push(decision("break_glass", "bg1"));
        q.push(decision("denied", "d1"));
        q.push(decision("denied", "d2"));
        q.push(decision("denied", "d3"));
        let names: Vec<String> = q.take(10).into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["bg1", "d2", "d3"]);

        // All break-glass: the oldest goes.
        for n in ["b1", "b2", "b3", "b4"] {
            q.push(decision("break_glass", n));
        }
        let names: Vec<String> = q.take(10).into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["b2", "b3", "b4"]);
    }

    #[test]
    fn an_unsent_batch_goes_back_in_order() {
        let q = AuditQueue::new(4, Metrics::default());
        for n in ["a", "b", "c"] {
            q.push(decision("denied", n));
        }
        let batch = q.take(2);
        q.push(decision("denied", "d"));
        q.push(decision("denied", "e"));
        q.requeue(batch);
        let names: Vec<String> = q.take(10).into_iter().map(|d| d.name).collect();
        // Capacity 4: one of the requeued (the oldest) is dropped.
        assert_eq!(names, ["b", "c", "d", "e"]);
    }

    #[test]
    fn status_goes_stale_after_max_staleness() {
        let cache = StatusCache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        match cache.view(t0) {
            KeydView::Unknown(why) => assert!(why.contains("has not answered"), "{why}"),
            KeydView::Known(_) => panic!("nothing fetched yet"),
        }
        cache.update(Ok(status()), t0);
        assert!(matches!(
            cache.view(t0 + Duration::from_secs(30)),
            KeydView::Known(_)
        ));
        // A failed refresh does not discard a fresh status...
        cache.update(
            Err("connection refused".into()),
            t0 + Duration::from_secs(5),
        );
        assert!(matches!(
            cache.view(t0 + Duration::from_secs(10)),
            KeydView::Known(_)
        ));
        // ...but once it is too old, the status is unknown and the error is named.
        match cache.view(t0 + Duration::from_secs(31)) {
            KeydView::Unknown(why) => {
                assert!(why.contains("31s old"), "{why}");
                assert!(why.contains("connection refused"), "{why}");
            }
            KeydView::Known(_) => panic!("stale status used"),
        }
    }

    #[test]
    fn urls() {
        let tls = Arc::new(
            ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let t = Duration::from_secs(1);
        let c = KeydClient::new("https://keyd.keyd.svc:8443/", tls.clone(), t).unwrap();
        assert_eq!(c.addr(), "keyd.keyd.svc:8443");
        let c = KeydClient::new("https://[::1]:9", tls.clone(), t).unwrap();
        assert_eq!(c.addr(), "::1:9");
        assert!(KeydClient::new("http://keyd:1", tls.clone(), t).is_err());
        assert!(KeydClient::new("https://keyd:port", tls, t).is_err());
    }
}
