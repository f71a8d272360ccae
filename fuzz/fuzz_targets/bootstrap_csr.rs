//! The bootstrap request a node agent sends before it holds a certificate: its body as the
//! handler reads it, the node name check, and the CSR through
//! `CertificateAuthority::issue_client_for_csr` (the PKCS#10 parser and signature check). The
//! first byte picks the whole body (even, as `b`) or the CSR PEM alone (odd, as `c`).
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use keyd::pki::CertificateAuthority;
use keyd_proto::BootstrapRequest;
use keyd_proto::identity::{Identity, validate_name};
use libfuzzer_sys::fuzz_target;

static CA: LazyLock<CertificateAuthority> =
    LazyLock::new(|| CertificateAuthority::generate("fuzz CA").expect("a CA"));

fn issue(node: &str, csr: &str) {
    let _ = CA.issue_client_for_csr(
        &Identity::Node(node.to_owned()),
        csr,
        Duration::from_secs(3600),
        None,
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let Ok(req) = serde_json::from_slice::<BootstrapRequest>(rest) else {
            return;
        };
        if validate_name(&req.node).is_ok() {
            issue(&req.node, &req.csr);
        }
    } else if let Ok(pem) = std::str::from_utf8(rest) {
        issue("node-a", pem);
    }
});
