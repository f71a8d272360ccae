//! Who a client certificate speaks for.
//!
//! keyd reads the identity from the certificate's URI subject alternative names, in SPIFFE form:
//! `spiffe://keyd/node/<name>` for a node agent, `spiffe://keyd/admin/<name>` for an operator and
//! `spiffe://keyd/webhook/<name>` for the admission webhook.
//! A certificate must carry exactly one such URI; one naming two identities is refused rather
//! than guessed at.

use std::fmt;

/// The SPIFFE trust domain keyd's identities live in.
pub const TRUST_DOMAIN: &str = "keyd";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A node agent; may read and write only this node's data.
    Node(String),
    /// An operator; may call the admin endpoints.
    Admin(String),
    /// The admission webhook; may read enforcement status and report admission decisions.
    Webhook(String),
}

impl Identity {
    /// The name part (`worker-1` of `node/worker-1`).
    pub fn name(&self) -> &str {
        match self {
            Identity::Node(n) | Identity::Admin(n) | Identity::Webhook(n) => n,
        }
    }

    pub fn uri(&self) -> String {
        match self {
            Identity::Node(n) => format!("spiffe://{TRUST_DOMAIN}/node/{n}"),
            Identity::Admin(n) => format!("spiffe://{TRUST_DOMAIN}/admin/{n}"),
            Identity::Webhook(n) => format!("spiffe://{TRUST_DOMAIN}/webhook/{n}"),
        }
    }

    /// Parses one URI SAN. `Ok(None)` means the URI is not a keyd identity at all (other URIs
    /// may be present in a certificate and are ignored).
    pub fn parse_uri(uri: &str) -> Result<Option<Identity>, IdentityError> {
        let Some(path) = uri.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/")) else {
            return Ok(None);
        };
        let (kind, name) = path.split_once('/').ok_or(IdentityError::Malformed)?;
        validate_name(name)?;
        match kind {
            "node" => Ok(Some(Identity::Node(name.to_owned()))),
            "admin" => Ok(Some(Identity::Admin(name.to_owned()))),
            "webhook" => Ok(Some(Identity::Webhook(name.to_owned()))),
            _ => Err(IdentityError::UnknownKind(kind.to_owned())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node/{n}"),
            Identity::Admin(n) => write!(f, "admin/{n}"),
            Identity::Webhook(n) => write!(f, "webhook/{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Malformed,
    UnknownKind(String),
    BadName(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Malformed => {
                write!(
                    f,
                    "identity URI must be spiffe://{TRUST_DOMAIN}/<node|admin>/<name>"
                )
            }
            IdentityError::UnknownKind(k) => {
                write!(
                    f,
                    "identity kind {k:?} is not \"node\", \"admin\" or \"webhook\""
                )
            }
            IdentityError::BadName(why) => write!(f, "invalid name: {why}"),
        }
    }
}

impl std::error::Error for IdentityError {}

/// Node and admin names follow Kubernetes node names: a DNS-1123 subdomain (lowercase
/// alphanumerics, `-` and `.`, starting and ending alphanumeric, at most 253 characters).
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let bad = |why: &str| Err(IdentityError::BadName(format!("{name:?}: {why}")));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return bad("only lowercase letters, digits, '-' and '.' are allowed");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return bad("must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_admin() {
        assert_eq!(
            Identity::parse_uri("spiffe://keyd/node/worker-1").unwrap(),
            Some(Identity::Node("worker-1".into()))
        );
        assert_eq!(
            Identity::parse_uri("spiffe://keyd/admin/alice").unwrap(),
            Some(Identity::Admin("alice".into()))
        );
        assert_eq!(Identity::parse_uri("spiffe://other/node/x").unwrap(), None);
        let id = Identity::Node("n1".into());
        assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), Some(id));
    }

    #[test]
    fn refuses_bad_names_and_kinds() {
        assert!(Identity::parse_uri("spiffe://keyd/node/").is_err());
        assert!(Identity::parse_uri("spiffe://keyd/node/Upper").is_err());
        assert!(Identity::parse_uri("spiffe://keyd/node/a/b").is_err());
        assert!(Identity::parse_uri("spiffe://keyd/root/a").is_err());
        assert!(Identity::parse_uri("spiffe://keyd/node").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name(&"a".repeat(254)).is_err());
    }
}
