//! node-shim's configuration: a TOML file, then `NODE_SHIM_*` environment variables, validated
//! completely before any socket opens or the kernel is touched. An invalid field exits with status
//! 64 and names the field. Tests feed the environment as a map, never the process environment.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use duration::{bounded_duration, duration};

mod duration;
mod steering;
pub use steering::{
    DEFAULT_MARKS, DEFAULT_PIN_DIR, DEFAULT_STEERING_TABLE, Encrypt, RawSteering, SteeringSettings,
};

/// The WireGuard port Cilium uses, and ours by default.
pub const DEFAULT_WG_PORT: u16 = 51871;
pub const DEFAULT_WG_DEVICE: &str = "keyd-wg0";
/// Tags node-shim's XFRM states and policies: what carries it is ours, nothing else is touched.
pub const DEFAULT_REQID: u32 = 0x6b65;
/// Mark bits that tell inbound states of different peers apart (bits 16..29: up to 16383 peers;
/// clear of kube-proxy's 0x4000/0x8000).
pub const DEFAULT_MARK_MASK: u32 = 0x3fff_0000;
/// Seconds. Besides keeping NAT mappings, a keepalive makes a newly added peer handshake at once
/// (the kernel sends one when the interval is set), so a peer that rotated its keypair is
/// reached as soon as this node learns the new key, rather than after WireGuard's 5 s retry.
pub const DEFAULT_KEEPALIVE: u16 = 25;
/// Cilium's replay window.
pub const DEFAULT_REPLAY_WINDOW: u32 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Wireguard,
    Ipsec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WgBackend {
    /// The kernel module if the kernel has it, boringtun otherwise.
    Auto,
    Kernel,
    /// boringtun over a TUN device, in this process.
    Userspace,
}

/// How node-shim proves who it is to keyd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// A certificate the cluster provisioned (URI SAN `spiffe://keyd/node/NAME`).
    Static { cert: PathBuf, key: PathBuf },
    /// A projected ServiceAccount token exchanged at keyd's bootstrap endpoint for a short-lived
    /// certificate, renewed at two thirds of its lifetime.
    Bootstrap {
        /// `https://HOST:PORT` of keyd's bootstrap listener (server-authenticated TLS only).
        server: String,
        token_path: PathBuf,
        /// Where the issued certificate and its key are written (mode 0600; tmpfs advised).
        cert_dir: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeydSettings {
    /// `https://HOST:PORT` of keyd's mTLS API.
    pub server: String,
    /// The CA that issued keyd's server certificate.
    pub ca: PathBuf,
    pub identity: IdentitySource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgSettings {
    pub device: String,
    pub listen_port: u16,
    /// The port other nodes listen on (the cluster uses one port).
    pub peer_port: u16,
    pub fwmark: u32,
    pub backend: WgBackend,
    /// Where to keep the private key across restarts of the node. Unset (the default), the key
    /// lives only in the kernel and in zeroized memory; a restarted node-shim reads it back from
    /// the kernel device.
    pub private_key_file: Option<PathBuf>,
    pub route_table: u32,
    pub route_metric: u32,
    /// Seconds, 0 for none (default 25, see [`DEFAULT_KEEPALIVE`]).
    pub persistent_keepalive: u16,
    /// Generate a new keypair when the current one is this old (unset: only on request, SIGUSR1).
    pub keypair_max_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecSettings {
    pub reqid: u32,
    pub replay_window: u32,
    pub mark_mask: u32,
    /// The device ESP from peers arrives on; found from `endpoint` when unset.
    pub underlay_device: Option<String>,
    /// How long a new key's states must have been installed here before outbound traffic moves
    /// to it, unless keyd's bundle already made it outbound before this node saw it. Gives the
    /// peers time to install the same key (default: two poll intervals).
    pub outbound_switch_delay: Duration,
    pub policy_priority: u32,
    /// Inbound and forward policies require ESP: plaintext from a peer's pod CIDR to a local pod
    /// is dropped. `false` makes the templates optional (Cilium's choice).
    pub require_inbound_esp: bool,
    /// tc filter priority of the per-peer mark filters (identifies them as ours).
    pub filter_priority: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    /// This node's address: WireGuard endpoint and outer address of ESP.
    pub endpoint: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub mode: Mode,
    pub poll_interval: Duration,
    /// Long polls: keyd answers as soon as the bundle changes, waiting at most this long
    /// (`None`: plain polling every `poll_interval`).
    pub long_poll: Option<Duration>,
    /// The kernel is compared with the last bundle at least this often, also while nothing
    /// changes, so that state removed behind node-shim's back is put back.
    pub resync_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub ops_listen: Option<SocketAddr>,
    pub boot_id_path: PathBuf,
    pub keyd: KeydSettings,
    pub wireguard: WgSettings,
    pub ipsec: IpsecSettings,
    pub steering: SteeringSettings,
    pub log_level: String,
    pub log_json: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_name: Option<String>,
    pub endpoint: Option<String>,
    pub pod_cidrs: Option<Vec<String>>,
    pub mode: Option<String>,
    pub poll_interval: Option<String>,
    /// `"30s"` (default), or `"off"` to poll every `poll_interval`.
    pub long_poll: Option<String>,
    pub resync_interval: Option<String>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
    pub ops_listen: Option<String>,
    pub boot_id_path: Option<PathBuf>,
    #[serde(default)]
    pub keyd: RawKeyd,
    #[serde(default)]
    pub wireguard: RawWireguard,
    #[serde(default)]
    pub ipsec: RawIpsec,
    #[serde(default)]
    pub steering: RawSteering,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyd {
    pub server: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub bootstrap: Option<RawBootstrap>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootstrap {
    pub server: Option<String>,
    pub token_path: Option<PathBuf>,
    pub cert_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWireguard {
    pub device: Option<String>,
    pub listen_port: Option<u16>,
    pub peer_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub backend: Option<String>,
    pub private_key_file: Option<PathBuf>,
    pub route_table: Option<u32>,
    pub route_metric: Option<u32>,
    pub persistent_keepalive: Option<u16>,
    pub keypair_max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpsec {
    pub reqid: Option<u32>,
    pub replay_window: Option<u32>,
    pub mark_mask: Option<u32>,
    pub underlay_device: Option<String>,
    pub outbound_switch_delay: Option<String>,
    pub policy_priority: Option<u32>,
    pub require_inbound_esp: Option<bool>,
    pub filter_priority: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

pub use keyd_mtls::ConfigError;

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

/// The environment variables read, and the field each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("NODE_SHIM_NODE_NAME", "node_name"),
    ("NODE_SHIM_ENDPOINT", "endpoint"),
    ("NODE_SHIM_POD_CIDRS", "pod_cidrs (comma-separated)"),
    ("NODE_SHIM_MODE", "mode"),
    ("NODE_SHIM_POLL_INTERVAL", "poll_interval"),
    ("NODE_SHIM_OPS_LISTEN", "ops_listen"),
    ("NODE_SHIM_KEYD_SERVER", "keyd.server"),
    ("NODE_SHIM_LOG_LEVEL", "log.level"),
    ("NODE_SHIM_ENCRYPT", "steering.encrypt"),
    (
        "NODE_SHIM_STEERING_DEVICES",
        "steering.devices (comma-separated)",
    ),
];

impl RawConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| err("config file", e.message().to_owned()))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Applies `NODE_SHIM_*` variables from `env` (only those in [`ENV_VARS`]).
    pub fn apply_env(&mut self, env: &HashMap<String, String>) {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("NODE_SHIM_NODE_NAME") {
            self.node_name = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_ENDPOINT") {
            self.endpoint = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_POD_CIDRS") {
            self.pod_cidrs = Some(v.split(',').map(|s| s.trim().to_owned()).collect());
        }
        if let Some(v) = get("NODE_SHIM_MODE") {
            self.mode = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_POLL_INTERVAL") {
            self.poll_interval = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_OPS_LISTEN") {
            self.ops_listen = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_KEYD_SERVER") {
            self.keyd.server = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_LOG_LEVEL") {
            self.log.level = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_ENCRYPT") {
            self.steering.encrypt = Some(v);
        }
        if let Some(v) = get("NODE_SHIM_STEERING_DEVICES") {
            self.steering.devices = Some(v.split(',').map(|s| s.trim().to_owned()).collect());
        }
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        let node_name = self
            .node_name
            .ok_or_else(|| err("node_name", "required (or NODE_SHIM_NODE_NAME)"))?;
        keyd_proto::identity::validate_name(&node_name)
            .map_err(|e| err("node_name", e.to_string()))?;
        let endpoint: IpAddr = self
            .endpoint
            .ok_or_else(|| err("endpoint", "required: this node's IP address"))?
            .parse()
            .map_err(|_| err("endpoint", "not an IP address"))?;
        if endpoint.is_unspecified() || endpoint.is_loopback() || endpoint.is_multicast() {
            return Err(err(
                "endpoint",
                "must be a unicast address other nodes can reach",
            ));
        }
        let mut pod_cidrs = Vec::new();
        for (i, c) in self.pod_cidrs.unwrap_or_default().iter().enumerate() {
            let net: IpNet = c
                .parse()
                .map_err(|_| err(&format!("pod_cidrs[{i}]"), format!("{c:?} is not a CIDR")))?;
            if net != net.trunc() {
                return Err(err(
                    &format!("pod_cidrs[{i}]"),
                    format!("{c} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
            pod_cidrs.push(net);
        }
        let mode = match self.mode.as_deref() {
            None | Some("wireguard") => Mode::Wireguard,
            Some("ipsec") => Mode::Ipsec,
            Some(other) => {
                return Err(err(
                    "mode",
                    format!("{other:?} is not \"wireguard\" or \"ipsec\""),
                ));
            }
        };
        let poll_interval = bounded_duration(
            "poll_interval",
            self.poll_interval.as_deref(),
            Duration::from_secs(5),
            Duration::from_millis(100)..=Duration::from_secs(3600),
        )?;
        let long_poll = match self.long_poll.as_deref() {
            Some("off") => None,
            other => {
                let d = duration("long_poll", other, Duration::from_secs(30))?;
                if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
                    return Err(err("long_poll", "must be between 1s and 5m, or \"off\""));
                }
                Some(d)
            }
        };
        let resync_interval = bounded_duration(
            "resync_interval",
            self.resync_interval.as_deref(),
            Duration::from_secs(30),
            Duration::from_secs(1)..=Duration::from_secs(3600),
        )?;
        let backoff_initial = duration(
            "backoff_initial",
            self.backoff_initial.as_deref(),
            Duration::from_secs(1),
        )?;
        let backoff_max = duration(
            "backoff_max",
            self.backoff_max.as_deref(),
            Duration::from_secs(60),
        )?;
        if backoff_initial.is_zero() || backoff_max < backoff_initial {
            return Err(err(
                "backoff_max",
                "backoff_initial must be above zero and at most backoff_max",
            ));
        }
        let ops_listen = self
            .ops_listen
            .map(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|_| err("ops_listen", format!("{s:?} is not HOST:PORT")))
            })
            .transpose()?;
        let boot_id_path = self
            .boot_id_path
            .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id"));

        let keyd = validate_keyd(self.keyd)?;
        let wg_table_set = self.wireguard.route_table.is_some();
        let mut wireguard = validate_wg(self.wireguard)?;
        let ipsec = validate_ipsec(self.ipsec, poll_interval)?;
        let steering = steering::validate(self.steering, ipsec.mark_mask)?;
        if steering.encrypt == Encrypt::Policy {
            // Routes through the WireGuard device serve only marked packets: they live in the
            // steering table, which only marked packets look up.
            if wg_table_set && wireguard.route_table != steering.route_table {
                return Err(err(
                    "wireguard.route_table",
                    format!(
                        "with encrypt = \"policy\" the WireGuard routes go to steering.route_table ({}); leave wireguard.route_table unset",
                        steering.route_table
                    ),
                ));
            }
            wireguard.route_table = steering.route_table;
        }

        let log_level = self.log.level.unwrap_or_else(|| "info".to_owned());
        let log_json = match self.log.format.as_deref() {
            None | Some("json") => true,
            Some("text") => false,
            Some(other) => {
                return Err(err(
                    "log.format",
                    format!("{other:?} is not \"json\" or \"text\""),
                ));
            }
        };
        if mode == Mode::Ipsec && pod_cidrs.is_empty() {
            return Err(err(
                "pod_cidrs",
                "IPsec mode needs this node's pod CIDRs for its policies",
            ));
        }
        Ok(Config {
            node_name,
            endpoint,
            pod_cidrs,
            mode,
            poll_interval,
            long_poll,
            resync_interval,
            backoff_initial,
            backoff_max,
            ops_listen,
            boot_id_path,
            keyd,
            wireguard,
            ipsec,
            steering,
            log_level,
            log_json,
        })
    }
}

fn validate_keyd(raw: RawKeyd) -> Result<KeydSettings, ConfigError> {
    let server = raw
        .server
        .ok_or_else(|| err("keyd.server", "required, e.g. https://keyd.keyd.svc:8443"))?;
    check_url("keyd.server", &server)?;
    let ca = raw
        .ca
        .ok_or_else(|| err("keyd.ca", "required: the CA of keyd's server certificate"))?;
    let identity = match (raw.cert, raw.key, raw.bootstrap) {
        (Some(cert), Some(key), None) => IdentitySource::Static { cert, key },
        (None, None, Some(b)) => {
            let server = b.server.ok_or_else(|| {
                err(
                    "keyd.bootstrap.server",
                    "required: keyd's bootstrap listener",
                )
            })?;
            check_url("keyd.bootstrap.server", &server)?;
            IdentitySource::Bootstrap {
                server,
                token_path: b
                    .token_path
                    .unwrap_or_else(|| PathBuf::from("/var/run/secrets/keyd/token")),
                cert_dir: b
                    .cert_dir
                    .unwrap_or_else(|| PathBuf::from("/run/keyd-node-shim")),
            }
        }
        (Some(_), None, _) | (None, Some(_), None) => {
            return Err(err("keyd.key", "keyd.cert and keyd.key go together"));
        }
        (Some(_), Some(_), Some(_)) | (None, Some(_), Some(_)) => {
            return Err(err(
                "keyd.bootstrap",
                "choose a static certificate (keyd.cert, keyd.key) or [keyd.bootstrap], not both",
            ));
        }
        (None, None, None) => {
            return Err(err(
                "keyd.cert",
                "an identity is required: keyd.cert and keyd.key, or [keyd.bootstrap]",
            ));
        }
    };
    Ok(KeydSettings {
        server,
        ca,
        identity,
    })
}

fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    match url
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
    {
        Some(host) if !host.is_empty() && !host.contains('/') => Ok(()),
        _ => Err(err(field, format!("{url:?} is not https://HOST[:PORT]"))),
    }
}

fn validate_wg(raw: RawWireguard) -> Result<WgSettings, ConfigError> {
    let device = raw.device.unwrap_or_else(|| DEFAULT_WG_DEVICE.to_owned());
    // IFNAMSIZ is 16 with the terminating NUL.
    if device.is_empty()
        || device.len() > 15
        || !device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(err(
            "wireguard.device",
            "1 to 15 characters: letters, digits, '-', '_' or '.'",
        ));
    }
    let listen_port = raw.listen_port.unwrap_or(DEFAULT_WG_PORT);
    if listen_port == 0 {
        return Err(err("wireguard.listen_port", "must not be 0"));
    }
    let peer_port = raw.peer_port.unwrap_or(listen_port);
    if peer_port == 0 {
        return Err(err("wireguard.peer_port", "must not be 0"));
    }
    let backend = match raw.backend.as_deref() {
        None | Some("auto") => WgBackend::Auto,
        Some("kernel") => WgBackend::Kernel,
        Some("userspace") => WgBackend::Userspace,
        Some(other) => {
            return Err(err(
                "wireguard.backend",
                format!("{other:?} is not \"auto\", \"kernel\" or \"userspace\""),
            ));
        }
    };
    let route_table = raw.route_table.unwrap_or(254);
    if route_table == 0 {
        return Err(err(
            "wireguard.route_table",
            "0 is not a table; the main table is 254",
        ));
    }
    let keypair_max_age = raw
        .keypair_max_age
        .as_deref()
        .map(|s| duration("wireguard.keypair_max_age", Some(s), Duration::ZERO))
        .transpose()?;
    if keypair_max_age.is_some_and(|d| d < Duration::from_secs(60)) {
        return Err(err("wireguard.keypair_max_age", "must be at least 1m"));
    }
    Ok(WgSettings {
        device,
        listen_port,
        peer_port,
        fwmark: raw.fwmark.unwrap_or(0),
        backend,
        private_key_file: raw.private_key_file,
        route_table,
        route_metric: raw.route_metric.unwrap_or(0),
        persistent_keepalive: raw.persistent_keepalive.unwrap_or(DEFAULT_KEEPALIVE),
        keypair_max_age,
    })
}

fn validate_ipsec(raw: RawIpsec, poll_interval: Duration) -> Result<IpsecSettings, ConfigError> {
    let reqid = raw.reqid.unwrap_or(DEFAULT_REQID);
    if reqid == 0 {
        return Err(err(
            "ipsec.reqid",
            "must not be 0: it marks node-shim's states and policies as its own",
        ));
    }
    let replay_window = raw.replay_window.unwrap_or(DEFAULT_REPLAY_WINDOW);
    // XFRMA_REPLAY_ESN_MAX is 4096 bytes of bitmap.
    if replay_window == 0 || replay_window > 4096 * 8 {
        return Err(err("ipsec.replay_window", "must be 1 to 32768 packets"));
    }
    let mark_mask = raw.mark_mask.unwrap_or(DEFAULT_MARK_MASK);
    if mark_mask == 0
        || (mark_mask >> mark_mask.trailing_zeros()).count_ones()
            != (mark_mask >> mark_mask.trailing_zeros()).trailing_ones()
    {
        return Err(err(
            "ipsec.mark_mask",
            "must be one contiguous run of bits, e.g. 0x3fff0000",
        ));
    }
    let outbound_switch_delay = duration(
        "ipsec.outbound_switch_delay",
        raw.outbound_switch_delay.as_deref(),
        poll_interval * 2,
    )?;
    // Skipped peers' drop policies sit one step below (see reconcile::fail_closed).
    if raw.policy_priority == Some(u32::MAX) {
        return Err(ConfigError::new(
            "ipsec.policy_priority",
            "must be below 4294967295 (skipped peers' drop policies take the next value)",
        ));
    }
    Ok(IpsecSettings {
        reqid,
        replay_window,
        mark_mask,
        underlay_device: raw.underlay_device,
        outbound_switch_delay,
        policy_priority: raw.policy_priority.unwrap_or(0x2000),
        require_inbound_esp: raw.require_inbound_esp.unwrap_or(true),
        filter_priority: raw.filter_priority.unwrap_or(0x6b65),
    })
}

/// Reads the file (if given), applies `env` and validates.
pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut raw = match path {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    raw.apply_env(env);
    raw.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node_name = "node-a"
endpoint = "192.168.100.1"
pod_cidrs = ["10.1.0.0/24"]
[keyd]
server = "https://127.0.0.1:8443"
ca = "/pki/ca.pem"
cert = "/pki/node-a.pem"
key = "/pki/node-a-key.pem"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        RawConfig::from_toml(text)?.validate()
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.mode, Mode::Wireguard);
        assert_eq!(c.wireguard.device, "keyd-wg0");
        assert_eq!(c.wireguard.listen_port, 51871);
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.ipsec.outbound_switch_delay, Duration::from_secs(10));
        assert_eq!(c.ipsec.replay_window, 1024);
        assert!(c.ipsec.require_inbound_esp);
        assert!(matches!(c.keyd.identity, IdentitySource::Static { .. }));
    }

    #[test]
    fn env_overrides_file() {
        let mut raw = RawConfig::from_toml(MINIMAL).unwrap();
        let env = HashMap::from([
            ("NODE_SHIM_NODE_NAME".to_owned(), "node-b".to_owned()),
            (
                "NODE_SHIM_POD_CIDRS".to_owned(),
                "10.2.0.0/24, 10.3.0.0/24".to_owned(),
            ),
            ("NODE_SHIM_MODE".to_owned(), "ipsec".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ]);
        raw.apply_env(&env);
        let c = raw.validate().unwrap();
        assert_eq!(c.node_name, "node-b");
        assert_eq!(c.mode, Mode::Ipsec);
        assert_eq!(c.pod_cidrs.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (MINIMAL.replace("192.168.100.1", "nope"), "endpoint"),
            (
                MINIMAL.replace("10.1.0.0/24", "10.1.0.1/24"),
                "pod_cidrs[0]",
            ),
            (MINIMAL.replace("node-a\"", "Node_A\""), "node_name"),
            (
                format!("{MINIMAL}\n[wireguard]\ndevice = \"a-very-long-device-name\"\n"),
                "wireguard.device",
            ),
            (
                format!("{MINIMAL}\n[ipsec]\nmark_mask = 0x0f0f0000\n"),
                "ipsec.mark_mask",
            ),
            (format!("{MINIMAL}\n[ipsec]\nreqid = 0\n"), "ipsec.reqid"),
            (
                MINIMAL.replace("https://127.0.0.1:8443", "http://x"),
                "keyd.server",
            ),
            (
                MINIMAL.replace("cert = \"/pki/node-a.pem\"\n", ""),
                "keyd.key",
            ),
            (format!("{MINIMAL}\nbogus = 1\n"), "config file"),
        ];
        for (text, field) in cases {
            let e = parse(&text).expect_err(field);
            assert_eq!(e.field(), field, "{e}");
        }
    }

    #[test]
    fn bootstrap_identity() {
        let text = MINIMAL.replace(
            "cert = \"/pki/node-a.pem\"\nkey = \"/pki/node-a-key.pem\"\n",
            "[keyd.bootstrap]\nserver = \"https://127.0.0.1:8444\"\ntoken_path = \"/t\"\n",
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.keyd.identity,
            IdentitySource::Bootstrap {
                server: "https://127.0.0.1:8444".into(),
                token_path: "/t".into(),
                cert_dir: "/run/keyd-node-shim".into(),
            }
        );
    }
}
