//! keyd's notion of now: the system clock plus an offset that tests can move forward.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keyd_proto::Timestamp;

/// keyd's notion of now: the system clock plus an offset that tests can move forward.
#[derive(Debug, Clone, Default)]
pub struct Clock(Arc<AtomicI64>);

impl Clock {
    pub fn now(&self) -> Timestamp {
        Timestamp(
            Timestamp::now()
                .0
                .saturating_add_signed(self.0.load(Ordering::Relaxed)),
        )
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            i64::try_from(by.as_secs()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}
