//! The reflectors and the recompile loop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Namespace;
use keyd_policy::crd::{ClusterEncryptionPolicy, EncryptionPolicy};
use keyd_policy::rules::{ClusterState, NodeInput, PolicySource, compile};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::{Notify, watch};

use super::config::{KubeApiConfig, PolicyWatchConfig};
use super::pod::PodLite;
use crate::service::Keyd;

/// How long a burst of changes may settle before one recompile (a rollout of many pods is one
/// compile, not one per pod); well under the 2 s a change may take to reach a node.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("policy.kube_api {url:?} is not a URL")]
    Url {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("reading the API server's CA (kube_ca) {path}")]
    Ca {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the API server's CA (kube_ca) {path} holds no certificate")]
    NoCa { path: String },
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client for the API server `c` names, trusting its CA and sending its token file.
pub fn client(c: &KubeApiConfig) -> Result<kube::Client, WatchError> {
    let url = c.api.parse().map_err(|source| WatchError::Url {
        url: c.api.clone(),
        source,
    })?;
    let path = c.ca.display().to_string();
    let certs = CertificateDer::pem_file_iter(&c.ca)
        .and_then(|it| it.map(|cert| cert.map(|c| c.to_vec())).collect())
        .map_err(|source| WatchError::Ca {
            path: path.clone(),
            source,
        })?;
    let certs: Vec<Vec<u8>> = certs;
    if certs.is_empty() {
        return Err(WatchError::NoCa { path });
    }
    let mut config = kube::Config::new(url);
    config.root_cert = Some(certs);
    config.auth_info.token_file = Some(c.token_file.display().to_string());
    kube::Client::try_from(config).map_err(WatchError::Client)
}

/// The reflectors' stores.
#[derive(Clone)]
struct Stores {
    policies: Store<EncryptionPolicy>,
    cluster_policies: Store<ClusterEncryptionPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    pods: Store<PodLite>,
}

impl Stores {
    async fn synced(&self) {
        let _ = tokio::join!(
            self.policies.wait_until_ready(),
            self.cluster_policies.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
    }

    /// What the compiler reads, copied out of the stores.
    fn cluster_state(&self, keyd: &Keyd) -> ClusterState {
        let nodes = keyd
            .list_nodes()
            .into_iter()
            .map(|n| NodeInput {
                name: n.name,
                pod_cidrs: n.pod_cidrs,
            })
            .collect();
        let namespaces = self
            .namespaces
            .state()
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.labels.clone().unwrap_or_default()))
            })
            .collect();
        let pods = self.pods.state().iter().map(|p| p.input()).collect();
        let policies = self
            .policies
            .state()
            .iter()
            .map(|p| PolicySource::from(p.as_ref()))
            .chain(
                self.cluster_policies
                    .state()
                    .iter()
                    .map(|p| PolicySource::from(p.as_ref())),
            )
            .collect();
        ClusterState {
            nodes,
            namespaces,
            pods,
            policies,
        }
    }
}

/// Starts the four watches; the returned future runs them and the recompile loop until
/// `shutdown`. Fails only on a client that cannot be built (the URL or CA); an API server that
/// cannot be reached is retried with backoff, and nodes get `rules_not_ready` meanwhile.
pub fn start(
    keyd: Arc<Keyd>,
    config: &PolicyWatchConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()> + Send + 'static, WatchError> {
    let client = client(&config.kube)?;
    keyd.expect_rules();
    let changed = Arc::new(Notify::new());
    let (policies, pw) = reflector::store::<EncryptionPolicy>();
    let (cluster_policies, cw) = reflector::store::<ClusterEncryptionPolicy>();
    let (namespaces, nw) = reflector::store::<PartialObjectMeta<Namespace>>();
    let (pods, podw) = reflector::store::<PodLite>();
    let cfg = watcher::Config::default();
    // Finished pods take no part; the API server need not send them.
    let pod_cfg = cfg
        .clone()
        .fields("status.phase!=Succeeded,status.phase!=Failed");
    let p = watcher(Api::<EncryptionPolicy>::all(client.clone()), cfg.clone())
        .default_backoff()
        .reflect(pw);
    let c = watcher(
        Api::<ClusterEncryptionPolicy>::all(client.clone()),
        cfg.clone(),
    )
    .default_backoff()
    .reflect(cw);
    // `Api<PartialObjectMeta<_>>` watches metadata only: labels are all the rules need.
    let n = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        cfg,
    )
    .default_backoff()
    .reflect(nw);
    let pd = watcher(Api::<PodLite>::all(client), pod_cfg)
        .default_backoff()
        .reflect(podw);
    let stores = Stores {
        policies,
        cluster_policies,
        namespaces,
        pods,
    };
    Ok(async move {
        tokio::join!(
            drive(p, "EncryptionPolicy", &changed, shutdown.clone()),
            drive(c, "ClusterEncryptionPolicy", &changed, shutdown.clone()),
            drive(n, "Namespace", &changed, shutdown.clone()),
            drive(pd, "Pod", &changed, shutdown.clone()),
            recompile_loop(keyd, stores, &changed, shutdown),
        );
    })
}

/// Runs one watch stream, waking the recompile loop on every event, until `shutdown`.
async fn drive<K, S>(stream: S, kind: &str, changed: &Notify, mut shutdown: watch::Receiver<bool>)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => tracing::warn!(kind, error = %e, "watch error; retrying"),
                None => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Compiles once the four watches have synced, then again after every change (debounced) and
/// every change of keyd's node table.
async fn recompile_loop(
    keyd: Arc<Keyd>,
    stores: Stores,
    changed: &Notify,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        () = stores.synced() => {}
        _ = shutdown.wait_for(|s| *s) => return,
    }
    tracing::info!("policy watches synced; compiling node rules");
    let mut nodes_changed = keyd.state_changes();
    loop {
        recompile(&keyd, &stores).await;
        tokio::select! {
            () = changed.notified() => {}
            r = nodes_changed.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

async fn recompile(keyd: &Arc<Keyd>, stores: &Stores) {
    let state = stores.cluster_state(keyd);
    let started = Instant::now();
    // The compile is CPU work proportional to the cluster; keep it off the request workers.
    let compiled: BTreeMap<_, _> = match tokio::task::spawn_blocking(move || compile(&state)).await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the rules compile did not finish; keeping the previous rules");
            return;
        }
    };
    keyd.metrics
        .rules
        .compile_duration
        .observe(started.elapsed().as_secs_f64());
    let changed = keyd.publish_rules(&compiled);
    tracing::debug!(
        nodes = compiled.len(),
        changed,
        micros = started.elapsed().as_micros() as u64,
        "node rules compiled"
    );
}
