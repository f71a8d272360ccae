//! Migrating between custodians is the same operation as a rotation: local -> AWS KMS ->
//! Vault transit -> local, each step verified record by record with every record readable
//! throughout; and the same through `keyctl kek` against a running keyd.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::sync::Arc;

use keyd::service::Keyd;
use keyd::store::Table;
use keyd_proto::kek::{KekSpec, KekStatus, VaultAuth};
use support::{Backend, Kind, RunningKeyd, check_all, open_store, seed, settings};

/// local -> aws-kms -> vault-transit -> local, through the same call `POST /v1/kek/migrate`
/// makes. After each step every record is under the new custodian, opens with its plaintext,
/// and the previous custodian is no longer needed.
#[tokio::test]
async fn records_move_local_to_kms_to_vault_and_back() {
    let Some(aws) = Backend::new(Kind::AwsKms).await else {
        return;
    };
    let vault = Backend::new(Kind::VaultTransit).await.unwrap();
    let local = Backend::new(Kind::Local).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let custody = keyd::custody::bootstrap(&local.spec(), &settings(), &store)
        .await
        .unwrap();
    seed(store.as_ref(), &custody, 30).await;
    let keyd = Keyd::open_with_custody(
        Arc::clone(&store),
        Arc::clone(&custody),
        keyd::service::ServiceConfig::default(),
        keyd::clock::Clock::default(),
    )
    .await
    .unwrap();
    let back_to_local = KekSpec::Local {
        path: dir.path().join("kek-again.key"),
    };
    for (to, backend) in [
        (aws.spec(), "aws-kms"),
        (vault.spec(), "vault-transit"),
        (back_to_local, "local"),
    ] {
        let started = keyd::service::migrate_kek(&keyd, "admin/test", to)
            .await
            .unwrap();
        assert_eq!(started.kind, "migrate");
        let m = support::wait_for_migration(&custody).await;
        assert_eq!(m.id, started.id);
        assert_eq!((m.rewrapped, m.failed), (32, 0), "{m:?}");
        for (id, bytes) in store.scan(Table::Sealed).unwrap() {
            let r = keyd::seal::SealedRecord::from_bytes(&bytes).unwrap();
            assert_eq!(r.backend, backend, "{id}");
        }
        assert_eq!(check_all(store.as_ref(), &custody).await, 30);
        assert!(custody.status().retired.is_empty());
        assert_eq!(keyd.status().kek_backend, backend);
    }
    let completed = store
        .audit_range(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|a| a.event.action == "kek.migration.completed")
        .count();
    assert_eq!(completed, 3);
    vault.vault().cleanup().await;
}

/// A target that cannot be used is refused before anything changes: the migration request
/// fails with the failing call, and the records stay where they are.
#[tokio::test]
async fn a_target_that_fails_its_check_changes_nothing() {
    let local = Backend::new(Kind::Local).await.unwrap();
    let vault = Backend::new(Kind::VaultTransit).await.unwrap();
    let v = vault.vault();
    v.create_key("not-derived", false).await;
    let policy = v.keyd_policy("not-derived", false).await;
    let (_, token_file) = v.token_file(&[&policy], "1h").await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let custody = keyd::custody::bootstrap(&local.spec(), &settings(), &store)
        .await
        .unwrap();
    seed(store.as_ref(), &custody, 5).await;
    let keyd = Keyd::open_with_custody(
        Arc::clone(&store),
        Arc::clone(&custody),
        keyd::service::ServiceConfig::default(),
        keyd::clock::Clock::default(),
    )
    .await
    .unwrap();
    let before = store.scan(Table::Sealed).unwrap();
    let target = vault.vault_spec("not-derived", VaultAuth::Token { token_file });
    let e = keyd::service::migrate_kek(&keyd, "admin/test", target)
        .await
        .unwrap_err();
    assert!(
        matches!(e, keyd::rewrap::RewrapError::TargetCheck(_)),
        "{e}"
    );
    assert!(e.to_string().contains("derived=true"), "{e}");
    assert_eq!(store.scan(Table::Sealed).unwrap(), before);
    assert_eq!(custody.active().wrapper.backend(), "local");
    v.cleanup().await;
}

/// A migration naming a file outside `kek.credential_dirs` (a secret id file pointed at the
/// CA's key, which would go out in a login body) is refused before keyd reads it, and the
/// refusal is audited.
#[tokio::test]
async fn a_spec_naming_files_outside_the_credential_dirs_is_refused_and_audited() {
    let local = Backend::new(Kind::Local).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let allowed = tempfile::tempdir().unwrap();
    let settings = keyd::custody::CustodySettings {
        credential_dirs: vec![allowed.path().to_owned()],
        ..settings()
    };
    let custody = keyd::custody::bootstrap(&local.spec(), &settings, &store)
        .await
        .unwrap();
    let keyd = Keyd::open_with_custody(
        Arc::clone(&store),
        Arc::clone(&custody),
        keyd::service::ServiceConfig::default(),
        keyd::clock::Clock::default(),
    )
    .await
    .unwrap();
    let secret = dir.path().join("ca-key.pem");
    std::fs::write(&secret, "not for Vault").unwrap();
    // Through a symbolic link inside the allowed directory: still outside once resolved.
    let link = allowed.path().join("secret-id");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    for secret_id_file in [secret.clone(), link] {
        let to = KekSpec::VaultTransit(keyd_proto::kek::VaultTransitSpec {
            address: "http://127.0.0.1:1".into(),
            namespace: None,
            mount: "transit".into(),
            key: "keyd".into(),
            ca_file: None,
            auth: VaultAuth::Approle {
                mount: "approle".into(),
                role_id: "r".into(),
                secret_id_file,
            },
        });
        let e = keyd::service::migrate_kek(&keyd, "admin/test", to)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("not under kek.credential_dirs")
                || keyd_mtls::error_chain(&e).contains("not under kek.credential_dirs"),
            "{}",
            keyd_mtls::error_chain(&e)
        );
    }
    // A new local key in a directory outside: refused too.
    let e = keyd::service::migrate_kek(
        &keyd,
        "admin/test",
        KekSpec::Local {
            path: dir.path().join("elsewhere.key"),
        },
    )
    .await
    .unwrap_err();
    assert!(keyd_mtls::error_chain(&e).contains("not under kek.credential_dirs"));
    let refused: Vec<_> = store
        .audit_range(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|a| a.event.action == "kek.migration.refused")
        .collect();
    assert_eq!(refused.len(), 3);
    assert_eq!(refused[0].event.actor, "admin/test");
    assert_eq!(custody.active().wrapper.backend(), "local");
    // Inside the directory: allowed past this check (the file is then used).
    let ok = keyd::service::migrate_kek(
        &keyd,
        "admin/test",
        KekSpec::Local {
            path: allowed.path().join("kek-2.key"),
        },
    )
    .await;
    assert!(
        ok.is_ok(),
        "{:?}",
        ok.err().map(|e| keyd_mtls::error_chain(&e))
    );
    support::wait_for_migration(&custody).await;
}

/// Runs keyctl on a blocking thread (keyd serves on this test's runtime meanwhile).
async fn keyctl(k: &RunningKeyd, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyctl"));
    cmd.arg("--config")
        .arg(&k.setup.keyctl_toml)
        .args(["--server", &format!("https://127.0.0.1:{}", k.api.port())])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The operator's path: `keyctl kek migrate --to vault-transit ... --wait`, then `keyctl kek
/// rotate --wait` (a new Vault key version), with `keyctl kek status` showing the result; a
/// request keyd refuses exits 6 with keyd's reason.
#[tokio::test]
async fn keyctl_migrates_and_rotates_a_running_keyd() {
    let vault = Backend::new(Kind::VaultTransit).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = KekSpec::Local {
        path: dir.path().join("kek.key"),
    };
    let k = RunningKeyd::start_in(dir, spec, settings()).await.unwrap();
    let (code, out, err) = keyctl(&k, &["kek", "status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("local") && out.contains("ok"), "{out}");

    let KekSpec::VaultTransit(v) = vault.spec() else {
        unreachable!()
    };
    let VaultAuth::Token { token_file } = &v.auth else {
        unreachable!()
    };
    let (code, out, err) = keyctl(
        &k,
        &[
            "kek",
            "migrate",
            "--to",
            "vault-transit",
            "--vault-addr",
            &v.address,
            "--vault-mount",
            &v.mount,
            "--vault-key",
            &v.key,
            "--vault-auth",
            "token",
            "--vault-token-file",
            token_file.to_str().unwrap(),
            "--wait",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("completed") && out.contains("0 failed"),
        "{out}"
    );
    let (code, out, err) = keyctl(&k, &["kek", "rotate", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rotate") && out.contains("completed"), "{out}");
    let (code, out, _) = keyctl(&k, &["kek", "status", "-o", "json"]).await;
    assert_eq!(code, 0);
    let s: KekStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(s.backend, "vault-transit");
    assert!(s.key_id.ends_with(":v2"), "{}", s.key_id);
    assert!(s.retired.is_empty());
    let (code, _, err) = keyctl(&k, &["kek", "rotate", "--key-id", "arn:aws:kms:x"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("use keyctl kek migrate"), "{err}");
    let (code, _, err) = keyctl(&k, &["kek", "migrate", "--to", "aws-kms"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("--key-id"), "{err}");
    k.stop().await;
    vault.vault().cleanup().await;
}
