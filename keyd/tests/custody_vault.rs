//! Vault transit specifics beyond the conformance suite: the three auth methods (token,
//! AppRole, Kubernetes ServiceAccount JWT), logging in again when Vault refuses a token, a key
//! without derivation refused at the start-up check, TLS with a configured CA, and namespaces.
//! Against the test double by default; against a real Vault when `VAULT_ADDR` and
//! `VAULT_TOKEN` are set (tests that need what a real Vault here cannot offer say so).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use keyd::seal::FailureKind;
use keyd_proto::kek::{KekSpec, VaultAuth, VaultTransitSpec};
use keyd_tests::vault_admin::VaultFixture;
use support::{chain, ctx, settings};

fn spec(v: &VaultFixture, key: &str, auth: VaultAuth) -> KekSpec {
    KekSpec::VaultTransit(VaultTransitSpec {
        address: v.address.clone(),
        namespace: v.namespace.clone(),
        mount: v.mount.clone(),
        key: key.into(),
        ca_file: v.ca_file().map(Into::into),
        auth,
    })
}

async fn fixture() -> (VaultFixture, String) {
    let v = VaultFixture::new().await;
    v.create_key("keyd", true).await;
    let policy = v.keyd_policy("keyd", false).await;
    (v, policy)
}

/// AppRole: keyd logs in with the role id and the secret id from its file; a wrong secret id
/// is "permission denied" at connect, with Vault's own words.
#[tokio::test]
async fn approle_login_works_and_a_wrong_secret_id_is_refused() {
    let (v, policy) = fixture().await;
    let (role_id, secret_id_file) = v.approle(&[&policy]).await;
    let auth = VaultAuth::Approle {
        mount: v.approle_mount.clone(),
        role_id: role_id.clone(),
        secret_id_file,
    };
    let w = keyd::custody::connect(&spec(&v, "keyd", auth), &settings())
        .await
        .unwrap();
    w.check().await.unwrap();
    let wrong = VaultAuth::Approle {
        mount: v.approle_mount.clone(),
        role_id,
        secret_id_file: v.write_secret("wrong", "not-the-secret-id"),
    };
    let e = keyd::custody::connect(&spec(&v, "keyd", wrong), &settings())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::PermissionDenied), "{e}");
    assert!(
        e.to_string().contains("approle login")
            && e.to_string().contains("invalid role or secret ID"),
        "{e}"
    );
    v.cleanup().await;
}

/// Kubernetes: keyd logs in with its ServiceAccount JWT; a JWT the API server no longer
/// accepts (a deleted ServiceAccount) is refused.
#[tokio::test]
async fn kubernetes_login_works_and_a_revoked_service_account_is_refused() {
    let (v, policy) = fixture().await;
    let Some(jwt_file) = v.kubernetes(&[&policy]).await else {
        eprintln!(
            "SKIPPED on a real Vault: its Kubernetes login calls a Kubernetes API server's \
             TokenReview, and there is none here"
        );
        v.cleanup().await;
        return;
    };
    let auth = VaultAuth::Kubernetes {
        mount: v.kubernetes_mount.clone(),
        role: "keyd".into(),
        jwt_file: jwt_file.clone(),
    };
    let w = keyd::custody::connect(&spec(&v, "keyd", auth.clone()), &settings())
        .await
        .unwrap();
    w.check().await.unwrap();
    let jwt = std::fs::read_to_string(&jwt_file).unwrap();
    v.double_server()
        .unwrap()
        .revoke_service_account_token(&jwt);
    let e = keyd::custody::connect(&spec(&v, "keyd", auth), &settings())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::PermissionDenied), "{e}");
    assert!(e.to_string().contains("kubernetes login"), "{e}");
}

/// A token revoked under keyd: the next call is refused, keyd reads its token file again
/// (where a Vault Agent would have written a new token) and carries on. With AppRole it logs
/// in again by itself; short leases are renewed before they run out.
#[tokio::test]
async fn keyd_logs_in_again_when_vault_refuses_its_token() {
    let (v, policy) = fixture().await;
    let (token, token_file) = v.token_file(&[&policy], "1h").await;
    let w = keyd::custody::connect(
        &spec(
            &v,
            "keyd",
            VaultAuth::Token {
                token_file: token_file.clone(),
            },
        ),
        &settings(),
    )
    .await
    .unwrap();
    let (dek, wrapped) = w.generate_data_key(&ctx("r")).await.unwrap();
    vaultrs::token::revoke(&v.admin(), &token).await.unwrap();
    let (new_token, _) = v.token_file(&[&policy], "1h").await;
    std::fs::write(&token_file, &new_token).unwrap();
    assert_eq!(
        w.unwrap_data_key(&wrapped, &ctx("r"))
            .await
            .unwrap()
            .expose(),
        dek.expose()
    );
    // AppRole with a 2 s token: keyd renews by logging in before the lease runs out.
    let (role_id, secret_id_file) = v.approle(&[&policy]).await;
    vaultrs::auth::approle::role::set(
        &v.admin(),
        &v.approle_mount,
        "keyd",
        Some(
            vaultrs::api::auth::approle::requests::SetAppRoleRequest::builder()
                .token_policies(vec![policy.clone()])
                .token_ttl("2s"),
        ),
    )
    .await
    .unwrap();
    let w = keyd::custody::connect(
        &spec(
            &v,
            "keyd",
            VaultAuth::Approle {
                mount: v.approle_mount.clone(),
                role_id,
                secret_id_file,
            },
        ),
        &settings(),
    )
    .await
    .unwrap();
    for _ in 0..4 {
        w.check().await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    if let Some(d) = v.double_server() {
        let logins = d.requests(&format!("auth/{}/login", v.approle_mount));
        assert!(logins >= 2, "keyd did not log in again ({logins} logins)");
    }
    v.cleanup().await;
}

/// A transit key created without `derived=true` would ignore the context that binds a
/// wrapped key to its record; keyd's check refuses it, saying how to fix it.
#[tokio::test]
async fn a_key_without_derivation_is_refused_by_the_check() {
    let (v, _) = fixture().await;
    v.create_key("not-derived", false).await;
    let policy = v.keyd_policy("not-derived", false).await;
    let (_, token_file) = v.token_file(&[&policy], "1h").await;
    let dir = tempfile::tempdir().unwrap();
    let store = support::open_store(dir.path());
    let e = keyd::custody::bootstrap(
        &spec(&v, "not-derived", VaultAuth::Token { token_file }),
        &settings(),
        &store,
    )
    .await
    .unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("derived=true") && msg.contains("misconfigured"),
        "{msg}"
    );
    v.cleanup().await;
}

/// HTTPS to Vault: trusted through `ca_file`; without it the certificate is refused, and the
/// error says to check `ca_file` (not "unavailable").
#[tokio::test]
async fn tls_to_vault_needs_its_ca() {
    let v = VaultFixture::double(true).await;
    v.create_key("keyd", true).await;
    let policy = v.keyd_policy("keyd", false).await;
    let (_, token_file) = v.token_file(&[&policy], "1h").await;
    let auth = VaultAuth::Token { token_file };
    let good = spec(&v, "keyd", auth.clone());
    assert!(v.address.starts_with("https://"));
    let w = keyd::custody::connect(&good, &settings()).await.unwrap();
    w.check().await.unwrap();
    let KekSpec::VaultTransit(mut no_ca) = good else {
        unreachable!()
    };
    no_ca.ca_file = None;
    let w = keyd::custody::connect(&KekSpec::VaultTransit(no_ca), &settings())
        .await
        .unwrap();
    let e = w.check().await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::Misconfigured), "{e}");
    assert!(e.to_string().contains("ca_file"), "{e}");
}

/// A Vault namespace is its own world: keyd's key in namespace `team` is reached with
/// `namespace = "team"`; without it, the same mount and key name do not exist.
#[tokio::test]
async fn namespaces_isolate_keys() {
    let v = VaultFixture::double(false).await;
    let d = v.double_server().unwrap();
    let addr: std::net::SocketAddr = v.address.trim_start_matches("http://").parse().unwrap();
    let admin = [("x-vault-token", d.root_token())];
    let call = |path: &'static str, ns: Option<&'static str>, body: &'static str| {
        let mut headers = admin.to_vec();
        if let Some(ns) = ns {
            headers.push(("x-vault-namespace", ns));
        }
        async move {
            let (status, body) =
                keyd_tests::http::request(addr, "POST", path, &headers, body.as_bytes().to_vec())
                    .await
                    .unwrap();
            assert!(
                status < 300,
                "{path}: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
    };
    call("/v1/sys/namespaces/team", None, "{}").await;
    call(
        "/v1/sys/mounts/transit",
        Some("team"),
        r#"{"type":"transit"}"#,
    )
    .await;
    call("/v1/transit/keys/keyd", Some("team"), r#"{"derived":true}"#).await;
    call("/v1/sys/mounts/transit", None, r#"{"type":"transit"}"#).await;
    let token_file = v.write_secret("root", d.root_token());
    let in_ns = KekSpec::VaultTransit(VaultTransitSpec {
        address: v.address.clone(),
        namespace: Some("team".into()),
        mount: "transit".into(),
        key: "keyd".into(),
        ca_file: None,
        auth: VaultAuth::Token {
            token_file: token_file.clone(),
        },
    });
    let w = keyd::custody::connect(&in_ns, &settings()).await.unwrap();
    w.check().await.unwrap();
    assert!(
        w.key_id().starts_with("team/transit/keyd"),
        "{}",
        w.key_id()
    );
    let KekSpec::VaultTransit(mut root) = in_ns else {
        unreachable!()
    };
    root.namespace = None;
    let w = keyd::custody::connect(&KekSpec::VaultTransit(root), &settings())
        .await
        .unwrap();
    let e = w.check().await.unwrap_err();
    assert_eq!(e.kind(), Some(FailureKind::KeyNotFound), "{e}");
}
