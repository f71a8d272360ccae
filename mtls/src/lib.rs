//! The mTLS plumbing that keyd, the admission webhook and node-shim share, so that each agent
//! links this and not the key service:
//! - [`tls`]: rustls configurations from PEM files (one crypto provider, aws-lc-rs), and hot
//!   reload of a server's certificate through a `watch` channel;
//! - [`identity`]: who a verified peer is (its one `spiffe://keyd/...` URI);
//! - [`server`]: accept loops with a connection cap, handshake, header-read and idle timeouts;
//! - [`client`]: a small mTLS HTTP/1.1 client for keyd's API;
//! - [`ops`]: error chains, logging set-up, configuration errors (exit 64) and field parsing.
#![forbid(unsafe_code)]

pub mod client;
pub mod identity;
pub mod ops;
pub mod server;
pub mod tls;

pub use ops::{ConfigError, EXIT_CONFIG, ErrorChain, error_chain};
