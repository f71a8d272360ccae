//! WireGuard: the node public-key registry rules, each node's peer set, and pairwise preshared
//! keys.
//!
//! Nodes generate their own x25519 keypairs and post only the public key. keyd holds one sealed
//! master secret and derives the preshared key of a node pair for an epoch with HKDF-SHA256, so
//! both ends of a pair receive the same key without keyd storing N^2 keys, and moving to a new
//! epoch replaces every pair's key at once.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hkdf::Hkdf;
use keyd_proto::{NodeInfo, SecretBytes, WireguardPeer};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::seal::Key256;

const PSK_SALT: &[u8] = b"keyd wireguard psk v1";

/// Checks a posted WireGuard public key (standard base64 of 32 bytes, not all zero) and returns
/// its one canonical spelling, which is what keyd stores and compares: `" K"` and `"K\n"` are
/// the same key as `"K"`, and a second node must not register it under another spelling.
///
/// The all-zero key is a low-order point that makes every handshake's shared secret zero;
/// wg(8) refuses it too.
pub fn canonical_public_key(key: &str) -> Result<String, String> {
    let raw = Zeroizing::new(STANDARD.decode(key.trim()).map_err(|_| {
        "wireguard_public_key must be standard base64 (as `wg pubkey` prints it)".to_owned()
    })?);
    if raw.len() != 32 {
        return Err(format!(
            "wireguard_public_key decodes to {} bytes; an x25519 key has 32",
            raw.len()
        ));
    }
    if raw.iter().all(|b| *b == 0) {
        return Err(
            "wireguard_public_key is the all-zero key, which is not a valid peer key".to_owned(),
        );
    }
    Ok(STANDARD.encode(raw.as_slice()))
}

/// The preshared key for the pair {a, b} in `epoch`: identical whichever end asks.
pub fn pair_psk(master: &Key256, epoch: u64, a: &str, b: &str) -> SecretBytes {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    // Length-prefixed names keep ("ab","c") and ("a","bc") apart.
    let info = format!("epoch={epoch};{}:{lo};{}:{hi}", lo.len(), hi.len());
    let hk = Hkdf::<Sha256>::new(Some(PSK_SALT), master.expose());
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 255 * 32 byte limit, so expand cannot fail.
    let _ = hk.expand(info.as_bytes(), okm.as_mut());
    SecretBytes::new(okm.to_vec())
}

/// The peers `node` should configure: every other node that has posted a public key.
pub fn peers_for<'a>(
    node: &str,
    nodes: impl IntoIterator<Item = &'a NodeInfo>,
    master: &Key256,
    epoch: u64,
) -> Vec<WireguardPeer> {
    nodes
        .into_iter()
        .filter(|n| n.name != node)
        .filter_map(|n| {
            let public_key = n.wireguard_public_key.clone()?;
            Some(WireguardPeer {
                node: n.name.clone(),
                public_key,
                endpoint: n.endpoint,
                allowed_ips: n.pod_cidrs.clone(),
                preshared_key: pair_psk(master, epoch, node, &n.name),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyd_proto::{Acked, Timestamp};

    fn node(name: &str, key: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            endpoint: "192.0.2.1".parse().unwrap(),
            pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
            wireguard_public_key: key.map(str::to_owned),
            wireguard_key_epoch: None,
            wireguard_key_since: None,
            boot_id: None,
            registered_at: Timestamp(0),
            last_seen: Timestamp(0),
            acked: Acked::default(),
        }
    }

    #[test]
    fn both_ends_derive_the_same_key_and_epochs_differ() {
        let m = Key256::random().unwrap();
        assert_eq!(pair_psk(&m, 1, "a", "b"), pair_psk(&m, 1, "b", "a"));
        assert_ne!(pair_psk(&m, 1, "a", "b"), pair_psk(&m, 2, "a", "b"));
        assert_ne!(pair_psk(&m, 1, "a", "b"), pair_psk(&m, 1, "a", "c"));
        assert_ne!(pair_psk(&m, 1, "ab", "c"), pair_psk(&m, 1, "a", "bc"));
        assert_ne!(
            pair_psk(&m, 1, "a", "b"),
            pair_psk(&Key256::random().unwrap(), 1, "a", "b")
        );
    }

    #[test]
    fn peers_exclude_self_and_nodes_without_keys() {
        let m = Key256::random().unwrap();
        let pk = STANDARD.encode(x25519_dalek::PublicKey::from(
            &x25519_dalek::StaticSecret::from([7u8; 32]),
        ));
        let nodes = [node("a", Some(&pk)), node("b", Some(&pk)), node("c", None)];
        let peers = peers_for("a", &nodes, &m, 3);
        assert_eq!(
            peers.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(
            peers[0].preshared_key,
            peers_for("b", &nodes, &m, 3)[0].preshared_key
        );
    }

    #[test]
    fn public_key_validation() {
        let pk = STANDARD.encode(x25519_dalek::PublicKey::from(
            &x25519_dalek::StaticSecret::from([1u8; 32]),
        ));
        assert_eq!(canonical_public_key(&pk).unwrap(), pk);
        assert_eq!(canonical_public_key(&format!(" {pk}\n")).unwrap(), pk);
        assert!(canonical_public_key("not base64!").is_err());
        assert!(
            canonical_public_key(&STANDARD.encode([1u8; 31]))
                .unwrap_err()
                .contains("31 bytes")
        );
        assert!(
            canonical_public_key(&STANDARD.encode([0u8; 32]))
                .unwrap_err()
                .contains("all-zero")
        );
    }
}
