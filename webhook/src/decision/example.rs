//! The example in a "no policy" refusal: a ready-to-apply `EncryptionPolicy` that selects the
//! refused object's pods, in a mode keyd reports ready.

use std::fmt::Write as _;

use super::context::Context;
use super::input::{KeydView, first_ready_mode};
use crate::crd::Mode;

/// Labels that identify a workload's pods better than the whole set, in order of preference.
const IDENTIFYING_LABELS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];
/// Labels controllers add per revision: selecting on them would break at the next rollout.
const REVISION_LABELS: [&str; 3] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
];

/// A ready-to-apply `EncryptionPolicy` selecting this object's pods.
pub(super) fn example_policy(ctx: &Context<'_>, keyd: &KeydView) -> String {
    let selector = example_selector(ctx);
    let base = selector
        .first()
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let n = ctx.input.object.display_name();
            if ctx.input.object.name.is_empty() {
                ctx.input
                    .object
                    .generate_name
                    .trim_end_matches('-')
                    .to_owned()
            } else {
                n
            }
        });
    let name = policy_name(&base);
    let mode = match keyd {
        KeydView::Known(s) => first_ready_mode(s).unwrap_or(Mode::Wireguard),
        KeydView::Unknown(_) => Mode::Wireguard,
    };
    let mut y = format!(
        "  kubectl apply -f - <<'EOF'\n  apiVersion: keyd.io/v1alpha1\n  kind: EncryptionPolicy\n  \
         metadata:\n    name: {name}\n    namespace: {}\n  spec:\n    mode: {}\n",
        ctx.input.namespace,
        mode.as_str()
    );
    if selector.is_empty() {
        y.push_str("    podSelector: {}   # every pod of the namespace\n");
    } else {
        y.push_str("    podSelector:\n      matchLabels:\n");
        for (k, v) in selector {
            let _ = writeln!(y, "        {k:?}: {v:?}");
        }
    }
    y.push_str("  EOF\n");
    y
}

/// The labels to select on: the first identifying label, else up to four of the pod's labels
/// that survive a rollout (not the sensitivity label itself: it is not what names the pods).
fn example_selector<'a>(ctx: &Context<'a>) -> Vec<(&'a String, &'a String)> {
    let labels = ctx.input.object.pod_labels();
    let mut selector: Vec<(&String, &String)> = match IDENTIFYING_LABELS
        .iter()
        .find_map(|k| labels.get_key_value(*k))
    {
        Some(kv) => vec![kv],
        None => labels
            .iter()
            .filter(|(k, _)| !REVISION_LABELS.contains(&k.as_str()))
            .filter(|(k, _)| {
                ctx.config
                    .sensitive_pod_label
                    .as_ref()
                    .is_none_or(|r| &r.key != *k)
            })
            .collect(),
    };
    selector.truncate(4);
    selector
}

/// A valid object name (DNS-1123 subdomain) derived from `base`.
fn policy_name(base: &str) -> String {
    let mut s: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches(|c| c == '-' || c == '.').to_owned();
    if s.is_empty() {
        s = "encrypted".to_owned();
    }
    s.truncate(200);
    format!("{s}-encryption")
}

#[cfg(test)]
mod tests {
    use super::policy_name;

    #[test]
    fn policy_names_are_valid_object_names() {
        let cases = [
            ("Web_API", "web-api-encryption"),
            ("--", "encrypted-encryption"),
        ];
        for (base, want) in cases {
            assert_eq!(policy_name(base), want, "base {base:?}");
        }
    }
}
