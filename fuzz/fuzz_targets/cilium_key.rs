//! A Cilium `keys` line, as `POST /v1/ipsec/import` receives it and as keyd reads its stored
//! keys back: `CiliumKey::parse_line`. What parses must survive keyd's own round trips: the line
//! keyd writes and the `cilium-ipsec-keys` Secret it renders parse back to the same key.
#![no_main]

use base64::Engine as _;
use keyd::ipsec::{CiliumKey, render_secret_yaml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = CiliumKey::parse_line(text) else {
        return;
    };
    let line = key.to_line();
    let again = CiliumKey::parse_line(&line).expect("keyd's own line parses");
    assert_eq!(again, key, "the line keyd writes is the key it parsed");
    let _ = key.spec();
    let _ = key.check_replaces(&key);

    let yaml = render_secret_yaml(&key, "kube-system");
    let secret: serde_json::Value = serde_norway::from_str(&yaml).expect("the Secret is YAML");
    let keys = secret["data"]["keys"].as_str().expect("data.keys");
    let keys = base64::engine::general_purpose::STANDARD
        .decode(keys)
        .expect("data.keys is base64");
    let from_secret = CiliumKey::parse_line(std::str::from_utf8(&keys).expect("UTF-8"))
        .expect("the Secret's line parses");
    assert_eq!(
        from_secret, key,
        "the Secret holds the key it was rendered from"
    );
});
