//! The metric names the shipped alerting rules (`deploy/monitoring/alerts.yaml`) and Grafana
//! dashboard (`deploy/monitoring/dashboard.json`) query, for the tests that check each one
//! against a component's real `/metrics`: a rule over a renamed or missing metric never fires,
//! and nothing else would notice.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// Every PromQL expression in the rules and the dashboard.
pub fn expressions() -> Vec<String> {
    let dir = monitoring_dir();
    let rules: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(dir.join("alerts.yaml")).expect("deploy/monitoring/alerts.yaml"),
    )
    .expect("alerts.yaml is YAML");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dashboard.json"))
            .expect("deploy/monitoring/dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    let mut out = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            out.push(rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    out
}

/// The metric names the expressions use that start with `prefix` (and not with any of
/// `except`): identifiers, since labels and functions never carry the components' prefixes.
pub fn queried_metrics(prefix: &str, except: &[&str]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for expr in expressions() {
        let mut token = String::new();
        // A trailing space closes the last token.
        for ch in expr.chars().chain([' ']) {
            if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
                token.push(ch);
                continue;
            }
            if token.starts_with(prefix) && !except.iter().any(|e| token.starts_with(e)) {
                names.insert(std::mem::take(&mut token));
            }
            token.clear();
        }
    }
    names
}

/// The sample names a Prometheus text exposition offers: every sample's, and those its `# TYPE`
/// lines promise (a counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`).
/// prometheus-client prints nothing for a labelled family without samples, so the callers
/// scrape after the activity that creates them.
pub fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            if end > 0 {
                names.insert(line[..end].to_owned());
            }
        }
    }
    names
}

/// The queried metrics with `prefix` that `exposition` lacks; panics if the rules and the
/// dashboard query none (a prefix typo would otherwise check nothing).
pub fn missing(exposition: &str, prefix: &str, except: &[&str]) -> Vec<String> {
    let wanted = queried_metrics(prefix, except);
    assert!(
        !wanted.is_empty(),
        "the rules and dashboard query no {prefix}* metric"
    );
    let have = exposed_names(exposition);
    wanted.into_iter().filter(|n| !have.contains(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_samples_and_type_lines() {
        let text = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                    # TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\n\
                    # TYPE a_up gauge\na_up 1\n# EOF\n";
        let names = exposed_names(text);
        for n in [
            "a_requests_total",
            "a_seconds_bucket",
            "a_seconds_sum",
            "a_up",
        ] {
            assert!(names.contains(n), "{n}: {names:?}");
        }
        assert!(!names.contains("a_requests"));
    }

    #[test]
    fn the_rules_query_each_component() {
        let keyd = queried_metrics("keyd_", &["keyd_webhook_"]);
        assert!(keyd.contains("keyd_key_rotation_overdue"), "{keyd:?}");
        assert!(!keyd.iter().any(|n| n.starts_with("keyd_webhook_")));
        assert!(queried_metrics("keyd_webhook_", &[]).contains("keyd_webhook_decisions_total"));
        assert!(queried_metrics("node_shim_", &[]).contains("node_shim_policy_packets_total"));
    }
}
