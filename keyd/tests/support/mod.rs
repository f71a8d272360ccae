//! The custodians the key custody suite runs against, behind one harness: the local KEK, AWS
//! KMS (moto's server on loopback) and Vault transit (the test double, or a real Vault when
//! `VAULT_ADDR` and `VAULT_TOKEN` are set).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyd::custody::{Custody, CustodySettings, Member};
use keyd::seal::{KeyWrapper, SealContext, SealedRecord};
use keyd::store::{RedbStore, Store, Table, Txn};
use keyd_proto::kek::{AwsKmsSpec, KekSpec, VaultAuth, VaultTransitSpec};
use keyd_tests::moto::Moto;
use keyd_tests::prereq;
use keyd_tests::vault_admin::VaultFixture;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    AwsKms,
    VaultTransit,
}

/// One custodian to test, with a primary key keyd is given, and the means to break it.
pub struct Backend {
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub moto: Option<Moto>,
    pub vault: Option<VaultFixture>,
    /// aws: the key ARN; vault: the transit key name; local: the key file.
    pub key: String,
    /// vault: the token file keyd uses.
    token_file: Option<PathBuf>,
}

/// Short timeouts and probes, so outages are noticed quickly in tests.
pub fn settings() -> CustodySettings {
    CustodySettings {
        max_unavailable: Duration::from_secs(3600),
        probe_interval: Duration::from_millis(200),
        call_timeout: Duration::from_secs(2),
        verify_on_start: true,
        concurrency: 8,
        // The tests' custodians keep their files in temporary directories.
        credential_dirs: vec![std::env::temp_dir()],
    }
}

impl Backend {
    /// The backend, or `None` (with a printed reason) when its prerequisite is missing outside
    /// CI.
    pub async fn new(kind: Kind) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Kind::Local => Some(Self {
                kind,
                key: dir.path().join("kek.key").display().to_string(),
                dir,
                moto: None,
                vault: None,
                token_file: None,
            }),
            Kind::AwsKms => {
                if !prereq::require(
                    "moto (AWS KMS test server)",
                    keyd_tests::moto::prerequisite(),
                ) {
                    return None;
                }
                let moto = Moto::start().await;
                let key = moto.create_key().await;
                Some(Self {
                    kind,
                    dir,
                    moto: Some(moto),
                    vault: None,
                    key,
                    token_file: None,
                })
            }
            Kind::VaultTransit => {
                let vault = VaultFixture::new().await;
                vault.create_key("keyd", true).await;
                let policy = vault.keyd_policy("keyd", true).await;
                let (_, token_file) = vault.token_file(&[&policy], "1h").await;
                Some(Self {
                    kind,
                    dir,
                    moto: None,
                    vault: Some(vault),
                    key: "keyd".into(),
                    token_file: Some(token_file),
                })
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Local => "local",
            Kind::AwsKms => "aws-kms",
            Kind::VaultTransit => "vault-transit",
        }
    }

    pub fn moto(&self) -> &Moto {
        self.moto.as_ref().unwrap()
    }

    pub fn vault(&self) -> &VaultFixture {
        self.vault.as_ref().unwrap()
    }

    pub fn aws_spec(&self, key_id: &str, credentials: PathBuf) -> KekSpec {
        KekSpec::AwsKms(AwsKmsSpec {
            key_id: key_id.to_owned(),
            region: Some("us-east-1".into()),
            endpoint: Some(self.moto().endpoint()),
            profile: None,
            credentials_file: Some(credentials),
            config_file: None,
        })
    }

    pub fn vault_spec(&self, key: &str, auth: VaultAuth) -> KekSpec {
        let v = self.vault();
        KekSpec::VaultTransit(VaultTransitSpec {
            address: v.address.clone(),
            namespace: v.namespace.clone(),
            mount: v.mount.clone(),
            key: key.to_owned(),
            ca_file: v.ca_file().map(PathBuf::from),
            auth,
        })
    }

    fn token_auth(&self) -> VaultAuth {
        VaultAuth::Token {
            token_file: self.token_file.clone().unwrap(),
        }
    }

    /// The custodian keyd is configured with.
    pub fn spec(&self) -> KekSpec {
        match self.kind {
            Kind::Local => KekSpec::Local {
                path: self.key.clone().into(),
            },
            Kind::AwsKms => self.aws_spec(&self.key, self.moto().credentials_file()),
            Kind::VaultTransit => self.vault_spec(&self.key, self.token_auth()),
        }
    }

    /// Another key on the same backend (a rotation or migration target).
    pub async fn second_spec(&self) -> KekSpec {
        match self.kind {
            Kind::Local => KekSpec::Local {
                path: self.dir.path().join("kek-2.key"),
            },
            Kind::AwsKms => {
                let arn = self.moto().create_key().await;
                self.aws_spec(&arn, self.moto().credentials_file())
            }
            Kind::VaultTransit => {
                let v = self.vault();
                v.create_key("keyd-2", true).await;
                let policy = v.keyd_policy("keyd-2", true).await;
                let (_, token_file) = v.token_file(&[&policy], "1h").await;
                self.vault_spec("keyd-2", VaultAuth::Token { token_file })
            }
        }
    }

    /// A spec naming a key the custodian does not have; `None` for the local KEK (its key
    /// is the file itself). The Vault token may use any key of the mount: with a policy for
    /// keyd's key only, Vault answers 403 for any other key name before it looks for the key.
    pub async fn missing_key_spec(&self) -> Option<KekSpec> {
        match self.kind {
            Kind::Local => None,
            Kind::AwsKms => Some(self.aws_spec(
                "arn:aws:kms:us-east-1:123456789012:key/00000000-1111-2222-3333-444444444444",
                self.moto().credentials_file(),
            )),
            Kind::VaultTransit => {
                let v = self.vault();
                let policy = format!("{}-any-key", v.mount);
                v.set_policy(
                    &policy,
                    &format!(
                        "path \"{}/*\" {{\n  capabilities = [\"update\"]\n}}\n",
                        v.mount
                    ),
                )
                .await;
                let (_, token_file) = v.token_file(&[&policy], "1h").await;
                Some(self.vault_spec("no-such-key", VaultAuth::Token { token_file }))
            }
        }
    }

    pub async fn connect(&self, spec: &KekSpec) -> Arc<dyn KeyWrapper> {
        keyd::custody::connect(spec, &settings()).await.unwrap()
    }

    pub async fn custody(&self) -> Arc<Custody> {
        let spec = self.spec();
        let w = self.connect(&spec).await;
        w.check().await.unwrap();
        Arc::new(Custody::new(Member::new(Some(spec), w), vec![], settings()))
    }
}

pub fn ctx(id: &str) -> SealContext {
    SealContext {
        record_id: id.to_owned(),
        purpose: "test-record".into(),
        version: 1,
    }
}

/// A store with `n` sealed records `test/<i>` (plaintext `secret <i>`).
pub async fn seed(store: &dyn Store, custody: &Custody, n: usize) {
    let mut txn = Txn::default();
    for i in 0..n {
        let id = format!("test/{i:05}");
        let sealed = keyd::seal::seal(custody, &ctx(&id), format!("secret {i}").as_bytes())
            .await
            .unwrap();
        txn = txn.put(Table::Sealed, id, sealed.to_bytes());
        if txn.puts.len() == 500 {
            store.commit(std::mem::take(&mut txn)).unwrap();
        }
    }
    store.commit(txn).unwrap();
}

/// Opens every `test/*` record and checks its plaintext; returns how many.
pub async fn check_all(store: &dyn Store, custody: &Custody) -> usize {
    let mut n = 0;
    for (id, bytes) in store.scan(Table::Sealed).unwrap() {
        let Some(i) = id.strip_prefix("test/") else {
            continue;
        };
        let record = SealedRecord::from_bytes(&bytes).unwrap();
        let plain = keyd::seal::open(custody, &ctx(&id), &record)
            .await
            .unwrap_or_else(|e| panic!("record {id} does not open: {e}"));
        assert_eq!(
            &plain[..],
            format!("secret {}", i.parse::<usize>().unwrap()).as_bytes()
        );
        n += 1;
    }
    n
}

pub fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(RedbStore::open(&dir.join("keyd.redb")).unwrap())
}

/// Waits (up to 60 s) until the custody's migration has completed.
pub async fn wait_for_migration(custody: &Custody) -> keyd_proto::kek::MigrationStatus {
    for _ in 0..600 {
        if let Some(m) = custody.migration()
            && m.state == "completed"
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("migration did not complete: {:?}", custody.migration());
}

/// A real keyd (`app::start`) on loopback with a given custodian, for the outage tests.
pub struct RunningKeyd {
    pub dir: tempfile::TempDir,
    pub setup: keyd::app::DevSetup,
    pub api: std::net::SocketAddr,
    pub ops: std::net::SocketAddr,
    pub keyd: Arc<keyd::service::Keyd>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningKeyd {
    pub async fn start(spec: KekSpec, custody: CustodySettings) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), spec, custody)
            .await
            .unwrap()
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        spec: KekSpec,
        custody: CustodySettings,
    ) -> anyhow::Result<Self> {
        keyd_mtls::tls::install_default_provider();
        let setup = keyd::app::prepare_dev(dir.path(), "127.0.0.1:0", "127.0.0.1:0")?;
        let flags = keyd::config::Flags {
            listen: Some("127.0.0.1:0".into()),
            ops_listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let mut config = keyd::config::load(
            Some(&setup.keyd_toml),
            &std::collections::HashMap::new(),
            &flags,
        )?;
        config.kek = spec;
        config.custody = custody;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let running = keyd::app::start(config, rx).await?;
        let (api, ops, keyd) = (
            running.api_addr,
            running.ops_addr,
            Arc::clone(&running.keyd),
        );
        let task = tokio::spawn(running.serve());
        Ok(Self {
            dir,
            setup,
            api,
            ops,
            keyd,
            stop,
            task,
        })
    }

    pub async fn stop(self) -> tempfile::TempDir {
        let RunningKeyd {
            dir,
            stop,
            task,
            keyd,
            ..
        } = self;
        stop.send(true).unwrap();
        task.await.unwrap();
        drop(keyd);
        // The monitor and any rewrap task hold the store briefly after shutdown.
        tokio::time::sleep(Duration::from_millis(300)).await;
        dir
    }

    pub async fn connect(
        &self,
        id: &keyd_proto::identity::Identity,
    ) -> keyd_mtls::client::Connection {
        let pair = match id {
            keyd_proto::identity::Identity::Admin(_) => &self.setup.pki.admin,
            keyd_proto::identity::Identity::Webhook(_) => &self.setup.pki.webhook,
            keyd_proto::identity::Identity::Node(n) => {
                &self
                    .setup
                    .pki
                    .nodes
                    .iter()
                    .find(|(name, _)| name == n)
                    .unwrap()
                    .1
            }
        };
        let tls = keyd_mtls::tls::client_config(&keyd_mtls::tls::TlsPaths {
            ca: self.setup.pki.ca.clone(),
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        })
        .unwrap();
        keyd_mtls::client::Connector::new(&format!("https://127.0.0.1:{}", self.api.port()), tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn admin(&self) -> keyd_mtls::client::Connection {
        self.connect(&keyd_proto::identity::Identity::Admin("admin".into()))
            .await
    }

    pub async fn node(&self, name: &str) -> keyd_mtls::client::Connection {
        self.connect(&keyd_proto::identity::Identity::Node(name.into()))
            .await
    }

    /// `GET` on the plain-HTTP ops listener.
    pub async fn ops_get(&self, path: &str) -> (u16, String) {
        let (status, body) = keyd_tests::http::request(self.ops, "GET", path, &[], vec![])
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// An error and its sources, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    keyd_mtls::error_chain(e)
}
