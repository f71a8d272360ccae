//! The report's pictures as plain SVG: key timelines and the admission chart. Colours are
//! fixed (the screenshot tests look for them) and every text is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use keyd_proto::Timestamp;

use super::{KeyLife, esc};

/// Colours, also named in the legend and looked for by the screenshot tests.
pub const IN_USE: &str = "#1f77b4";
pub const OVERDUE: &str = "#d62728";
pub const BEYOND_BOUNDS: &str = "#7f0000";
pub const STAGED: &str = "#aec7e8";
pub const OVERLAP: &str = "#9edae5";
pub const OUTAGE: &str = "#ff7f0e";
/// Admission outcomes, in stacking order.
pub const OUTCOMES: [(&str, &str); 5] = [
    ("allowed", "#2ca02c"),
    ("denied", "#8c564b"),
    ("warned", "#bcbd22"),
    ("audited", "#9467bd"),
    ("break_glass", "#e377c2"),
];

const WIDTH: f64 = 900.0;
const LABEL: f64 = 170.0;
const ROW: f64 = 18.0;

struct Axis {
    since: u64,
    until: u64,
}

impl Axis {
    fn x(&self, t: u64) -> f64 {
        let span = self.until.saturating_sub(self.since).max(1) as f64;
        let t = t.clamp(self.since, self.until);
        LABEL + (t - self.since) as f64 / span * (WIDTH - LABEL - 10.0)
    }

    fn ticks(&self, out: &mut String, top: f64, bottom: f64) {
        for i in 0..=4u64 {
            let t = self.since + (self.until - self.since) * i / 4;
            let x = self.x(t);
            // The last label ends at its line, so that it stays inside the picture.
            let anchor = if i == 4 { "end" } else { "middle" };
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="{anchor}" fill="#444">{}</text>"##,
                bottom + 12.0,
                esc(&date(t))
            );
        }
    }
}

fn date(t: u64) -> String {
    let s = Timestamp(t).to_string();
    // 2026-12-06T22:10:00Z -> 2026-12-06 22:10
    s.get(..16).unwrap_or(&s).replace('T', " ")
}

fn rect(out: &mut String, x1: f64, x2: f64, y: f64, h: f64, fill: &str, title: &str) {
    if x2 - x1 < 0.5 {
        return;
    }
    let _ = write!(
        out,
        r#"<rect x="{x1:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{fill}"><title>{}</title></rect>"#,
        x2 - x1,
        esc(title)
    );
}

/// One row per key: staged, in use, overdue, beyond bounds, overlap until retired; outages as
/// a band across the chart.
pub fn timeline(
    keys: &[KeyLife],
    since: Timestamp,
    until: Timestamp,
    outages: &[(u64, u64)],
) -> String {
    let axis = Axis {
        since: since.0,
        until: until.0,
    };
    let rows = keys.len().max(1) as f64;
    let height = 10.0 + rows * ROW + 30.0;
    let mut s = format!(
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" role="img">"#
    );
    let bottom = 10.0 + rows * ROW;
    axis.ticks(&mut s, 5.0, bottom);
    for (from, to) in outages {
        let (x1, x2) = (axis.x(*from), axis.x(*to).max(axis.x(*from) + 2.0));
        rect(
            &mut s,
            x1,
            x2,
            5.0,
            bottom - 5.0,
            OUTAGE,
            "KEK custodian outage",
        );
    }
    for (i, k) in keys.iter().enumerate() {
        let y = 10.0 + i as f64 * ROW;
        let _ = write!(
            s,
            r##"<text x="4" y="{:.1}" font-size="11" fill="#222">{}</text>"##,
            y + 11.0,
            esc(&k.label)
        );
        let h = ROW - 6.0;
        let t = |o: Option<Timestamp>| o.map(|t| t.0);
        let end = t(k.retired).unwrap_or(until.0);
        if let (Some(st), Some(a)) = (t(k.staged).or(t(k.created)), t(k.active_from))
            && st < a
        {
            rect(&mut s, axis.x(st), axis.x(a), y, h, STAGED, "staged");
        }
        let a = t(k.active_from).unwrap_or(since.0);
        let in_use_end = t(k.superseded).unwrap_or(end);
        let overdue = t(k.overdue_from).filter(|o| *o < in_use_end);
        let beyond = t(k.beyond_bounds_from).filter(|b| *b < in_use_end);
        let normal_end = overdue
            .unwrap_or(in_use_end)
            .min(beyond.unwrap_or(in_use_end));
        rect(
            &mut s,
            axis.x(a),
            axis.x(normal_end),
            y,
            h,
            IN_USE,
            "in use",
        );
        if let Some(o) = overdue {
            let e = beyond.filter(|b| *b > o).unwrap_or(in_use_end);
            rect(&mut s, axis.x(o), axis.x(e), y, h, OVERDUE, "overdue");
        }
        if let Some(b) = beyond {
            rect(
                &mut s,
                axis.x(b),
                axis.x(in_use_end),
                y,
                h,
                BEYOND_BOUNDS,
                "beyond bounds",
            );
        }
        if in_use_end < end {
            rect(
                &mut s,
                axis.x(in_use_end),
                axis.x(end),
                y,
                h,
                OVERLAP,
                "superseded, still accepted",
            );
        }
    }
    if keys.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{LABEL}" y="22" font-size="11" fill="#666">no key in this period</text>"##
        );
    }
    s.push_str("</svg>");
    s
}

/// Stacked bars of admission decisions per time bucket.
pub fn admissions(buckets: &[BTreeMap<String, u64>], since: Timestamp, bucket_secs: u64) -> String {
    let max = buckets
        .iter()
        .map(|b| b.values().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (chart_h, top) = (160.0, 10.0);
    let height = top + chart_h + 30.0;
    let mut s = format!(
        r#"<svg class="admissions" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" role="img">"#
    );
    let until = since.0 + bucket_secs * buckets.len() as u64;
    let axis = Axis {
        since: since.0,
        until,
    };
    axis.ticks(&mut s, top, top + chart_h);
    let _ = write!(
        s,
        r##"<text x="4" y="{:.1}" font-size="10" fill="#444">{max} per {}</text>"##,
        top + 10.0,
        esc(&super::human_secs(bucket_secs))
    );
    let bar_w = (WIDTH - LABEL - 10.0) / buckets.len().max(1) as f64;
    for (i, b) in buckets.iter().enumerate() {
        let x = LABEL + i as f64 * bar_w;
        let mut y = top + chart_h;
        for (outcome, colour) in OUTCOMES {
            let n = b.get(outcome).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let h = n as f64 / max as f64 * chart_h;
            y -= h;
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{colour}"><title>{n} {outcome}</title></rect>"#,
                x + 1.0,
                (bar_w - 2.0).max(1.0)
            );
        }
    }
    s.push_str("</svg>");
    s
}
