//! Policy status: how many existing pods each policy covers, and whether its selector is
//! malformed. Recomputed every `status.interval` from one paged metadata list of pods (not a
//! pod watch: the webhook does not need pods on its request path), and written only when it
//! changed. Several webhook replicas compute the same values, so they never fight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;

use crate::crd::{ClusterEncryptionPolicy, EncryptionPolicy, Labels, PolicyStatus};
use crate::kube_cache::KubeCache;
use crate::policy::{PolicyKind, PolicyRef, PolicySet};

/// Pods that are running or about to: finished pods are not counted.
pub const LIVE_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Lists the metadata of every live pod, page by page.
pub async fn list_live_pods(client: &Client) -> Result<Vec<PartialObjectMeta<Pod>>, kube::Error> {
    let api = Api::<Pod>::all(client.clone());
    let mut out = Vec::new();
    let mut lp = ListParams::default().fields(LIVE_PODS).limit(500);
    loop {
        let page = api.list_metadata(&lp).await?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// Covered-pod counts per policy.
pub fn coverage<'a>(
    pods: impl IntoIterator<Item = (&'a str, &'a Labels)>,
    namespace_labels: impl Fn(&str) -> Option<Labels>,
    policies: &PolicySet,
) -> HashMap<PolicyRef, u32> {
    let mut counts: HashMap<PolicyRef, u32> = policies.all().map(|p| (p.id.clone(), 0)).collect();
    let mut ns_cache: HashMap<&str, Option<Labels>> = HashMap::new();
    for (ns, labels) in pods {
        let ns_labels = ns_cache.entry(ns).or_insert_with(|| namespace_labels(ns));
        for p in policies.candidates_for(ns, ns_labels.as_ref()) {
            if p.selects(labels, ns_labels.as_ref()) {
                *counts.entry(p.id.clone()).or_default() += 1;
            }
        }
    }
    counts
}

/// Recomputes and writes policy status every `interval` until `shutdown`.
pub async fn run_status_loop(
    client: Client,
    cache: KubeCache,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        () = cache.wait_ready() => {}
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Err(e) = update_once(&client, &cache).await {
            tracing::warn!(error = %crate::ErrorChain(&e), "cannot update policy status");
        }
    }
}

/// One pass: count, compare with the current status, patch what differs.
pub async fn update_once(client: &Client, cache: &KubeCache) -> Result<usize, kube::Error> {
    let pods = list_live_pods(client).await?;
    let policies: Arc<PolicySet> = cache.policy_set();
    let counts = coverage(
        pods.iter().map(|p| {
            (
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.labels.as_ref().unwrap_or(&EMPTY),
            )
        }),
        |ns| {
            cache
                .namespaces
                .get(&ObjectRef::new(ns))
                .map(|n| n.metadata.labels.clone().unwrap_or_default())
        },
        &policies,
    );
    let mut patched = 0;
    for p in policies.all() {
        let want = PolicyStatus {
            covered_pods: counts.get(&p.id).copied().unwrap_or(0),
            observed_generation: p.generation,
            selector_error: p.selector_error().map(ToString::to_string),
        };
        let have = match p.id.kind {
            PolicyKind::Namespaced => cache
                .policies
                .get(&ObjectRef::new(&p.id.name).within(&p.id.namespace))
                .and_then(|o| o.status.clone()),
            PolicyKind::Cluster => cache
                .cluster_policies
                .get(&ObjectRef::new(&p.id.name))
                .and_then(|o| o.status.clone()),
        };
        if have.as_ref() == Some(&want) {
            continue;
        }
        let body = Patch::Merge(serde_json::json!({ "status": want }));
        let pp = PatchParams::default();
        let result = match p.id.kind {
            PolicyKind::Namespaced => {
                Api::<EncryptionPolicy>::namespaced(client.clone(), &p.id.namespace)
                    .patch_status(&p.id.name, &pp, &body)
                    .await
                    .map(drop)
            }
            PolicyKind::Cluster => Api::<ClusterEncryptionPolicy>::all(client.clone())
                .patch_status(&p.id.name, &pp, &body)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => patched += 1,
            // Deleted since the snapshot: nothing to update.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(patched)
}

static EMPTY: Labels = Labels::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterEncryptionPolicySpec, EncryptionPolicySpec, LabelSelector, Mode};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn coverage_counts_each_policy_that_selects_a_pod() {
        let mut a = EncryptionPolicy::new(
            "a",
            EncryptionPolicySpec {
                pod_selector: LabelSelector {
                    match_labels: labels(&[("app", "pay")]),
                    match_expressions: vec![],
                },
                mode: Mode::Ipsec,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        a.metadata.namespace = Some("shop".into());
        let c = ClusterEncryptionPolicy::new(
            "c",
            ClusterEncryptionPolicySpec {
                namespace_selector: LabelSelector {
                    match_labels: labels(&[("pci", "yes")]),
                    match_expressions: vec![],
                },
                pod_selector: LabelSelector::default(),
                mode: Mode::Wireguard,
                strict: None,
                ports: vec![],
                peers: vec![],
            },
        );
        let set = PolicySet::from_resources([&a], [&c]);
        let pay = labels(&[("app", "pay")]);
        let web = labels(&[("app", "web")]);
        let pods = [
            ("shop", &pay),
            ("shop", &pay),
            ("shop", &web),
            ("blog", &pay),
        ];
        let counts = coverage(
            pods.iter().map(|(n, l)| (*n, *l)),
            |ns| (ns == "shop").then(|| labels(&[("pci", "yes")])),
            &set,
        );
        let get = |name: &str| counts.iter().find(|(k, _)| k.name == name).map(|(_, v)| *v);
        assert_eq!(get("a"), Some(2));
        assert_eq!(get("c"), Some(3));
    }
}
