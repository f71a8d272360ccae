//! `auth/...`: tokens, AppRole and Kubernetes logins and their roles.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use serde_json::{Value, json};

use super::http::{Reply, bad, denied, envelope, errors, no_content, no_route, strings};
use super::state::{AppRole, K8sRole, Kubernetes, State, Token, ns_mut, random_hex, random_uuid};

/// `auth/token/lookup-self`.
pub fn lookup_self(st: &mut State, ns: &str, tok: &Token) -> Reply {
    (
        StatusCode::OK,
        envelope(
            st,
            json!({"policies": tok.policies, "creation_ttl": tok.ttl, "ttl": tok.expires.map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs()),
                   "namespace_path": if ns.is_empty() { String::new() } else { format!("{ns}/") }}),
        ),
    )
}

/// `auth/token/create`.
pub fn create_token(st: &mut State, ns: &str, req: &Value) -> Reply {
    let mut policies = strings(&req["policies"]);
    let ttl = parse_ttl(&req["ttl"]).unwrap_or(0);
    if !req["no_default_policy"].as_bool().unwrap_or(false) {
        policies.push("default".into());
    }
    issue_token(st, ns, policies, ttl, json!({}))
}

fn issue_token(
    st: &mut State,
    ns: &str,
    policies: Vec<String>,
    ttl: u64,
    metadata: Value,
) -> Reply {
    let token = format!("hvs.{}", random_hex(16));
    st.tokens.insert(
        token.clone(),
        Token {
            namespace: ns.to_owned(),
            policies: policies.clone(),
            expires: (ttl > 0).then(|| Instant::now() + Duration::from_secs(ttl)),
            ttl,
        },
    );
    st.next_id += 1;
    (
        StatusCode::OK,
        json!({
            "request_id": format!("00000000-0000-0000-0000-{:012}", st.next_id),
            "lease_id": "", "renewable": false, "lease_duration": 0, "data": null,
            "wrap_info": null, "warnings": null,
            "auth": {
                "client_token": token, "accessor": random_hex(12),
                "policies": policies, "token_policies": policies,
                "metadata": metadata, "lease_duration": ttl, "renewable": ttl > 0,
                "entity_id": "", "token_type": "service", "orphan": true
            }
        }),
    )
}
/// `auth/:mount/login`, for an AppRole or a Kubernetes mount.
pub fn login(st: &mut State, ns: &str, mount: &str, req: &Value) -> Reply {
    let n = ns_mut(st, ns);
    if let Some(roles) = n.approle.get(mount) {
        return match approle_login(roles, req) {
            Ok((policies, ttl, metadata)) => {
                issue_token(st, ns, with_default(policies), ttl, metadata)
            }
            Err(reply) => reply,
        };
    }
    if let Some(k) = n.kubernetes.get(mount) {
        let role = match kubernetes_login(k, req) {
            Ok(role) => role,
            Err(reply) => return reply,
        };
        let (policies, ttl, metadata) = role;
        // The TokenReview against the (simulated) API server.
        if !st.sa_tokens.contains_key(req["jwt"].as_str().unwrap_or("")) {
            return denied();
        }
        return issue_token(st, ns, with_default(policies), ttl, metadata);
    }
    no_route(&format!("auth/{mount}/login"))
}

/// What a login grants: policies, TTL and the token's metadata.
type Grant = (Vec<String>, u64, Value);

fn approle_login(roles: &HashMap<String, AppRole>, req: &Value) -> Result<Grant, Reply> {
    let role_id = req["role_id"].as_str().unwrap_or("");
    let secret_id = req["secret_id"].as_str().unwrap_or("");
    if role_id.is_empty() {
        return Err(bad("missing role_id"));
    }
    let Some((name, role)) = roles.iter().find(|(_, r)| r.role_id == role_id) else {
        return Err(bad("invalid role or secret ID"));
    };
    if !role.secret_ids.iter().any(|s| s == secret_id) {
        return Err(bad("invalid role or secret ID"));
    }
    Ok((
        role.policies.clone(),
        role.ttl,
        json!({ "role_name": name }),
    ))
}

/// Checks the JWT's claims against the role, as Vault's Kubernetes method does before its
/// TokenReview.
fn kubernetes_login(k: &Kubernetes, req: &Value) -> Result<Grant, Reply> {
    let role_name = req["role"].as_str().unwrap_or("");
    let jwt = req["jwt"].as_str().unwrap_or("");
    if role_name.is_empty() {
        return Err(bad("missing role"));
    }
    if jwt.is_empty() {
        return Err(bad("missing jwt"));
    }
    let Some(role) = k.roles.get(role_name) else {
        return Err(bad(&format!("invalid role name {role_name:?}")));
    };
    if !k.configured {
        return Err(errors(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not load backend configuration",
        ));
    }
    let Some(claims) = jwt_claims(jwt) else {
        return Err(errors(StatusCode::FORBIDDEN, "failed to parse the JWT"));
    };
    if !k.disable_iss_validation {
        let want = k.issuer.as_deref().unwrap_or("kubernetes/serviceaccount");
        if claims["iss"].as_str() != Some(want) {
            return Err(errors(StatusCode::FORBIDDEN, "invalid issuer (iss) claim"));
        }
    }
    if let Some(aud) = &role.audience
        && !strings(&claims["aud"]).contains(aud)
    {
        return Err(errors(
            StatusCode::FORBIDDEN,
            "invalid audience (aud) claim",
        ));
    }
    let (sa_ns, sa_name) = service_account(&claims);
    if !glob(&role.names, &sa_name) {
        return Err(errors(
            StatusCode::FORBIDDEN,
            "service account name not authorized",
        ));
    }
    if !glob(&role.namespaces, &sa_ns) {
        return Err(errors(StatusCode::FORBIDDEN, "namespace not authorized"));
    }
    Ok((
        role.policies.clone(),
        role.ttl,
        json!({ "role": role_name, "service_account_name": sa_name,
                "service_account_namespace": sa_ns }),
    ))
}

/// The ServiceAccount's namespace and name, from a projected token's `kubernetes.io` claim or
/// a legacy token's flat claims.
fn service_account(claims: &Value) -> (String, String) {
    match claims.get("kubernetes.io") {
        Some(k8s) => (
            k8s["namespace"].as_str().unwrap_or("").to_owned(),
            k8s["serviceaccount"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        ),
        None => (
            claims["kubernetes.io/serviceaccount/namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            claims["kubernetes.io/serviceaccount/service-account.name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        ),
    }
}

/// A role's bound names: `*`, exact, or a `prefix*`.
fn glob(list: &[String], v: &str) -> bool {
    list.iter()
        .any(|p| p == "*" || p == v || p.strip_suffix('*').is_some_and(|pre| v.starts_with(pre)))
}

fn with_default(mut p: Vec<String>) -> Vec<String> {
    if !p.iter().any(|x| x == "default") {
        p.push("default".into());
    }
    p
}

fn jwt_claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.split('.');
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()?;
    // Kubernetes signs with RSA, ECDSA or RSA-PSS; anything else is refused at parse.
    const ALLOWED: [&str; 9] = [
        "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
    ];
    if !ALLOWED.contains(&header["alg"].as_str()?) {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()
}
/// `auth/:mount/...` other than logins: AppRole roles and their IDs, the Kubernetes config
/// and roles.
pub fn admin(
    st: &mut State,
    ns: &str,
    method: &str,
    mount: &str,
    rest: &[&str],
    req: &Value,
) -> Reply {
    let write = matches!(method, "POST" | "PUT");
    let n = ns_mut(st, ns);
    if let Some(roles) = n.approle.get_mut(mount) {
        let reply = approle_admin(roles, method, write, rest, req);
        return match reply {
            AdminReply::Done(reply) => reply,
            AdminReply::Data(data) => (StatusCode::OK, envelope(st, data)),
            AdminReply::NoRoute => no_route(&format!("auth/{mount}/{}", rest.join("/"))),
        };
    }
    if let Some(k) = n.kubernetes.get_mut(mount)
        && let Some(reply) = kubernetes_admin(k, write, rest, req)
    {
        return reply;
    }
    no_route(&format!("auth/{mount}/{}", rest.join("/")))
}

/// An AppRole admin answer: data still to wrap in the envelope (which needs the whole state),
/// a finished reply, or no such route.
enum AdminReply {
    Data(Value),
    Done(Reply),
    NoRoute,
}

fn approle_admin(
    roles: &mut HashMap<String, AppRole>,
    method: &str,
    write: bool,
    rest: &[&str],
    req: &Value,
) -> AdminReply {
    match (method, rest) {
        (_, ["role", name]) if write => {
            let role = roles.entry((*name).to_owned()).or_insert_with(|| AppRole {
                role_id: format!("role-{}", random_hex(8)),
                secret_ids: vec![],
                policies: vec![],
                ttl: 0,
            });
            role.policies = strings(&req["token_policies"]);
            if role.policies.is_empty() {
                role.policies = strings(&req["policies"]);
            }
            role.ttl = parse_ttl(&req["token_ttl"]).unwrap_or(0);
            AdminReply::Done(no_content())
        }
        ("GET", ["role", name, "role-id"]) => match roles.get(*name) {
            Some(r) => AdminReply::Data(json!({ "role_id": r.role_id.clone() })),
            None => AdminReply::Done(errors(StatusCode::NOT_FOUND, "")),
        },
        (_, ["role", name, "secret-id"]) if write => match roles.get_mut(*name) {
            Some(r) => {
                let secret = random_uuid();
                r.secret_ids.push(secret.clone());
                AdminReply::Data(
                    json!({ "secret_id": secret, "secret_id_accessor": random_uuid(),
                            "secret_id_ttl": 0, "secret_id_num_uses": 0 }),
                )
            }
            None => AdminReply::Done(bad(&format!("role \"{name}\" does not exist"))),
        },
        _ => AdminReply::NoRoute,
    }
}

/// The Kubernetes method's `config` and `role/:name`; `None` for any other route.
fn kubernetes_admin(k: &mut Kubernetes, write: bool, rest: &[&str], req: &Value) -> Option<Reply> {
    Some(match rest {
        ["config"] if write => {
            if req["kubernetes_host"].as_str().unwrap_or("").is_empty() {
                return Some(bad("no host provided"));
            }
            k.configured = true;
            k.issuer = req["issuer"].as_str().map(str::to_owned);
            k.disable_iss_validation = req["disable_iss_validation"].as_bool().unwrap_or(true);
            no_content()
        }
        ["role", name] if write => {
            let names = strings(&req["bound_service_account_names"]);
            let namespaces = strings(&req["bound_service_account_namespaces"]);
            if names.is_empty() {
                return Some(bad("\"bound_service_account_names\" can not be empty"));
            }
            if namespaces.is_empty() {
                return Some(bad("\"bound_service_account_namespaces\" can not be empty"));
            }
            let mut policies = strings(&req["token_policies"]);
            if policies.is_empty() {
                policies = strings(&req["policies"]);
            }
            k.roles.insert(
                (*name).to_owned(),
                K8sRole {
                    names,
                    namespaces,
                    policies,
                    ttl: parse_ttl(&req["token_ttl"]).unwrap_or(0),
                    audience: req["audience"]
                        .as_str()
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned),
                },
            );
            no_content()
        }
        _ => return None,
    })
}

/// A TTL as seconds or a duration string (`"1h"`, `"30s"`, `"90"`).
fn parse_ttl(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => s.parse().ok().or_else(|| {
            let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                _ => return None,
            })
        }),
        _ => None,
    }
}
