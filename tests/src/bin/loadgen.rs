//! `loadgen`: the keyd benchmark (see `docs/benchmarks.md` and `keyd_tests::loadgen`).
//!
//! ```text
//! cargo build --release -p keyd -p keyd-tests
//! cargo run --release -p keyd-tests --bin loadgen -- [--nodes 1000] [--seconds 10] [--json FILE]
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keyd_tests::loadgen::{self, CeilingArgs, Options, Scenario};

/// Exit status for invalid options (as keyd uses for invalid configuration).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Benchmark keyd: N nodes fetch bundles over mTLS, against keyd and against a minimal rustls ceiling",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: the ceiling server, started by the benchmark as a child process.
    #[command(hide = true)]
    Ceiling(CeilingCli),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Simulated nodes, each with its own client certificate and keep-alive connection.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Worker tasks, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per scenario and server.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each measured run.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Comma-separated: keepalive, keepalive-304, handshake, wg-mesh, wg-mesh-304 (the
    /// WireGuard ones last). Default: all.
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<Scenario>>,
    /// Open loop: send this many requests (or handshakes) per second in total, on a schedule,
    /// and count latency from when each was due. Default: closed loop, as fast as answered.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop each run after this many measured requests.
    #[arg(long)]
    max_requests: Option<u64>,
    /// A request slower than this is an error.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// The keyd binary [default: `keyd` next to this executable, e.g. target/release/keyd].
    #[arg(long)]
    keyd: Option<PathBuf>,
    /// Also write every number as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CeilingCli {
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    body: PathBuf,
    #[arg(long)]
    etag: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ceiling(c)) => ceiling(c),
        None => bench(cli.bench),
    }
}

fn ceiling(c: CeilingCli) -> ExitCode {
    let args = CeilingArgs {
        ca: c.ca,
        cert: c.cert,
        key: c.key,
        body: c.body,
        etag: c.etag,
        listen: c.listen,
    };
    match loadgen::run_ceiling(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen ceiling: {}", loadgen::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn seconds(field: &'static str, v: f64) -> Result<Duration, loadgen::Error> {
    Duration::try_from_secs_f64(v).map_err(|_| loadgen::Error::Option {
        field,
        reason: format!("{v} is not a number of seconds"),
    })
}

fn bench(a: BenchArgs) -> ExitCode {
    let opts = (|| {
        let opts = Options {
            nodes: a.nodes,
            concurrency: a.concurrency,
            warmup: seconds("warmup", a.warmup)?,
            duration: seconds("seconds", a.seconds)?,
            scenarios: a.scenarios.unwrap_or_else(|| Scenario::ALL.to_vec()),
            max_requests: a.max_requests,
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            rate: a.rate,
        };
        opts.validate()?;
        Ok::<_, loadgen::Error>(opts)
    })();
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("loadgen: cannot find my own executable (for the ceiling server): {e}");
            return ExitCode::FAILURE;
        }
    };
    let keyd = a.keyd.unwrap_or_else(|| exe.with_file_name("keyd"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping the benchmark future (on Ctrl-C) kills the children and removes the temp dir.
    let result = runtime.block_on(async {
        tokio::select! {
            r = loadgen::bench(&opts, &keyd, &exe) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let report = match result {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            eprintln!("loadgen: {}", loadgen::error_chain(&e));
            return ExitCode::FAILURE;
        }
        None => {
            eprintln!("loadgen: interrupted; keyd and the ceiling were stopped");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.render());
    if let Some(path) = a.json {
        let written = report
            .to_json()
            .map_err(|e| loadgen::error_chain(&e))
            .and_then(|j| std::fs::write(&path, j + "\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
