//! A real keyd on loopback, with the dev PKI in a temporary directory, for integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use keyd::app::DevSetup;
use keyd::config::Flags;
use keyd::service::Keyd;
use keyd_mtls::client::{Connection, Connector};
use keyd_mtls::tls::TlsPaths;
use keyd_proto::identity::Identity;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub setup: DevSetup,
    pub api: SocketAddr,
    pub ops: SocketAddr,
    pub keyd: Arc<Keyd>,
    /// keyd's clock; tests move it forward instead of sleeping.
    pub clock: keyd::clock::Clock,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(
            tempfile::tempdir().unwrap(),
            HashMap::new(),
            keyd::clock::Clock::default(),
        )
        .await
    }

    /// Starts with extra `KEYD_*` settings (e.g. a short audit segment).
    pub async fn start_with_env(env: &[(&str, &str)]) -> Self {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_with(
            tempfile::tempdir().unwrap(),
            env,
            keyd::clock::Clock::default(),
        )
        .await
    }

    /// Starts with `extra` appended to keyd.toml (e.g. a `[policy]` section).
    pub async fn start_with_toml(extra: &str) -> Self {
        Self::start_with_extra(
            tempfile::tempdir().unwrap(),
            HashMap::new(),
            keyd::clock::Clock::default(),
            extra,
        )
        .await
    }

    async fn start_with(
        dir: tempfile::TempDir,
        env: HashMap<String, String>,
        clock: keyd::clock::Clock,
    ) -> Self {
        Self::start_with_extra(dir, env, clock, "").await
    }

    async fn start_with_extra(
        dir: tempfile::TempDir,
        env: HashMap<String, String>,
        clock: keyd::clock::Clock,
        extra_toml: &str,
    ) -> Self {
        keyd_mtls::tls::install_default_provider();
        let setup = keyd::app::prepare_dev(dir.path(), "127.0.0.1:0", "127.0.0.1:0").unwrap();
        if !extra_toml.is_empty() {
            // prepare_dev rewrites keyd.toml; the extra sections go after it.
            let mut toml = std::fs::read_to_string(&setup.keyd_toml).unwrap();
            toml.push('\n');
            toml.push_str(extra_toml);
            std::fs::write(&setup.keyd_toml, toml).unwrap();
        }
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            ops_listen: Some("127.0.0.1:0".into()),
            ..Flags::default()
        };
        // The scheduler is driven by the tests (`keyd.tick()`), not by wall time.
        let mut env = env;
        env.entry("KEYD_SCHEDULER_TICK".into())
            .or_insert_with(|| "1h".into());
        let config = keyd::config::load(Some(&setup.keyd_toml), &env, &flags).unwrap();
        let (stop, rx) = watch::channel(false);
        // After a restart the previous instance's last references (its audit writer thread,
        // draining connections) may hold the store for a moment longer.
        let mut attempts = 0;
        let running = loop {
            match keyd::app::start_with_clock(config.clone(), rx.clone(), clock.clone()).await {
                Ok(r) => break r,
                Err(e) if attempts < 50 && format!("{e:#}").contains("already open") => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("keyd did not start: {e:#}"),
            }
        };
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
            clock,
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
            clock,
            ..
        } = self;
        stop.send(true).unwrap();
        task.await.unwrap();
        drop(keyd);
        Self::start_with(dir, HashMap::new(), clock).await
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
        let tls = keyd_mtls::tls::client_config(&self.paths_for(id)).unwrap();
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

/// Plays the nodes' part in an IPsec rollout until it completes: every node fetches its bundle,
/// acknowledges what it would program, and keyd's clock moves past the overlap.
pub async fn drive_rollout(h: &Harness, nodes: &[&str]) {
    for _ in 0..10 {
        for name in nodes {
            let mut c = h.node(name).await;
            let b: keyd_proto::NodeBundle = serde_json::from_slice(
                &c.get(&format!("/v1/nodes/{name}/bundle"))
                    .await
                    .unwrap()
                    .body,
            )
            .unwrap();
            if let Some(ipsec) = b.ipsec {
                let spis: Vec<u8> = ipsec.keys.iter().map(|k| k.spi).collect();
                let ack = serde_json::json!({ "ipsec_spis": spis, "ipsec_outbound_spi": ipsec.outbound_spi });
                let r = c
                    .post_json(&format!("/v1/nodes/{name}/ack"), &ack)
                    .await
                    .unwrap();
                assert!(r.status.is_success(), "{}", r.error_message());
            }
        }
        h.keyd.tick().await.unwrap();
        match h.keyd.ipsec_status().rollout {
            None => return,
            Some(r) if r.phase == "active" && r.waiting_for.is_empty() => {
                h.clock.advance(std::time::Duration::from_secs(301));
                h.keyd.tick().await.unwrap();
            }
            Some(_) => {}
        }
    }
    panic!(
        "the rollout did not complete: {:?}",
        h.keyd.ipsec_status().rollout
    );
}
