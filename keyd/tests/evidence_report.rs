//! The evidence report over a scripted history: rotations on and off schedule, a class left
//! overdue, a KEK custodian outage, break-glass and warn-mode admissions. The numbers are
//! checked in the JSON and in the HTML; the signature is checked with `keyctl audit
//! verify-report` and an edited report fails it; headless Chromium renders the HTML (a
//! screenshot with the charts' colours where the timelines are, and no console error) and
//! the PDF keyd prints is rasterised with `pdftoppm` and checked the same way.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use keyd::clock::Clock;
use keyd::custody::Custody;
use keyd::report::{EvidenceReport, ReportFormat, html};
use keyd::seal::{FailureKind, Key256, KeyWrapper, LocalKek, SealContext, SealError, WrappedKey};
use keyd::service::{Keyd, Progress, ReportRequest, ServiceConfig};
use keyd::store::{RedbStore, Store};
use keyd_proto::identity::Identity;
use keyd_proto::{AdmissionDecision, Bounds, KeyClass, ScheduleUpdate, Timestamp};

const HOUR: u64 = 3600;

/// A local KEK that can be made to fail as an unreachable custodian does.
#[derive(Debug)]
struct Switchable {
    inner: LocalKek,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), SealError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(SealError::Custodian {
                backend: "local",
                key_id: self.inner.key_id(),
                op: "test",
                kind: FailureKind::Unavailable,
                detail: "switched off by the test".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl KeyWrapper for Switchable {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn key_id(&self) -> String {
        self.inner.key_id()
    }
    async fn generate_data_key(
        &self,
        ctx: &SealContext,
    ) -> Result<(Key256, WrappedKey), SealError> {
        self.check()?;
        self.inner.generate_data_key(ctx).await
    }
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        self.check()?;
        self.inner.unwrap_data_key(wrapped, ctx).await
    }
    async fn wrap_data_key(
        &self,
        dek: &Key256,
        ctx: &SealContext,
    ) -> Result<WrappedKey, SealError> {
        self.check()?;
        self.inner.wrap_data_key(dek, ctx).await
    }
}

struct History {
    _dir: tempfile::TempDir,
    kek: Arc<Switchable>,
    custody: Arc<Custody>,
    keyd: Keyd,
    clock: Clock,
    start: Timestamp,
}

fn decision(
    at: Timestamp,
    outcome: &str,
    ns: &str,
    user: &str,
    reason: &str,
    policies: &[&str],
) -> AdmissionDecision {
    AdmissionDecision {
        at,
        outcome: outcome.into(),
        enforcement: if outcome == "warned" {
            "warn"
        } else {
            "enforce"
        }
        .into(),
        operation: "CREATE".into(),
        kind: "Pod".into(),
        namespace: ns.into(),
        name: format!("{ns}-{outcome}"),
        user: user.into(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        reason: reason.into(),
    }
}

/// Rotates IPsec and lets the rollout finish (no nodes: every phase completes at once, the
/// old key leaves after the overlap).
async fn rotate_ipsec(h: &History, admin: &Identity) {
    h.keyd.rotate_class(admin, KeyClass::Ipsec).await.unwrap();
    for _ in 0..4 {
        h.keyd.tick().await.unwrap();
        h.clock.advance(Duration::from_secs(400));
    }
    h.keyd.tick().await.unwrap();
}

/// The scripted history; see the module documentation. Days are moved on the keyd clock.
async fn history() -> History {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("k.redb")).unwrap());
    let kek = Arc::new(Switchable {
        inner: LocalKek::from_key(Key256::random().unwrap(), dir.path().join("kek")),
        down: AtomicBool::new(false),
    });
    let custody = Arc::new(Custody::single(Arc::clone(&kek) as Arc<dyn KeyWrapper>));
    let clock = Clock::default();
    let config = ServiceConfig {
        claims: keyd::service::ClaimCheck::Open,
        ..ServiceConfig::default()
    };
    let keyd = Keyd::open_with_custody(store, Arc::clone(&custody), config, clock.clone())
        .await
        .unwrap();
    let h = History {
        _dir: dir,
        kek: Arc::clone(&kek),
        custody: Arc::clone(&custody),
        keyd,
        start: clock.now(),
        clock,
    };
    let admin = Identity::Admin("auditor-setup".into());
    let day = Duration::from_secs(24 * HOUR);
    h.keyd
        .update_schedule(
            &admin,
            KeyClass::Ipsec,
            ScheduleUpdate {
                period: Some(day),
                overlap: Some(Duration::from_secs(300)),
                ..ScheduleUpdate::default()
            },
        )
        .await
        .unwrap();
    h.keyd
        .set_bounds(
            &admin,
            KeyClass::Ipsec,
            Bounds {
                min_period: None,
                max_period: Some(2 * day),
            },
        )
        .await
        .unwrap();
    // WireGuard preshared keys: a daily schedule, paused, so the class goes overdue.
    h.keyd
        .update_schedule(
            &admin,
            KeyClass::WireguardPsk,
            ScheduleUpdate {
                period: Some(day),
                paused: Some(true),
                ..ScheduleUpdate::default()
            },
        )
        .await
        .unwrap();
    rotate_ipsec(&h, &admin).await; // SPI 1
    h.clock.advance(Duration::from_secs(20 * HOUR));
    rotate_ipsec(&h, &admin).await; // SPI 2, on schedule
    h.clock.advance(Duration::from_secs(3 * 24 * HOUR));
    rotate_ipsec(&h, &admin).await; // SPI 3: SPI 2 was in use 3 days, late and beyond bounds

    // A two-hour KEK custodian outage.
    kek.down.store(true, Ordering::SeqCst);
    assert!(custody.probe().await.is_err());
    assert_eq!(h.keyd.audit_custody_transitions().await.unwrap(), 1);
    h.clock.advance(Duration::from_secs(2 * HOUR));
    kek.down.store(false, Ordering::SeqCst);
    custody.probe().await.unwrap();
    assert_eq!(h.keyd.audit_custody_transitions().await.unwrap(), 1);

    // Admissions: three allowed, one denied, a break-glass and a warn-mode admission.
    let webhook = Identity::Webhook("webhook".into());
    let now = h.clock.now();
    let mut ds = vec![];
    for _ in 0..3 {
        ds.push(decision(
            now,
            "allowed",
            "payments",
            "deployer",
            "covered by pci",
            &["pci"],
        ));
    }
    ds.push(decision(
        now,
        "denied",
        "payments",
        "mallory",
        "no policy covers it",
        &[],
    ));
    ds.push(decision(
        now,
        "break_glass",
        "payments",
        "alice",
        "incident 4711: <restore> & \"rollback\"",
        &["pci"],
    ));
    ds.push(decision(
        now,
        "warned",
        "dev",
        "bob",
        "no policy covers it (warn mode)",
        &[],
    ));
    h.keyd
        .record_admission_decisions(&webhook, ds)
        .await
        .unwrap();

    // A node's data plane in `all` mode (no [policy] here), encrypting, with 5 strict drops
    // between two reports. (Registered last: a rollout would wait for it.)
    let node = Identity::Node("node-a".into());
    h.keyd
        .register_node(
            &node,
            "node-a",
            keyd_proto::NodeRegistration {
                endpoint: "192.0.2.10".parse().unwrap(),
                pod_cidrs: vec!["10.0.1.0/24".parse().unwrap()],
                wireguard_public_key: None,
                wireguard_key_epoch: None,
                boot_id: None,
            },
        )
        .await
        .unwrap();
    let counters = |dropped: u64| keyd_proto::rules::DataplaneReport {
        node_mode: "all".into(),
        rules_revision: None,
        counting_since: h.start,
        at: h.clock.now(),
        policies: vec![keyd_proto::rules::PolicyCounters {
            name: "all".into(),
            programmed: true,
            encrypted_packets: 1000,
            encrypted_bytes: 1_500_000,
            dropped_packets: dropped,
            dropped_bytes: dropped * 100,
            ..Default::default()
        }],
    };
    h.keyd
        .record_dataplane(&node, "node-a", counters(0))
        .await
        .unwrap();
    h.keyd
        .record_dataplane(&node, "node-a", counters(5))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(HOUR));
    h
}

async fn report(h: &History, format: ReportFormat) -> keyd::service::SignedReport {
    h.keyd
        .evidence_report(
            &Identity::Admin("auditor".into()),
            ReportRequest {
                since: None,
                until: None,
                format,
            },
            Arc::new(Progress::default()),
        )
        .await
        .unwrap()
}

fn class(r: &EvidenceReport, c: KeyClass) -> &keyd::report::ClassEvidence {
    r.classes.iter().find(|x| x.class == c).unwrap()
}

#[tokio::test]
async fn the_numbers_match_the_scripted_history() {
    let h = history().await;
    let signed = report(&h, ReportFormat::Json).await;
    let r: EvidenceReport = serde_json::from_slice(&signed.content).unwrap();
    assert_eq!(r, signed.report, "the JSON is the report");
    assert!(!r.compliant);
    assert_eq!(
        r.since, h.start,
        "the period starts at the log's first record"
    );

    let ipsec = class(&r, KeyClass::Ipsec);
    let labels: Vec<&str> = ipsec.keys.iter().map(|k| k.label.as_str()).collect();
    assert_eq!(labels, ["SPI 1", "SPI 2", "SPI 3"], "{ipsec:#?}");
    assert_eq!(
        (
            ipsec.rotations,
            ipsec.rotations_on_schedule,
            ipsec.rotations_late
        ),
        (2, 1, 1)
    );
    assert_eq!(ipsec.keys[0].on_schedule, Some(true));
    assert_eq!(ipsec.keys[1].on_schedule, Some(false));
    // SPI 2 was the key in use from 20h to 20h + 3 days (plus the rollout's minutes): overdue
    // after 1 day + 5 min overlap + 30 min grace, beyond bounds after 2 days + 35 min.
    let overdue = 3 * 24 * HOUR - (24 * HOUR + 2100);
    let beyond = 3 * 24 * HOUR - (48 * HOUR + 2100);
    assert!(
        ipsec.overdue_secs.abs_diff(overdue) < 3600,
        "{}",
        ipsec.overdue_secs
    );
    assert!(
        ipsec.beyond_bounds_secs.abs_diff(beyond) < 3600,
        "{}",
        ipsec.beyond_bounds_secs
    );
    assert!(!ipsec.compliant);
    assert!(
        ipsec
            .reasons
            .iter()
            .any(|x| x.starts_with("SPI 2 was in use")),
        "{:?}",
        ipsec.reasons
    );
    assert!(
        ipsec
            .reasons
            .iter()
            .any(|x| x.contains("beyond the max_period bound"))
    );
    assert_eq!(ipsec.rollouts.len(), 2, "{:#?}", ipsec.rollouts);
    assert!(
        ipsec
            .rollouts
            .iter()
            .all(|ro| ro.retired.is_some() && ro.stage_wait_secs.is_some())
    );
    assert!(ipsec.keys.iter().all(|k| k.created.is_some()));

    let psk = class(&r, KeyClass::WireguardPsk);
    assert!(!psk.compliant, "paused for four days on a daily schedule");
    assert!(psk.keys[0].overdue_from.is_some());
    assert!(
        psk.schedule_changes
            .iter()
            .any(|c| c.action == "schedule.paused")
    );
    assert!(class(&r, KeyClass::WireguardNodeKeys).compliant);
    assert!(
        class(&r, KeyClass::Kek).compliant,
        "{:?}",
        class(&r, KeyClass::Kek).reasons
    );

    assert_eq!(r.custody.outages.len(), 1, "{:#?}", r.custody.outages);
    assert_eq!(r.custody.outages[0].secs, 2 * HOUR);
    assert_eq!(r.custody.outage_secs, 2 * HOUR);
    assert!(
        r.custody.outages[0]
            .reason
            .contains("switched off by the test")
    );

    let totals: BTreeMap<&str, u64> = r
        .admission
        .totals
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        totals,
        BTreeMap::from([
            ("allowed", 3),
            ("break_glass", 1),
            ("denied", 1),
            ("warned", 1)
        ])
    );
    assert_eq!(r.admission.exceptions_total, 2);
    let bg = r
        .admission
        .exceptions
        .iter()
        .find(|e| e.outcome == "break_glass")
        .unwrap();
    assert_eq!(
        (bg.user.as_str(), bg.namespace.as_str()),
        ("alice", "payments")
    );
    assert!(bg.reason.starts_with("incident 4711"));
    assert_eq!(
        r.admission
            .buckets
            .iter()
            .map(|b| b.values().sum::<u64>())
            .sum::<u64>(),
        6
    );
    let pci = r.policies.iter().find(|p| p.name == "pci").unwrap();
    assert_eq!(pci.admissions.get("allowed"), Some(&3));
    assert!(!pci.compliant && pci.reasons[0].contains("1 workloads admitted as exceptions"));
    assert!(
        r.findings.iter().any(|f| f.contains("no policy covered")),
        "{:?}",
        r.findings
    );
    assert!(r.dataplane.available, "{}", r.dataplane.note);
    assert_eq!(r.dataplane.nodes_reporting, 1);
    assert_eq!(r.dataplane.strict_drops_by_node.get("node-a"), Some(&5));
    let all = r.policies.iter().find(|p| p.name == "all").unwrap();
    assert_eq!((all.strict_drop_packets, all.strict_drop_bytes), (5, 500));
    let dp = all.dataplane.as_ref().unwrap();
    assert_eq!((dp.nodes_programmed, dp.encrypted_bytes), (1, 1_500_000));
    assert!(all.compliant, "{:?}", all.reasons);

    let i = &r.integrity;
    assert!(i.chain_verified && i.chain_error.is_none(), "{i:?}");
    assert!(i.checkpoints_verified >= 1);
    let last_cp = i.last_checkpoint.as_ref().unwrap();
    assert!(
        last_cp.seq >= i.last_seq.unwrap(),
        "the checkpoint vouches for the period's end"
    );
    assert_eq!(
        i.records_in_period,
        i.last_seq.unwrap() - i.first_seq.unwrap() + 1
    );
    let (key, key_id) = h.keyd.audit_public_key();
    assert_eq!(
        (i.public_key.as_str(), i.key_id.as_str()),
        (key.as_str(), key_id.as_str())
    );

    // A period that ends before the outage: no outage, and fewer records.
    let early_signed = h
        .keyd
        .evidence_report(
            &Identity::Admin("auditor".into()),
            ReportRequest {
                since: None,
                until: Some(Timestamp(h.start.0 + 2 * HOUR)),
                format: ReportFormat::Json,
            },
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
    let early = early_signed.report.clone();
    assert!(early.custody.outages.is_empty());
    assert!(early.integrity.records_in_period < i.records_in_period);
    assert_eq!(class(&early, KeyClass::Ipsec).keys.len(), 1);
    assert!(
        early.classes.iter().all(|c| c.current.is_none()),
        "no live view in a past period"
    );

    // Every report handed out is audited with its digest.
    let last = h.keyd.store().audit_last().unwrap().unwrap();
    assert_eq!(last.event.action, "report.generated");
    assert_eq!(
        last.event.details["sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            &early_signed.content
        ))
    );
    assert_eq!(last.event.details["compliant"], early.compliant);
}

/// keyd stopped during an outage (no `recovered` record); it starts again only once the
/// custodian answers, and then closes the outage; the next outage is its own.
#[tokio::test]
async fn an_outage_cut_short_by_a_restart_is_closed_at_the_next_start() {
    let h = history().await;
    assert!(!h.keyd.close_outage_left_open().await.unwrap(), "none open");
    h.kek.down.store(true, Ordering::SeqCst);
    assert!(h.custody.probe().await.is_err());
    h.keyd.audit_custody_transitions().await.unwrap();
    h.clock.advance(Duration::from_secs(3 * HOUR));
    // The restart: a new process would not know of the outage; the store does.
    h.kek.down.store(false, Ordering::SeqCst);
    assert!(h.keyd.close_outage_left_open().await.unwrap());
    assert!(
        !h.keyd.close_outage_left_open().await.unwrap(),
        "closed once"
    );
    h.clock.advance(Duration::from_secs(HOUR));
    let r = report(&h, ReportFormat::Json).await.report;
    assert_eq!(r.custody.outages.len(), 2, "{:#?}", r.custody.outages);
    let second = &r.custody.outages[1];
    assert_eq!(second.secs, 3 * HOUR);
    assert!(second.to.is_some());
    assert_eq!(r.custody.outage_secs, 5 * HOUR);
}

/// Records removed from the store's start behind keyd's back (not by a prune, which leaves a
/// signed checkpoint before what remains): the report's chain check fails and says so.
#[tokio::test]
async fn a_log_cut_outside_a_prune_is_a_finding() {
    let h = history().await;
    let store = h.keyd.store();
    let cut = (3..50)
        .find(|s| {
            keyd::audit::checkpoint_at(store.as_ref(), *s)
                .unwrap()
                .is_none()
        })
        .unwrap();
    store.audit_delete_through(cut, 1000).unwrap();
    let r = report(&h, ReportFormat::Json).await.report;
    assert!(!r.compliant);
    assert!(!r.integrity.chain_verified);
    let e = r.integrity.chain_error.as_deref().unwrap();
    assert!(e.contains(&format!("starts at record {}", cut + 1)), "{e}");
    assert!(r.findings.iter().any(|f| f.starts_with("audit log: ")));
}

#[tokio::test]
async fn the_html_shows_the_same_numbers_escaped() {
    let h = history().await;
    let signed = report(&h, ReportFormat::Html).await;
    let page = String::from_utf8(signed.content.clone()).unwrap();
    assert_eq!(page, html::render(&signed.report));
    assert!(page.contains("Not compliant"));
    assert!(
        page.contains("incident 4711: &lt;restore&gt; &amp; &quot;rollback&quot;"),
        "escaped"
    );
    assert!(!page.contains("<restore>"));
    assert!(!page.contains("<script"), "no script");
    assert!(
        page.contains("default-src 'none'"),
        "a CSP that forbids fetches and scripts"
    );
    assert!(
        page.contains(r#"<td class="n">2 (1 / 1)</td>"#),
        "IPsec rotations on schedule / late"
    );
    assert!(page.contains("Outages in the period: 1 (2h 0m in total"));
    assert!(page.contains("6 decisions by the admission webhook"));
    assert_eq!(
        page.matches(r#"<svg class="timeline""#).count(),
        4,
        "a timeline per class"
    );
    assert!(page.contains(r#"<svg class="admissions""#));
    assert!(page.contains(keyd::report::esc(&signed.report.integrity.key_id).as_str()));
}

fn keyctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_signature_verifies_and_an_edited_report_does_not() {
    let h = history().await;
    let signed = report(&h, ReportFormat::Html).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.html");
    std::fs::write(&file, &signed.content).unwrap();
    std::fs::write(
        dir.path().join("report.html.sig"),
        serde_json::to_vec(&signed.signature).unwrap(),
    )
    .unwrap();
    let (key, _) = h.keyd.audit_public_key();
    let f = file.to_str().unwrap();
    let ok = keyctl(&["audit", "verify-report", f, "--public-key", &key]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK: "));

    // Another audit key is refused even though the file is intact.
    let other = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let wrong = keyctl(&["audit", "verify-report", f, "--public-key", &other]);
    assert_eq!(wrong.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not with the trusted audit key"));

    // One number edited: "6 decisions" becomes "5 decisions".
    let page = String::from_utf8(signed.content.clone()).unwrap();
    std::fs::write(&file, page.replace("6 decisions", "5 decisions")).unwrap();
    let bad = keyctl(&["audit", "verify-report", f, "--public-key", &key]);
    assert_eq!(bad.status.code(), Some(7));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("TAMPERED") && err.contains("changed after signing"),
        "{err}"
    );

    // The signature file edited to match the edited report: its signature no longer holds.
    let mut sig = signed.signature.clone();
    let edited = std::fs::read(&file).unwrap();
    sig.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&edited));
    sig.bytes = edited.len() as u64;
    std::fs::write(
        dir.path().join("report.html.sig"),
        serde_json::to_vec(&sig).unwrap(),
    )
    .unwrap();
    let bad = keyctl(&["audit", "verify-report", f, "--public-key", &key]);
    assert_eq!(bad.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("signature does not verify"));
}

/// The Chromium binary, or why the rendering tests cannot run.
fn chromium() -> Option<std::path::PathBuf> {
    let found = keyd::report::pdf::find_chromium();
    keyd_tests::prereq::require(
        "chromium (headless) for the report's rendering tests",
        found
            .clone()
            .map(|_| ())
            .ok_or_else(|| "no chromium on PATH".to_owned()),
    )
    .then_some(found)
    .flatten()
}

/// Pixels of exactly (or, for rasterised PDFs, nearly) this colour.
fn count_colour(rgb: &[u8], channels: usize, hex: &str, tolerance: u8) -> usize {
    let want = [
        u8::from_str_radix(&hex[1..3], 16).unwrap(),
        u8::from_str_radix(&hex[3..5], 16).unwrap(),
        u8::from_str_radix(&hex[5..7], 16).unwrap(),
    ];
    rgb.chunks_exact(channels)
        .filter(|p| (0..3).all(|i| p[i].abs_diff(want[i]) <= tolerance))
        .count()
}

fn decode_png(path: &Path) -> (Vec<u8>, usize, u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    (buf, channels, info.width, info.height)
}

/// A PPM (P6) from pdftoppm: the pixels, 3 bytes each.
fn decode_ppm(bytes: &[u8]) -> (Vec<u8>, u32, u32) {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..i]).into_owned());
    }
    assert_eq!(fields[0], "P6");
    (
        bytes[i + 1..].to_vec(),
        fields[1].parse().unwrap(),
        fields[2].parse().unwrap(),
    )
}

/// The charts' colours are on the page: the timelines (in use, overdue, beyond bounds, the
/// outage band) and the admission bars.
fn assert_charts_drawn(what: &str, rgb: &[u8], channels: usize, tolerance: u8) {
    use keyd::report::svg as c;
    for (name, colour, min) in [
        ("key in use", c::IN_USE, 2000),
        ("overdue", c::OVERDUE, 300),
        ("beyond bounds", c::BEYOND_BOUNDS, 300),
        ("KEK outage", c::OUTAGE, 50),
        ("admitted (bars)", c::OUTCOMES[0].1, 300),
    ] {
        let n = count_colour(rgb, channels, colour, tolerance);
        eprintln!("{what}: {n} pixels of {name}");
        assert!(
            n >= min,
            "{what}: {n} pixels of {name} ({colour}), expected at least {min}"
        );
    }
}

#[tokio::test]
async fn chromium_renders_the_page_and_the_pdf_with_their_charts() {
    let Some(chromium) = chromium() else { return };
    let h = history().await;
    let signed = report(&h, ReportFormat::Html).await;
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &signed.content).unwrap();
    let shot = dir.path().join("shot.png");
    let mut args: Vec<String> = vec![
        "--headless".into(),
        "--disable-gpu".into(),
        "--hide-scrollbars".into(),
        "--enable-logging=stderr".into(),
        "--v=0".into(),
        format!("--user-data-dir={}", dir.path().join("profile").display()),
        format!("--screenshot={}", shot.display()),
        "--window-size=1000,4000".into(),
    ];
    if keyd_tests::prereq::is_root() {
        args.push("--no-sandbox".into());
    }
    args.push(format!("file://{}", page.display()));
    let out = std::process::Command::new(&chromium)
        .args(&args)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(shot.exists(), "no screenshot: {log}");
    // Console messages (a script error, a refused load) are logged as CONSOLE lines.
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let (rgb, channels, w, hgt) = decode_png(&shot);
    assert_eq!((w, hgt), (1000, 4000));
    assert_charts_drawn("screenshot", &rgb, channels, 0);

    // The PDF keyd prints from the same page, rasterised.
    let pdf = report(&h, ReportFormat::Pdf).await;
    assert!(pdf.content.starts_with(b"%PDF"));
    let file = dir.path().join("report.pdf");
    std::fs::write(&file, &pdf.content).unwrap();
    let pdftoppm = std::process::Command::new("pdftoppm")
        .args(["-r", "60"])
        .arg(&file)
        .arg(dir.path().join("page"))
        .output();
    let ok = keyd_tests::prereq::require(
        "pdftoppm (poppler-utils)",
        match &pdftoppm {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(e.to_string()),
        },
    );
    if !ok {
        return;
    }
    let mut pages: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ppm"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 2, "a report of several pages: {pages:?}");
    let mut all = Vec::new();
    for p in &pages {
        let (rgb, w, hgt) = decode_ppm(&std::fs::read(p).unwrap());
        assert_eq!(rgb.len(), (w * hgt * 3) as usize);
        let blank = rgb.iter().filter(|b| **b == 255).count();
        assert!(blank < rgb.len(), "page {} is blank", p.display());
        all.extend(rgb);
    }
    assert_charts_drawn("PDF", &all, 3, 12);

    // `KEYD_EXAMPLE_REPORT_DIR=docs/example-report`: keep the files (the example in docs/).
    if let Some(out) = std::env::var_os("KEYD_EXAMPLE_REPORT_DIR") {
        let out = Path::new(&out);
        std::fs::create_dir_all(out).unwrap();
        std::fs::write(out.join("report.html"), &signed.content).unwrap();
        let sig = serde_json::to_vec_pretty(&signed.signature).unwrap();
        std::fs::write(out.join("report.html.sig"), sig).unwrap();
        std::fs::write(out.join("report.pdf"), &pdf.content).unwrap();
        let sig = serde_json::to_vec_pretty(&pdf.signature).unwrap();
        std::fs::write(out.join("report.pdf.sig"), sig).unwrap();
        std::fs::copy(&shot, out.join("screenshot.png")).unwrap();
        let (key, _) = h.keyd.audit_public_key();
        std::fs::write(out.join("audit-public-key.txt"), format!("{key}\n")).unwrap();
    }
}

/// keyctl over mTLS against a running keyd: the report and its signature land in files, the
/// signature verifies against the key `keyctl audit public-key` prints, bad requests get clear
/// errors, and a node certificate cannot have a report made.
#[tokio::test]
async fn keyctl_writes_the_signed_report_it_gets_over_mtls() {
    let h = common::Harness::start().await;
    let mut admin = h.admin().await;
    let r = admin
        .post_json("/v1/ipsec/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.error_message());
    let dir = tempfile::tempdir().unwrap();
    let cfg = h.setup.keyctl_toml.to_str().unwrap().to_owned();
    let server = h.server_url();
    let run = |args: Vec<String>| {
        let (cfg, server) = (cfg.clone(), server.clone());
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
                .args(["--config", &cfg, "--server", &server])
                .args(args)
                .output()
                .await
                .unwrap()
        }
    };
    let file = dir.path().join("evidence.html");
    let f = file.to_str().unwrap().to_owned();
    let out = run(vec![
        "report".into(),
        "--format".into(),
        "html".into(),
        "-o".into(),
        f.clone(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("compliant over the period"), "{err}");
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .starts_with("<!DOCTYPE html>")
    );
    let key =
        String::from_utf8(run(vec!["audit".into(), "public-key".into()]).await.stdout).unwrap();
    let ok = keyctl(&["audit", "verify-report", &f, "--public-key", key.trim()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // JSON, with its own signature file.
    let json = dir.path().join("evidence.json");
    let sig = dir.path().join("elsewhere.sig");
    let out = run(vec![
        "report".into(),
        "--format".into(),
        "json".into(),
        "-o".into(),
        json.to_str().unwrap().into(),
        "--signature".into(),
        sig.to_str().unwrap().into(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: EvidenceReport = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r.generated_by, "admin/admin");
    assert_eq!(class(&r, KeyClass::Ipsec).keys.len(), 1);
    assert_eq!(r.custody.events[0].action, "kek.custodian.initialised");
    let ok = keyctl(&[
        "audit",
        "verify-report",
        json.to_str().unwrap(),
        "--signature",
        sig.to_str().unwrap(),
        "--public-key",
        key.trim(),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A period that ends before it starts; an unknown format; -o as a file without --format.
    let out = run(vec![
        "report".into(),
        "--format".into(),
        "json".into(),
        "-o".into(),
        dir.path().join("x").to_str().unwrap().into(),
        "--since".into(),
        "2030-01-01T00:00:00Z".into(),
        "--until".into(),
        "2029-01-01T00:00:00Z".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is after until"));
    let out = run(vec![
        "report".into(),
        "--format".into(),
        "docx".into(),
        "-o".into(),
        "x".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not one of json, html, pdf"));
    let out = run(vec!["report".into(), "--format".into(), "html".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give -o FILE"));
    let out = run(vec!["report".into(), "-o".into(), "report.html".into()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format html|pdf|json -o FILE"));
    assert!(
        !dir.path().join("x").exists(),
        "nothing written on an error"
    );

    // Only an admin may have a report made.
    let r = h
        .node("node-a")
        .await
        .get("/v1/report/evidence")
        .await
        .unwrap();
    assert_eq!(r.status, http::StatusCode::FORBIDDEN);
}
