//! The transit engine (`/v1/<mount>/...`): keys with versions, data keys, encrypt, decrypt
//! and rewrap, with Vault's ciphertext format and its HKDF key derivation.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::StatusCode;
use serde_json::{Value, json};

use super::http::{Reply, bad, envelope, errors, no_content, no_route};
use super::state::{State, TransitKey, ns_mut, random_bytes, random_key, unix_now};

const MISSING_CONTEXT: &str = "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key";

/// A request to a transit mount; every plaintext it sees is recorded for the tests' log
/// searches.
pub fn handle(
    st: &mut State,
    ns: &str,
    method: &str,
    mount: &str,
    rest: &[&str],
    req: &Value,
) -> Reply {
    let write = matches!(method, "POST" | "PUT");
    let keys = ns_mut(st, ns).transit.get_mut(mount).expect("mount exists");
    let reply: Result<Value, Reply> = match (method, rest) {
        (_, ["keys", name]) if write => return create_key(keys, name, req),
        ("GET", ["keys", name]) => match keys.get(*name) {
            Some(k) => Ok(key_info(name, k)),
            None => return errors(StatusCode::NOT_FOUND, ""),
        },
        ("DELETE", ["keys", name]) => return delete_key(keys, name),
        (_, ["keys", name, "config"]) if write => match keys.get_mut(*name) {
            None => return bad(&format!("no existing key named {name} could be found")),
            Some(k) => configure_key(k, req).map(|()| key_info(name, k)),
        },
        (_, ["keys", name, "rotate"]) if write => match keys.get_mut(*name) {
            None => return bad(&format!("no existing key named {name} could be found")),
            Some(k) => {
                k.versions.push((random_key(), unix_now()));
                Ok(key_info(name, k))
            }
        },
        (_, ["datakey", kind, name]) if write => datakey(keys, kind, name, req),
        (_, ["encrypt", name]) if write => {
            if !keys.contains_key(*name) {
                // The upsert (the caller had `create`): derived iff a context is given.
                keys.insert(
                    (*name).to_owned(),
                    new_key(!req["context"].as_str().unwrap_or("").is_empty()),
                );
            }
            let k = &keys[*name];
            match STANDARD.decode(req["plaintext"].as_str().unwrap_or("")) {
                Err(_) => return bad("failed to base64-decode plaintext"),
                Ok(pt) => encrypt(k, req, &pt)
                    .map(|(ct, v)| json!({ "ciphertext": ct, "key_version": v })),
            }
        }
        (_, ["decrypt", name]) if write => with_ciphertext(keys, name, req, |k, ct| {
            decrypt(k, req, ct).map(|pt| json!({ "plaintext": STANDARD.encode(pt) }))
        }),
        (_, ["rewrap", name]) if write => with_ciphertext(keys, name, req, |k, ct| {
            decrypt(k, req, ct)
                .and_then(|pt| encrypt(k, req, &pt))
                .map(|(ct, v)| json!({ "ciphertext": ct, "key_version": v }))
        }),
        _ => return no_route(&format!("{mount}/{}", rest.join("/"))),
    };
    match reply {
        Ok(data) => {
            for field in [&data["plaintext"], &req["plaintext"]] {
                if let Some(p) = field.as_str().and_then(|p| STANDARD.decode(p).ok()) {
                    st.plaintexts.push(p);
                }
            }
            (StatusCode::OK, envelope(st, data))
        }
        Err(e) => e,
    }
}

/// A new key with one version.
fn new_key(derived: bool) -> TransitKey {
    TransitKey {
        derived,
        versions: vec![(random_key(), unix_now())],
        min_decryption_version: 1,
        min_encryption_version: 0,
        deletion_allowed: false,
    }
}

/// `keys/:name`: creates the key if it does not exist (only `aes256-gcm96`).
fn create_key(keys: &mut HashMap<String, TransitKey>, name: &str, req: &Value) -> Reply {
    let kind = req["type"].as_str().unwrap_or("aes256-gcm96");
    if kind != "aes256-gcm96" {
        return bad(&format!(
            "unknown key type {kind} (this test double models aes256-gcm96 only)"
        ));
    }
    keys.entry(name.to_owned())
        .or_insert_with(|| new_key(req["derived"].as_bool().unwrap_or(false)));
    no_content()
}

/// `DELETE keys/:name`: only once the key's config allows deletion.
fn delete_key(keys: &mut HashMap<String, TransitKey>, name: &str) -> Reply {
    match keys.get(name) {
        None => no_content(),
        Some(k) if !k.deletion_allowed => bad(&format!(
            "error deleting policy {name}: deletion is not allowed for this key"
        )),
        Some(_) => {
            keys.remove(name);
            no_content()
        }
    }
}

/// `keys/:name/config`: the minimum versions and `deletion_allowed`.
fn configure_key(k: &mut TransitKey, req: &Value) -> Result<(), Reply> {
    if let Some(v) = req["min_decryption_version"].as_u64() {
        if v as usize > k.versions.len() {
            return Err(bad(&format!(
                "cannot set min decryption version of {v}, latest key version is {}",
                k.versions.len()
            )));
        }
        k.min_decryption_version = v.max(1);
    }
    if let Some(v) = req["min_encryption_version"].as_u64() {
        if v > 0 && v < k.min_decryption_version {
            return Err(bad(
                "min encryption version must be 0 or greater than or equal to min decryption version",
            ));
        }
        k.min_encryption_version = v;
    }
    if let Some(v) = req["deletion_allowed"].as_bool() {
        k.deletion_allowed = v;
    }
    Ok(())
}

/// `datakey/{plaintext,wrapped}/:name`: a fresh random key, encrypted (and shown, for
/// `plaintext`).
fn datakey(
    keys: &HashMap<String, TransitKey>,
    kind: &str,
    name: &str,
    req: &Value,
) -> Result<Value, Reply> {
    let plaintext = match kind {
        "plaintext" => true,
        "wrapped" => false,
        _ => return Err(bad("Invalid path, must be 'plaintext' or 'wrapped'")),
    };
    let bits = req["bits"].as_u64().unwrap_or(256);
    let len = match bits {
        128 => 16,
        256 => 32,
        512 => 64,
        _ => return Err(bad("invalid bit length")),
    };
    let Some(k) = keys.get(name) else {
        return Err(bad("encryption key not found"));
    };
    let dk = random_bytes(len);
    encrypt(k, req, &dk).map(|(ct, v)| {
        let mut out = json!({ "ciphertext": ct, "key_version": v });
        if plaintext {
            out["plaintext"] = json!(STANDARD.encode(&dk));
        }
        out
    })
}

/// `decrypt/:name` and `rewrap/:name`: the key and a non-empty ciphertext, then `op`.
fn with_ciphertext(
    keys: &HashMap<String, TransitKey>,
    name: &str,
    req: &Value,
    op: impl FnOnce(&TransitKey, &str) -> Result<Value, Reply>,
) -> Result<Value, Reply> {
    let Some(k) = keys.get(name) else {
        return Err(bad("encryption key not found"));
    };
    let ct = req["ciphertext"].as_str().unwrap_or("");
    if ct.is_empty() {
        return Err(bad("missing ciphertext to decrypt"));
    }
    op(k, ct)
}

fn key_info(name: &str, k: &TransitKey) -> Value {
    let versions: serde_json::Map<String, Value> = k
        .versions
        .iter()
        .enumerate()
        .map(|(i, (_, t))| ((i + 1).to_string(), json!(t)))
        .collect();
    json!({
        "name": name, "type": "aes256-gcm96", "derived": k.derived, "kdf": if k.derived { "hkdf_sha256" } else { "" },
        "keys": versions, "latest_version": k.versions.len(),
        "min_decryption_version": k.min_decryption_version,
        "min_encryption_version": k.min_encryption_version,
        "deletion_allowed": k.deletion_allowed, "exportable": false,
        "supports_encryption": true, "supports_decryption": true, "supports_derivation": true,
        "supports_signing": false, "imported": false
    })
}

/// The key for `version` under `context` (Vault's `hkdf_sha256` KDF for derived keys).
fn version_key(k: &TransitKey, version: usize, context: &[u8]) -> Result<[u8; 32], Reply> {
    let raw = k.versions[version - 1].0;
    if !k.derived {
        return Ok(raw);
    }
    if context.is_empty() {
        return Err(bad(MISSING_CONTEXT));
    }
    let mut out = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, &raw)
        .expand(context, &mut out)
        .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "key derivation failed"))?;
    Ok(out)
}

fn context_of(req: &Value) -> Result<Vec<u8>, Reply> {
    STANDARD
        .decode(req["context"].as_str().unwrap_or(""))
        .map_err(|_| bad("failed to base64-decode context"))
}

fn encrypt(k: &TransitKey, req: &Value, plaintext: &[u8]) -> Result<(String, usize), Reply> {
    let latest = k.versions.len();
    let version = match req["key_version"].as_u64().unwrap_or(0) as usize {
        0 => latest,
        v if v > latest => {
            return Err(bad(
                "requested version for encryption is higher than the latest key version",
            ));
        }
        v => v,
    };
    if (version as u64) < k.min_encryption_version {
        return Err(bad(
            "requested version for encryption is less than the minimum encryption key version",
        ));
    }
    let key = version_key(k, version, &context_of(req)?)?;
    let nonce = random_bytes(12);
    let ct = Aes256Gcm::new(&key.into())
        .encrypt(
            &Nonce::try_from(nonce.as_slice())
                .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "nonce"))?,
            Payload {
                msg: plaintext,
                aad: b"",
            },
        )
        .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "encryption failed"))?;
    let mut blob = nonce;
    blob.extend_from_slice(&ct);
    Ok((
        format!("vault:v{version}:{}", STANDARD.encode(blob)),
        version,
    ))
}

fn decrypt(k: &TransitKey, req: &Value, ciphertext: &str) -> Result<Vec<u8>, Reply> {
    let Some(rest) = ciphertext.strip_prefix("vault:v") else {
        return Err(bad("invalid ciphertext: no prefix"));
    };
    let Some((version, b64)) = rest.split_once(':') else {
        return Err(bad("invalid ciphertext: wrong number of fields"));
    };
    let Ok(mut version) = version.parse::<usize>() else {
        return Err(bad(
            "invalid ciphertext: version number could not be decoded",
        ));
    };
    if version == 0 {
        version = 1;
    }
    if version > k.versions.len() {
        return Err(bad("invalid ciphertext: version is too new"));
    }
    if k.min_decryption_version > 0 && (version as u64) < k.min_decryption_version {
        return Err(bad(
            "ciphertext or signature version is disallowed by policy (too old)",
        ));
    }
    let Ok(blob) = STANDARD.decode(b64) else {
        return Err(bad("invalid ciphertext: could not decode base64"));
    };
    let key = version_key(k, version, &context_of(req)?)?;
    if blob.len() < 12 {
        return Err(bad("invalid ciphertext length"));
    }
    let (nonce, ct) = blob.split_at(12);
    Aes256Gcm::new(&key.into())
        .decrypt(
            &Nonce::try_from(nonce).map_err(|_| bad("invalid ciphertext length"))?,
            Payload { msg: ct, aad: b"" },
        )
        .map_err(|_| bad("cipher: message authentication failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_bind_the_context_and_versions_are_policed() {
        let mut k = TransitKey {
            derived: true,
            versions: vec![(random_key(), 0)],
            min_decryption_version: 1,
            min_encryption_version: 0,
            deletion_allowed: false,
        };
        let ctx = |c: &str| json!({ "context": STANDARD.encode(c) });
        let (ct, v) = encrypt(&k, &ctx("a"), b"secret").unwrap();
        assert_eq!(v, 1);
        assert!(ct.starts_with("vault:v1:"));
        assert_eq!(decrypt(&k, &ctx("a"), &ct).unwrap(), b"secret");
        let err = decrypt(&k, &ctx("b"), &ct).unwrap_err();
        assert_eq!(err.1["errors"][0], "cipher: message authentication failed");
        let err = decrypt(&k, &json!({}), &ct).unwrap_err();
        assert_eq!(err.1["errors"][0], MISSING_CONTEXT);
        k.versions.push((random_key(), 0));
        k.min_decryption_version = 2;
        let err = decrypt(&k, &ctx("a"), &ct).unwrap_err();
        assert_eq!(
            err.1["errors"][0],
            "ciphertext or signature version is disallowed by policy (too old)"
        );
    }
}
