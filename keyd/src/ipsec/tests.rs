//! The Cilium key format and the per-tunnel derivation, against known lines and keys.

use super::*;

const GCM128_HEX: &str = "0123456789abcdef0123456789abcdefdeadbeef";
const AUTH_HEX: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const ENC_HEX: &str = "c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0";

fn id(n: u8) -> KeyId {
    KeyId::new(n).expect("valid test id")
}

fn gcm_line(id: &str, hex: &str, icv: &str) -> String {
    format!("{id} rfc4106(gcm(aes)) {hex} {icv}")
}

#[test]
fn key_id_range_is_1_to_15() {
    assert_eq!(KeyId::new(0), Err(IpsecError::KeyIdOutOfRange { id: 0 }));
    assert_eq!(KeyId::new(16), Err(IpsecError::KeyIdOutOfRange { id: 16 }));
    assert_eq!(KeyId::new(1).map(KeyId::get), Ok(1));
    assert_eq!(KeyId::new(15).map(KeyId::get), Ok(15));
    let err =
        CiliumKey::parse_line(&gcm_line("0+", GCM128_HEX, "128")).expect_err("must be rejected");
    assert_eq!(err, IpsecError::KeyIdOutOfRange { id: 0 });
    let err =
        CiliumKey::parse_line(&gcm_line("16", GCM128_HEX, "128")).expect_err("must be rejected");
    assert_eq!(err, IpsecError::KeyIdOutOfRange { id: 16 });
    for bad in ["+", "x+", "3++", "-1", "256", "3 +"] {
        let err =
            CiliumKey::parse_line(&gcm_line(bad, GCM128_HEX, "128")).expect_err("must be rejected");
        assert!(
            matches!(
                err,
                IpsecError::InvalidKeyId | IpsecError::UnsupportedAlgorithm { .. }
            ),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(
        CiliumKey::parse_line(&gcm_line("x+", GCM128_HEX, "128")),
        Err(IpsecError::InvalidKeyId)
    );
}

#[test]
fn key_id_next_wraps_after_15() {
    assert_eq!(id(1).next(), id(2));
    assert_eq!(id(14).next(), id(15));
    assert_eq!(id(15).next(), id(1));
}

#[test]
fn successor_rule() {
    assert!(id(4).is_successor_of(id(3)));
    assert!(id(15).is_successor_of(id(3)), "any higher ID is allowed");
    assert!(id(1).is_successor_of(id(15)), "15 wraps to 1");
    assert!(!id(3).is_successor_of(id(3)), "equal ID");
    assert!(!id(2).is_successor_of(id(3)), "lower ID");
    assert!(!id(1).is_successor_of(id(14)), "wrap only from 15");
    assert!(!id(2).is_successor_of(id(15)), "after 15 only 1");
    for c in 1..=15u8 {
        assert!(id(c).next().is_successor_of(id(c)), "next() of {c}");
    }
}

#[test]
fn generate_parse_round_trip_for_each_spec_with_and_without_plus() {
    for spec in [
        KeySpec::Gcm128,
        KeySpec::Gcm256,
        KeySpec::HmacSha256CbcAes256,
    ] {
        for per_tunnel in [true, false] {
            let key = CiliumKey::generate(id(3), spec, per_tunnel).unwrap();
            let line = key.to_line();
            assert_eq!(line.starts_with("3+ "), per_tunnel, "{spec:?}");
            assert!(!line.ends_with('\n'));
            let parsed = CiliumKey::parse_line(&line).expect("generated line parses");
            assert_eq!(parsed, key, "{spec:?} per_tunnel={per_tunnel}");
            assert_eq!(parsed.to_line(), line);
        }
    }
}

#[test]
fn generated_forms_match_the_specs() {
    let gcm128 = CiliumKey::generate(id(1), KeySpec::Gcm128, true).unwrap();
    let gcm256 = CiliumKey::generate(id(1), KeySpec::Gcm256, true).unwrap();
    let hmac = CiliumKey::generate(id(1), KeySpec::HmacSha256CbcAes256, true).unwrap();
    assert_eq!(
        gcm128.spec(),
        KeySpecDesc {
            algorithm: GCM,
            key_bits: 128,
            auth_key_bits: None,
            icv_bits: Some(128)
        }
    );
    assert_eq!(gcm256.spec().key_bits, 256);
    assert_eq!(
        hmac.spec(),
        KeySpecDesc {
            algorithm: "hmac(sha256) cbc(aes)",
            key_bits: 256,
            auth_key_bits: Some(256),
            icv_bits: None
        }
    );
    let KeyMaterial::Gcm { key, .. } = &gcm128.material else {
        panic!("gcm expected")
    };
    assert_eq!(key.len(), 20, "16-byte key + 4-byte salt");
    let KeyMaterial::Gcm { key, .. } = &gcm256.material else {
        panic!("gcm expected")
    };
    assert_eq!(key.len(), 36, "32-byte key + 4-byte salt");
    let again = CiliumKey::generate(id(1), KeySpec::Gcm128, true).unwrap();
    assert_ne!(
        again.material, gcm128.material,
        "fresh random bytes each time"
    );
}

#[test]
fn push_hex_matches_the_hex_crate_for_every_byte() {
    let all: Vec<u8> = (0..=255).collect();
    let mut out = String::new();
    push_hex(&mut out, &all);
    assert_eq!(out, hex::encode(&all));
}

#[test]
fn upper_case_hex_is_accepted_and_rendered_lower_case() {
    let upper = gcm_line("5+", &GCM128_HEX.to_uppercase(), "128");
    let key = CiliumKey::parse_line(&upper).expect("upper-case hex");
    assert_eq!(*key.to_line(), gcm_line("5+", GCM128_HEX, "128"));
    let mixed = format!(
        "7 hmac(sha256) {} cbc(aes) {ENC_HEX}",
        AUTH_HEX.to_uppercase()
    );
    let key = CiliumKey::parse_line(&mixed).expect("upper-case hmac hex");
    assert_eq!(
        *key.to_line(),
        format!("7 hmac(sha256) {AUTH_HEX} cbc(aes) {ENC_HEX}")
    );
}

#[test]
fn legacy_0x_prefix_and_surrounding_whitespace_are_accepted() {
    let line = format!("\n  3+ rfc4106(gcm(aes)) 0x{GCM128_HEX} 128 \r\n\n");
    let key = CiliumKey::parse_line(&line).expect("0x prefix and whitespace");
    assert_eq!(key.id, id(3));
    assert!(key.per_tunnel);
    assert_eq!(*key.to_line(), gcm_line("3+", GCM128_HEX, "128"));
}

#[test]
fn global_key_without_plus_is_accepted() {
    let key = CiliumKey::parse_line(&gcm_line("3", GCM128_HEX, "128")).expect("global key");
    assert!(!key.per_tunnel);
}

#[test]
fn icv_96_and_128_accepted_256_rejected_for_the_kernel() {
    for icv in [96u16, 128] {
        let key =
            CiliumKey::parse_line(&gcm_line("1+", GCM128_HEX, &icv.to_string())).expect("icv");
        assert_eq!(key.spec().icv_bits, Some(icv));
    }
    let err =
        CiliumKey::parse_line(&gcm_line("1+", GCM128_HEX, "256")).expect_err("must be rejected");
    assert_eq!(err, IpsecError::IcvTooLongForKernel);
    assert!(err.to_string().contains("kernel"), "{err}");
    assert_eq!(
        CiliumKey::parse_line(&gcm_line("1+", GCM128_HEX, "64")),
        Err(IpsecError::InvalidIcv { found: Some(64) })
    );
    assert_eq!(
        CiliumKey::parse_line(&gcm_line("1+", GCM128_HEX, "abc")),
        Err(IpsecError::InvalidIcv { found: None })
    );
}

#[test]
fn hmac_key_length_rules() {
    let short_auth = &AUTH_HEX[..30];
    let err = CiliumKey::parse_line(&format!("2+ hmac(sha256) {short_auth} cbc(aes) {ENC_HEX}"))
        .expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::KeyLength {
                position: 3,
                actual: 30,
                ..
            }
        ),
        "{err:?}"
    );
    let min_auth = &AUTH_HEX[..32];
    let key = CiliumKey::parse_line(&format!("2+ hmac(sha256) {min_auth} cbc(aes) {ENC_HEX}"))
        .expect("16-byte auth key");
    assert_eq!(key.spec().auth_key_bits, Some(128));
    let too_long = AUTH_HEX.repeat(3);
    let err = CiliumKey::parse_line(&format!("2+ hmac(sha256) {too_long} cbc(aes) {ENC_HEX}"))
        .expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::KeyLength {
                position: 3,
                actual: 192,
                ..
            }
        ),
        "{err:?}"
    );
    for enc_len in [32, 48, 64] {
        let line = format!(
            "2+ hmac(sha256) {AUTH_HEX} cbc(aes) {}",
            &ENC_HEX[..enc_len]
        );
        let key = CiliumKey::parse_line(&line).expect("AES-128/192/256");
        assert_eq!(usize::from(key.spec().key_bits), enc_len * 4);
    }
    let line = format!("2+ hmac(sha256) {AUTH_HEX} cbc(aes) {}", &ENC_HEX[..40]);
    let err = CiliumKey::parse_line(&line).expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::KeyLength {
                position: 5,
                actual: 40,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rotated_advances_the_id_and_keeps_the_form() {
    for spec in [
        KeySpec::Gcm128,
        KeySpec::Gcm256,
        KeySpec::HmacSha256CbcAes256,
    ] {
        let key = CiliumKey::generate(id(15), spec, true).unwrap();
        let next = key.rotated().unwrap();
        assert_eq!(next.id, id(1));
        assert!(next.per_tunnel);
        assert_eq!(next.spec(), key.spec());
        assert_ne!(next.material, key.material, "fresh bytes");
        assert_eq!(next.check_replaces(&key), Ok(()));
    }
    let icv96 = CiliumKey::parse_line(&gcm_line("4", GCM128_HEX, "96")).expect("icv 96");
    let next = icv96.rotated().unwrap();
    assert_eq!(
        (next.id, next.per_tunnel, next.spec().icv_bits),
        (id(5), true, Some(96)),
        "a global key rotates to a per-tunnel one"
    );
}

#[test]
fn check_replaces_enforces_the_id_rule() {
    let at = |n: u8| CiliumKey::generate(id(n), KeySpec::Gcm128, true).unwrap();
    assert_eq!(
        at(3).check_replaces(&at(3)),
        Err(IpsecError::NotSuccessor {
            prev: id(3),
            new: id(3)
        })
    );
    assert_eq!(
        at(2).check_replaces(&at(3)),
        Err(IpsecError::NotSuccessor {
            prev: id(3),
            new: id(2)
        })
    );
    assert_eq!(
        at(1).check_replaces(&at(14)),
        Err(IpsecError::NotSuccessor {
            prev: id(14),
            new: id(1)
        })
    );
    assert_eq!(at(1).check_replaces(&at(15)), Ok(()));
    assert_eq!(at(9).check_replaces(&at(3)), Ok(()));
    let msg = at(1)
        .check_replaces(&at(14))
        .expect_err("14 -> 1")
        .to_string();
    assert!(msg.contains("only 15 wraps to 1"), "{msg}");
    let msg = at(2)
        .check_replaces(&at(15))
        .expect_err("15 -> 2")
        .to_string();
    assert!(msg.contains("after 15 the IDs wrap to 1"), "{msg}");
}

#[test]
fn check_replaces_rejects_a_form_change() {
    let prev = CiliumKey::generate(id(3), KeySpec::Gcm128, true).unwrap();
    for new in [
        CiliumKey::generate(id(4), KeySpec::Gcm256, true).unwrap(),
        CiliumKey::generate(id(4), KeySpec::HmacSha256CbcAes256, true).unwrap(),
        CiliumKey::parse_line(&gcm_line("4+", GCM128_HEX, "96")).expect("icv 96"),
    ] {
        let err = new.check_replaces(&prev).expect_err("must be rejected");
        assert_eq!(
            err,
            IpsecError::FormChanged {
                prev: prev.spec(),
                new: new.spec()
            }
        );
    }
    let hmac = CiliumKey::generate(id(3), KeySpec::HmacSha256CbcAes256, true).unwrap();
    let shorter_auth = CiliumKey::parse_line(&format!(
        "4+ hmac(sha256) {} cbc(aes) {ENC_HEX}",
        &AUTH_HEX[..32]
    ))
    .expect("parses");
    assert!(matches!(
        shorter_auth.check_replaces(&hmac),
        Err(IpsecError::FormChanged { .. })
    ));
}

#[test]
fn check_replaces_allows_adding_plus_but_not_dropping_it() {
    let global = CiliumKey::generate(id(3), KeySpec::Gcm128, false).unwrap();
    let per_tunnel = CiliumKey::generate(id(4), KeySpec::Gcm128, true).unwrap();
    assert_eq!(per_tunnel.check_replaces(&global), Ok(()));
    let back = CiliumKey::generate(id(5), KeySpec::Gcm128, false).unwrap();
    assert_eq!(
        back.check_replaces(&per_tunnel),
        Err(IpsecError::PerTunnelDropped)
    );
}

#[test]
fn wrong_hex_length_is_rejected() {
    let err = CiliumKey::parse_line(&gcm_line("3+", &GCM128_HEX[..38], "128"))
        .expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::KeyLength {
                position: 3,
                actual: 38,
                ..
            }
        ),
        "{err:?}"
    );
    let odd = format!("{GCM128_HEX}a");
    let err = CiliumKey::parse_line(&gcm_line("3+", &odd, "128")).expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::KeyLength {
                position: 3,
                actual: 41,
                ..
            }
        ),
        "{err:?}"
    );
    // 24-byte AES + salt: the kernel has it, but keyd accepts only AES-128 and AES-256 GCM.
    let err = CiliumKey::parse_line(&gcm_line("3+", &"ab".repeat(28), "128"))
        .expect_err("must be rejected");
    assert!(
        matches!(err, IpsecError::KeyLength { actual: 56, .. }),
        "{err:?}"
    );
}

#[test]
fn non_hex_is_rejected() {
    let bad = GCM128_HEX.replacen('a', "g", 1);
    assert_eq!(
        CiliumKey::parse_line(&gcm_line("3+", &bad, "128")),
        Err(IpsecError::NotHex {
            position: 3,
            field: "AES key and salt"
        })
    );
    let bad_enc = ENC_HEX.replacen('c', "z", 1);
    let err = CiliumKey::parse_line(&format!("2 hmac(sha256) {AUTH_HEX} cbc(aes) {bad_enc}"))
        .expect_err("must be rejected");
    assert!(
        matches!(err, IpsecError::NotHex { position: 5, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_fields_are_rejected() {
    assert_eq!(
        CiliumKey::parse_line(&format!("3+ rfc4106(gcm(aes)) {GCM128_HEX}")),
        Err(IpsecError::MissingFields {
            found: 3,
            expected: 4,
            layout: AEAD_LAYOUT
        })
    );
    assert_eq!(
        CiliumKey::parse_line(&format!("3+ hmac(sha256) {AUTH_HEX} cbc(aes)")),
        Err(IpsecError::MissingFields {
            found: 4,
            expected: 5,
            layout: AUTH_ENC_LAYOUT
        })
    );
    assert!(matches!(
        CiliumKey::parse_line("3+"),
        Err(IpsecError::MissingFields { found: 1, .. })
    ));
    assert_eq!(CiliumKey::parse_line(" \n\t\n"), Err(IpsecError::Empty));
    assert_eq!(CiliumKey::parse_line(""), Err(IpsecError::Empty));
}

#[test]
fn extra_fields_are_rejected() {
    assert_eq!(
        CiliumKey::parse_line(&format!("3+ rfc4106(gcm(aes)) {GCM128_HEX} 128 extra")),
        Err(IpsecError::ExtraFields {
            found: 5,
            expected: 4,
            layout: AEAD_LAYOUT
        })
    );
    // Cilium's optional trailing IP on the auth/enc form is not supported.
    assert!(matches!(
        CiliumKey::parse_line(&format!(
            "3+ hmac(sha256) {AUTH_HEX} cbc(aes) {ENC_HEX} 10.0.0.1"
        )),
        Err(IpsecError::ExtraFields {
            found: 6,
            expected: 5,
            ..
        })
    ));
}

#[test]
fn unknown_algorithms_are_rejected_naming_the_supported_ones() {
    let err = CiliumKey::parse_line(&format!("3+ rfc4309(ccm(aes)) {GCM128_HEX} 128"))
        .expect_err("must be rejected");
    assert_eq!(
        err,
        IpsecError::UnsupportedAlgorithm {
            position: 2,
            expected: "`rfc4106(gcm(aes))` or `hmac(sha256)`",
            found: Some("rfc4309(ccm(aes))".into()),
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("rfc4309(ccm(aes))") && msg.contains("rfc4106(gcm(aes))"),
        "{msg}"
    );
    let err = CiliumKey::parse_line(&format!("3+ hmac(sha1) {AUTH_HEX} cbc(aes) {ENC_HEX}"))
        .expect_err("must be rejected");
    assert!(
        matches!(&err, IpsecError::UnsupportedAlgorithm { position: 2, found: Some(f), .. } if f == "hmac(sha1)"),
        "{err:?}"
    );
    let err = CiliumKey::parse_line(&format!(
        "3+ hmac(sha256) {AUTH_HEX} cbc(des3_ede) {ENC_HEX}"
    ))
    .expect_err("must be rejected");
    assert!(
        matches!(
            err,
            IpsecError::UnsupportedAlgorithm {
                position: 4,
                expected: "`cbc(aes)`",
                ..
            }
        ),
        "{err:?}"
    );
    let err = CiliumKey::parse_line(&format!("3+ RFC4106(GCM(AES)) {GCM128_HEX} 128"))
        .expect_err("must be rejected");
    assert!(
        matches!(err, IpsecError::UnsupportedAlgorithm { position: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn two_lines_are_rejected() {
    let two = format!(
        "{}\n{}\n",
        gcm_line("3+", GCM128_HEX, "128"),
        gcm_line("4+", GCM128_HEX, "128")
    );
    assert_eq!(
        CiliumKey::parse_line(&two),
        Err(IpsecError::MultipleLines { count: 2 })
    );
}

#[test]
fn errors_never_contain_key_hex() {
    let bad_char = GCM128_HEX.replacen('a', "g", 1);
    let lines = [
        gcm_line("3+", &GCM128_HEX[..38], "128"),
        gcm_line("3+", &bad_char, "128"),
        gcm_line("3+", GCM128_HEX, GCM128_HEX),
        gcm_line(GCM128_HEX, GCM128_HEX, "128"),
        gcm_line("99", GCM128_HEX, "128"),
        format!("3+ {GCM128_HEX} 128"),
        format!("3+ {GCM128_HEX} rfc4106(gcm(aes)) 128"),
        format!("3+ rfc4106(gcm(aes)) {GCM128_HEX} 128 {GCM128_HEX}"),
        format!("3+ rfc4106(gcm(aes)) {GCM128_HEX}"),
        format!("3+ hmac(sha256) {AUTH_HEX} {ENC_HEX} cbc(aes)"),
        format!("3+ hmac(sha256) {AUTH_HEX} cbc(aes) {}", &ENC_HEX[..40]),
        format!("3+ hmac(sha256) {} cbc(aes) {ENC_HEX}", &AUTH_HEX[..30]),
        format!(
            "{}\n{}",
            gcm_line("3+", GCM128_HEX, "128"),
            gcm_line("4+", GCM128_HEX, "128")
        ),
        format!("3+ {GCM128_HEX}(x) {GCM128_HEX} 128"),
        format!("3+ hmac(sha256) {AUTH_HEX} cbc({ENC_HEX}) {ENC_HEX}"),
    ];
    let secrets = [GCM128_HEX, &bad_char, AUTH_HEX, ENC_HEX];
    for line in &lines {
        let err = CiliumKey::parse_line(line).expect_err(line);
        let shown = format!("{err} | {err:?}").to_lowercase();
        for secret in secrets {
            // Any 8-digit run of a key is a leak, not only the whole field.
            for window in secret.as_bytes().windows(8) {
                let window = std::str::from_utf8(window).expect("ascii");
                assert!(
                    !shown.contains(window),
                    "error for {line:?} leaks {window}: {shown}"
                );
            }
        }
    }
}

#[test]
fn debug_never_contains_key_hex() {
    let gcm = CiliumKey::parse_line(&gcm_line("3+", GCM128_HEX, "128")).expect("parses");
    let hmac = CiliumKey::parse_line(&format!("3+ hmac(sha256) {AUTH_HEX} cbc(aes) {ENC_HEX}"))
        .expect("parses");
    for shown in [
        format!(
            "{gcm:?} {:?} {:?}",
            gcm.to_proto(KeyRole::Current),
            gcm.info(KeyRole::Current, Timestamp(0), "imported")
        ),
        format!("{hmac:?} {:?}", hmac.to_proto(KeyRole::Previous)),
    ] {
        for secret in [GCM128_HEX, AUTH_HEX, ENC_HEX] {
            assert!(!shown.to_lowercase().contains(&secret[..8]), "{shown}");
        }
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[test]
fn to_proto_and_info_use_the_kernel_names() {
    let gcm = CiliumKey::parse_line(&gcm_line("3+", GCM128_HEX, "96")).expect("parses");
    let proto = gcm.to_proto(KeyRole::Current);
    assert_eq!(
        (proto.spi, proto.role, proto.per_tunnel),
        (3, KeyRole::Current, true)
    );
    let IpsecAlgorithm::Aead {
        name,
        key,
        icv_bits,
    } = &proto.algorithm
    else {
        panic!("aead expected")
    };
    assert_eq!((name.as_str(), *icv_bits), ("rfc4106(gcm(aes))", 96));
    assert_eq!(hex::encode(key.expose()), GCM128_HEX);

    let hmac = CiliumKey::parse_line(&format!("7 hmac(sha256) {AUTH_HEX} cbc(aes) {ENC_HEX}"))
        .expect("parses");
    let proto = hmac.to_proto(KeyRole::Previous);
    let IpsecAlgorithm::AuthEnc {
        auth_name,
        auth_key,
        enc_name,
        enc_key,
    } = &proto.algorithm
    else {
        panic!("auth/enc expected")
    };
    assert_eq!(
        (auth_name.as_str(), enc_name.as_str()),
        ("hmac(sha256)", "cbc(aes)")
    );
    assert_eq!(
        (
            hex::encode(auth_key.expose()),
            hex::encode(enc_key.expose())
        ),
        (AUTH_HEX.into(), ENC_HEX.into())
    );

    let info = hmac.info(KeyRole::Previous, Timestamp(42), "generated");
    assert_eq!(
        info,
        IpsecKeyInfo {
            spi: 7,
            role: KeyRole::Previous,
            algorithm: "hmac(sha256) cbc(aes)".into(),
            key_bits: 256,
            icv_bits: None,
            per_tunnel: false,
            created_at: Timestamp(42),
            origin: "generated".into(),
        }
    );
    assert_eq!(
        gcm.info(KeyRole::Current, Timestamp(1), "imported")
            .key_bits,
        128
    );
}

#[test]
fn secret_yaml_parses_and_round_trips() {
    for spec in [
        KeySpec::Gcm128,
        KeySpec::Gcm256,
        KeySpec::HmacSha256CbcAes256,
    ] {
        let key = CiliumKey::generate(id(3), spec, true).unwrap();
        let yaml = render_secret_yaml(&key, DEFAULT_NAMESPACE);
        let doc: serde_json::Value = serde_norway::from_str(&yaml).expect("valid YAML");
        assert_eq!(doc["apiVersion"], "v1");
        assert_eq!(doc["kind"], "Secret");
        assert_eq!(doc["type"], "Opaque");
        assert_eq!(doc["metadata"]["name"], SECRET_NAME);
        assert_eq!(doc["metadata"]["namespace"], "kube-system");
        let encoded = doc["data"][SECRET_DATA_KEY]
            .as_str()
            .expect("data.keys is a string");
        let decoded = STANDARD.decode(encoded).expect("base64");
        assert_eq!(decoded, key.to_line().as_bytes());
        let line = String::from_utf8(decoded).expect("utf-8");
        assert_eq!(CiliumKey::parse_line(&line), Ok(key));
    }
}

#[test]
fn secret_yaml_quotes_any_namespace() {
    let key = CiliumKey::generate(id(1), KeySpec::Gcm128, true).unwrap();
    for namespace in [
        "cilium",
        "a\"b\\c",
        "x\ny: z",
        "tab\there",
        "#not-a-comment",
        "\u{2028}\u{0}é",
    ] {
        let yaml = render_secret_yaml(&key, namespace);
        let doc: serde_json::Value = serde_norway::from_str(&yaml).expect("valid YAML");
        assert_eq!(doc["metadata"]["namespace"], namespace, "{}", *yaml);
        assert_eq!(
            doc["metadata"].as_object().map(|m| m.len()),
            Some(2),
            "{}",
            *yaml
        );
    }
}
