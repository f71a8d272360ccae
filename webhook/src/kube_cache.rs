//! What the webhook knows about the cluster: policies and namespaces from kube-rs reflectors
//! (one watch each, never a request per review), and the compiled [`PolicySet`] rebuilt whenever
//! a policy changes.
//!
//! Namespaces are watched as metadata only (labels are all the decision needs). A namespace
//! missing from the cache (created a moment ago, the watch not yet caught up) is read once from
//! the API, with a short timeout; the API server admits pods only into existing namespaces, so
//! this is rare.
//!
//! [`ClusterSource`] is what the server reads: the live caches, or a fixed snapshot for tests and
//! benchmarks.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::crd::{ClusterEncryptionPolicy, EncryptionPolicy, Labels};
use crate::metrics::Metrics;
use crate::policy::PolicySet;

/// Namespace labels, borrowed from wherever they are held.
#[derive(Debug, Clone)]
pub enum NamespaceLabels {
    Cached(Arc<PartialObjectMeta<Namespace>>),
    Owned(Arc<Labels>),
}

static NO_LABELS: Labels = Labels::new();

impl NamespaceLabels {
    pub fn labels(&self) -> &Labels {
        match self {
            NamespaceLabels::Cached(m) => m.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            NamespaceLabels::Owned(l) => l,
        }
    }
}

/// The live caches.
#[derive(Clone)]
pub struct KubeCache {
    client: Client,
    pub policies: Store<EncryptionPolicy>,
    pub cluster_policies: Store<ClusterEncryptionPolicy>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    snapshot: Arc<RwLock<Arc<PolicySet>>>,
    ready: watch::Receiver<bool>,
    metrics: Metrics,
}

impl std::fmt::Debug for KubeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCache")
            .field("policies", &self.policies.len())
            .field("cluster_policies", &self.cluster_policies.len())
            .field("namespaces", &self.namespaces.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// How long a cache miss may wait for the API.
const NAMESPACE_GET_TIMEOUT: Duration = Duration::from_secs(2);

impl KubeCache {
    /// Starts the three watches and the rebuild task on `tasks`; they run until `shutdown`.
    pub fn start(
        client: Client,
        metrics: Metrics,
        tasks: &mut JoinSet<()>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let changed = Arc::new(Notify::new());
        let (policies, pw) = reflector::store::<EncryptionPolicy>();
        let (cluster_policies, cw) = reflector::store::<ClusterEncryptionPolicy>();
        let (namespaces, nw) = reflector::store::<PartialObjectMeta<Namespace>>();

        let cfg = watcher::Config::default();
        let p_stream = watcher(Api::<EncryptionPolicy>::all(client.clone()), cfg.clone())
            .default_backoff()
            .reflect(pw);
        let c_stream = watcher(
            Api::<ClusterEncryptionPolicy>::all(client.clone()),
            cfg.clone(),
        )
        .default_backoff()
        .reflect(cw);
        // `Api<PartialObjectMeta<_>>` watches metadata only.
        let n_stream = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            cfg,
        )
        .default_backoff()
        .reflect(nw);
        tasks.spawn(drive(
            p_stream,
            "EncryptionPolicy",
            Some(changed.clone()),
            shutdown.clone(),
        ));
        tasks.spawn(drive(
            c_stream,
            "ClusterEncryptionPolicy",
            Some(changed.clone()),
            shutdown.clone(),
        ));
        tasks.spawn(drive(n_stream, "Namespace", None, shutdown.clone()));

        let (ready_tx, ready) = watch::channel(false);
        let cache = Self {
            client,
            policies,
            cluster_policies,
            namespaces,
            snapshot: Arc::new(RwLock::new(Arc::new(PolicySet::default()))),
            ready,
            metrics,
        };
        let rebuilder = cache.clone();
        let mut stop = shutdown;
        tasks.spawn(async move {
            let synced = async {
                let _ = tokio::join!(
                    rebuilder.policies.wait_until_ready(),
                    rebuilder.cluster_policies.wait_until_ready(),
                    rebuilder.namespaces.wait_until_ready(),
                );
            };
            tokio::select! {
                () = synced => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            rebuilder.rebuild();
            let _ = ready_tx.send(true);
            rebuilder.metrics.ready.set(1);
            tracing::info!(
                policies = rebuilder.policy_set().len(),
                namespaces = rebuilder.namespaces.len(),
                "policy and namespace caches synced"
            );
            loop {
                tokio::select! {
                    () = changed.notified() => rebuilder.rebuild(),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        cache
    }

    fn rebuild(&self) {
        let namespaced = self.policies.state();
        let cluster = self.cluster_policies.state();
        let set = PolicySet::from_resources(
            namespaced.iter().map(AsRef::as_ref),
            cluster.iter().map(AsRef::as_ref),
        );
        for p in set.all() {
            if let Some(e) = p.selector_error() {
                tracing::warn!(policy = %p.id, error = %e, "policy has a malformed selector and selects nothing");
            }
        }
        self.metrics
            .policies
            .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        *self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }

    /// The policies in force.
    pub fn policy_set(&self) -> Arc<PolicySet> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether all three caches have synced.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the caches have synced.
    pub async fn wait_ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|ready| *ready).await;
    }

    /// A namespace's labels: from the cache, else from the API; `None` when it does not exist
    /// or cannot be read.
    pub async fn namespace(&self, name: &str) -> Option<NamespaceLabels> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(name)) {
            Metrics::count(&self.metrics.namespace_lookups, "cache");
            return Some(NamespaceLabels::Cached(ns));
        }
        let api = Api::<Namespace>::all(self.client.clone());
        match tokio::time::timeout(NAMESPACE_GET_TIMEOUT, api.get_metadata_opt(name)).await {
            Ok(Ok(Some(ns))) => {
                Metrics::count(&self.metrics.namespace_lookups, "api");
                Some(NamespaceLabels::Owned(Arc::new(
                    ns.metadata.labels.unwrap_or_default(),
                )))
            }
            Ok(Ok(None)) => {
                Metrics::count(&self.metrics.namespace_lookups, "missing");
                None
            }
            Ok(Err(e)) => {
                Metrics::count(&self.metrics.namespace_lookups, "missing");
                tracing::warn!(namespace = name, error = %crate::ErrorChain(&e), "cannot read a namespace missing from the cache");
                None
            }
            Err(_) => {
                Metrics::count(&self.metrics.namespace_lookups, "missing");
                tracing::warn!(
                    namespace = name,
                    "reading a namespace missing from the cache timed out"
                );
                None
            }
        }
    }
}

/// Runs one reflector stream until `shutdown`, logging watch errors (the stream retries with
/// backoff) and signalling `changed` after each event.
async fn drive<S, T>(
    stream: S,
    what: &'static str,
    changed: Option<Arc<Notify>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: futures_util::Stream<Item = Result<T, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match next {
            Some(Ok(_)) => {
                if let Some(c) = &changed {
                    c.notify_one();
                }
            }
            Some(Err(e)) => {
                tracing::warn!(resource = what, error = %crate::ErrorChain(&e), "watch failed; retrying with backoff");
            }
            None => return,
        }
    }
}

/// A fixed cluster: for tests and benchmarks.
#[derive(Debug, Default)]
pub struct StaticCluster {
    pub policies: Arc<PolicySet>,
    pub namespaces: HashMap<String, Arc<Labels>>,
}

/// Where the server reads policies and namespaces from.
#[derive(Debug, Clone)]
pub enum ClusterSource {
    Kube(Box<KubeCache>),
    Static(Arc<StaticCluster>),
}

impl ClusterSource {
    pub fn policies(&self) -> Arc<PolicySet> {
        match self {
            ClusterSource::Kube(k) => k.policy_set(),
            ClusterSource::Static(s) => Arc::clone(&s.policies),
        }
    }

    pub async fn namespace(&self, name: &str) -> Option<NamespaceLabels> {
        match self {
            ClusterSource::Kube(k) => k.namespace(name).await,
            ClusterSource::Static(s) => s
                .namespaces
                .get(name)
                .map(|l| NamespaceLabels::Owned(Arc::clone(l))),
        }
    }

    pub fn is_ready(&self) -> bool {
        match self {
            ClusterSource::Kube(k) => k.is_ready(),
            ClusterSource::Static(_) => true,
        }
    }
}
