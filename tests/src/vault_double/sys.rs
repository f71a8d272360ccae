//! `sys/...`: namespaces, secret and auth mounts, ACL policies, and the policy check every
//! request passes.

use std::collections::HashMap;

use http::StatusCode;
use serde_json::{Value, json};

use super::http::{Reply, bad, envelope, no_content, strings};
use super::state::{Namespace, Rule, State, ns_mut, random_hex};

/// `sys/namespaces/:path` (Vault Enterprise): a child of the caller's namespace.
pub fn create_namespace(st: &mut State, ns: &str, rest: &[&str]) -> Reply {
    let child = rest.join("/");
    let full = if ns.is_empty() {
        child
    } else {
        format!("{ns}/{child}")
    };
    st.namespaces.entry(full.clone()).or_default();
    (
        StatusCode::OK,
        envelope(
            st,
            json!({ "path": format!("{full}/"), "id": random_hex(4) }),
        ),
    )
}

/// `sys/mounts/:path`: only the transit engine.
pub fn mount(st: &mut State, ns: &str, rest: &[&str], req: &Value) -> Reply {
    let mount = rest.join("/");
    let n = ns_mut(st, ns);
    match req["type"].as_str() {
        Some("transit") => {
            if n.transit.contains_key(&mount) {
                return bad(&format!("path is already in use at {mount}/"));
            }
            n.transit.insert(mount, HashMap::new());
            no_content()
        }
        other => bad(&format!(
            "plugin not found in the catalog: {}",
            other.unwrap_or("")
        )),
    }
}

pub fn unmount(st: &mut State, ns: &str, rest: &[&str]) -> Reply {
    ns_mut(st, ns).transit.remove(&rest.join("/"));
    no_content()
}

/// `sys/auth/:path`: AppRole or Kubernetes.
pub fn enable_auth(st: &mut State, ns: &str, rest: &[&str], req: &Value) -> Reply {
    let mount = rest.join("/");
    let n = ns_mut(st, ns);
    match req["type"].as_str() {
        Some("approle") => {
            n.approle.entry(mount).or_default();
            no_content()
        }
        Some("kubernetes") => {
            n.kubernetes.entry(mount).or_default();
            no_content()
        }
        other => bad(&format!(
            "plugin not found in the catalog: {}",
            other.unwrap_or("")
        )),
    }
}

/// `sys/policies/acl/:name` (or the older `sys/policy/:name`).
pub fn put_policy(st: &mut State, ns: &str, name: &str, req: &Value) -> Reply {
    match parse_policy(req["policy"].as_str().unwrap_or("")) {
        Ok(rules) => {
            ns_mut(st, ns).policies.insert(name.to_owned(), rules);
            no_content()
        }
        Err(e) => bad(&format!("failed to parse policy: {e}")),
    }
}

pub fn allowed(ns: &Namespace, policies: &[String], path: &str, cap: &str) -> bool {
    if policies.iter().any(|p| p == "root") {
        return true;
    }
    // Every token may look itself up and revoke itself (the `default` policy).
    if matches!(
        path,
        "auth/token/lookup-self" | "auth/token/revoke-self" | "auth/token/renew-self"
    ) {
        return true;
    }
    let mut best: Option<&Rule> = None;
    for p in policies {
        for r in ns.policies.get(p).into_iter().flatten() {
            if path_matches(&r.path, path) {
                // The most specific (longest) matching path wins, as in Vault.
                if best.is_none_or(|b| r.path.len() > b.path.len()) {
                    best = Some(r);
                }
            }
        }
    }
    best.is_some_and(|r| !r.caps.iter().any(|c| c == "deny") && r.caps.iter().any(|c| c == cap))
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        return path.starts_with(prefix) || path_matches(prefix.trim_end_matches('/'), path);
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(a, b)| *a == "+" || a == b)
}

/// A policy in JSON (`{"path": {"P": {"capabilities": [...]}}}`) or in the simple HCL form.
fn parse_policy(text: &str) -> Result<Vec<Rule>, String> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let paths = v["path"].as_object().ok_or("no \"path\" object")?;
        return Ok(paths
            .iter()
            .map(|(p, r)| Rule {
                path: p.clone(),
                caps: strings(&r["capabilities"]),
            })
            .collect());
    }
    let mut rules = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("path") {
        rest = &rest[i + 4..];
        let open = rest.find('"').ok_or("expected a quoted path")?;
        let close = rest[open + 1..].find('"').ok_or("unterminated path")? + open + 1;
        let path = rest[open + 1..close].to_owned();
        let lb = rest[close..].find('[').ok_or("expected capabilities")? + close;
        let rb = rest[lb..].find(']').ok_or("unterminated capabilities")? + lb;
        let caps = rest[lb + 1..rb]
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        rules.push(Rule { path, caps });
        rest = &rest[rb..];
    }
    if rules.is_empty() {
        return Err("no path rules".into());
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_paths_match_like_vault() {
        assert!(path_matches(
            "transit/datakey/plaintext/keyd",
            "transit/datakey/plaintext/keyd"
        ));
        assert!(path_matches("transit/+/keyd", "transit/decrypt/keyd"));
        assert!(!path_matches(
            "transit/+/keyd",
            "transit/datakey/plaintext/keyd"
        ));
        assert!(path_matches("transit/*", "transit/decrypt/keyd"));
        let rules =
            parse_policy("path \"transit/decrypt/keyd\" {\n  capabilities = [\"update\"]\n}\n")
                .unwrap();
        assert_eq!(rules[0].path, "transit/decrypt/keyd");
        assert_eq!(rules[0].caps, vec!["update".to_owned()]);
    }
}
