//! Cross-component tests and harnesses for keyd, the webhook and node-shim.
#![forbid(unsafe_code)]
