//! Per-source limits for a listener that needs no credential (bootstrap): how many requests one
//! address may make per window, and which of its refusals are recorded in full. A loop of bad
//! requests then costs one audit record per source and window plus one summary, not one record
//! per request, so it cannot fill the disk.
//!
//! Pure bookkeeping, no IO: the caller passes the time and writes the records.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window requests are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// What a window of one source's refusals left unrecorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None`: the sources that found the table full.
    pub source: Option<IpAddr>,
    /// Refusals after the first of the window (which was recorded in full).
    pub refusals: u64,
    /// Requests turned away for the rate.
    pub rate_limited: u64,
    /// The reason of the last refusal counted.
    pub last_reason: String,
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Over the rate: try again after this long.
    Limited(Duration),
}

#[derive(Debug)]
struct Entry {
    since: Instant,
    requests: u32,
    /// The window's first refusal was recorded in full.
    recorded: bool,
    refusals: u64,
    rate_limited: u64,
    last_reason: String,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Entry {
            since: now,
            requests: 0,
            recorded: false,
            refusals: 0,
            rate_limited: 0,
            last_reason: String::new(),
        }
    }

    fn summary(&self, source: Option<IpAddr>) -> Option<Summary> {
        (self.refusals + self.rate_limited > 0).then(|| Summary {
            source,
            refusals: self.refusals,
            rate_limited: self.rate_limited,
            last_reason: self.last_reason.clone(),
        })
    }
}

#[derive(Debug, Default)]
struct Inner {
    sources: HashMap<IpAddr, Entry>,
    /// Requests from sources that found the table full, counted together.
    overflow: Option<Entry>,
    /// Summaries of windows that ended while their source kept asking.
    ended: Vec<Summary>,
}

#[derive(Debug)]
pub struct SourceLimiter {
    per_window: u32,
    max_sources: usize,
    inner: Mutex<Inner>,
}

impl SourceLimiter {
    /// At most `per_window` requests per source address and [`WINDOW`], and at most
    /// `max_sources` addresses tracked at once (beyond that, new addresses are turned away
    /// until a window ends: the table cannot grow without bound in a flood from many
    /// addresses).
    pub fn new(per_window: u32, max_sources: usize) -> Self {
        Self {
            per_window: per_window.max(1),
            max_sources: max_sources.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a request from `source`.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Admit {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if !inner.sources.contains_key(&source) && inner.sources.len() >= self.max_sources {
            let o = inner.overflow.get_or_insert_with(|| Entry::new(now));
            o.rate_limited += 1;
            return Admit::Limited(WINDOW.saturating_sub(now.duration_since(o.since)));
        }
        let e = inner
            .sources
            .entry(source)
            .or_insert_with(|| Entry::new(now));
        if now.duration_since(e.since) >= WINDOW {
            if let Some(s) = e.summary(Some(source)) {
                inner.ended.push(s);
            }
            *e = Entry::new(now);
        }
        if e.requests >= self.per_window {
            e.rate_limited += 1;
            return Admit::Limited(WINDOW.saturating_sub(now.duration_since(e.since)));
        }
        e.requests += 1;
        Admit::Yes
    }

    /// A refusal of a request from `source`: `true` if it is the window's first and is to be
    /// recorded in full; otherwise it is counted for the summary.
    pub fn refused(&self, source: IpAddr, reason: &str, now: Instant) -> bool {
        let mut inner = self.lock();
        let e = inner
            .sources
            .entry(source)
            .or_insert_with(|| Entry::new(now));
        if !e.recorded {
            e.recorded = true;
            return true;
        }
        e.refusals += 1;
        e.last_reason = capped(reason, MAX_REASON).into_owned();
        false
    }

    /// The summaries to record now: windows that ended (all of them, with `flush`, at
    /// shutdown). Sources whose window ended are forgotten.
    pub fn take_summaries(&self, now: Instant, flush: bool) -> Vec<Summary> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut out = std::mem::take(&mut inner.ended);
        let done = |e: &Entry| flush || now.duration_since(e.since) >= WINDOW;
        inner.sources.retain(|ip, e| {
            if !done(e) {
                return true;
            }
            out.extend(e.summary(Some(*ip)));
            false
        });
        if inner.overflow.as_ref().is_some_and(done) {
            out.extend(inner.overflow.take().and_then(|e| e.summary(None)));
        }
        out
    }
}

/// The longest reason a summary keeps.
const MAX_REASON: usize = 512;

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it was.
pub fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_rate_and_one_full_record_per_window() {
        let l = SourceLimiter::new(3, 100);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(l.admit(a, t0), Admit::Yes);
        }
        assert_eq!(
            l.admit(a, t0 + Duration::from_secs(20)),
            Admit::Limited(Duration::from_secs(40))
        );
        // Another source is not affected.
        assert_eq!(l.admit(ip("192.0.2.2"), t0), Admit::Yes);
        assert!(l.refused(a, "bad token", t0));
        assert!(!l.refused(a, "bad token again", t0));
        assert!(!l.refused(a, &"x".repeat(10_000), t0));
        assert!(
            l.take_summaries(t0 + Duration::from_secs(30), false)
                .is_empty()
        );
        let s = l.take_summaries(t0 + WINDOW, false);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(
            (s[0].source, s[0].refusals, s[0].rate_limited),
            (Some(a), 2, 1)
        );
        assert!(s[0].last_reason.len() < 600 && s[0].last_reason.ends_with("(10000 bytes)"));
        // Forgotten after its summary: a new window, a new first record.
        assert_eq!(l.admit(a, t0 + WINDOW), Admit::Yes);
        assert!(l.refused(a, "bad token", t0 + WINDOW));
    }

    #[test]
    fn a_window_that_ends_while_the_source_asks_is_summarised() {
        let l = SourceLimiter::new(1, 100);
        let t0 = Instant::now();
        let a = ip("2001:db8::1");
        assert_eq!(l.admit(a, t0), Admit::Yes);
        assert!(l.refused(a, "r", t0));
        assert!(!l.refused(a, "r2", t0));
        assert!(matches!(l.admit(a, t0), Admit::Limited(_)));
        assert_eq!(l.admit(a, t0 + WINDOW), Admit::Yes);
        let s = l.take_summaries(t0 + WINDOW, false);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].refusals, s[0].rate_limited), (1, 1));
    }

    #[test]
    fn the_table_is_bounded() {
        let l = SourceLimiter::new(10, 2);
        let t0 = Instant::now();
        assert_eq!(l.admit(ip("10.0.0.1"), t0), Admit::Yes);
        assert_eq!(l.admit(ip("10.0.0.2"), t0), Admit::Yes);
        assert!(matches!(l.admit(ip("10.0.0.3"), t0), Admit::Limited(_)));
        assert!(matches!(l.admit(ip("10.0.0.4"), t0), Admit::Limited(_)));
        let s = l.take_summaries(t0, true);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].source, s[0].rate_limited), (None, 2));
        assert_eq!(l.admit(ip("10.0.0.3"), t0), Admit::Yes, "room again");
    }

    #[test]
    fn capped_cuts_at_a_character_boundary() {
        assert_eq!(capped("short", 10), "short");
        let long = "é".repeat(10);
        let c = capped(&long, 5);
        assert!(c.starts_with("éé...") && c.ends_with("(20 bytes)"), "{c}");
    }
}
