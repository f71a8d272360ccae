//! Crash points for the crash-consistency test: compiled only with the `fault-injection`
//! feature, which release builds never enable (see keyd/Cargo.toml), so a production binary
//! holds neither this code nor the variables below.
//!
//! Every store commit passes two points, just before redb commits and just after, named
//! `LABEL#N:before` and `LABEL#N:after`: LABEL says what the transaction is (the action of its
//! first audit record, or `put:TABLE`, `delete:TABLE`, `audit.prune` when it has none) and N
//! counts that label's commits since the process started, so a second run over the same data
//! and the same requests passes the same points. `KEYD_FAULT_TRACE=FILE` appends each point
//! reached to FILE (one line each, written before the process goes on); `KEYD_FAULT_ABORT_AT=
//! POINT` aborts the process (`SIGABRT`, no unwinding, no destructors) at that point.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

pub const ABORT_AT_VAR: &str = "KEYD_FAULT_ABORT_AT";
pub const TRACE_VAR: &str = "KEYD_FAULT_TRACE";

/// The variables, as [`crate::config`] lists the ones it accepts.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        ABORT_AT_VAR,
        "fault injection: the commit point to abort at",
    ),
    (
        TRACE_VAR,
        "fault injection: a file to append each commit point to",
    ),
];

/// Where in a commit the point lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Everything is written into the transaction; redb has not committed it.
    Before,
    /// redb has committed (fsynced) it; the caller has not yet seen the result.
    After,
}

#[derive(Debug, Default)]
struct Faults {
    abort_at: Option<String>,
    trace: Option<std::fs::File>,
    counts: HashMap<String, u64>,
}

fn faults() -> &'static Mutex<Faults> {
    static FAULTS: OnceLock<Mutex<Faults>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let trace = std::env::var_os(TRACE_VAR).and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Mutex::new(Faults {
            abort_at: std::env::var(ABORT_AT_VAR).ok(),
            trace,
            counts: HashMap::new(),
        })
    })
}

/// Counts a commit of `label`; returns its occurrence number for [`reached`].
pub fn begin(label: &str) -> u64 {
    let mut f = faults().lock().unwrap_or_else(|p| p.into_inner());
    let n = f.counts.entry(label.to_owned()).or_insert(0);
    *n += 1;
    *n
}

/// Records the point and aborts the process if it is the one selected.
pub fn reached(label: &str, n: u64, stage: Stage) {
    let stage = match stage {
        Stage::Before => "before",
        Stage::After => "after",
    };
    let point = format!("{label}#{n}:{stage}");
    let mut f = faults().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = f.trace.as_mut() {
        // The test reads the trace after the process is gone: one write per line, unbuffered.
        let _ = t.write_all(format!("{point}\n").as_bytes());
    }
    if f.abort_at.as_deref() == Some(point.as_str()) {
        eprintln!("keyd: fault injection: aborting at commit point {point}");
        std::process::abort();
    }
}
