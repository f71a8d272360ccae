//! Decision-function latency with 1,000 policies across 10,000 namespaces (target: p99 under
//! 200 us). Each call is timed on its own, so the percentiles are of single decisions, including
//! the denial messages (which format a YAML fix) and the namespace-label and policy lookups.
//!
//! Cluster policies' namespace selectors are evaluated once per namespace (and again when its
//! labels change) and memoized in the policy set; the last scenario measures only such first
//! reviews, each in a namespace not seen before, with every cluster policy evaluated.
//!
//! `cargo bench -p keyd-webhook --bench decision`
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;
use std::time::Instant;

use common::{Rng, keyd_status, namespaces, percentile, pick_namespace, pod_labels, policies};
use keyd_webhook::crd::Labels;
use keyd_webhook::decision::{DecisionConfig, Input, KeydView, Operation, Outcome, decide};
use keyd_webhook::workload::Workload;

const DECISIONS: usize = 200_000;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let ns = namespaces();
    let keyd = KeydView::Known(std::sync::Arc::new(keyd_status()));
    let config = DecisionConfig::default();
    println!(
        "decision: {} policies, {} namespaces, {DECISIONS} decisions per scenario\n",
        common::POLICIES,
        common::NAMESPACES
    );
    println!(
        "| scenario | p50 (us) | p99 (us) | p99.9 (us) | max (us) | allowed | denied | warned |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, cluster) in [
        ("900 EncryptionPolicy + 100 ClusterEncryptionPolicy", 100),
        ("1,000 ClusterEncryptionPolicy", 1_000),
        ("1,000 EncryptionPolicy", 0),
    ] {
        let set = policies(cluster);
        let mut rng = Rng::new(42);
        let inputs: Vec<(String, Workload)> = (0..DECISIONS)
            .map(|i| {
                (
                    pick_namespace(&mut rng, cluster),
                    Workload::pod(&format!("pod-{i}"), pod_labels(&mut rng), Labels::new()),
                )
            })
            .collect();
        // Warm up caches and the allocator.
        for (n, w) in inputs.iter().take(10_000) {
            black_box(decide(&input(n, w), ns.get(n), &set, &keyd, &config));
        }
        let mut samples = Vec::with_capacity(DECISIONS);
        let mut counts = [0usize; 3];
        for (n, w) in &inputs {
            let t = Instant::now();
            // The namespace lookup is part of what a review does per request.
            let d = decide(&input(n, w), ns.get(n), &set, &keyd, &config);
            let e = t.elapsed();
            samples.push(e.as_secs_f64() * 1e6);
            match d.outcome {
                Outcome::Allowed => counts[0] += 1,
                Outcome::Denied => counts[1] += 1,
                _ => counts[2] += 1,
            }
            black_box(d);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            percentile(&samples, 50.0),
            percentile(&samples, 99.0),
            percentile(&samples, 99.9),
            samples.last().copied().unwrap_or_default(),
            counts[0],
            counts[1],
            counts[2],
        );
    }
    cold(&ns, &keyd, &config);
}

/// First reviews only: each decision in a namespace the policy set has not seen, so all 1,000
/// cluster policies' namespace selectors are evaluated every time.
fn cold(ns: &std::collections::HashMap<String, Labels>, keyd: &KeydView, config: &DecisionConfig) {
    let set = policies(1_000);
    let mut rng = Rng::new(9);
    let inputs: Vec<(String, Workload)> = (0..common::NAMESPACES)
        .map(|i| {
            (
                common::ns_name(i),
                Workload::pod(&format!("pod-{i}"), pod_labels(&mut rng), Labels::new()),
            )
        })
        .collect();
    let mut samples = Vec::with_capacity(inputs.len());
    for (n, w) in &inputs {
        let t = Instant::now();
        let d = decide(&input(n, w), ns.get(n), &set, keyd, config);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        black_box(d);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "| 1,000 ClusterEncryptionPolicy, first review of each of the {} namespaces | {:.1} | {:.1} | {:.1} | {:.1} | | | |",
        inputs.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        percentile(&samples, 99.9),
        samples.last().copied().unwrap_or_default(),
    );
}

fn input<'a>(namespace: &'a str, object: &'a Workload) -> Input<'a> {
    Input {
        operation: Operation::Create,
        namespace,
        object,
        old_object: None,
        user: "system:serviceaccount:kube-system:replicaset-controller",
    }
}
