//! A Vault to test against, set up through Vault's HTTP API (with vaultrs, an independent
//! client, so the test double is also exercised by someone else's idea of the API).
//!
//! By default this is the [`VaultDouble`]. When `VAULT_ADDR` and `VAULT_TOKEN` are set (and
//! optionally `VAULT_CACERT`, `VAULT_NAMESPACE`), it is that real Vault instead: every fixture
//! then works in its own new transit mount and auth mounts, which it removes again in
//! [`VaultFixture::cleanup`]. The token needs to manage mounts, auth methods and policies, and
//! create tokens (a root token in a dev server does).

use std::path::{Path, PathBuf};

use vaultrs::api::auth::approle::requests::SetAppRoleRequest;
use vaultrs::api::auth::kubernetes::requests::CreateKubernetesRoleRequest;
use vaultrs::api::token::requests::CreateTokenRequest;
use vaultrs::api::transit::requests::{CreateKeyRequest, UpdateKeyConfigurationRequest};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

use crate::vault_double::VaultDouble;

/// Where the fixture's Vault is.
#[derive(Debug)]
pub enum Server {
    Double(VaultDouble),
    Real,
}

#[derive(Debug)]
pub struct VaultFixture {
    pub server: Server,
    pub address: String,
    pub namespace: Option<String>,
    /// Unique per fixture: the transit mount and the auth mounts.
    pub mount: String,
    pub approle_mount: String,
    pub kubernetes_mount: String,
    ca_file: Option<PathBuf>,
    dir: tempfile::TempDir,
    admin_token: String,
}

/// A real Vault from the environment, if one is configured.
pub fn real_vault() -> Option<(String, String)> {
    match (std::env::var("VAULT_ADDR"), std::env::var("VAULT_TOKEN")) {
        (Ok(a), Ok(t)) if !a.is_empty() && !t.is_empty() => Some((a, t)),
        _ => None,
    }
}

impl VaultFixture {
    /// The real Vault from the environment, else a new test double over plain HTTP.
    pub async fn new() -> Self {
        match real_vault() {
            Some((address, token)) => {
                let ca_file = std::env::var("VAULT_CACERT").ok().map(PathBuf::from);
                let namespace = std::env::var("VAULT_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty());
                Self::setup(Server::Real, address, token, ca_file, namespace).await
            }
            None => Self::double(false).await,
        }
    }

    /// A new test double, over HTTPS with its own CA if `tls`.
    pub async fn double(tls: bool) -> Self {
        let d = if tls {
            VaultDouble::start_tls().await
        } else {
            VaultDouble::start().await
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = d.ca_pem().map(|pem| {
            let p = dir.path().join("vault-ca.pem");
            std::fs::write(&p, pem).expect("write CA");
            p
        });
        let (address, token) = (d.address(), d.root_token().to_owned());
        let mut f = Self::setup(Server::Double(d), address, token, ca_file, None).await;
        f.dir = dir;
        f
    }

    async fn setup(
        server: Server,
        address: String,
        admin_token: String,
        ca_file: Option<PathBuf>,
        namespace: Option<String>,
    ) -> Self {
        let suffix = hex::encode({
            let mut b = [0u8; 4];
            getrandom::fill(&mut b).expect("randomness");
            b
        });
        let f = Self {
            server,
            address,
            namespace,
            mount: format!("keyd-transit-{suffix}"),
            approle_mount: format!("keyd-approle-{suffix}"),
            kubernetes_mount: format!("keyd-k8s-{suffix}"),
            ca_file,
            dir: tempfile::tempdir().expect("tempdir"),
            admin_token,
        };
        vaultrs::sys::mount::enable(&f.admin(), &f.mount, "transit", None)
            .await
            .expect("enable the transit engine");
        f
    }

    pub fn is_real(&self) -> bool {
        matches!(self.server, Server::Real)
    }

    pub fn double_server(&self) -> Option<&VaultDouble> {
        match &self.server {
            Server::Double(d) => Some(d),
            Server::Real => None,
        }
    }

    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// An admin client (the root token of the double, or `VAULT_TOKEN`).
    pub fn admin(&self) -> VaultClient {
        self.client_with(&self.admin_token)
    }

    pub fn client_with(&self, token: &str) -> VaultClient {
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&self.address)
            .token(token)
            .verify(true)
            .ca_certs(
                self.ca_file
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect(),
            )
            .identity(None)
            .namespace(self.namespace.clone());
        VaultClient::new(b.build().expect("vault settings")).expect("vault client")
    }

    /// A transit key; `derived` as keyd requires.
    pub async fn create_key(&self, name: &str, derived: bool) {
        vaultrs::transit::key::create(
            &self.admin(),
            &self.mount,
            name,
            Some(CreateKeyRequest::builder().derived(derived)),
        )
        .await
        .expect("create transit key");
    }

    pub async fn rotate(&self, name: &str) {
        vaultrs::transit::key::rotate(&self.admin(), &self.mount, name)
            .await
            .expect("rotate transit key");
    }

    pub async fn set_min_decryption_version(&self, name: &str, version: u64) {
        vaultrs::transit::key::update(
            &self.admin(),
            &self.mount,
            name,
            Some(UpdateKeyConfigurationRequest::builder().min_decryption_version(version)),
        )
        .await
        .expect("configure transit key");
    }

    /// The policy keyd needs on `key` (HCL), named `keyd-<key>`; `with_rotate` adds the
    /// rotation keyd makes for `keyctl kek rotate`.
    pub async fn keyd_policy(&self, key: &str, with_rotate: bool) -> String {
        let m = &self.mount;
        let mut hcl = String::new();
        for p in [
            format!("{m}/datakey/plaintext/{key}"),
            format!("{m}/decrypt/{key}"),
            format!("{m}/encrypt/{key}"),
            format!("{m}/rewrap/{key}"),
        ] {
            hcl.push_str(&format!(
                "path \"{p}\" {{\n  capabilities = [\"update\"]\n}}\n"
            ));
        }
        if with_rotate {
            hcl.push_str(&format!(
                "path \"{m}/keys/{key}/rotate\" {{\n  capabilities = [\"update\"]\n}}\n"
            ));
        }
        let name = format!("{}-{key}", self.mount);
        self.set_policy(&name, &hcl).await;
        name
    }

    pub async fn set_policy(&self, name: &str, hcl: &str) {
        vaultrs::sys::policy::set(&self.admin(), name, hcl)
            .await
            .expect("write policy");
    }

    /// A token with `policies`, and the file keyd reads it from.
    pub async fn token_file(&self, policies: &[&str], ttl: &str) -> (String, PathBuf) {
        let auth = vaultrs::token::new(
            &self.admin(),
            Some(
                CreateTokenRequest::builder()
                    .policies(policies.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())
                    .ttl(ttl),
            ),
        )
        .await
        .expect("create token");
        let path = self.write_secret("token", &auth.client_token);
        (auth.client_token, path)
    }

    /// Writes a 0600 file in the fixture's directory.
    pub fn write_secret(&self, name: &str, value: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let mut suffix = [0u8; 3];
        getrandom::fill(&mut suffix).expect("randomness");
        let path = self
            .dir
            .path()
            .join(format!("{name}-{}", hex::encode(suffix)));
        std::fs::write(&path, value).expect("write secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// An AppRole with `policies`: its role id and a file with a fresh secret id.
    pub async fn approle(&self, policies: &[&str]) -> (String, PathBuf) {
        let admin = self.admin();
        vaultrs::sys::auth::enable(&admin, &self.approle_mount, "approle", None)
            .await
            .expect("enable approle");
        vaultrs::auth::approle::role::set(
            &admin,
            &self.approle_mount,
            "keyd",
            Some(
                SetAppRoleRequest::builder()
                    .token_policies(policies.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()),
            ),
        )
        .await
        .expect("approle role");
        let role_id = vaultrs::auth::approle::role::read_id(&admin, &self.approle_mount, "keyd")
            .await
            .expect("role id")
            .role_id;
        let secret = vaultrs::auth::approle::role::secret::generate(
            &admin,
            &self.approle_mount,
            "keyd",
            None,
        )
        .await
        .expect("secret id");
        (role_id, self.write_secret("secret-id", &secret.secret_id))
    }

    /// Kubernetes auth bound to ServiceAccount `keyd/keyd`, and a file with that
    /// ServiceAccount's JWT. `None` against a real Vault: its login calls the TokenReview API
    /// of a Kubernetes API server, which these machines do not have.
    pub async fn kubernetes(&self, policies: &[&str]) -> Option<PathBuf> {
        let double = self.double_server()?;
        let admin = self.admin();
        vaultrs::sys::auth::enable(&admin, &self.kubernetes_mount, "kubernetes", None)
            .await
            .expect("enable kubernetes auth");
        vaultrs::auth::kubernetes::configure(
            &admin,
            &self.kubernetes_mount,
            "https://kubernetes.default.svc",
            Some(
                vaultrs::api::auth::kubernetes::requests::ConfigureKubernetesAuthRequest::builder()
                    .issuer("https://kubernetes.default.svc"),
            ),
        )
        .await
        .expect("configure kubernetes auth");
        vaultrs::auth::kubernetes::role::create(
            &admin,
            &self.kubernetes_mount,
            "keyd",
            Some(
                CreateKubernetesRoleRequest::builder()
                    .bound_service_account_names(vec!["keyd".to_owned()])
                    .bound_service_account_namespaces(vec!["keyd".to_owned()])
                    .token_policies(policies.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()),
            ),
        )
        .await
        .expect("kubernetes role");
        let jwt = double.issue_service_account_token("keyd", "keyd");
        Some(self.write_secret("sa-token", &jwt))
    }

    /// Removes what the fixture created on a real Vault (nothing to do on the double).
    pub async fn cleanup(&self) {
        if self.is_real() {
            let admin = self.admin();
            let _ = vaultrs::sys::mount::disable(&admin, &self.mount).await;
            let _ = vaultrs::sys::auth::disable(&admin, &self.approle_mount).await;
            let _ = vaultrs::sys::auth::disable(&admin, &self.kubernetes_mount).await;
        }
    }
}
