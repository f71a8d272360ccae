//! Key types: zeroized on drop, redacted in `Debug` by type, compared in constant time.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::SecretBytes;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A 32-byte secret: a WireGuard private or preshared key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key32([u8; 32]);

impl Key32 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Copies `bytes` if it is exactly 32 long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    /// 32 bytes from the operating system's random number generator.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut k = Self([0; 32]);
        getrandom::fill(&mut k.0)?;
        Ok(k)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A digest that identifies the key without revealing it: lets the reconciler tell whether
    /// the kernel holds the key it wants without keeping a second copy of what the kernel holds.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&[b"key32", &self.0])
    }

    /// The x25519 public key of this private key.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// Lower-case hex, in a zeroizing buffer (the WireGuard cross-platform UAPI format).
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(64));
        for b in self.0 {
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
        out
    }

    pub fn from_proto(s: &SecretBytes) -> Option<Self> {
        Self::from_slice(s.expose())
    }
}

fn hex_digit(n: u8) -> char {
    // Branch-free, as in keyd's Cilium line rendering: the time taken does not depend on the key.
    let letters = 0u8.wrapping_sub(9u8.wrapping_sub(n) >> 7);
    char::from(b'0' + n + (letters & 0x27))
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

impl PartialEq for Key32 {
    fn eq(&self, other: &Self) -> bool {
        keyd_proto::constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for Key32 {}

/// A WireGuard (x25519) public key: not secret, printed as standard base64 like `wg` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let raw = STANDARD
            .decode(s.trim())
            .map_err(|_| "a WireGuard public key is standard base64".to_owned())?;
        let arr: [u8; 32] = raw.try_into().map_err(|v: Vec<u8>| {
            format!("a WireGuard public key has 32 bytes, not {}", v.len())
        })?;
        Ok(PublicKey(arr))
    }
}

/// SHA-256 over a domain tag and key bytes: compared against to decide whether a kernel object
/// already holds the wanted key. Keys are uniformly random (or derived from such), so the digest
/// reveals nothing usable; it is still never logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            // Length-prefixed so that part boundaries cannot shift.
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        Fingerprint(h.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_hex_is_lowercase() {
        let k = Key32::from_bytes([0xAB; 32]);
        let dbg = format!("{k:?}");
        assert!(!dbg.to_lowercase().contains("ab"), "{dbg}");
        assert_eq!(k.to_hex().as_str(), "ab".repeat(32));
        let k = Key32::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(
            k.to_hex().as_str(),
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        );
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // `echo AAAA...= | wg pubkey` for the all-0x01 private key (clamped by x25519).
        let k = Key32::from_bytes([1; 32]);
        let pk = k.public_key();
        let parsed: PublicKey = pk.to_base64().parse().unwrap();
        assert_eq!(parsed, pk);
        assert!("abc".parse::<PublicKey>().is_err());
        assert!(STANDARD.encode([1u8; 31]).parse::<PublicKey>().is_err());
    }

    #[test]
    fn fingerprints_differ_by_key_and_boundaries() {
        assert_ne!(
            Fingerprint::of(&[b"ab", b"c"]),
            Fingerprint::of(&[b"a", b"bc"])
        );
        assert_ne!(
            Key32::from_bytes([1; 32]).fingerprint(),
            Key32::from_bytes([2; 32]).fingerprint()
        );
    }
}
