//! One conformance suite for every KEK custodian, instantiated for `local`, `aws-kms` (moto's
//! KMS server on loopback) and `vault-transit` (the Vault test double, or a real Vault when
//! `VAULT_ADDR` and `VAULT_TOKEN` are set). Each test states the property it checks; a test
//! that does not apply to a backend (a local KEK has no permissions to deny) says so and
//! returns.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use keyd::custody::{Custody, Member};
use keyd::rewrap::{self, Kind as MigrationKind, RunOptions};
use keyd::seal::{self, FailureKind, SealContext, SealedRecord};
use keyd::service::Keyd;
use keyd::store::Table;
use keyd_proto::identity::Identity;
use keyd_proto::kek::{KekRotateRequest, KekSpec, VaultAuth};
use keyd_proto::{NodeRegistration, RotateRequest};
use support::{Backend, Kind, RunningKeyd, chain, check_all, ctx, open_store, seed, settings};

macro_rules! conformance {
    ($($module:ident => $kind:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            async fn backend() -> Option<Backend> {
                Backend::new($kind).await
            }

            #[tokio::test]
            async fn wraps_unwraps_and_passes_its_check() {
                if let Some(b) = backend().await { super::wraps_unwraps_and_passes_its_check(b).await }
            }

            #[tokio::test]
            async fn a_wrapped_key_only_unwraps_for_its_own_record() {
                if let Some(b) = backend().await { super::a_wrapped_key_only_unwraps_for_its_own_record(b).await }
            }

            #[tokio::test]
            async fn a_wrong_key_id_is_named_and_stops_start_up() {
                if let Some(b) = backend().await { super::a_wrong_key_id_is_named_and_stops_start_up(b).await }
            }

            #[tokio::test]
            async fn permission_denied_is_its_own_error() {
                if let Some(b) = backend().await { super::permission_denied_is_its_own_error(b).await }
            }

            #[tokio::test]
            async fn a_disabled_key_is_its_own_error() {
                if let Some(b) = backend().await { super::a_disabled_key_is_its_own_error(b).await }
            }

            #[tokio::test]
            async fn an_outage_fails_fast_bounds_serving_and_recovers() {
                if let Some(b) = backend().await { super::an_outage_fails_fast_bounds_serving_and_recovers(b).await }
            }

            #[tokio::test]
            async fn keyd_keeps_serving_through_an_outage_and_refuses_rotations() {
                if let Some(b) = backend().await { super::keyd_keeps_serving_through_an_outage_and_refuses_rotations(b).await }
            }

            #[tokio::test]
            async fn a_kek_rotation_rewraps_every_record_with_nothing_unreadable() {
                if let Some(b) = backend().await { super::a_kek_rotation_rewraps_every_record_with_nothing_unreadable(b).await }
            }

            #[tokio::test]
            async fn a_migration_resumes_after_a_crash() {
                if let Some(b) = backend().await { super::a_migration_resumes_after_a_crash(b).await }
            }
        }
    )*};
}

conformance!(
    local => Kind::Local,
    aws_kms => Kind::AwsKms,
    vault_transit => Kind::VaultTransit,
);

fn not_applicable(b: &Backend, why: &str) -> bool {
    eprintln!("not applicable to {}: {why}", b.name());
    true
}

/// A round trip through the custodian, an existing data key wrapped (what a migration does),
/// the KEK named in the record, and the start-up check (which also proves the context is
/// enforced).
async fn wraps_unwraps_and_passes_its_check(b: Backend) {
    let w = b.connect(&b.spec()).await;
    w.check().await.unwrap();
    let c = ctx("r/1");
    let (dek, wrapped) = w.generate_data_key(&c).await.unwrap();
    assert_eq!(
        w.unwrap_data_key(&wrapped, &c).await.unwrap().expose(),
        dek.expose()
    );
    let again = w.wrap_data_key(&dek, &c).await.unwrap();
    assert_ne!(again, wrapped, "every wrap is fresh");
    assert_eq!(
        w.unwrap_data_key(&again, &c).await.unwrap().expose(),
        dek.expose()
    );
    let custody = Custody::single(Arc::clone(&w));
    let sealed = seal::seal(&custody, &c, b"plaintext").await.unwrap();
    assert_eq!(sealed.backend, b.name());
    assert!(
        w.holds(&sealed.backend, &sealed.kek_id),
        "{}",
        sealed.kek_id
    );
    assert_eq!(
        &seal::open(&custody, &c, &sealed).await.unwrap()[..],
        b"plaintext"
    );
    // Neither the data key nor a credential shows in Debug.
    let debug = format!("{w:?} {dek:?} {wrapped:?}");
    assert!(!debug.contains(&hex::encode(dek.expose())), "{debug}");
    if b.kind == Kind::VaultTransit {
        assert!(!debug.contains("hvs."), "a Vault token in Debug: {debug}");
    }
}

/// The custodian binds each wrapped key to its record id, purpose and version: under any
/// other context it refuses with a "wrong encryption context" error that names the backend
/// and the key; a wrapped key spliced into another record does not open it.
async fn a_wrapped_key_only_unwraps_for_its_own_record(b: Backend) {
    let w = b.connect(&b.spec()).await;
    let a = ctx("ipsec/1");
    let (_, wrapped) = w.generate_data_key(&a).await.unwrap();
    for other in [
        ctx("ipsec/2"),
        SealContext {
            purpose: "another-purpose".into(),
            ..a.clone()
        },
        SealContext {
            version: 2,
            ..a.clone()
        },
    ] {
        let e = w.unwrap_data_key(&wrapped, &other).await.unwrap_err();
        assert_eq!(e.kind(), Some(FailureKind::ContextMismatch), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(b.name()) && msg.contains(&w.key_id()), "{msg}");
    }
    let custody = Custody::single(Arc::clone(&w));
    let rec_a = seal::seal(&custody, &a, b"a").await.unwrap();
    let rec_b = seal::seal(&custody, &ctx("ipsec/2"), b"b").await.unwrap();
    let mut spliced = rec_a.clone();
    spliced.wrapped_key = rec_b.wrapped_key.clone();
    let e = seal::open(&custody, &a, &spliced).await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::ContextMismatch), "{e}");
    // The whole record under another id does not open either.
    assert!(seal::open(&custody, &ctx("ipsec/2"), &rec_a).await.is_err());
}

/// A key the custodian does not have: "key not found", naming backend and key; and `keyd
/// serve`'s start-up check fails saying which call failed and why.
async fn a_wrong_key_id_is_named_and_stops_start_up(b: Backend) {
    let Some(spec) = b.missing_key_spec().await else {
        not_applicable(
            &b,
            "a local KEK is the key file itself; there is no key id to get wrong",
        );
        return;
    };
    let w = b.connect(&spec).await;
    let e = w.generate_data_key(&ctx("r")).await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::KeyNotFound), "{e}");
    let missing = match &spec {
        KekSpec::AwsKms(a) => a.key_id.clone(),
        KekSpec::VaultTransit(v) => v.key.clone(),
        KekSpec::Local { .. } => unreachable!(),
    };
    assert!(
        e.to_string().contains(b.name()) && e.to_string().contains(&missing),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let err = keyd::custody::bootstrap(&spec, &settings(), &store)
        .await
        .unwrap_err();
    let msg = chain(&err);
    let call = match b.kind {
        Kind::AwsKms => "GenerateDataKey failed",
        _ => "transit/datakey/plaintext failed",
    };
    assert!(
        msg.contains("start-up check") && msg.contains(call) && msg.contains("key not found"),
        "{msg}"
    );
}

/// Credentials that may wrap but not unwrap: "permission denied", naming the call and key.
async fn permission_denied_is_its_own_error(b: Backend) {
    let spec = match b.kind {
        Kind::Local => {
            not_applicable(
                &b,
                "a local KEK has no permissions (its file mode is checked instead)",
            );
            return;
        }
        Kind::AwsKms => {
            // moto enforces IAM once switched on; this user may not call Decrypt.
            let creds = b
                .moto()
                .restricted_credentials(&["kms:GenerateDataKey", "kms:Encrypt"])
                .await;
            b.aws_spec(&b.key, creds)
        }
        Kind::VaultTransit => {
            let v = b.vault();
            let policy = format!("{}-datakey-only", v.mount);
            v.set_policy(
                &policy,
                &format!(
                    "path \"{}/datakey/plaintext/keyd\" {{\n  capabilities = [\"update\"]\n}}\n",
                    v.mount
                ),
            )
            .await;
            let (_, token_file) = v.token_file(&[&policy], "1h").await;
            b.vault_spec("keyd", VaultAuth::Token { token_file })
        }
    };
    let w = b.connect(&spec).await;
    let (_, wrapped) = w.generate_data_key(&ctx("r")).await.unwrap();
    let e = w.unwrap_data_key(&wrapped, &ctx("r")).await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::PermissionDenied), "{e}");
    let call = match b.kind {
        Kind::AwsKms => "Decrypt failed",
        _ => "transit/decrypt failed",
    };
    assert!(
        e.to_string().contains(call) && e.to_string().contains(b.name()),
        "{e}"
    );
}

/// A disabled key (KMS `DisableKey`; a Vault key version below `min_decryption_version`):
/// "key disabled", and usable again once re-enabled.
async fn a_disabled_key_is_its_own_error(b: Backend) {
    if b.kind == Kind::Local {
        not_applicable(&b, "a local KEK cannot be disabled");
        return;
    }
    let w = b.connect(&b.spec()).await;
    let (dek, wrapped) = w.generate_data_key(&ctx("r")).await.unwrap();
    match b.kind {
        Kind::AwsKms => b.moto().disable_key(&b.key).await,
        _ => {
            b.vault().rotate("keyd").await;
            b.vault().set_min_decryption_version("keyd", 2).await;
        }
    }
    let e = w.unwrap_data_key(&wrapped, &ctx("r")).await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::KeyDisabled), "{e}");
    assert!(e.to_string().contains(b.name()), "{e}");
    match b.kind {
        Kind::AwsKms => b.moto().enable_key(&b.key).await,
        _ => b.vault().set_min_decryption_version("keyd", 1).await,
    }
    assert_eq!(
        w.unwrap_data_key(&wrapped, &ctx("r"))
            .await
            .unwrap()
            .expose(),
        dek.expose()
    );
}

/// The custodian stops mid-run: calls fail "unavailable", then fail at once while it is being
/// re-checked; held keys are served for `max_unavailable`, no longer; when the server comes
/// back the keyring notices by itself and everything works again.
async fn an_outage_fails_fast_bounds_serving_and_recovers(b: Backend) {
    if !can_stop(&b) {
        return;
    }
    let mut s = settings();
    s.max_unavailable = Duration::from_secs(2);
    let spec = b.spec();
    let w = b.connect(&spec).await;
    let custody = Arc::new(Custody::new(Member::new(Some(spec), w), vec![], s));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let _monitor = custody.spawn_monitor(rx);
    let before = seal::seal(&*custody, &ctx("r"), b"held").await.unwrap();
    stop_server(&b).await;
    let e = seal::seal(&*custody, &ctx("r2"), b"x").await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::Unavailable), "{e}");
    let t = Instant::now();
    let e = seal::seal(&*custody, &ctx("r3"), b"x").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "did not fail fast"
    );
    assert!(e.to_string().contains("not tried"), "{e}");
    assert!(
        custody.serving_check().is_ok(),
        "held keys are served at first"
    );
    let health = custody.status().health;
    assert_eq!(health.state, "unavailable");
    assert!(health.reason.is_some() && health.serving_until.is_some());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e = custody.serving_check().unwrap_err();
    assert!(e.to_string().contains("max_unavailable"), "{e}");
    start_server(&b).await;
    wait_until(Duration::from_secs(20), || !custody.health().is_down()).await;
    assert!(custody.serving_check().is_ok());
    assert_eq!(
        &seal::open(&*custody, &ctx("r"), &before).await.unwrap()[..],
        b"held"
    );
    seal::seal(&*custody, &ctx("r4"), b"x").await.unwrap();
}

/// The same outage seen through keyd's API: nodes still get their bundles, IPsec rotations
/// are refused with 503 `custodian_unavailable` (nothing half-written), readiness and status
/// say why; after `max_unavailable` bundles are refused and keyd is not ready; when the
/// custodian returns keyd recovers by itself and every record is intact.
async fn keyd_keeps_serving_through_an_outage_and_refuses_rotations(b: Backend) {
    if !can_stop(&b) {
        return;
    }
    let mut s = settings();
    s.max_unavailable = Duration::from_secs(4);
    let k = RunningKeyd::start(b.spec(), s).await;
    let reg = NodeRegistration {
        endpoint: "192.0.2.1".parse().unwrap(),
        pod_cidrs: vec!["10.0.1.0/24".parse().unwrap()],
        wireguard_public_key: None,
        wireguard_key_epoch: None,
        boot_id: None,
    };
    let mut node = k.node("node-a").await;
    assert_eq!(
        node.put_json("/v1/nodes/node-a", &reg)
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let mut admin = k.admin().await;
    let r = admin
        .post_json("/v1/ipsec/rotate", &RotateRequest::default())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let records_before = k.keyd.store().scan(Table::Sealed).unwrap();

    stop_server(&b).await;
    let r = admin
        .post_json("/v1/ipsec/rotate", &RotateRequest::default())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let e: keyd_proto::ErrorBody = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e.error, "custodian_unavailable");
    assert!(
        e.message.contains(b.name()) && e.message.contains("nothing was changed"),
        "{}",
        e.message
    );
    assert_eq!(
        k.keyd.store().scan(Table::Sealed).unwrap(),
        records_before,
        "a refused rotation writes nothing"
    );
    // A KEK rotation asked for through the schedules' endpoint gets the same answer as one
    // asked for through /v1/kek (once a 422 there against a 503 here for the same outage).
    let direct = admin
        .post_json("/v1/kek/rotate", &serde_json::json!({}))
        .await
        .unwrap();
    let scheduled = admin
        .post_json("/v1/rotate/kek", &serde_json::json!({}))
        .await
        .unwrap();
    let code = |r: &keyd_mtls::client::Response| {
        serde_json::from_slice::<keyd_proto::ErrorBody>(&r.body)
            .map(|e| e.error)
            .unwrap_or_default()
    };
    assert!(
        !direct.status.is_success(),
        "a KEK rotation ran during the outage"
    );
    assert_eq!(
        (scheduled.status, code(&scheduled)),
        (direct.status, code(&direct)),
        "{} / {}",
        scheduled.error_message(),
        direct.error_message()
    );
    let r = node.get("/v1/nodes/node-a/bundle").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "held keys are still served");
    let (code, text) = k.ops_get("/readyz").await;
    assert_eq!(code, 200);
    assert!(text.contains("degraded"), "{text}");
    let status: keyd_proto::Status =
        serde_json::from_slice(&admin.get("/v1/status").await.unwrap().body).unwrap();
    assert_eq!(status.custody.unwrap().health.state, "unavailable");
    let (_, metrics) = k.ops_get("/metrics").await;
    assert!(metrics.contains("keyd_kek_custodian_up 0"), "{metrics}");

    tokio::time::sleep(Duration::from_millis(4500)).await;
    let r = node.get("/v1/nodes/node-a/bundle").await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "past max_unavailable"
    );
    let (code, text) = k.ops_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(text.contains("max_unavailable"), "{text}");

    start_server(&b).await;
    let mut ready = false;
    for _ in 0..200 {
        if k.ops_get("/readyz").await == (200, "ready\n".to_owned()) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "keyd did not recover by itself");
    assert_eq!(
        node.get("/v1/nodes/node-a/bundle").await.unwrap().status,
        StatusCode::OK
    );
    let r = admin
        .post_json("/v1/ipsec/rotate", &RotateRequest::default())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    // The outage is in the audit log: when it began and, once over, how long it lasted (the
    // evidence report's custody section reads these).
    let mut actions = Vec::new();
    for _ in 0..50 {
        actions = k
            .keyd
            .store()
            .audit_range(0, 100_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.event.action.starts_with("kek.custodian."))
            .map(|r| (r.event.action, r.event.details))
            .collect::<Vec<_>>();
        if actions.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        [
            "kek.custodian.initialised",
            "kek.custodian.unavailable",
            "kek.custodian.recovered"
        ]
    );
    assert_eq!(actions[1].1["kind"], "unavailable");
    assert!(
        actions[2].1["seconds"].as_u64().unwrap() >= 4,
        "the outage outlasted max_unavailable: {}",
        actions[2].1
    );
    // A restart (which opens every record) proves nothing was lost or half-written.
    let spec = b.spec();
    let dir = k.stop().await;
    let k = RunningKeyd::start_in(dir, spec, settings()).await.unwrap();
    assert_eq!(k.keyd.ipsec_status().keys.len(), 2);
    k.stop().await;
}

/// `keyctl kek rotate`: a new local KEK file, a new KMS key, or a new Vault key version.
/// Every record is rewrapped in the background, verified, and opens with the same plaintext;
/// a reader opening every record meanwhile never fails; an IPsec rotation during the rewrap is
/// sealed under the new KEK; audit, status and metrics follow it.
async fn a_kek_rotation_rewraps_every_record_with_nothing_unreadable(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let custody = b.custody().await;
    seed(store.as_ref(), &custody, 60).await;
    let keyd = Keyd::open_with_custody(
        Arc::clone(&store),
        Arc::clone(&custody),
        keyd::service::ServiceConfig::default(),
        keyd::clock::Clock::default(),
    )
    .await
    .unwrap();
    let old = custody.active();
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (store, custody, done, reads) = (
            Arc::clone(&store),
            Arc::clone(&custody),
            Arc::clone(&done),
            Arc::clone(&reads),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                assert_eq!(check_all(store.as_ref(), &custody).await, 60);
                reads.fetch_add(1, Ordering::Relaxed);
                // A local KEK never makes the reader wait: let the rewrap run.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let req = match b.kind {
        Kind::AwsKms => KekRotateRequest {
            key_id: Some(b.moto().create_key().await),
            rewrap_only: false,
        },
        _ => KekRotateRequest::default(),
    };
    let started = keyd::service::rotate_kek(&keyd, "admin/test", req)
        .await
        .unwrap();
    assert_eq!(started.kind, "rotate");
    assert_eq!(
        started.total, 62,
        "60 records, the WireGuard master secret and the audit signing key"
    );
    keyd.rotate_ipsec(&Identity::Admin("test".into()), RotateRequest::default())
        .await
        .unwrap();
    let m = support::wait_for_migration(&custody).await;
    done.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!((m.rewrapped, m.failed), (62, 0), "{m:?}");
    let active = custody.active().wrapper;
    for (id, bytes) in store.scan(Table::Sealed).unwrap() {
        let r = SealedRecord::from_bytes(&bytes).unwrap();
        assert!(
            active.holds(&r.backend, &r.kek_id) && active.is_current(&r.kek_id),
            "{id} still under {} {}",
            r.backend,
            r.kek_id
        );
    }
    assert_eq!(check_all(store.as_ref(), &custody).await, 60);
    if b.kind != Kind::VaultTransit {
        assert!(!Arc::ptr_eq(&old.wrapper, &active));
    }
    assert!(
        custody.status().retired.is_empty(),
        "the old KEK holds no record any more"
    );
    let (doc, _) = keyd::custody::doc::read_doc(store.as_ref())
        .unwrap()
        .unwrap();
    assert!(
        doc.retired.is_empty(),
        "the next start does not connect to it"
    );
    let audit = store.audit_range(0, 10_000).unwrap();
    let started = audit
        .iter()
        .find(|a| a.event.action == "kek.migration.started")
        .unwrap();
    assert_eq!(started.event.actor, "admin/test");
    assert!(
        audit
            .iter()
            .any(|a| a.event.action == "kek.migration.completed")
    );
    let status = keyd.status().custody.unwrap();
    assert_eq!(status.migration.unwrap().state, "completed");
    let metrics = keyd.metrics.encode();
    assert!(
        metrics.contains("keyd_kek_rewrap_records{state=\"remaining\"} 0")
            && metrics.contains("keyd_kek_rewrapped_records_total 62"),
        "{metrics}"
    );
}

/// A migration that stops after its first chunk (as a crash would) leaves every record
/// readable, under the old or the new KEK; at the next start keyd finds the custodians in the
/// store (even though the configuration still names the old one), resumes, and completes.
async fn a_migration_resumes_after_a_crash(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_store(dir.path());
        let custody = keyd::custody::bootstrap(&b.spec(), &settings(), &store)
            .await
            .unwrap();
        seed(store.as_ref(), &custody, 40).await;
        let keyd = Keyd::open_with_custody(
            Arc::clone(&store),
            Arc::clone(&custody),
            keyd::service::ServiceConfig::default(),
            keyd::clock::Clock::default(),
        )
        .await
        .unwrap();
        drop(keyd);
        let target_spec = b.second_spec().await;
        let target = Member::new(Some(target_spec.clone()), b.connect(&target_spec).await);
        rewrap::start(
            Arc::clone(&store),
            Arc::clone(&custody),
            "admin/test",
            MigrationKind::Migrate,
            target,
            RunOptions {
                chunk: 10,
                halt_after_chunks: Some(1),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
        wait_until(Duration::from_secs(30), || {
            custody.migration().is_some_and(|m| m.rewrapped == 10)
                && custody.metrics().migration_running.get() == 0
        })
        .await;
        let (doc, _) = keyd::custody::doc::read_doc(store.as_ref())
            .unwrap()
            .unwrap();
        assert!(!doc.migration.unwrap().completed);
        // Mid-migration, every record opens (10 under the new KEK, 31 under the old one).
        assert_eq!(check_all(store.as_ref(), &custody).await, 40);
    }
    // "Restart": the configuration still names the old custodian.
    let store = open_store(dir.path());
    let custody = keyd::custody::bootstrap(&b.spec(), &settings(), &store)
        .await
        .unwrap();
    assert!(custody.status().config_note.is_some());
    assert_eq!(
        custody.others().len(),
        1,
        "the old KEK is retired, not forgotten"
    );
    assert_eq!(check_all(store.as_ref(), &custody).await, 40);
    assert!(
        rewrap::resume(
            Arc::clone(&store),
            Arc::clone(&custody),
            RunOptions::default()
        )
        .await
        .unwrap()
    );
    let m = support::wait_for_migration(&custody).await;
    assert_eq!((m.rewrapped, m.failed), (42, 0), "{m:?}");
    assert_eq!(check_all(store.as_ref(), &custody).await, 40);
    let actions: Vec<String> = store
        .audit_range(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|a| a.event.action)
        .filter(|a| a.starts_with("kek."))
        .collect();
    assert_eq!(
        actions,
        [
            "kek.custodian.initialised",
            "kek.migration.started",
            "kek.migration.resumed",
            "kek.migration.completed"
        ]
    );
}

fn can_stop(b: &Backend) -> bool {
    match b.kind {
        Kind::Local => !not_applicable(b, "a local KEK file cannot be unreachable"),
        Kind::VaultTransit if b.vault().is_real() => {
            !not_applicable(b, "a real Vault cannot be stopped by the test")
        }
        _ => true,
    }
}

async fn stop_server(b: &Backend) {
    match b.kind {
        Kind::AwsKms => b.moto().stop().await,
        Kind::VaultTransit => b.vault().double_server().unwrap().stop().await,
        Kind::Local => unreachable!(),
    }
}

async fn start_server(b: &Backend) {
    match b.kind {
        Kind::AwsKms => b.moto().start_again().await,
        Kind::VaultTransit => b.vault().double_server().unwrap().start_again().await,
        Kind::Local => unreachable!(),
    }
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
