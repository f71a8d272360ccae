//! Cilium's per-tunnel IPsec keys: what a `+` after the key ID asks for.
//!
//! For the direction from node S to node D, the key is the first `len(global)` bytes of
//! SHA-256 (SHA-512 when the global key is longer than 32 bytes) over
//! `global ‖ ip(S) ‖ ip(D) ‖ boot_id(S)[..36] ‖ boot_id(D)[..36]`, where an IPv4 address counts
//! as its 4 bytes. S's outbound state and D's inbound state for S use the same key; the reverse
//! direction gets a different one, and a reboot of either node (a new boot ID) changes both.
//! For `rfc4106(gcm(aes))` the global key includes the 4-byte salt, and so does the result.

use std::net::IpAddr;

use keyd_proto::SecretBytes;
use sha2::{Digest, Sha256, Sha512};
use zeroize::Zeroizing;

/// Boot IDs are UUIDs in their 36-character text form; Cilium hashes exactly 36 bytes.
pub const BOOT_ID_LEN: usize = 36;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeriveError {
    #[error("boot ID of {which} has {len} characters; at least {BOOT_ID_LEN} are needed")]
    BootIdTooShort { which: &'static str, len: usize },
    #[error("a {len}-byte key is longer than SHA-512's 64 bytes; it cannot be derived per tunnel")]
    KeyTooLong { len: usize },
    #[error("an empty key cannot be derived per tunnel")]
    EmptyKey,
}

/// The per-tunnel key for traffic from `src` to `dst`.
pub fn tunnel_key(
    global: &[u8],
    src: IpAddr,
    dst: IpAddr,
    src_boot_id: &str,
    dst_boot_id: &str,
) -> Result<SecretBytes, DeriveError> {
    let len = global.len();
    if len == 0 {
        return Err(DeriveError::EmptyKey);
    }
    if len > 64 {
        return Err(DeriveError::KeyTooLong { len });
    }
    let src_boot = boot_prefix(src_boot_id, "the source node")?;
    let dst_boot = boot_prefix(dst_boot_id, "the destination node")?;
    let mut input = Zeroizing::new(Vec::with_capacity(len + 32 + 2 * BOOT_ID_LEN));
    input.extend_from_slice(global);
    input.extend_from_slice(&canonical(src));
    input.extend_from_slice(&canonical(dst));
    input.extend_from_slice(src_boot);
    input.extend_from_slice(dst_boot);
    let mut out = Zeroizing::new(vec![0u8; len]);
    if len <= 32 {
        let mut digest = Sha256::digest(&input[..]);
        out.copy_from_slice(&digest[..len]);
        zeroize::Zeroize::zeroize(digest.as_mut_slice());
    } else {
        let mut digest = Sha512::digest(&input[..]);
        out.copy_from_slice(&digest[..len]);
        zeroize::Zeroize::zeroize(digest.as_mut_slice());
    }
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}

fn boot_prefix<'a>(boot_id: &'a str, which: &'static str) -> Result<&'a [u8], DeriveError> {
    let bytes = boot_id.as_bytes();
    bytes.get(..BOOT_ID_LEN).ok_or(DeriveError::BootIdTooShort {
        which,
        len: bytes.len(),
    })
}

/// IPv4 (and IPv4-mapped IPv6) as 4 bytes, IPv6 as 16, as Go's `To4()` canonicalises.
fn canonical(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_A: &str = "11111111-2222-3333-4444-555555555555";
    const BOOT_B: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    // Expected values computed independently with Python's hashlib:
    // sha256(g + ip(src) + ip(dst) + boot(src) + boot(dst))[:len(g)].
    #[test]
    fn gcm128_vector() {
        let g = hex::decode("0123456789abcdef0123456789abcdefdeadbeef").unwrap();
        let k = tunnel_key(&g, ip("192.168.100.1"), ip("192.168.100.2"), BOOT_A, BOOT_B).unwrap();
        assert_eq!(
            hex::encode(k.expose()),
            "28c1d4fbd9e91cd509bf2c97e47cf9d2c4f7eb68"
        );
    }

    #[test]
    fn long_keys_use_sha512() {
        let g: Vec<u8> = (0..36).collect();
        let k = tunnel_key(&g, ip("192.168.100.2"), ip("192.168.100.1"), BOOT_B, BOOT_A).unwrap();
        assert_eq!(
            hex::encode(k.expose()),
            "89fc41924af784bbcb38e259ea5b176f7d7977e3ece0ac5af15509c1a3bfdda2d0207305"
        );
    }

    #[test]
    fn directions_differ_and_mapped_v4_is_v4() {
        let g = [7u8; 20];
        let ab = tunnel_key(&g, ip("10.0.0.1"), ip("10.0.0.2"), BOOT_A, BOOT_B).unwrap();
        let ba = tunnel_key(&g, ip("10.0.0.2"), ip("10.0.0.1"), BOOT_B, BOOT_A).unwrap();
        assert_ne!(ab, ba);
        let mapped = tunnel_key(&g, ip("::ffff:10.0.0.1"), ip("10.0.0.2"), BOOT_A, BOOT_B).unwrap();
        assert_eq!(ab, mapped);
        // Only the first 36 characters of a boot ID count.
        let longer = format!("{BOOT_A}\n");
        assert_eq!(
            ab,
            tunnel_key(&g, ip("10.0.0.1"), ip("10.0.0.2"), &longer, BOOT_B).unwrap()
        );
    }

    #[test]
    fn refuses_short_boot_ids_and_odd_lengths() {
        let g = [7u8; 20];
        assert!(matches!(
            tunnel_key(&g, ip("10.0.0.1"), ip("10.0.0.2"), "short", BOOT_B),
            Err(DeriveError::BootIdTooShort { len: 5, .. })
        ));
        assert_eq!(
            tunnel_key(&[1; 65], ip("10.0.0.1"), ip("10.0.0.2"), BOOT_A, BOOT_B),
            Err(DeriveError::KeyTooLong { len: 65 })
        );
        assert_eq!(
            tunnel_key(&[], ip("10.0.0.1"), ip("10.0.0.2"), BOOT_A, BOOT_B),
            Err(DeriveError::EmptyKey)
        );
    }
}
