//! The scenarios and the workers that drive them.
//!
//! Keep-alive scenarios: one connection per node, each with its node's certificate, opened (and
//! checked with one fetch, which also learns the node's ETag) before the clock starts. W workers
//! each own a slice of the connections and issue one request at a time on them round-robin, so
//! W requests are in flight. Handshake scenario: W workers each loop over fresh TCP + TLS
//! connections (no resumption), one `GET` with `Connection: close` on each.
//!
//! By default the loop is closed (each worker sends its next request when the previous one is
//! answered), which finds the maximum throughput and the latency at saturation. With a rate the
//! loop is open: requests are due on a fixed schedule, and latency counts from when a request
//! was due, so it includes any wait a slow server caused (no coordinated omission).
//!
//! Every run has a warm-up, then a measured window; a request counts (latency and throughput)
//! if it started (open loop: was due) inside the window, and throughput divides by the
//! window's length. Errors are counted during warm-up too; in the open loop, a request that
//! was due but could not be sent before the run ended is an error. Each request is bounded by
//! the request timeout and each run by its duration (plus a grace period), so a run always
//! ends.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::{HeaderName, Method, StatusCode, header};
use keyd_mtls::client::{Connection, Connector};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::fleet::{self, BenchNode, Fleet};
use super::{Error, error_chain};

/// Connections opened at once while preparing a keep-alive run.
const CONNECT_PARALLELISM: usize = 32;
/// Error messages kept per run, for the report.
const ERROR_SAMPLES: usize = 5;
/// Latency histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_MICROS: u64 = 60_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Full bundle fetches (200) over keep-alive connections, one per node.
    Keepalive,
    /// The same with `If-None-Match: <etag>` (304), as a polling node-shim fetches.
    #[serde(rename = "keepalive-304")]
    Keepalive304,
    /// A fresh TCP + TLS connection per fetch, no session resumption.
    Handshake,
    /// Full fetches after every node registered a WireGuard key: each bundle holds N-1 peers.
    WgMesh,
    /// The mesh bundles with `If-None-Match`.
    #[serde(rename = "wg-mesh-304")]
    WgMesh304,
}

impl Scenario {
    /// Every scenario, in the order they must run (the WireGuard mesh cannot be undone).
    pub const ALL: [Scenario; 5] = [
        Scenario::Keepalive,
        Scenario::Keepalive304,
        Scenario::Handshake,
        Scenario::WgMesh,
        Scenario::WgMesh304,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Keepalive => "keepalive",
            Scenario::Keepalive304 => "keepalive-304",
            Scenario::Handshake => "handshake",
            Scenario::WgMesh => "wg-mesh",
            Scenario::WgMesh304 => "wg-mesh-304",
        }
    }

    /// Needs every node registered with a WireGuard key.
    pub fn wireguard(self) -> bool {
        matches!(self, Scenario::WgMesh | Scenario::WgMesh304)
    }

    fn conditional(self) -> bool {
        matches!(self, Scenario::Keepalive304 | Scenario::WgMesh304)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                format!("unknown scenario {s:?}; one of {}", names.join(", "))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    Keyd,
    Ceiling,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Keyd => "keyd",
            ServerKind::Ceiling => "ceiling",
        }
    }
}

/// A server to load.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: ServerKind,
    pub addr: std::net::SocketAddr,
    /// For CPU accounting; `None` if it runs inside this process.
    pub pid: Option<u32>,
}

/// How long and how hard one run goes.
#[derive(Debug, Clone)]
pub struct RunParams {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_requests: Option<u64>,
    pub request_timeout: Duration,
    /// Open loop: this many requests per second in total, spread over the workers; latency then
    /// counts from when each request was due. `None`: closed loop, as fast as answered.
    pub rate: Option<f64>,
}

/// What one run measured.
#[derive(Debug)]
pub struct Measurement {
    /// Successful requests inside the measured window.
    pub requests: u64,
    /// The measured window's length (shorter if the request budget ran out first).
    pub seconds: f64,
    /// Latency of the counted requests, in microseconds.
    pub latency: Histogram<u64>,
    /// Failed requests, warm-up included.
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Response body bytes of the counted requests.
    pub body_bytes: u64,
    /// The measured window second by second.
    pub timeline: Vec<Second>,
    /// Open connections (keep-alive) or workers (handshake).
    pub connections: usize,
    pub workers: usize,
    /// CPU cores used during the measured window by the server and by this process.
    pub server_cores: Option<f64>,
    pub client_cores: Option<f64>,
    /// CPU cores busy machine-wide in the same window (anything else running shows here).
    pub system_cores: Option<f64>,
}

/// Runs `scenario` against `target` once: prepare, warm up, measure.
pub async fn run(
    fleet: &Fleet,
    scenario: Scenario,
    target: &Target,
    p: &RunParams,
) -> Result<Measurement, Error> {
    let (workers, connections): (Vec<Work>, usize) = match scenario {
        Scenario::Handshake => {
            let connectors = fleet
                .nodes
                .iter()
                .map(|n| Ok((n.connector(target.addr)?, n.bundle_path.clone())))
                .collect::<Result<Vec<_>, Error>>()?;
            let connectors = Arc::new(connectors);
            let w = p.concurrency;
            let work = (0..w)
                .map(|i| Work::Handshake {
                    connectors: Arc::clone(&connectors),
                    first: i,
                    stride: w,
                })
                .collect();
            (work, w)
        }
        _ => {
            let slots = open_connections(fleet, target).await?;
            let n = slots.len();
            let w = p.concurrency.min(n);
            let mut per_worker: Vec<Vec<Slot>> = (0..w).map(|_| Vec::new()).collect();
            for (i, slot) in slots.into_iter().enumerate() {
                per_worker[i % w].push(slot);
            }
            let conditional = scenario.conditional();
            let work = per_worker
                .into_iter()
                .map(|slots| Work::KeepAlive { slots, conditional })
                .collect();
            (work, n)
        }
    };
    let worker_count = workers.len();

    let start = Instant::now();
    let clock = Clock {
        measure_from: start + p.warmup,
        stop_at: start + p.warmup + p.duration,
        budget: p.max_requests.map(|m| Arc::new(AtomicU64::new(m))),
        request_timeout: p.request_timeout,
    };
    let server_pid = target.pid;
    let measure_from = clock.measure_from;
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        CpuSample::take(server_pid)
    });
    let empty = Histogram::new_with_bounds(1, HIST_MAX_MICROS, 3).map_err(|e| Error::Protocol {
        what: "creating a latency histogram".into(),
        reason: e.to_string(),
    })?;
    let mut tasks = JoinSet::new();
    for (i, work) in workers.into_iter().enumerate() {
        let pacer = Pacer::new(p.rate, i, worker_count, start);
        tasks.spawn(work.run(clock.clone(), pacer, Stats::new(&empty)));
    }
    // Workers stop sending at `stop_at` (open loop: at the latest a request timeout later), and
    // the last request may then take up to the request timeout.
    let grace = p.request_timeout * 2 + Duration::from_secs(15);
    let mut stats = Stats::new(&empty);
    let joined = tokio::time::timeout_at((clock.stop_at + grace).into(), async {
        while let Some(done) = tasks.join_next().await {
            stats.merge(done.map_err(Error::Join)?);
        }
        Ok::<_, Error>(())
    })
    .await;
    let ended = Instant::now();
    match joined {
        Ok(result) => result?,
        Err(_) => {
            return Err(Error::Timeout {
                what: format!(
                    "stopping the {scenario} workers against {}",
                    target.server.name()
                ),
                after: p.warmup + p.duration + grace,
            });
        }
    }
    let cpu_end = CpuSample::take(server_pid);
    let cpu_start = sampler.await.map_err(Error::Join)?;
    // The window is the denominator: requests started (open loop: due) in it, over its length.
    // A run cut short by its request budget ends at its last answer instead.
    let window_end = stats.last_done.map_or(ended, |t| t.min(clock.stop_at));
    let seconds = window_end
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    Ok(Measurement {
        requests: stats.ok,
        seconds,
        latency: stats.latency,
        errors: stats.errors,
        error_samples: stats.samples,
        body_bytes: stats.body_bytes,
        timeline: stats.per_second,
        connections,
        workers: worker_count,
        server_cores: cpu_end.server_cores_since(&cpu_start),
        client_cores: cpu_end.client_cores_since(&cpu_start),
        system_cores: cpu_end.system_cores_since(&cpu_start),
    })
}

/// Opens one connection per node, each checked with a full fetch that also yields its ETag.
async fn open_connections(fleet: &Fleet, target: &Target) -> Result<Vec<Slot>, Error> {
    let permits = Arc::new(Semaphore::new(CONNECT_PARALLELISM));
    let mut tasks = JoinSet::new();
    for node in &fleet.nodes {
        let connector = node.connector(target.addr)?;
        let node: BenchNode = node.clone();
        let permits = Arc::clone(&permits);
        let server = target.server.name();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let what = format!("opening {}'s connection to {server}", node.name);
            let mut conn = fleet::connect(&connector, &what).await?;
            let resp = conn
                .get(&node.bundle_path)
                .await
                .map_err(|source| Error::Client {
                    what: what.clone(),
                    source: Box::new(source),
                })?;
            fleet::expect_status(&what, &resp, StatusCode::OK)?;
            let etag = fleet::etag_of(&what, &resp)?;
            Ok::<_, Error>(Slot {
                index: node.index,
                path: node.bundle_path,
                etag,
                conn: Some(conn),
                connector,
            })
        });
    }
    let mut slots = Vec::with_capacity(fleet.nodes.len());
    while let Some(done) = tasks.join_next().await {
        slots.push(done.map_err(Error::Join)??);
    }
    slots.sort_by_key(|s| s.index);
    Ok(slots)
}

/// One node's keep-alive connection.
struct Slot {
    index: usize,
    path: String,
    etag: String,
    /// `None` after a failure; reopened before its next request.
    conn: Option<Connection>,
    connector: Connector,
}

#[derive(Clone)]
struct Clock {
    measure_from: Instant,
    stop_at: Instant,
    /// Measured requests left, if the run is bounded in count.
    budget: Option<Arc<AtomicU64>>,
    request_timeout: Duration,
}

impl Clock {
    /// Whether a request whose latency counts from `at` is sent (`None`: the run is over) and,
    /// if it is measured, in which second of the window (`Some(None)`: warm-up). Requests are
    /// sent while `at` is before the end of the window; in the open loop, a request due before
    /// then but still unsent a request timeout after the end is dropped (and the pacer counts
    /// it as failed), so a server that fell behind cannot keep a run going.
    fn next(&self, at: Instant) -> Option<Option<usize>> {
        if at >= self.stop_at || Instant::now() >= self.stop_at + self.request_timeout {
            return None;
        }
        let measured = at
            .checked_duration_since(self.measure_from)
            .map(|d| usize::try_from(d.as_secs()).unwrap_or(usize::MAX));
        if measured.is_some()
            && let Some(budget) = &self.budget
        {
            // Take one; refuse once none are left.
            let took = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            });
            if took.is_err() {
                return None;
            }
        }
        Some(measured)
    }
}

enum Work {
    KeepAlive {
        slots: Vec<Slot>,
        conditional: bool,
    },
    Handshake {
        connectors: Arc<Vec<(Connector, String)>>,
        first: usize,
        stride: usize,
    },
}

impl Work {
    async fn run(self, clock: Clock, mut pacer: Pacer, mut stats: Stats) -> Stats {
        match self {
            Work::KeepAlive { slots, conditional } => {
                keep_alive(slots, conditional, &clock, &mut pacer, &mut stats).await;
            }
            Work::Handshake {
                connectors,
                first,
                stride,
            } => handshakes(&connectors, first, stride, &clock, &mut pacer, &mut stats).await,
        }
        stats
    }
}

/// When a worker sends its next request: as soon as the previous one is answered (closed
/// loop), or on a fixed schedule (open loop, `--rate`).
enum Pacer {
    Closed,
    Open {
        interval: Duration,
        /// When the next request is due.
        next: Instant,
    },
}

impl Pacer {
    /// Worker `index` of `workers` sharing `rate` requests/s from `start`: each sends every
    /// `workers / rate` seconds, the workers staggered evenly.
    fn new(rate: Option<f64>, index: usize, workers: usize, start: Instant) -> Self {
        let Some(rate) = rate.filter(|r| *r > 0.0) else {
            return Pacer::Closed;
        };
        let interval = Duration::from_secs_f64(workers as f64 / rate);
        let offset = interval.mul_f64(index as f64 / workers.max(1) as f64);
        Pacer::Open {
            interval,
            next: start + offset,
        }
    }

    /// Waits until the next request is due; returns when it was due (which decides whether it
    /// is sent and measured) and the instant its latency counts from. Closed loop: both are
    /// now. Open loop: if the worker is behind schedule (the previous response came late),
    /// latency counts from the due time, so a slow server cannot hide behind the requests it
    /// delayed; if the worker slept, from when it woke, so the timer's own lateness is not
    /// charged to the server.
    async fn wait(&mut self) -> (Instant, Instant) {
        match self {
            Pacer::Closed => {
                let now = Instant::now();
                (now, now)
            }
            Pacer::Open { interval, next } => {
                let due = *next;
                *next += *interval;
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                    (due, Instant::now())
                } else {
                    (due, due)
                }
            }
        }
    }

    /// Once the worker has stopped: how many requests were due before `stop_at` but not sent,
    /// counting the one [`Pacer::wait`] handed out last (the worker stopped instead of sending
    /// it).
    fn unsent(&self, stop_at: Instant) -> u64 {
        match self {
            Pacer::Closed => 0,
            Pacer::Open { interval, next } => {
                let first_unsent = *next - *interval;
                if first_unsent >= stop_at || interval.is_zero() {
                    return 0;
                }
                let gap = stop_at - first_unsent;
                u64::try_from(gap.as_nanos().div_ceil(interval.as_nanos())).unwrap_or(u64::MAX)
            }
        }
    }

    /// Counts the unsent requests as errors: the server fell too far behind for them.
    fn settle(&self, clock: &Clock, stats: &mut Stats) {
        let unsent = self.unsent(clock.stop_at);
        if unsent > 0 {
            stats.errors += unsent;
            if stats.samples.len() < ERROR_SAMPLES {
                stats.samples.push(format!(
                    "{unsent} requests were due but not sent before the run ended (the server fell behind)"
                ));
            }
        }
    }
}

async fn keep_alive(
    mut slots: Vec<Slot>,
    conditional: bool,
    clock: &Clock,
    pacer: &mut Pacer,
    stats: &mut Stats,
) {
    let want = if conditional {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let count = slots.len().max(1);
    let mut next = 0;
    loop {
        let (due, started) = pacer.wait().await;
        let Some(measured) = clock.next(due) else {
            pacer.settle(clock, stats);
            return;
        };
        let Some(slot) = slots.get_mut(next % count) else {
            return;
        };
        next += 1;
        let conn = match &mut slot.conn {
            Some(c) => c,
            None => {
                match tokio::time::timeout(clock.request_timeout, slot.connector.connect()).await {
                    Ok(Ok(c)) => slot.conn.insert(c),
                    Ok(Err(e)) => {
                        stats.error(|| format!("reconnecting: {}", error_chain(&e)));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(_) => {
                        stats.error(|| "reconnecting: timed out".into());
                        continue;
                    }
                }
            }
        };
        let inm: [(HeaderName, &str); 1] = [(header::IF_NONE_MATCH, &slot.etag)];
        let extra: &[(HeaderName, &str)] = if conditional { &inm } else { &[] };
        let result = tokio::time::timeout(
            clock.request_timeout,
            conn.send(Method::GET, &slot.path, None, extra),
        )
        .await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(resp)) => match check(&resp, want) {
                Ok(()) => {
                    if let Some(second) = measured {
                        stats.ok(second, elapsed, resp.body.len());
                    }
                }
                Err(e) => stats.error(|| e),
            },
            Ok(Err(e)) => {
                stats.error(|| error_chain(&e));
                slot.conn = None;
            }
            Err(_) => {
                stats.error(|| format!("no response within {:?}", clock.request_timeout));
                slot.conn = None;
            }
        }
    }
}

async fn handshakes(
    connectors: &[(Connector, String)],
    first: usize,
    stride: usize,
    clock: &Clock,
    pacer: &mut Pacer,
    stats: &mut Stats,
) {
    let close: [(HeaderName, &str); 1] = [(header::CONNECTION, "close")];
    let mut i = first;
    loop {
        let (due, started) = pacer.wait().await;
        let Some(measured) = clock.next(due) else {
            pacer.settle(clock, stats);
            return;
        };
        let Some((connector, path)) = connectors.get(i % connectors.len().max(1)) else {
            return;
        };
        i = i.wrapping_add(stride);
        let result = tokio::time::timeout(clock.request_timeout, async {
            let mut conn = connector.connect().await?;
            conn.send(Method::GET, path, None, &close).await
        })
        .await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(resp)) => match check(&resp, StatusCode::OK) {
                Ok(()) => {
                    if let Some(second) = measured {
                        stats.ok(second, elapsed, resp.body.len());
                    }
                }
                Err(e) => stats.error(|| e),
            },
            Ok(Err(e)) => stats.error(|| error_chain(&e)),
            Err(_) => stats.error(|| format!("no response within {:?}", clock.request_timeout)),
        }
    }
}

/// 200 with a body, or 304 when that is what was asked for.
fn check(resp: &keyd_mtls::client::Response, want: StatusCode) -> Result<(), String> {
    if resp.status != want {
        return Err(format!(
            "expected {want}, got {}: {}",
            resp.status,
            resp.error_message()
        ));
    }
    if want == StatusCode::OK && resp.body.is_empty() {
        return Err("200 with an empty body".into());
    }
    Ok(())
}

/// Requests that started in one second of the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Second {
    pub requests: u64,
    /// The slowest of them, in microseconds: a stall in the server shows up here.
    pub max_micros: u64,
}

/// Bound on the per-second timeline's length.
const MAX_SECONDS: usize = 3600;

/// One worker's (and then the run's) counts.
struct Stats {
    latency: Histogram<u64>,
    per_second: Vec<Second>,
    ok: u64,
    errors: u64,
    samples: Vec<String>,
    body_bytes: u64,
    /// When the last counted request was answered.
    last_done: Option<Instant>,
}

impl Stats {
    fn new(empty: &Histogram<u64>) -> Self {
        Self {
            latency: empty.clone(),
            per_second: Vec::new(),
            ok: 0,
            errors: 0,
            samples: Vec::new(),
            body_bytes: 0,
            last_done: None,
        }
    }

    fn ok(&mut self, second: usize, elapsed: Duration, body_len: usize) {
        self.last_done = Some(Instant::now());
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
        // Seconds past the end of the window (a budget-free run stops starting requests at its
        // end) land in the last bucket; the window is at most an hour.
        let second = second.min(MAX_SECONDS);
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, Second::default());
        }
        let bucket = &mut self.per_second[second];
        bucket.requests += 1;
        bucket.max_micros = bucket.max_micros.max(micros);
        self.ok += 1;
        self.body_bytes += body_len as u64;
    }

    fn error(&mut self, message: impl FnOnce() -> String) {
        self.errors += 1;
        if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(message());
        }
    }

    fn merge(&mut self, other: Stats) {
        // Both histograms have the same bounds, so adding cannot fail; saturate to be safe.
        if self.latency.add(&other.latency).is_err() {
            for v in other.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        if self.per_second.len() < other.per_second.len() {
            self.per_second
                .resize(other.per_second.len(), Second::default());
        }
        for (mine, theirs) in self.per_second.iter_mut().zip(&other.per_second) {
            mine.requests += theirs.requests;
            mine.max_micros = mine.max_micros.max(theirs.max_micros);
        }
        self.last_done = self.last_done.max(other.last_done);
        self.ok += other.ok;
        self.errors += other.errors;
        self.body_bytes += other.body_bytes;
        let room = ERROR_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
    }
}

/// CPU time of the server and of this process at one moment.
struct CpuSample {
    at: Instant,
    server: Option<f64>,
    client: Option<f64>,
    system: Option<f64>,
}

impl CpuSample {
    fn take(server_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server: server_pid.and_then(super::cpu_seconds),
            client: super::cpu_seconds(std::process::id()),
            system: super::procs::system_busy_seconds(),
        }
    }

    fn cores(end: Option<f64>, start: Option<f64>, wall: Duration) -> Option<f64> {
        let wall = wall.as_secs_f64();
        (wall > 0.0).then_some(())?;
        Some((end? - start?) / wall)
    }

    fn server_cores_since(&self, start: &CpuSample) -> Option<f64> {
        Self::cores(self.server, start.server, self.at - start.at)
    }

    fn client_cores_since(&self, start: &CpuSample) -> Option<f64> {
        Self::cores(self.client, start.client, self.at - start.at)
    }

    fn system_cores_since(&self, start: &CpuSample) -> Option<f64> {
        Self::cores(self.system, start.system, self.at - start.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).expect("serializes"),
                serde_json::json!(s.name())
            );
        }
        assert!("nope".parse::<Scenario>().is_err());
    }

    #[test]
    fn the_budget_bounds_measured_requests() {
        let now = Instant::now();
        let clock = Clock {
            measure_from: now,
            stop_at: now + Duration::from_secs(60),
            budget: Some(Arc::new(AtomicU64::new(2))),
            request_timeout: Duration::from_secs(1),
        };
        assert_eq!(clock.next(now), Some(Some(0)));
        assert_eq!(clock.next(now + Duration::from_secs(2)), Some(Some(2)));
        assert_eq!(clock.next(now), None);
        let over = Clock {
            stop_at: now,
            ..clock
        };
        assert_eq!(over.next(now), None);
    }

    #[tokio::test]
    async fn an_open_loop_charges_lateness_to_the_server_but_not_to_the_timer() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        // Two workers sharing 1000/s: each sends every 2 ms, the second 1 ms after the first.
        let mut second = Pacer::new(Some(1000.0), 1, 2, start);
        // Ahead of schedule: it sleeps, and counts from when it woke.
        let (due, from) = second.wait().await;
        assert_eq!(due, start + ms(1));
        assert!(from >= due);
        // Then the answer comes 20 ms late: the requests due meanwhile count from their due
        // times, not from when they could finally be sent.
        tokio::time::sleep(ms(20)).await;
        assert_eq!(second.wait().await, (start + ms(3), start + ms(3)));
        assert_eq!(second.wait().await, (start + ms(5), start + ms(5)));
        // Stopping now with the window ending at 10 ms: the slots at 5 (handed out, not sent),
        // 7 and 9 ms were never sent.
        assert_eq!(second.unsent(start + ms(10)), 3);
        assert_eq!(second.unsent(start + ms(5)), 0);
        let before = Instant::now();
        let mut closed = Pacer::new(None, 0, 2, start);
        let (due, from) = closed.wait().await;
        assert!(due >= before && due == from);
        assert_eq!(closed.unsent(Instant::now() + ms(100)), 0);
    }

    #[test]
    fn merged_stats_add_up() {
        let empty = Histogram::new_with_bounds(1, HIST_MAX_MICROS, 3).expect("bounds");
        let mut a = Stats::new(&empty);
        let mut b = Stats::new(&empty);
        a.ok(0, Duration::from_micros(100), 10);
        b.ok(0, Duration::from_micros(300), 10);
        b.ok(2, Duration::from_micros(50), 10);
        for i in 0..10 {
            b.error(|| format!("e{i}"));
        }
        a.merge(b);
        assert_eq!((a.ok, a.errors, a.body_bytes), (3, 10, 30));
        assert_eq!(a.samples.len(), ERROR_SAMPLES);
        assert_eq!(a.latency.len(), 3);
        let second = |requests, max_micros| Second {
            requests,
            max_micros,
        };
        assert_eq!(
            a.per_second,
            vec![second(2, 300), second(0, 0), second(1, 50)]
        );
        assert!(a.latency.value_at_quantile(1.0) >= 299);
    }
}
