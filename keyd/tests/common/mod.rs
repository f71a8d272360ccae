//! A real keyd on loopback, with the dev PKI in a temporary directory, for integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use keyd::app::DevSetup;
use keyd::client::{Connection, Connector};
use keyd::config::Flags;
use keyd::service::Keyd;
use keyd::tls::TlsPaths;
use keyd_proto::identity::Identity;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub setup: DevSetup,
    pub api: SocketAddr,
    pub ops: SocketAddr,
    pub keyd: Arc<Keyd>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Self {
        keyd::tls::install_default_provider();
        let setup = keyd::app::prepare_dev(dir.path(), "127.0.0.1:0", "127.0.0.1:0").unwrap();
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            ops_listen: Some("127.0.0.1:0".into()),
            ..Flags::default()
        };
        let config = keyd::config::load(Some(&setup.keyd_toml), &HashMap::new(), &flags).unwrap();
        let (stop, rx) = watch::channel(false);
        let running = keyd::app::start(config, rx).await.unwrap();
        let (api, ops, keyd) = (
            running.api_addr,
            running.ops_addr,
            Arc::clone(&running.keyd),
        );
        let task = tokio::spawn(running.serve());
        Harness {
            dir,
            setup,
            api,
            ops,
            keyd,
            stop,
            task,
        }
    }

    /// Stops keyd (draining connections) and starts a new one on the same data directory.
    pub async fn restart(self) -> Self {
        let Harness {
            dir,
            stop,
            task,
            keyd,
            ..
        } = self;
        stop.send(true).unwrap();
        task.await.unwrap();
        drop(keyd);
        Self::start_in(dir).await
    }

    pub fn paths_for(&self, id: &Identity) -> TlsPaths {
        let pair = match id {
            Identity::Admin(_) => &self.setup.pki.admin,
            Identity::Webhook(_) => &self.setup.pki.webhook,
            Identity::Node(n) => {
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
        TlsPaths {
            ca: self.setup.pki.ca.clone(),
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        }
    }

    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api.port())
    }

    pub async fn connect_as(&self, id: &Identity) -> Connection {
        let tls = keyd::tls::client_config(&self.paths_for(id)).unwrap();
        Connector::new(&self.server_url(), tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn admin(&self) -> Connection {
        self.connect_as(&Identity::Admin("admin".into())).await
    }

    pub async fn node(&self, name: &str) -> Connection {
        self.connect_as(&Identity::Node(name.into())).await
    }
}

/// Reads a file as text (for checking that secrets never show up elsewhere).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}
