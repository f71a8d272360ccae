//! Cilium's IPsec pre-shared key format: generate, import (parse), check rotations, render.
//!
//! Cilium reads one line from the `keys` entry of the Secret `cilium-ipsec-keys`
//! (namespace `kube-system`), in one of two forms:
//!
//! ```text
//! KEYID[+] rfc4106(gcm(aes)) KEY-HEX ICV-BITS
//! KEYID[+] hmac(sha256) AUTH-KEY-HEX cbc(aes) ENC-KEY-HEX
//! ```
//!
//! The key ID is the ESP SPI (1..=15). A `+` after it selects per-tunnel keys, which each node pair
//! derives from this one; without it every node uses the same global key, which Cilium deprecates
//! as insecure. A rotation must increase the ID (wrapping 15 -> 1) and keep the algorithm, key
//! length and ICV: Cilium keeps old and new states side by side while nodes catch up, and they can
//! only be told apart by SPI.
//!
//! Key bytes never reach an error message or a `Debug` string: errors name the field position and
//! lengths, never the field's text, and every buffer that holds key bytes or their hex or base64 is
//! zeroized when dropped.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::{
    IpsecAlgorithm, IpsecKey, IpsecKeyInfo, KeyRole, KeySpec, SecretBytes, Timestamp,
};
use zeroize::Zeroizing;

/// Name of the Secret Cilium reads its IPsec keys from.
pub const SECRET_NAME: &str = "cilium-ipsec-keys";
/// The Secret's data key holding the key line.
pub const SECRET_DATA_KEY: &str = "keys";
/// Where Cilium looks for the Secret unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "kube-system";

const GCM: &str = "rfc4106(gcm(aes))";
const HMAC_SHA256: &str = "hmac(sha256)";
const CBC_AES: &str = "cbc(aes)";
const AUTH_ENC: &str = "hmac(sha256) cbc(aes)";

const AEAD_LAYOUT: &str = "KEYID[+] rfc4106(gcm(aes)) KEY-HEX ICV-BITS";
const AUTH_ENC_LAYOUT: &str = "KEYID[+] hmac(sha256) AUTH-KEY-HEX cbc(aes) ENC-KEY-HEX";

/// The rfc4106 salt that follows the AES key in the same hex field.
const GCM_SALT_LEN: usize = 4;
/// ICV length keyd generates; the largest the kernel's rfc4106 accepts.
const DEFAULT_ICV_BITS: u16 = 128;
/// Shortest HMAC key accepted: 128 bits.
const MIN_AUTH_KEY_LEN: usize = 16;
/// Longest HMAC key accepted: the SHA-256 block size. HMAC hashes longer keys down to 32 bytes, so
/// they add nothing, and the bound keeps lengths in `u16` bits.
const MAX_AUTH_KEY_LEN: usize = 64;
/// Key lengths generated for `hmac(sha256)` / `cbc(aes)`.
const GENERATED_AUTH_KEY_LEN: usize = 32;
const GENERATED_ENC_KEY_LEN: usize = 32;

/// A Cilium key ID, which is also the ESP SPI: 1..=15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(u8);

impl KeyId {
    /// The largest ID; after it the sequence wraps to [`KeyId::MIN`].
    pub const MAX: KeyId = KeyId(15);
    pub const MIN: KeyId = KeyId(1);

    pub fn new(id: u8) -> Result<KeyId, IpsecError> {
        if (Self::MIN.0..=Self::MAX.0).contains(&id) {
            Ok(KeyId(id))
        } else {
            Err(IpsecError::KeyIdOutOfRange { id })
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// The ID a rotation moves to by default: one up, and 15 wraps to 1.
    pub fn next(self) -> KeyId {
        if self == Self::MAX {
            Self::MIN
        } else {
            KeyId(self.0 + 1)
        }
    }

    /// Whether a key with this ID may replace one with `prev`: any higher ID, or 1 after 15.
    pub fn is_successor_of(self, prev: KeyId) -> bool {
        if prev == Self::MAX {
            self == Self::MIN
        } else {
            self > prev
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The secret part of a key line. Build it through [`CiliumKey::generate`] or
/// [`CiliumKey::parse_line`], which enforce the lengths below.
///
/// `Debug` is derived: every secret field is a [`SecretBytes`], whose `Debug` shows only the length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// `rfc4106(gcm(aes))`: the AES key (16 or 32 bytes) followed by the 4-byte salt.
    Gcm { key: SecretBytes, icv_bits: u16 },
    /// `hmac(sha256)` with `auth_key` (16..=64 bytes), `cbc(aes)` with `enc_key` (16, 24 or 32).
    HmacSha256CbcAes {
        auth_key: SecretBytes,
        enc_key: SecretBytes,
    },
}

/// One Cilium IPsec key: what one `keys` line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiliumKey {
    pub id: KeyId,
    /// Cilium's `+`: per-tunnel keys derived from this one.
    pub per_tunnel: bool,
    pub material: KeyMaterial,
}

/// Non-secret description of a key's form: equal forms may rotate into each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpecDesc {
    /// `rfc4106(gcm(aes))` or `hmac(sha256) cbc(aes)`.
    pub algorithm: &'static str,
    /// Encryption key bits, without the GCM salt.
    pub key_bits: u16,
    /// HMAC key bits, for `hmac(sha256) cbc(aes)`.
    pub auth_key_bits: Option<u16>,
    /// ICV bits, for `rfc4106(gcm(aes))`.
    pub icv_bits: Option<u16>,
}

impl fmt::Display for KeySpecDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.auth_key_bits, self.icv_bits) {
            (Some(auth), _) => write!(
                f,
                "{HMAC_SHA256} with a {auth}-bit key and {CBC_AES} with a {}-bit key",
                self.key_bits
            ),
            (None, Some(icv)) => write!(
                f,
                "{} with a {}-bit key and a {icv}-bit ICV",
                self.algorithm, self.key_bits
            ),
            (None, None) => write!(f, "{} with a {}-bit key", self.algorithm, self.key_bits),
        }
    }
}

/// What is wrong with a key line or a rotation. No variant carries key bytes or a field's text,
/// except an algorithm name that cannot be key hex (see [`UnsupportedAlgorithm`]).
///
/// [`UnsupportedAlgorithm`]: IpsecError::UnsupportedAlgorithm
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpsecError {
    #[error("key ID {id} is out of range: Cilium key IDs (SPIs) are 1 to 15")]
    KeyIdOutOfRange { id: u8 },
    #[error("field 1 is not a key ID: expected a number from 1 to 15, optionally followed by `+`")]
    InvalidKeyId,
    #[error("no key line: expected one line `{AEAD_LAYOUT}` or `{AUTH_ENC_LAYOUT}`")]
    Empty,
    #[error("{count} non-empty lines: expected exactly one key line")]
    MultipleLines { count: usize },
    #[error("the key line has {found} fields, expected {expected}: `{layout}`")]
    MissingFields {
        found: usize,
        expected: usize,
        layout: &'static str,
    },
    #[error("the key line has {found} fields, expected {expected}: `{layout}`")]
    ExtraFields {
        found: usize,
        expected: usize,
        layout: &'static str,
    },
    /// `found` is the name only when it looks like an algorithm name (see `printable_name`);
    /// otherwise it is withheld, since a shifted line can put key hex in this position.
    #[error(
        "unsupported algorithm {} in field {position}: expected {expected}",
        shown_name(found)
    )]
    UnsupportedAlgorithm {
        position: usize,
        expected: &'static str,
        found: Option<String>,
    },
    #[error("field {position} ({field}) has {actual} hex digits, expected {expected}")]
    KeyLength {
        position: usize,
        field: &'static str,
        expected: &'static str,
        actual: usize,
    },
    #[error("field {position} ({field}) is not hexadecimal")]
    NotHex {
        position: usize,
        field: &'static str,
    },
    #[error(
        "ICV of 256 bits: Cilium accepts it but the kernel's rfc4106(gcm(aes)) takes at most 128; \
         use 128 (or 96)"
    )]
    IcvTooLongForKernel,
    /// `found` is the number when field 4 is one; any other text is withheld.
    #[error("field 4 (ICV bits) is {}: expected 96 or 128", shown_icv(found))]
    InvalidIcv { found: Option<u16> },
    #[error("key ID {new} cannot replace key ID {prev}: a rotation must move to {}", successors(*prev))]
    NotSuccessor { prev: KeyId, new: KeyId },
    #[error(
        "a rotation cannot change the key form: the current key is {prev}, the new one is {new}"
    )]
    FormChanged { prev: KeySpecDesc, new: KeySpecDesc },
    #[error(
        "a rotation cannot drop `+` to go from per-tunnel keys back to one global key, which \
         Cilium deprecates as insecure"
    )]
    PerTunnelDropped,
    /// getrandom's error is not a `std::error::Error` without its `std` feature, so it is kept as
    /// a field and shown in the message rather than chained as a source.
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
}

fn shown_name(found: &Option<String>) -> String {
    match found {
        Some(name) => format!("`{name}`"),
        None => "(not shown: it does not look like an algorithm name)".to_owned(),
    }
}

fn shown_icv(found: &Option<u16>) -> String {
    match found {
        Some(bits) => bits.to_string(),
        None => "not a number".to_owned(),
    }
}

fn successors(prev: KeyId) -> String {
    match prev.0 {
        15 => "1: after 15 the IDs wrap to 1".to_owned(),
        14 => "15: the ID must increase, and only 15 wraps to 1".to_owned(),
        n => format!("a higher ID, {} to 15 (only 15 wraps to 1)", n + 1),
    }
}

impl CiliumKey {
    /// A fresh key of form `spec`; fails only if the OS random number generator does.
    pub fn generate(id: KeyId, spec: KeySpec, per_tunnel: bool) -> Result<CiliumKey, IpsecError> {
        let material = match spec {
            KeySpec::Gcm128 => KeyMaterial::Gcm {
                key: random(16 + GCM_SALT_LEN)?,
                icv_bits: DEFAULT_ICV_BITS,
            },
            KeySpec::Gcm256 => KeyMaterial::Gcm {
                key: random(32 + GCM_SALT_LEN)?,
                icv_bits: DEFAULT_ICV_BITS,
            },
            KeySpec::HmacSha256CbcAes256 => KeyMaterial::HmacSha256CbcAes {
                auth_key: random(GENERATED_AUTH_KEY_LEN)?,
                enc_key: random(GENERATED_ENC_KEY_LEN)?,
            },
        };
        Ok(CiliumKey {
            id,
            per_tunnel,
            material,
        })
    }

    /// Parses the Secret's `keys` value: exactly one non-empty line, surrounding whitespace
    /// allowed. Hex may be upper or lower case and may carry Cilium's legacy `0x` prefix.
    pub fn parse_line(input: &str) -> Result<CiliumKey, IpsecError> {
        let mut lines = input.lines().filter(|l| !l.trim().is_empty());
        let line = lines.next().ok_or(IpsecError::Empty)?;
        let rest = lines.count();
        if rest > 0 {
            return Err(IpsecError::MultipleLines { count: rest + 1 });
        }

        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let (Some(&id_field), Some(&algorithm)) = (fields.first(), fields.get(1)) else {
            return Err(IpsecError::MissingFields {
                found: fields.len(),
                expected: 4,
                layout: AEAD_LAYOUT,
            });
        };
        let (id, per_tunnel) = parse_id(id_field)?;

        let (expected, layout) = match algorithm {
            GCM => (4, AEAD_LAYOUT),
            HMAC_SHA256 => (5, AUTH_ENC_LAYOUT),
            other => {
                return Err(IpsecError::UnsupportedAlgorithm {
                    position: 2,
                    expected: "`rfc4106(gcm(aes))` or `hmac(sha256)`",
                    found: printable_name(other),
                });
            }
        };
        let found = fields.len();
        if found < expected {
            return Err(IpsecError::MissingFields {
                found,
                expected,
                layout,
            });
        }
        if found > expected {
            return Err(IpsecError::ExtraFields {
                found,
                expected,
                layout,
            });
        }

        let material = if algorithm == GCM {
            let key = decode_hex(fields[2], 3, "AES key and salt", |len| {
                len == 16 + GCM_SALT_LEN || len == 32 + GCM_SALT_LEN
            })
            .map_err(|e| {
                e.expecting("40 (AES-128 key + 4-byte salt) or 72 (AES-256 key + 4-byte salt)")
            })?;
            let icv_bits = parse_icv(fields[3])?;
            KeyMaterial::Gcm { key, icv_bits }
        } else {
            let auth_key = decode_hex(fields[2], 3, "hmac(sha256) key", |len| {
                (MIN_AUTH_KEY_LEN..=MAX_AUTH_KEY_LEN).contains(&len)
            })
            .map_err(|e| e.expecting("an even number from 32 to 128 (a 16- to 64-byte key)"))?;
            if fields[3] != CBC_AES {
                return Err(IpsecError::UnsupportedAlgorithm {
                    position: 4,
                    expected: "`cbc(aes)`",
                    found: printable_name(fields[3]),
                });
            }
            let enc_key = decode_hex(fields[4], 5, "cbc(aes) key", |len| {
                matches!(len, 16 | 24 | 32)
            })
            .map_err(|e| e.expecting("32, 48 or 64 (AES-128, -192 or -256)"))?;
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key }
        };
        Ok(CiliumKey {
            id,
            per_tunnel,
            material,
        })
    }

    /// The bare `keys` line, hex in lower case, no trailing newline.
    pub fn to_line(&self) -> Zeroizing<String> {
        // Sized up front so the string never reallocates: a reallocation would leave an
        // unzeroized copy of the key hex in freed memory.
        let capacity = 3 + match &self.material {
            KeyMaterial::Gcm { key, .. } => 1 + GCM.len() + 1 + 2 * key.len() + 1 + 5,
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key } => {
                1 + HMAC_SHA256.len()
                    + 1
                    + 2 * auth_key.len()
                    + 1
                    + CBC_AES.len()
                    + 1
                    + 2 * enc_key.len()
            }
        };
        let mut line = Zeroizing::new(String::with_capacity(capacity));
        line.push_str(&self.id.to_string());
        if self.per_tunnel {
            line.push('+');
        }
        match &self.material {
            KeyMaterial::Gcm { key, icv_bits } => {
                line.push(' ');
                line.push_str(GCM);
                line.push(' ');
                push_hex(&mut line, key.expose());
                line.push(' ');
                line.push_str(&icv_bits.to_string());
            }
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key } => {
                line.push(' ');
                line.push_str(HMAC_SHA256);
                line.push(' ');
                push_hex(&mut line, auth_key.expose());
                line.push(' ');
                line.push_str(CBC_AES);
                line.push(' ');
                push_hex(&mut line, enc_key.expose());
            }
        }
        debug_assert_eq!(line.capacity(), capacity, "the key line outgrew its buffer");
        line
    }

    pub fn spec(&self) -> KeySpecDesc {
        match &self.material {
            KeyMaterial::Gcm { key, icv_bits } => KeySpecDesc {
                algorithm: GCM,
                key_bits: bits(key.len().saturating_sub(GCM_SALT_LEN)),
                auth_key_bits: None,
                icv_bits: Some(*icv_bits),
            },
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key } => KeySpecDesc {
                algorithm: AUTH_ENC,
                key_bits: bits(enc_key.len()),
                auth_key_bits: Some(bits(auth_key.len())),
                icv_bits: None,
            },
        }
    }

    /// The key for the next rotation: next id, same form, fresh random bytes, always per-tunnel
    /// (a global key, imported for a legacy cluster, is replaced by a per-tunnel one, as
    /// Cilium's own migration does).
    pub fn rotated(&self) -> Result<CiliumKey, IpsecError> {
        let material = match &self.material {
            KeyMaterial::Gcm { key, icv_bits } => KeyMaterial::Gcm {
                key: random(key.len())?,
                icv_bits: *icv_bits,
            },
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key } => KeyMaterial::HmacSha256CbcAes {
                auth_key: random(auth_key.len())?,
                enc_key: random(enc_key.len())?,
            },
        };
        Ok(CiliumKey {
            id: self.id.next(),
            per_tunnel: true,
            material,
        })
    }

    /// Checks that `self` may replace `prev`: the ID moves up (or wraps 15 -> 1), the form
    /// (algorithm, key lengths, ICV) is unchanged, and per-tunnel keys do not fall back to a
    /// global key. Going from global to per-tunnel is allowed: it is how Cilium migrates.
    pub fn check_replaces(&self, prev: &CiliumKey) -> Result<(), IpsecError> {
        if !self.id.is_successor_of(prev.id) {
            return Err(IpsecError::NotSuccessor {
                prev: prev.id,
                new: self.id,
            });
        }
        let (prev_spec, new_spec) = (prev.spec(), self.spec());
        if prev_spec != new_spec {
            return Err(IpsecError::FormChanged {
                prev: prev_spec,
                new: new_spec,
            });
        }
        if prev.per_tunnel && !self.per_tunnel {
            return Err(IpsecError::PerTunnelDropped);
        }
        Ok(())
    }

    pub fn to_proto(&self, role: KeyRole) -> IpsecKey {
        let algorithm = match &self.material {
            KeyMaterial::Gcm { key, icv_bits } => IpsecAlgorithm::Aead {
                name: GCM.to_owned(),
                key: key.clone(),
                icv_bits: *icv_bits,
            },
            KeyMaterial::HmacSha256CbcAes { auth_key, enc_key } => IpsecAlgorithm::AuthEnc {
                auth_name: HMAC_SHA256.to_owned(),
                auth_key: auth_key.clone(),
                enc_name: CBC_AES.to_owned(),
                enc_key: enc_key.clone(),
            },
        };
        IpsecKey {
            spi: self.id.get(),
            role,
            per_tunnel: self.per_tunnel,
            algorithm,
        }
    }

    pub fn info(&self, role: KeyRole, created_at: Timestamp, origin: &str) -> IpsecKeyInfo {
        let spec = self.spec();
        IpsecKeyInfo {
            spi: self.id.get(),
            role,
            algorithm: spec.algorithm.to_owned(),
            key_bits: spec.key_bits,
            icv_bits: spec.icv_bits,
            per_tunnel: self.per_tunnel,
            created_at,
            origin: origin.to_owned(),
        }
    }
}

/// The `cilium-ipsec-keys` Secret as YAML, with `data.keys` the base64 of [`CiliumKey::to_line`].
///
/// Rendered by hand into one pre-sized buffer so that no unzeroized copy of the key is left
/// behind; the namespace is a double-quoted YAML scalar, escaped, so any string is safe.
pub fn render_secret_yaml(key: &CiliumKey, namespace: &str) -> Zeroizing<String> {
    let line = key.to_line();
    let mut encoded = Zeroizing::new(vec![0u8; line.len().div_ceil(3) * 4]);
    // Invariant: `encoded` is exactly the padded base64 length of `line`, all encode_slice needs.
    let written = STANDARD
        .encode_slice(line.as_bytes(), &mut encoded[..])
        .expect("base64 buffer is sized for the line");

    let namespace = yaml_double_quoted(namespace);
    const HEAD: &str =
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: cilium-ipsec-keys\n  namespace: ";
    const MID: &str = "\ntype: Opaque\ndata:\n  keys: \"";
    const TAIL: &str = "\"\n";
    let capacity = HEAD.len() + namespace.len() + MID.len() + written + TAIL.len();
    let mut yaml = Zeroizing::new(String::with_capacity(capacity));
    yaml.push_str(HEAD);
    yaml.push_str(&namespace);
    yaml.push_str(MID);
    // Base64 output is ASCII, so each byte is one char.
    yaml.extend(encoded.iter().take(written).map(|&b| char::from(b)));
    yaml.push_str(TAIL);
    debug_assert_eq!(yaml.capacity(), capacity, "the Secret outgrew its buffer");
    yaml
}

/// `s` as a YAML double-quoted scalar. Escapes the quote, the backslash and everything YAML
/// would not keep verbatim (control characters, Unicode line separators, BOM, non-characters).
fn yaml_double_quoted(s: &str) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                // Every such character is in the Basic Multilingual Plane, so four digits do.
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_id(field: &str) -> Result<(KeyId, bool), IpsecError> {
    let (digits, per_tunnel) = match field.strip_suffix('+') {
        Some(digits) => (digits, true),
        None => (field, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IpsecError::InvalidKeyId);
    }
    // All digits: a parse failure can only be overflow, which is just another bad ID.
    let id = digits.parse::<u8>().map_err(|_| IpsecError::InvalidKeyId)?;
    Ok((KeyId::new(id)?, per_tunnel))
}

fn parse_icv(field: &str) -> Result<u16, IpsecError> {
    // Only a plain number is echoed back; anything else might be a misplaced key.
    let bits = field
        .parse::<u16>()
        .map_err(|_| IpsecError::InvalidIcv { found: None })?;
    match bits {
        96 | 128 => Ok(bits),
        256 => Err(IpsecError::IcvTooLongForKernel),
        other => Err(IpsecError::InvalidIcv { found: Some(other) }),
    }
}

/// `Some(name)` when `token` can be shown in an error: a short run of the characters kernel
/// algorithm names use, containing `(` (which key hex never does) and no run of 8 or more hex
/// digits (real names have at most 6, e.g. `c4309` in `rfc4309`), so that even a key with a stray
/// `(` pasted into this position stays hidden.
fn printable_name(token: &str) -> Option<String> {
    let charset = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'(' | b')' | b'-' | b'_' | b','));
    let longest_hex_run = token
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    let plausible = token.len() <= 64 && token.contains('(') && charset && longest_hex_run < 8;
    plausible.then(|| token.to_owned())
}

/// A failed hex field, before the expected length is attached.
struct HexFieldError {
    position: usize,
    field: &'static str,
    /// `Some(hex digits)` when the length is wrong, `None` when the digits are not hex.
    wrong_length: Option<usize>,
}

impl HexFieldError {
    fn expecting(self, expected: &'static str) -> IpsecError {
        let HexFieldError {
            position,
            field,
            wrong_length,
        } = self;
        match wrong_length {
            Some(actual) => IpsecError::KeyLength {
                position,
                field,
                expected,
                actual,
            },
            None => IpsecError::NotHex { position, field },
        }
    }
}

/// Decodes one hex key field (optionally `0x`-prefixed, as Cilium's v1.4 docs wrote it) whose
/// decoded length must satisfy `len_ok`. The bytes go straight into a zeroizing buffer.
fn decode_hex(
    field: &str,
    position: usize,
    name: &'static str,
    len_ok: impl Fn(usize) -> bool,
) -> Result<SecretBytes, HexFieldError> {
    let digits = field.strip_prefix("0x").unwrap_or(field);
    let fail = |wrong_length| HexFieldError {
        position,
        field: name,
        wrong_length,
    };
    if !digits.len().is_multiple_of(2) || !len_ok(digits.len() / 2) {
        return Err(fail(Some(digits.len())));
    }
    let mut bytes = Zeroizing::new(vec![0u8; digits.len() / 2]);
    // The hex crate's error names the offending character; it is dropped unread.
    hex::decode_to_slice(digits, &mut bytes[..]).map_err(|_| fail(None))?;
    // Moves the allocation (no copy) into SecretBytes, which zeroizes it on drop.
    Ok(SecretBytes::new(std::mem::take(&mut *bytes)))
}

/// Appends `bytes` as lower-case hex. Branch-free, so the time taken does not depend on the key.
fn push_hex(out: &mut String, bytes: &[u8]) {
    fn digit(nibble: u8) -> char {
        // For 10..=15, `9 - nibble` wraps to 0xf6..=0xff (top bit set) and the mask is 0xff, adding
        // 0x27 to go from ':' to 'a'; for 0..=9 the top bit is clear and nothing is added.
        let letters = 0u8.wrapping_sub(9u8.wrapping_sub(nibble) >> 7);
        let letter_offset = letters & 0x27;
        char::from(b'0' + nibble + letter_offset)
    }
    for &b in bytes {
        out.push(digit(b >> 4));
        out.push(digit(b & 0x0f));
    }
}

fn random(len: usize) -> Result<SecretBytes, IpsecError> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    getrandom::fill(&mut bytes[..]).map_err(IpsecError::Random)?;
    Ok(SecretBytes::new(std::mem::take(&mut *bytes)))
}

/// Bits in `len` bytes, saturating: lengths are bounded far below this by parsing and generation.
fn bits(len: usize) -> u16 {
    u16::try_from(len.saturating_mul(8)).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests;
