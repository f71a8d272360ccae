//! The connection to keyd and the request helpers every command uses: each maps an HTTP
//! status to keyctl's exit code.

use ::http::StatusCode;
use keyd_mtls::client::{ClientSettings, Connection, Connector, Response};
pub use keyd_mtls::error_chain;

use crate::{
    EXIT_CONFIG, EXIT_FORBIDDEN, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_SERVER, EXIT_UNREACHABLE,
    Failure, fail,
};

/// Connects to keyd with the client certificate: a bad certificate or key is a config error,
/// a failed connection or handshake means keyd is unreachable.
pub async fn connect(settings: &ClientSettings) -> Result<Connection, Failure> {
    let connector =
        Connector::from_settings(settings).map_err(|e| fail(EXIT_CONFIG, error_chain(&e)))?;
    connector.connect().await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!(
                "{}\n  is keyd running? (`keyd dev` or `keyd serve`)",
                error_chain(&e)
            ),
        )
    })
}

pub fn to_body<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(v).map_err(|e| fail(EXIT_SERVER, format!("cannot encode the request: {e}")))
}

pub async fn send(
    conn: &mut Connection,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, Failure> {
    let method = ::http::Method::from_bytes(method.as_bytes())
        .map_err(|e| fail(EXIT_SERVER, e.to_string()))?;
    let resp = conn.send(method, path, body, &[]).await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!("request to keyd failed: {}", error_chain(&e)),
        )
    })?;
    if resp.status.is_success() {
        return Ok(resp);
    }
    let msg = resp.error_message();
    Err(match resp.status {
        StatusCode::FORBIDDEN => fail(
            EXIT_FORBIDDEN,
            format!(
                "refused: {msg}\n  (admin commands need the admin certificate from keyctl.toml)"
            ),
        ),
        StatusCode::NOT_FOUND => fail(EXIT_NOT_FOUND, msg),
        s if s.is_client_error() => fail(EXIT_INVALID, format!("keyd refused the request: {msg}")),
        s => fail(EXIT_SERVER, format!("keyd failed ({s}): {msg}")),
    })
}

pub async fn call<T: serde::de::DeserializeOwned>(
    conn: &mut Connection,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, Failure> {
    let resp = send(conn, method, path, body).await?;
    serde_json::from_slice(&resp.body)
        .map_err(|e| fail(EXIT_SERVER, format!("unexpected answer from keyd: {e}")))
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay), so that a time such as
/// `2026-11-01T00:00:00+01:00` keeps its `+`.
pub fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
