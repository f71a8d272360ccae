//! The HTTP side: the listener (plain or TLS), Vault's reply shapes, and the router that
//! checks the seal, the namespace, the token and its policies before a handler runs.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::state::{State, Token};
use super::{auth, sys, transit};

/// The permission-denied body, as Vault writes it (a Go multierror).
const PERMISSION_DENIED: &str = "1 error occurred:\n\t* permission denied\n\n";

#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub ca_pem: String,
}

pub async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, tls: Option<Tls>) {
    // Connections live in this set, so that aborting the server closes them all (an outage).
    let mut conns = JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let state = Arc::clone(&state);
        let tls = tls.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(t) => {
                    if let Ok(stream) = t.acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

pub type Reply = (StatusCode, Value);

pub fn errors(status: StatusCode, msg: &str) -> Reply {
    (status, json!({ "errors": [msg] }))
}

pub fn bad(msg: &str) -> Reply {
    errors(StatusCode::BAD_REQUEST, msg)
}

pub fn denied() -> Reply {
    errors(StatusCode::FORBIDDEN, PERMISSION_DENIED)
}

pub fn no_route(path: &str) -> Reply {
    errors(
        StatusCode::NOT_FOUND,
        &format!("no handler for route {path:?}. route entry not found."),
    )
}

/// A write that answers nothing (Vault's 204).
pub fn no_content() -> Reply {
    (StatusCode::NO_CONTENT, Value::Null)
}

pub fn envelope(st: &mut State, data: Value) -> Value {
    st.next_id += 1;
    json!({
        "request_id": format!("00000000-0000-0000-0000-{:012}", st.next_id),
        "lease_id": "", "renewable": false, "lease_duration": 0,
        "data": data, "wrap_info": null, "warnings": null, "auth": null
    })
}

pub fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Value::String(s) if !s.is_empty() => s.split(',').map(|x| x.trim().to_owned()).collect(),
        _ => vec![],
    }
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let token = header("x-vault-token");
    let namespace = header("x-vault-namespace")
        .unwrap_or_default()
        .trim_matches('/')
        .to_owned();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let reply = {
        let mut st = state.lock().expect("lock");
        route(&mut st, &method, &path, &namespace, token.as_deref(), &body)
    };
    let (status, value) = reply;
    let bytes = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        Bytes::from(value.to_string())
    };
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn route(
    st: &mut State,
    method: &Method,
    full_path: &str,
    ns: &str,
    token: Option<&str>,
    body: &[u8],
) -> Reply {
    let Some(path) = full_path.strip_prefix("/v1/") else {
        return no_route(full_path);
    };
    let path = path.trim_end_matches('/').to_owned();
    *st.requests.entry(format!("{method} {path}")).or_default() += 1;
    if path == "sys/health" {
        return health(st);
    }
    if st.sealed {
        return errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed");
    }
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad(&format!("failed to parse JSON input: {e}")),
        }
    };
    if !st.namespaces.contains_key(ns) {
        return no_route(&path);
    }
    // Logins need no token.
    let segs: Vec<&str> = path.split('/').collect();
    if segs.first() == Some(&"auth") && segs.last() == Some(&"login") && segs.len() == 3 {
        return auth::login(st, ns, segs[1], &req);
    }
    let tok = match authorize(st, method, &path, &segs, ns, token) {
        Ok(tok) => tok,
        Err(reply) => return reply,
    };
    let token = token.unwrap_or_default();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["auth", "token", "lookup-self"]) => auth::lookup_self(st, ns, &tok),
        ("POST" | "PUT", ["auth", "token", "revoke-self"]) => {
            st.tokens.remove(token);
            no_content()
        }
        ("POST" | "PUT", ["auth", "token", "revoke"]) => {
            if let Some(t) = req["token"].as_str() {
                st.tokens.remove(t);
            }
            no_content()
        }
        ("POST" | "PUT", ["auth", "token", "create"]) => auth::create_token(st, ns, &req),
        ("POST" | "PUT", ["sys", "namespaces", rest @ ..]) => sys::create_namespace(st, ns, rest),
        ("POST" | "PUT", ["sys", "mounts", rest @ ..]) => sys::mount(st, ns, rest, &req),
        ("DELETE", ["sys", "mounts", rest @ ..]) => sys::unmount(st, ns, rest),
        ("POST" | "PUT", ["sys", "auth", rest @ ..]) => sys::enable_auth(st, ns, rest, &req),
        ("POST" | "PUT", ["sys", "policies", "acl", name])
        | ("POST" | "PUT", ["sys", "policy", name]) => sys::put_policy(st, ns, name, &req),
        (m, ["auth", mount, rest @ ..]) => auth::admin(st, ns, m, mount, rest, &req),
        (m, [mount, rest @ ..]) if st.namespaces[ns].transit.contains_key(*mount) => {
            transit::handle(st, ns, m, mount, rest, &req)
        }
        _ => no_route(&path),
    }
}

/// `sys/health`: answered sealed or not, without a token.
fn health(st: &State) -> Reply {
    if st.sealed {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"initialized": true, "sealed": true, "standby": false}),
        )
    } else {
        (
            StatusCode::OK,
            json!({"initialized": true, "sealed": false, "standby": false, "version": "test-double"}),
        )
    }
}

/// The caller's token, if it is valid in this namespace and its policies grant what the
/// request needs; else Vault's 403 (an expired token is removed).
fn authorize(
    st: &mut State,
    method: &Method,
    path: &str,
    segs: &[&str],
    ns: &str,
    token: Option<&str>,
) -> Result<Token, Reply> {
    let Some(tok) = token.and_then(|t| st.tokens.get(t).cloned()) else {
        return Err(denied());
    };
    if tok.expires.is_some_and(|e| Instant::now() >= e) {
        if let Some(t) = token {
            st.tokens.remove(t);
        }
        return Err(denied());
    }
    if tok.namespace != ns && !tok.policies.iter().any(|p| p == "root") {
        return Err(denied());
    }
    // What the request needs: Vault asks for `create` when an upsert creates the key.
    let transit_missing_key = |st: &State| {
        let mount = segs.first().copied().unwrap_or("");
        segs.get(1) == Some(&"encrypt")
            && segs.len() == 3
            && st.namespaces[ns]
                .transit
                .get(mount)
                .is_some_and(|m| !m.contains_key(segs[2]))
    };
    let cap = match *method {
        Method::GET => "read",
        Method::DELETE => "delete",
        ref m if m.as_str() == "LIST" => "list",
        _ if transit_missing_key(st) => "create",
        _ => "update",
    };
    if !sys::allowed(&st.namespaces[ns], &tok.policies, path, cap) {
        return Err(denied());
    }
    Ok(tok)
}

pub fn make_tls() -> Tls {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "vault test double CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_pem: ca.pem(),
    }
}
