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

/// Starts a streaming GET: the response body once keyd answered 2xx, else the failure with
/// keyd's message (`what` names the request: "export", "report").
pub async fn get_streaming(
    conn: &mut Connection,
    path: &str,
    what: &str,
) -> Result<(::http::response::Parts, hyper::body::Incoming), Failure> {
    use http_body_util::BodyExt as _;
    let resp = conn.get_streaming(path).await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!("request to keyd failed: {}", error_chain(&e)),
        )
    })?;
    let (parts, body) = resp.into_parts();
    if parts.status.is_success() {
        return Ok((parts, body));
    }
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let msg = serde_json::from_slice::<keyd_proto::ErrorBody>(&bytes)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    Err(fail(
        exit_for_status(parts.status.as_u16()),
        format!("{what} refused: {msg}"),
    ))
}

/// keyctl's exit code for a refusal with this HTTP status.
pub fn exit_for_status(status: u16) -> u8 {
    match status {
        403 => EXIT_FORBIDDEN,
        404 => EXIT_NOT_FOUND,
        400..=499 => EXIT_INVALID,
        _ => EXIT_SERVER,
    }
}

/// `--public-key`: base64, or a file holding it (as `keyctl audit public-key` prints it).
pub fn read_public_key(arg: Option<&str>) -> Result<Option<Vec<u8>>, Failure> {
    use base64::Engine as _;
    let Some(k) = arg else { return Ok(None) };
    let text = if std::path::Path::new(k).is_file() {
        std::fs::read_to_string(k)
            .map_err(|e| fail(EXIT_CONFIG, format!("cannot read {k}: {e}")))?
    } else {
        k.to_owned()
    };
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(Some)
        .map_err(|_| {
            fail(
                EXIT_INVALID,
                "--public-key is not base64 (use `keyctl audit public-key`)",
            )
        })
}
