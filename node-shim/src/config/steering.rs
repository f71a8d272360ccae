//! `[steering]`: the eBPF program that decides, per packet from a local pod, whether it must be
//! encrypted (see `bpf/steer.c` and [`crate::steering`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use keyd_mtls::ConfigError;

use crate::kernel::ebpf::AttachMode;
use crate::steering::Marks;

/// Which cross-node pod traffic node-shim encrypts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encrypt {
    /// Every packet between pods of different nodes (routes and XFRM policies do it; the
    /// program, when attached, only counts and enforces `strict`).
    All,
    /// Only what an EncryptionPolicy covers, steered by the program with a mark.
    Policy,
}

impl Encrypt {
    /// As configured and reported (`/status`, keyd's data-plane reports).
    pub fn as_str(self) -> &'static str {
        match self {
            Encrypt::All => "all",
            Encrypt::Policy => "policy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteeringSettings {
    pub encrypt: Encrypt,
    /// The devices local pods send on (the host side of their veths, or their bridge): exact
    /// names, or a prefix ending in `*`. Empty: no program (only `encrypt = "all"`).
    pub devices: Vec<String>,
    /// `all` mode: a cross-node pod packet to a peer whose tunnel is not programmed is dropped
    /// instead of going out in the clear (policies carry their own `strict`).
    pub strict: bool,
    pub attach: AttachMode,
    /// A folder on a bpffs: maps and links are pinned there so that a restart keeps them.
    pub pin_dir: Option<PathBuf>,
    /// cls_bpf priority on kernels without TCX (this and the next one are used).
    pub filter_priority: u16,
    pub marks: Marks,
    /// Policy mode, WireGuard: the routing table for marked packets (routes to the peers' pod
    /// CIDRs through the WireGuard device), and the priority of the rules that send marked
    /// packets there (a second rule one lower blackholes marked packets the table has no route
    /// for, so they are never sent in the clear).
    pub route_table: u32,
    pub rule_priority: u32,
    /// How often the counters are reported to keyd (they are exported every second).
    pub report_interval: Duration,
}

impl SteeringSettings {
    pub fn enabled(&self) -> bool {
        !self.devices.is_empty()
    }

    /// Whether `name` is one of `devices`.
    pub fn matches(&self, name: &str) -> bool {
        self.devices.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }
}

pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/keyd-node-shim";
/// Policy mode's routing table and rule priority ("ke" in ASCII, like the reqid).
pub const DEFAULT_STEERING_TABLE: u32 = 0x6b65;
pub const DEFAULT_FILTER_PRIORITY: u16 = 0x6b00;
/// Clear of Cilium (0xFF00 and the bits from 16 up), kube-proxy (0x4000, 0x8000) and
/// node-shim's own IPsec peer index (bits 16-29).
pub const DEFAULT_MARKS: Marks = Marks {
    mask: 0xf0,
    wireguard: 0x10,
    ipsec: 0x20,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSteering {
    pub encrypt: Option<String>,
    pub devices: Option<Vec<String>>,
    pub strict: Option<bool>,
    pub attach: Option<String>,
    /// `""` turns pinning off.
    pub pin_dir: Option<PathBuf>,
    pub filter_priority: Option<u16>,
    pub mark_mask: Option<u32>,
    pub mark_wireguard: Option<u32>,
    pub mark_ipsec: Option<u32>,
    pub route_table: Option<u32>,
    pub rule_priority: Option<u32>,
    pub report_interval: Option<String>,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

pub fn validate(raw: RawSteering, ipsec_mark_mask: u32) -> Result<SteeringSettings, ConfigError> {
    let encrypt = match raw.encrypt.as_deref() {
        None | Some("all") => Encrypt::All,
        Some("policy") => Encrypt::Policy,
        Some(other) => {
            return Err(err(
                "steering.encrypt",
                format!("{other:?} is not \"all\" or \"policy\""),
            ));
        }
    };
    let devices = raw.devices.unwrap_or_default();
    for (i, d) in devices.iter().enumerate() {
        let name = d.strip_suffix('*').unwrap_or(d);
        if name.is_empty() && d != "*" || name.len() > 15 || name.contains(['*', '/', ' ']) {
            return Err(err(
                &format!("steering.devices[{i}]"),
                format!("{d:?} is not a device name or a prefix ending in '*'"),
            ));
        }
    }
    if encrypt == Encrypt::Policy && devices.is_empty() {
        return Err(err(
            "steering.devices",
            "encrypt = \"policy\" needs the devices local pods send on (e.g. [\"lxc*\"])",
        ));
    }
    let attach = match raw.attach.as_deref() {
        None | Some("auto") => AttachMode::Auto,
        Some("tcx") => AttachMode::Tcx,
        Some("netlink") => AttachMode::Netlink,
        Some(other) => {
            return Err(err(
                "steering.attach",
                format!("{other:?} is not \"auto\", \"tcx\" or \"netlink\""),
            ));
        }
    };
    let pin_dir = match raw.pin_dir {
        None => Some(PathBuf::from(DEFAULT_PIN_DIR)),
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) if p.is_absolute() => Some(p),
        Some(p) => {
            return Err(err(
                "steering.pin_dir",
                format!("{} is not an absolute path", p.display()),
            ));
        }
    };
    let marks = Marks {
        mask: raw.mark_mask.unwrap_or(DEFAULT_MARKS.mask),
        wireguard: raw.mark_wireguard.unwrap_or(DEFAULT_MARKS.wireguard),
        ipsec: raw.mark_ipsec.unwrap_or(DEFAULT_MARKS.ipsec),
    };
    if marks.mask & ipsec_mark_mask != 0 {
        return Err(err(
            "steering.mark_mask",
            format!(
                "{:#x} overlaps ipsec.mark_mask {ipsec_mark_mask:#x}",
                marks.mask
            ),
        ));
    }
    for (field, v) in [
        ("steering.mark_wireguard", marks.wireguard),
        ("steering.mark_ipsec", marks.ipsec),
    ] {
        if v == 0 || v & !marks.mask != 0 {
            return Err(err(
                field,
                format!(
                    "{v:#x} must be non-zero and inside mark_mask {:#x}",
                    marks.mask
                ),
            ));
        }
    }
    if marks.wireguard == marks.ipsec {
        return Err(err(
            "steering.mark_ipsec",
            "must differ from mark_wireguard",
        ));
    }
    let route_table = raw.route_table.unwrap_or(DEFAULT_STEERING_TABLE);
    if matches!(route_table, 0 | 253..=255) {
        return Err(err(
            "steering.route_table",
            "must not be 0 or a reserved table (253 default, 254 main, 255 local)",
        ));
    }
    let rule_priority = raw.rule_priority.unwrap_or(DEFAULT_STEERING_TABLE);
    if rule_priority == 0 || rule_priority >= 32766 {
        return Err(err(
            "steering.rule_priority",
            "must be between 1 and 32765 (before the main table's rule)",
        ));
    }
    let report_interval = super::duration::bounded_duration(
        "steering.report_interval",
        raw.report_interval.as_deref(),
        DEFAULT_REPORT_INTERVAL,
        Duration::from_secs(1)..=Duration::from_secs(3600),
    )?;
    Ok(SteeringSettings {
        encrypt,
        report_interval,
        strict: raw.strict.unwrap_or(true),
        devices,
        attach,
        pin_dir,
        filter_priority: raw.filter_priority.unwrap_or(DEFAULT_FILTER_PRIORITY),
        marks,
        route_table,
        rule_priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut RawSteering)) -> RawSteering {
        let mut r = RawSteering::default();
        f(&mut r);
        r
    }

    #[test]
    fn defaults_are_all_mode_without_a_program() {
        let s = validate(RawSteering::default(), 0x3fff_0000).unwrap();
        assert_eq!(s.encrypt, Encrypt::All);
        assert!(!s.enabled());
        assert!(s.strict);
        assert_eq!(s.marks, DEFAULT_MARKS);
        assert_eq!(s.report_interval, DEFAULT_REPORT_INTERVAL);
        assert_eq!(
            s.pin_dir.as_deref(),
            Some(std::path::Path::new(DEFAULT_PIN_DIR))
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(&str, RawSteering)> = vec![
            ("steering.encrypt", raw(|r| r.encrypt = Some("some".into()))),
            (
                "steering.devices",
                raw(|r| r.encrypt = Some("policy".into())),
            ),
            (
                "steering.devices[1]",
                raw(|r| r.devices = Some(vec!["lxc*".into(), "a*b".into()])),
            ),
            ("steering.attach", raw(|r| r.attach = Some("xdp".into()))),
            (
                "steering.pin_dir",
                raw(|r| r.pin_dir = Some("rel/dir".into())),
            ),
            ("steering.mark_mask", raw(|r| r.mark_mask = Some(0x1_0000))),
            (
                "steering.mark_wireguard",
                raw(|r| r.mark_wireguard = Some(0x100)),
            ),
            ("steering.mark_ipsec", raw(|r| r.mark_ipsec = Some(0x10))),
            ("steering.route_table", raw(|r| r.route_table = Some(254))),
            (
                "steering.rule_priority",
                raw(|r| r.rule_priority = Some(40000)),
            ),
            (
                "steering.report_interval",
                raw(|r| r.report_interval = Some("500ms".into())),
            ),
            (
                "steering.report_interval",
                raw(|r| r.report_interval = Some("often".into())),
            ),
        ];
        for (field, r) in cases {
            let e = validate(r, 0x3fff_0000).expect_err(field);
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn device_patterns_match_by_name_or_prefix() {
        let s = validate(
            raw(|r| {
                r.encrypt = Some("policy".into());
                r.devices = Some(vec!["lxc*".into(), "cni0".into()]);
                r.pin_dir = Some(PathBuf::new());
            }),
            0,
        )
        .unwrap();
        assert!(s.enabled() && s.pin_dir.is_none());
        assert!(s.matches("lxc1234") && s.matches("cni0"));
        assert!(!s.matches("cni01") && !s.matches("eth0"));
    }
}
