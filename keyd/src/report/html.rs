//! The report as one self-contained HTML file: inline CSS and SVG, no script, no external
//! resource, laid out to print (the PDF is this page printed).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use keyd_proto::Timestamp;

use super::svg::{self, OUTCOMES};
use super::{EvidenceReport, esc, human_secs};

const STYLE: &str = r#"
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; font-size: 12px; color: #222;
       max-width: 960px; margin: 24px auto; padding: 0 12px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; border-bottom: 1px solid #ccc; padding-bottom: 3px; margin-top: 28px; }
h3 { font-size: 14px; margin-bottom: 4px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: bold; }
.bad { color: #c62828; font-weight: bold; }
.verdict { font-size: 18px; padding: 8px 12px; border-radius: 4px; display: inline-block; }
.verdict.ok { background: #e6f4ea; }
.verdict.bad { background: #fdecea; }
.meta { color: #555; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
            margin-right: 4px; }
code { font-size: 11px; word-break: break-all; }
section { page-break-inside: avoid; }
@media print { body { margin: 0; max-width: none; } h2 { page-break-after: avoid; }
               svg { max-width: 100%; height: auto; } }
"#;

fn verdict(ok: bool) -> &'static str {
    if ok {
        r#"<span class="ok">compliant</span>"#
    } else {
        r#"<span class="bad">not compliant</span>"#
    }
}

fn t(v: Option<Timestamp>) -> String {
    v.map_or_else(|| "-".into(), |t| esc(&t.to_string()))
}

fn counts(m: &BTreeMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

fn legend(out: &mut String, items: &[(&str, &str)]) {
    out.push_str(r#"<p class="legend">"#);
    for (name, colour) in items {
        let _ = write!(
            out,
            r#"<span><i style="background:{colour}"></i>{}</span>"#,
            esc(name)
        );
    }
    out.push_str("</p>");
}

/// The whole page.
pub fn render(r: &EvidenceReport) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'"><title>keyd evidence report {} to {}</title><style>{STYLE}</style></head><body>"#,
        esc(&r.since.to_string()),
        esc(&r.until.to_string())
    );
    let _ = write!(
        h,
        r#"<h1>Encryption key evidence report</h1><p class="meta">Period {} to {}. Generated {} for {} by keyd. Audit key <code>{}</code>.</p>"#,
        t(Some(r.since)),
        t(Some(r.until)),
        t(Some(r.generated_at)),
        esc(&r.generated_by),
        esc(&r.integrity.key_id)
    );

    // Summary.
    let _ = write!(
        h,
        r#"<section id="summary"><h2>Summary</h2><p class="verdict {}">{}</p>"#,
        if r.compliant { "ok" } else { "bad" },
        if r.compliant {
            "Compliant over the whole period"
        } else {
            "Not compliant: see the findings"
        }
    );
    if !r.findings.is_empty() {
        h.push_str("<h3>Findings</h3><ul>");
        for f in &r.findings {
            let _ = write!(h, "<li>{}</li>", esc(f));
        }
        h.push_str("</ul>");
    }
    h.push_str("<h3>Key classes</h3><table><tr><th>Class</th><th>Verdict</th><th>Period</th><th>Rotations (on schedule / late)</th><th>Overdue</th><th>Beyond bounds</th><th>Reasons</th></tr>");
    for c in &r.classes {
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td>{}</td><td>{}{}</td><td class="n">{} ({} / {})</td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            esc(c.class.as_str()),
            verdict(c.compliant),
            esc(&human_secs(c.schedule.period.as_secs())),
            if c.schedule.paused { " (paused)" } else { "" },
            c.rotations,
            c.rotations_on_schedule,
            c.rotations_late,
            esc(&human_secs(c.overdue_secs)),
            esc(&human_secs(c.beyond_bounds_secs)),
            esc(&c.reasons.join("; "))
        );
    }
    h.push_str("</table><h3>Encryption policies</h3>");
    if r.policies.is_empty() {
        h.push_str("<p>No EncryptionPolicy appears in the period (no admission named one, no node reported one).</p>");
    } else {
        h.push_str("<table><tr><th>Policy</th><th>Verdict</th><th>Admissions</th><th>Programmed</th><th>Strict drops</th><th>Reasons</th></tr>");
        for p in &r.policies {
            let adm = p
                .admissions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let programmed = p.dataplane.as_ref().map_or_else(
                || "-".into(),
                |d| format!("{}/{}", d.nodes_programmed, d.nodes_reporting),
            );
            let _ = write!(
                h,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
                esc(&p.name),
                verdict(p.compliant),
                esc(&adm),
                esc(&programmed),
                p.strict_drop_packets,
                esc(&p.reasons.join("; "))
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    // Key classes in detail.
    let outages: Vec<(u64, u64)> = r
        .custody
        .outages
        .iter()
        .map(|o| (o.from.0, o.to.unwrap_or(r.until).0))
        .collect();
    h.push_str(r#"<section id="keys"><h2>Key lifetimes</h2>"#);
    legend(
        &mut h,
        &[
            ("staged", svg::STAGED),
            ("in use", svg::IN_USE),
            ("overdue", svg::OVERDUE),
            ("beyond bounds", svg::BEYOND_BOUNDS),
            ("superseded, still accepted", svg::OVERLAP),
            ("KEK custodian outage", svg::OUTAGE),
        ],
    );
    for c in &r.classes {
        let bounds = c
            .bounds
            .max_period
            .map(|m| format!(", max_period {}", human_secs(m.as_secs())))
            .unwrap_or_default();
        let _ = write!(
            h,
            r#"<h3 id="class-{0}">{0}</h3><p class="meta">Rotate every {1}, overlap {2}{3}; a key counts as overdue after {4} in use{5}.</p>"#,
            esc(c.class.as_str()),
            esc(&human_secs(c.schedule.period.as_secs())),
            esc(&human_secs(c.schedule.overlap.as_secs())),
            esc(&bounds),
            esc(&human_secs(c.overdue_after_secs)),
            if c.schedule.window.is_some() {
                " (plus the wait for the maintenance window)"
            } else {
                ""
            },
        );
        h.push_str(&svg::timeline(&c.keys, r.since, r.until, &outages));
        h.push_str("<table><tr><th>Key</th><th>Created</th><th>In use from</th><th>Replaced</th><th>Retired</th><th>On schedule</th></tr>");
        for k in &c.keys {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&k.label),
                t(k.created),
                t(k.active_from),
                t(k.superseded),
                t(k.retired),
                match k.on_schedule {
                    Some(true) => r#"<span class="ok">yes</span>"#,
                    Some(false) => r#"<span class="bad">late</span>"#,
                    None => "in use",
                }
            );
        }
        h.push_str("</table>");
        if !c.rollouts.is_empty() {
            h.push_str("<table><tr><th>Rollout</th><th>Staged</th><th>Waited for every node to stage</th><th>Waited to retire</th><th>Stuck alarms (phase: nodes)</th><th>Skipped nodes</th></tr>");
            for ro in &c.rollouts {
                let stuck = ro
                    .stuck
                    .iter()
                    .map(|s| format!("{}: {}", s.phase, s.waiting_for.join(", ")))
                    .collect::<Vec<_>>()
                    .join("; ");
                let skipped = ro
                    .skipped
                    .iter()
                    .map(|s| format!("{} (by {})", s.node, s.by))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = write!(
                    h,
                    r#"<tr><td>SPI {} &rarr; {}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
                    ro.from_spi.map_or("-".into(), |s| s.to_string()),
                    ro.to_spi,
                    t(Some(ro.staged)),
                    ro.stage_wait_secs.map_or("running".into(), human_secs),
                    ro.activate_wait_secs.map_or("running".into(), human_secs),
                    esc(&stuck),
                    esc(&skipped)
                );
            }
            h.push_str("</table>");
        }
        if !c.schedule_changes.is_empty() {
            h.push_str("<table><tr><th>Schedule change</th><th>When</th><th>By</th><th>Period after</th></tr>");
            for ch in &c.schedule_changes {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&ch.action),
                    t(Some(ch.at)),
                    esc(&ch.actor),
                    ch.period_secs.map_or("-".into(), human_secs)
                );
            }
            h.push_str("</table>");
        }
    }
    h.push_str("</section>");

    // Custody.
    let _ = write!(
        h,
        r#"<section id="custody"><h2>Key-encryption key custody</h2><p>Every key is sealed under a KEK held by <b>{}</b> (<code>{}</code>); its health at the report's end: <b>{}</b>. Outages in the period: {} ({} in total, keyd serving the keys it held meanwhile).</p>"#,
        esc(&r.custody.backend),
        esc(&r.custody.key_id),
        esc(&r.custody.health_now),
        r.custody.outages.len(),
        esc(&human_secs(r.custody.outage_secs))
    );
    if !r.custody.outages.is_empty() {
        h.push_str("<table><tr><th>Outage from</th><th>To</th><th>Length</th><th>Custodian</th><th>Reason</th></tr>");
        for o in &r.custody.outages {
            let _ = write!(
                h,
                r#"<tr><td>{}</td><td>{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
                t(Some(o.from)),
                o.to.map_or_else(|| "still down".into(), |v| esc(&v.to_string())),
                esc(&human_secs(o.secs)),
                esc(&o.backend),
                esc(&o.reason)
            );
        }
        h.push_str("</table>");
    }
    if !r.custody.events.is_empty() {
        h.push_str("<table><tr><th>Event</th><th>When</th><th>By</th><th>Detail</th></tr>");
        for e in &r.custody.events {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.action),
                t(Some(e.at)),
                esc(&e.actor),
                esc(&e.detail)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    // Admission.
    let a = &r.admission;
    h.push_str(r#"<section id="admission"><h2>Admission</h2><p>"#);
    let total: u64 = a.totals.values().sum();
    let _ = write!(
        h,
        "{total} decisions by the admission webhook in the period:"
    );
    for (o, _) in OUTCOMES {
        let _ = write!(h, " {} {},", esc(o), counts(&a.totals, o));
    }
    h.pop();
    h.push_str(".</p>");
    legend(&mut h, &OUTCOMES);
    h.push_str(&svg::admissions(&a.buckets, r.since, a.bucket_secs));
    h.push_str("<table><tr><th>Namespace</th>");
    for (o, _) in OUTCOMES {
        let _ = write!(h, "<th>{}</th>", esc(o));
    }
    h.push_str("</tr>");
    let mut rows: Vec<(&str, &BTreeMap<String, u64>)> = a
        .by_namespace
        .iter()
        .map(|n| (n.namespace.as_str(), &n.counts))
        .collect();
    if !a.other_namespaces.is_empty() {
        rows.push(("(other namespaces)", &a.other_namespaces));
    }
    for (ns, c) in rows {
        let _ = write!(h, "<tr><td>{}</td>", esc(ns));
        for (o, _) in OUTCOMES {
            let _ = write!(h, r#"<td class="n">{}</td>"#, counts(c, o));
        }
        h.push_str("</tr>");
    }
    let _ = write!(
        h,
        r#"</table><h3>Exceptions: break-glass, warn and audit-mode admissions ({})</h3>"#,
        a.exceptions_total
    );
    if a.exceptions.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>When</th><th>Outcome</th><th>Object</th><th>User</th><th>Reason</th></tr>");
        for e in &a.exceptions {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{} {}/{}</td><td>{}</td><td>{}</td></tr>",
                t(Some(e.at)),
                esc(&e.outcome),
                esc(&e.kind),
                esc(&e.namespace),
                esc(&e.name),
                esc(&e.user),
                esc(&e.reason)
            );
        }
        h.push_str("</table>");
        if (a.exceptions.len() as u64) < a.exceptions_total {
            let _ = write!(
                h,
                "<p>{} more are in the audit log (<code>keyctl audit export</code>).</p>",
                a.exceptions_total - a.exceptions.len() as u64
            );
        }
    }
    h.push_str("</section>");

    // Data plane.
    let _ = write!(
        h,
        r#"<section id="dataplane"><h2>Data plane</h2><p>{}</p>"#,
        esc(&r.dataplane.note)
    );
    let with_dp: Vec<_> = r
        .policies
        .iter()
        .filter_map(|p| p.dataplane.as_ref().map(|d| (p, d)))
        .collect();
    if !with_dp.is_empty() {
        h.push_str("<table><tr><th>Policy</th><th>Nodes programmed</th><th>Encrypted packets</th><th>Encrypted bytes</th><th>Strict drops (period)</th><th>Clear packets</th></tr>");
        for (p, d) in with_dp {
            let _ = write!(
                h,
                r#"<tr><td>{}</td><td class="n">{}/{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                esc(&p.name),
                d.nodes_programmed,
                d.nodes_reporting,
                d.encrypted_packets,
                d.encrypted_bytes,
                p.strict_drop_packets,
                d.clear_packets
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    // Integrity.
    let i = &r.integrity;
    let _ = write!(
        h,
        r#"<section id="integrity"><h2>Integrity</h2><table><tr><th>Records in the period</th><td>{} (record {} to {})</td></tr><tr><th>Records verified</th><td>{} (every hash and link from the log's first retained record)</td></tr><tr><th>Chain</th><td>{}</td></tr><tr><th>Signed checkpoints verified</th><td>{}</td></tr><tr><th>Checkpoint vouching for the period</th><td>{}</td></tr><tr><th>Audit public key (ed25519)</th><td><code>{}</code><br>fingerprint <code>{}</code></td></tr></table><p>This file is signed with the audit key: check it with <code>keyctl audit verify-report FILE --public-key KEY</code> against a copy of the key kept outside keyd.</p></section>"#,
        i.records_in_period,
        i.first_seq.map_or("-".into(), |s| s.to_string()),
        i.last_seq.map_or("-".into(), |s| s.to_string()),
        i.records_verified,
        if i.chain_verified {
            r#"<span class="ok">verified</span>"#.to_owned()
        } else {
            format!(
                r#"<span class="bad">broken: {}</span>"#,
                esc(i.chain_error.as_deref().unwrap_or(""))
            )
        },
        i.checkpoints_verified,
        i.last_checkpoint.as_ref().map_or_else(
            || "none".into(),
            |c| format!(
                "record {} at {}, hash <code>{}</code>",
                c.seq,
                esc(&c.at.to_string()),
                esc(&c.hash)
            )
        ),
        esc(&i.public_key),
        esc(&i.key_id)
    );
    h.push_str("</body></html>\n");
    h
}
