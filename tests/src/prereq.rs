//! Test prerequisites: a test that needs an external program skips with a printed reason when
//! it is missing, except in CI (`CI=true`), where a missing prerequisite fails the test.

/// Returns `true` if the test should run; prints why not otherwise. Panics in CI.
pub fn require(what: &str, check: Result<(), String>) -> bool {
    match check {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{what} is required in CI but missing: {why} (./scripts/test.sh installs it)")
        }
        Err(why) => {
            eprintln!("SKIPPED: {what} is not available: {why} (./scripts/test.sh installs it)");
            false
        }
    }
}

/// Whether this process runs as root (effective uid 0), for tests that mount or program the
/// kernel.
pub use keyd_mtls::ops::is_root;
