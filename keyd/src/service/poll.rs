//! The long poll shared by the bundle and the rules.

use std::time::Duration;

use super::state::Result;

/// The long poll behind every conditional `?wait=` fetch: reads `current` (`None`: nothing to
/// serve yet, keep waiting), returns it once its ETag differs from `etag`, and otherwise waits
/// for `changed` to move, up to `wait`. `None` when the wait passes without a change.
pub(super) async fn long_poll<X, T, F>(
    mut changed: tokio::sync::watch::Receiver<X>,
    etag: &str,
    wait: Duration,
    mut current: impl FnMut() -> F,
    etag_of: impl Fn(&T) -> &str,
) -> Result<Option<T>>
where
    F: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = current().await?
            && etag_of(&v) != etag
        {
            return Ok(Some(v));
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => continue,
            // The sender lives as long as keyd; a closed channel cannot happen here.
            Ok(Err(_)) | Err(_) => return Ok(None),
        }
    }
}
