//! The results: a table for people, JSON for files, and the targets checked.

use std::fmt::Write as _;

use serde::Serialize;

use super::scenario::{Measurement, Second};

/// Cores used by other processes during a run above which the report warns.
const OTHER_CPU_WARNING: f64 = 0.25;
use super::{
    Error, Options, Scenario, ServerKind, TARGET_FETCH_P99_MS, TARGET_FETCHES_PER_SEC,
    TARGET_HANDSHAKES_PER_SEC, TARGET_NODES,
};

/// How the numbers were obtained.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// `std::thread::available_parallelism`: shared by the load generator and the servers.
    pub cores: usize,
    pub cpu_model: Option<String>,
    /// `release` or `debug` (a debug load generator measures itself, not keyd).
    pub build: &'static str,
    pub keyd_binary: Option<String>,
    pub nodes: usize,
    pub concurrency: usize,
    pub warmup_seconds: f64,
    pub duration_seconds: f64,
    pub request_timeout_ms: u128,
    pub max_requests: Option<u64>,
    /// Open-loop rate (requests/s in total); `None`: closed loop.
    pub rate: Option<f64>,
    pub scenarios: Vec<Scenario>,
    /// Registering every node (one keyd write each), IPsec-only.
    pub register_seconds: f64,
    /// Re-registering every node with a WireGuard key.
    pub wireguard_register_seconds: Option<f64>,
    /// Node 0's bundle as served (and as the ceiling serves it).
    pub ipsec_bundle_bytes: Option<usize>,
    pub wireguard_bundle_bytes: Option<usize>,
    pub wireguard_peers: Option<usize>,
}

impl Setup {
    pub fn new(opts: &Options) -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            keyd_binary: None,
            nodes: opts.nodes,
            concurrency: opts.concurrency,
            warmup_seconds: opts.warmup.as_secs_f64(),
            duration_seconds: opts.duration.as_secs_f64(),
            request_timeout_ms: opts.request_timeout.as_millis(),
            max_requests: opts.max_requests,
            rate: opts.rate,
            scenarios: opts.scenarios.clone(),
            register_seconds: 0.0,
            wireguard_register_seconds: None,
            ipsec_bundle_bytes: None,
            wireguard_bundle_bytes: None,
            wireguard_peers: None,
        }
    }
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// One scenario against one server.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub scenario: Scenario,
    pub server: ServerKind,
    /// Successful requests in the measured window.
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Failed requests, warm-up included.
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub mean_body_bytes: f64,
    pub connections: usize,
    pub workers: usize,
    /// CPU cores the server process and the load generator used in the measured window.
    pub server_cpu_cores: Option<f64>,
    pub client_cpu_cores: Option<f64>,
    /// CPU cores busy machine-wide in the same window: more than server + client means
    /// something else competed for the cores.
    pub system_cpu_cores: Option<f64>,
    /// keyd's requests/s over the ceiling's for the same scenario (keyd rows only).
    pub ratio_to_ceiling: Option<f64>,
    /// When the run started, from the start of the benchmark, and from the last registration
    /// of every node (keyd rewrites a node's `last_seen` on a fetch 30 s after the last write).
    pub started_at_seconds: f64,
    pub since_registration_seconds: f64,
    /// The fewest requests started in any whole second of the measured window: a stall in
    /// the server shows up here even when the average hides it.
    pub min_second_requests: Option<u64>,
    /// Requests per second of the measured window, and the slowest request of each second.
    pub timeline: Vec<Second>,
}

impl RunRecord {
    /// Cores used by anything other than the server under test and the load generator.
    pub fn other_cpu_cores(&self) -> Option<f64> {
        Some(self.system_cpu_cores? - self.server_cpu_cores? - self.client_cpu_cores?)
    }

    pub(crate) fn new(
        scenario: Scenario,
        server: ServerKind,
        m: &Measurement,
        window: std::time::Duration,
        started_at_seconds: f64,
        since_registration_seconds: f64,
    ) -> Self {
        // Only whole seconds: the last, partial one would always look like a dip.
        let whole = usize::try_from(window.as_secs()).unwrap_or(usize::MAX);
        let min_second_requests = (whole > 0).then(|| {
            (0..whole)
                .map(|i| m.timeline.get(i).map_or(0, |s| s.requests))
                .min()
                .unwrap_or(0)
        });
        let ms = |micros: u64| micros as f64 / 1000.0;
        let q = |quantile: f64| {
            if m.latency.is_empty() {
                0.0
            } else {
                ms(m.latency.value_at_quantile(quantile))
            }
        };
        Self {
            scenario,
            server,
            requests: m.requests,
            seconds: m.seconds,
            requests_per_second: if m.seconds > 0.0 {
                m.requests as f64 / m.seconds
            } else {
                0.0
            },
            p50_ms: q(0.50),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if m.latency.is_empty() {
                0.0
            } else {
                ms(m.latency.max())
            },
            mean_ms: m.latency.mean() / 1000.0,
            errors: m.errors,
            error_samples: m.error_samples.clone(),
            mean_body_bytes: if m.requests > 0 {
                m.body_bytes as f64 / m.requests as f64
            } else {
                0.0
            },
            connections: m.connections,
            workers: m.workers,
            server_cpu_cores: m.server_cores,
            client_cpu_cores: m.client_cores,
            system_cpu_cores: m.system_cores,
            ratio_to_ceiling: None,
            started_at_seconds,
            since_registration_seconds,
            min_second_requests,
            timeline: m.timeline.clone(),
        }
    }
}

/// One of the targets, checked against the measured numbers.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when not applicable (scenario not run, or not 1,000 nodes).
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub results: Vec<RunRecord>,
    pub targets: Vec<TargetCheck>,
}

impl Report {
    pub(crate) fn new(setup: Setup, mut results: Vec<RunRecord>) -> Self {
        let ceilings: Vec<(Scenario, f64)> = results
            .iter()
            .filter(|r| r.server == ServerKind::Ceiling)
            .map(|r| (r.scenario, r.requests_per_second))
            .collect();
        for r in results.iter_mut().filter(|r| r.server == ServerKind::Keyd) {
            r.ratio_to_ceiling = ceilings
                .iter()
                .find(|(s, rps)| *s == r.scenario && *rps > 0.0)
                .map(|(_, rps)| r.requests_per_second / rps);
        }
        let targets = check_targets(&setup, &results);
        Self {
            setup,
            results,
            targets,
        }
    }

    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string_pretty(self).map_err(Error::Json)
    }

    /// The human-readable report: a header saying how it was measured, the table, the
    /// targets, and sample errors.
    pub fn render(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let pacing = match s.rate {
            Some(r) => format!("open loop at {r:.0} requests/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "keyd loadgen ({} build): {} nodes, {} workers, {pacing}, {:.1} s warm-up + {:.1} s per run",
            s.build, s.nodes, s.concurrency, s.warmup_seconds, s.duration_seconds
        );
        let _ = writeln!(
            out,
            "cores: {} (available_parallelism), shared by the load generator, keyd and the ceiling; loopback only",
            s.cores
        );
        if let Some(cpu) = &s.cpu_model {
            let _ = writeln!(out, "cpu: {cpu}");
        }
        if s.build == "debug" {
            let _ = writeln!(
                out,
                "WARNING: debug build of the load generator; build with --release for real numbers"
            );
        }
        let mut sizes = Vec::new();
        if let Some(b) = s.ipsec_bundle_bytes {
            sizes.push(format!("ipsec-only {b} B"));
        }
        if let (Some(b), Some(p)) = (s.wireguard_bundle_bytes, s.wireguard_peers) {
            sizes.push(format!("wg-mesh {b} B ({p} peers)"));
        }
        if !sizes.is_empty() {
            let _ = writeln!(out, "bundle size: {}", sizes.join("; "));
        }
        let _ = write!(
            out,
            "setup: registered {} nodes in {:.1} s",
            s.nodes, s.register_seconds
        );
        if let Some(w) = s.wireguard_register_seconds {
            let _ = write!(out, "; WireGuard re-registration {w:.1} s");
        }
        let _ = writeln!(out, "\n");
        let _ = writeln!(
            out,
            "{:<14} {:<8} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6}",
            "scenario",
            "server",
            "requests",
            "req/s",
            "min 1s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "errors",
            "ratio",
            "srv cpu",
            "cli cpu",
            "oth cpu",
            "B/resp",
            "t+reg"
        );
        let opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
        };
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<14} {:<8} {:>9} {:>10.0} {:>8} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8.0} {:>5.0}s",
                r.scenario.name(),
                r.server.name(),
                r.requests,
                r.requests_per_second,
                r.min_second_requests
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.errors,
                opt(r.ratio_to_ceiling, 2),
                opt(r.server_cpu_cores, 2),
                opt(r.client_cpu_cores, 2),
                opt(r.other_cpu_cores(), 2),
                r.mean_body_bytes,
                r.since_registration_seconds,
            );
        }
        let _ = writeln!(
            out,
            "\nmin 1s = fewest requests started in one whole second of the run (stalls show here);\n\
             ratio = keyd req/s / ceiling req/s; srv/cli/oth cpu = cores used by the server process / the load generator /\n\
             everything else on the machine (the other server idles);\n\
             t+reg = seconds since every node was (re-)registered when the run began"
        );
        let busiest = self
            .results
            .iter()
            .filter_map(RunRecord::other_cpu_cores)
            .fold(0.0, f64::max);
        if busiest > OTHER_CPU_WARNING {
            let _ = writeln!(
                out,
                "\nWARNING: other processes used up to {busiest:.2} cores during a run; those runs understate \
                 both servers. Rerun on an idle machine."
            );
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets ({TARGET_NODES} nodes, 2 cores):");
            for t in &self.targets {
                let verdict = match t.met {
                    Some(true) => "MET",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                let _ = writeln!(out, "  {:<6} {}: {}", verdict, t.target, t.measured);
            }
        }
        for r in self.results.iter().filter(|r| r.errors > 0) {
            let _ = writeln!(
                out,
                "\nerrors in {} against {} ({}), first ones:",
                r.scenario.name(),
                r.server.name(),
                r.errors
            );
            for e in &r.error_samples {
                let _ = writeln!(out, "  {e}");
            }
        }
        out
    }
}

/// Open-loop runs can only reach the offered rate, and the workers' staggered schedules put
/// a few requests either side of the window's edges: a run that achieved this share of the
/// offered rate sustained it.
const SUSTAINED: f64 = 0.99;

fn check_targets(setup: &Setup, results: &[RunRecord]) -> Vec<TargetCheck> {
    let keyd = |sc: Scenario| {
        results
            .iter()
            .find(|r| r.scenario == sc && r.server == ServerKind::Keyd)
    };
    let applicable = setup.nodes == TARGET_NODES;
    // Closed loop: the maximum must reach the target. Open loop: the offered rate must be at
    // least the target, and it must have been sustained.
    let reaches = |r: &RunRecord, target: f64| match setup.rate {
        None => r.requests_per_second >= target,
        Some(rate) => rate >= target && r.requests_per_second >= SUSTAINED * rate,
    };
    let pacing = match setup.rate {
        Some(rate) => format!(", open loop at {rate:.0}/s"),
        None => String::new(),
    };
    let mut out = Vec::new();
    let fetch_target = format!(
        "keep-alive bundle fetches >= {TARGET_FETCHES_PER_SEC:.0}/s with p99 < {TARGET_FETCH_P99_MS} ms"
    );
    for sc in [Scenario::Keepalive, Scenario::Keepalive304] {
        if let Some(r) = keyd(sc) {
            let met = reaches(r, TARGET_FETCHES_PER_SEC)
                && r.p99_ms < TARGET_FETCH_P99_MS
                && r.errors == 0;
            out.push(TargetCheck {
                target: format!("{fetch_target} ({}{pacing})", sc.name()),
                measured: format!(
                    "{:.0}/s, p99 {:.2} ms, {} errors",
                    r.requests_per_second, r.p99_ms, r.errors
                ),
                met: applicable.then_some(met),
            });
        }
    }
    if let Some(r) = keyd(Scenario::Handshake) {
        out.push(TargetCheck {
            target: format!("new mTLS handshakes >= {TARGET_HANDSHAKES_PER_SEC:.0}/s{pacing}"),
            measured: format!(
                "{:.0}/s, p99 {:.2} ms, {} errors",
                r.requests_per_second, r.p99_ms, r.errors
            ),
            met: applicable.then_some(reaches(r, TARGET_HANDSHAKES_PER_SEC) && r.errors == 0),
        });
    }
    out
}
