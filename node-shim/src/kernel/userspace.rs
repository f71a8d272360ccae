//! Userspace WireGuard: boringtun over a TUN device, in this process, for kernels without the
//! WireGuard module. It is driven by the cross-platform UAPI (`set=1` / `get=1` text) over a
//! private socket pair, so the same desired state configures it as configures the kernel.
//!
//! What it costs (also in docs/node-shim.md): every packet crosses into userspace and back (a TUN read or
//! write plus a UDP syscall each way), so throughput is a fraction of the kernel's and CPU per
//! packet is higher; the device lives and dies with node-shim, so a restart drops every session
//! (peers handshake again, about one round trip plus up to 5 s of WireGuard's retry timer);
//! and boringtun cannot change a peer in place, so a changed peer (a new preshared key epoch) is
//! removed and added again, which also costs it a handshake.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::device::{DeviceConfig, DeviceHandle};
use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::kernel::KernelError;
use crate::model::{ObservedPeer, WgDeviceConfig, WgPeerSpec};
use crate::secret::{Key32, PublicKey};

/// The device state the UAPI reports (boringtun never reports its private key).
pub(crate) struct UapiDevice {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: std::collections::BTreeMap<PublicKey, ObservedPeer>,
}

pub(crate) struct Userspace {
    name: String,
    /// The network namespace the kernel handle was opened in: the TUN device and boringtun's
    /// UDP sockets are made there, whichever thread applies the change.
    netns: Option<std::fs::File>,
    device: Option<(DeviceHandle, UnixStream)>,
}

impl Userspace {
    pub fn new(name: &str, netns: Option<std::fs::File>) -> Self {
        Self {
            name: name.to_owned(),
            netns,
            device: None,
        }
    }

    pub fn running(&self) -> bool {
        self.device.is_some()
    }

    /// Creates the TUN device and starts boringtun's threads.
    pub fn start(&mut self) -> Result<(), KernelError> {
        if self.device.is_some() {
            return Ok(());
        }
        let err = |what: &str| {
            let what = what.to_owned();
            move |source: std::io::Error| KernelError::Userspace { what, source }
        };
        let (ours, theirs) = UnixStream::pair().map_err(err("creating the UAPI socket pair"))?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(err("setting the UAPI timeout"))?;
        // boringtun takes ownership of this end; when `ours` closes, the device exits.
        let fd = theirs.into_raw_fd();
        let name = self.name.clone();
        let netns = match &self.netns {
            Some(f) => Some(f.try_clone().map_err(err("duplicating the netns handle"))?),
            None => None,
        };
        // A thread of its own: it enters the namespace (namespaces are per thread, and the
        // threads boringtun spawns inherit it) and is gone afterwards.
        let started = std::thread::spawn(move || {
            if let Some(ns) = netns {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            }
            DeviceHandle::new(
                &name,
                DeviceConfig {
                    n_threads: 2,
                    use_connected_socket: true,
                    use_multi_queue: false,
                    uapi_fd: fd,
                },
            )
            .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .join()
        .map_err(|_| KernelError::Userspace {
            what: "starting boringtun".into(),
            source: std::io::Error::other("the start thread panicked"),
        })?;
        let handle = started.map_err(|source| KernelError::Userspace {
            what: format!("starting boringtun on TUN device {}", self.name),
            source,
        })?;
        self.device = Some((handle, ours));
        Ok(())
    }

    /// One UAPI exchange; the reply up to and including the `errno=` line. Buffers are zeroized
    /// (requests carry keys, `get` replies carry preshared keys).
    fn exchange(&mut self, request: &[u8]) -> Result<Zeroizing<String>, KernelError> {
        let Some((_, stream)) = self.device.as_mut() else {
            return Err(KernelError::Unsupported(
                "the userspace WireGuard device is not running".into(),
            ));
        };
        let io = |what: &'static str| {
            move |source: std::io::Error| KernelError::Userspace {
                what: what.to_owned(),
                source,
            }
        };
        stream
            .write_all(request)
            .map_err(io("sending a UAPI request"))?;
        let mut reply = Zeroizing::new(Vec::with_capacity(64 * 1024));
        let mut chunk = Zeroizing::new([0u8; 8192]);
        loop {
            let n = stream
                .read(&mut chunk[..])
                .map_err(io("reading a UAPI reply"))?;
            if n == 0 {
                return Err(KernelError::Userspace {
                    what: "reading a UAPI reply".into(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            if reply.len() + n > reply.capacity() {
                // Grow without leaving an unzeroized copy behind.
                let mut bigger = Zeroizing::new(Vec::with_capacity(reply.capacity() * 2 + n));
                bigger.extend_from_slice(&reply);
                reply = bigger;
            }
            reply.extend_from_slice(&chunk[..n]);
            if let Some(pos) = find_errno_end(&reply) {
                reply.truncate(pos);
                break;
            }
        }
        decode_reply(std::mem::take(&mut *reply))
    }

    pub fn get(&mut self) -> Result<UapiDevice, KernelError> {
        let text = self.exchange(b"get=1\n\n")?;
        Ok(parse_get(&text))
    }

    pub fn configure(&mut self, c: &WgDeviceConfig) -> Result<(), KernelError> {
        let current = self.get()?;
        let mut req = Zeroizing::new(String::with_capacity(256));
        req.push_str("set=1\nprivate_key=");
        req.push_str(&c.private_key.to_hex());
        req.push('\n');
        // Re-binding the port resets every peer's endpoint socket: only when it changes.
        if current.listen_port != c.listen_port {
            req.push_str(&format!("listen_port={}\n", c.listen_port));
        }
        if current.fwmark != c.fwmark {
            req.push_str(&format!("fwmark={}\n", c.fwmark));
        }
        req.push('\n');
        self.exchange(req.as_bytes()).map(drop)
    }

    /// boringtun panics when asked to modify an existing peer, so a peer it has is removed first
    /// (in a request of its own: boringtun carries `remove` and the other fields over from one
    /// peer section to the next, so every section below sets every field).
    pub fn upsert_peers(&mut self, peers: &[WgPeerSpec]) -> Result<(), KernelError> {
        let current = self.get()?;
        let existing: Vec<PublicKey> = peers
            .iter()
            .map(|p| p.public_key)
            .filter(|k| current.peers.contains_key(k))
            .collect();
        if !existing.is_empty() {
            self.remove_peers(&existing)?;
        }
        // Sized for the worst case up front: a reallocation would leave a copy of the keys behind.
        let capacity: usize = peers
            .iter()
            .map(|p| 400 + 60 * p.allowed_ips.len())
            .sum::<usize>()
            + 16;
        let mut req = Zeroizing::new(String::with_capacity(capacity));
        req.push_str("set=1\n");
        for p in peers {
            req.push_str(&format!(
                "public_key={}\npreshared_key=",
                hex::encode(p.public_key.0)
            ));
            req.push_str(&p.preshared_key.to_hex());
            req.push_str(&format!(
                "\nendpoint={}\npersistent_keepalive_interval={}\nreplace_allowed_ips=true\n",
                p.endpoint, p.keepalive
            ));
            for ip in &p.allowed_ips {
                req.push_str(&format!("allowed_ip={ip}\n"));
            }
        }
        req.push('\n');
        self.exchange(req.as_bytes()).map(drop)
    }

    pub fn remove_peers(&mut self, keys: &[PublicKey]) -> Result<(), KernelError> {
        let mut req = String::from("set=1\n");
        for k in keys {
            req.push_str(&format!("public_key={}\nremove=true\n", hex::encode(k.0)));
        }
        req.push('\n');
        self.exchange(req.as_bytes()).map(drop)
    }

    /// Stops boringtun; the TUN device disappears with it.
    pub fn stop(&mut self) {
        self.device = None;
    }
}

/// A complete UAPI reply (through its `errno=N` line) as text, or the error it reports. It comes
/// from boringtun, over a socket: malformed text is an error, never a panic.
pub(crate) fn decode_reply(reply: Vec<u8>) -> Result<Zeroizing<String>, KernelError> {
    let text = String::from_utf8(reply).map_err(|e| {
        let mut bytes = e.into_bytes();
        zeroize::Zeroize::zeroize(&mut bytes);
        KernelError::Decode {
            what: "a UAPI reply",
        }
    })?;
    let text = Zeroizing::new(text);
    let errno = text
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or(KernelError::Decode {
            what: "a UAPI reply",
        })?;
    if errno != 0 {
        return Err(KernelError::Userspace {
            what: "a UAPI request".into(),
            source: std::io::Error::from_raw_os_error(errno),
        });
    }
    Ok(text)
}

pub(crate) fn find_errno_end(buf: &[u8]) -> Option<usize> {
    // The reply ends with "errno=N\n\n".
    let start = buf.windows(6).position(|w| w == b"errno=")?;
    let rest = &buf[start..];
    rest.windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| start + p + 2)
}

pub(crate) fn parse_get(text: &str) -> UapiDevice {
    let mut dev = UapiDevice {
        public_key: None,
        listen_port: 0,
        fwmark: 0,
        peers: Default::default(),
    };
    let mut current: Option<ObservedPeer> = None;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = |v: &str| -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(v, &mut out).ok()?;
        Some(out)
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "own_public_key" => dev.public_key = key(v).map(PublicKey),
            "listen_port" => dev.listen_port = v.parse().unwrap_or(0),
            "fwmark" => dev.fwmark = v.parse().unwrap_or(0),
            "public_key" => {
                if let Some(p) = current.take() {
                    dev.peers.insert(p.public_key, p);
                }
                current = key(v).map(|k| ObservedPeer {
                    public_key: PublicKey(k),
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: vec![],
                    keepalive: 0,
                    last_handshake: None,
                });
            }
            _ => {
                let Some(p) = current.as_mut() else {
                    continue;
                };
                match k {
                    "preshared_key" => {
                        if let Some(mut raw) = key(v) {
                            if raw.iter().any(|b| *b != 0) {
                                p.preshared_key = Some(Key32::from_bytes(raw).fingerprint());
                            }
                            zeroize::Zeroize::zeroize(&mut raw);
                        }
                    }
                    "endpoint" => p.endpoint = v.parse::<SocketAddr>().ok(),
                    "persistent_keepalive_interval" => p.keepalive = v.parse().unwrap_or(0),
                    "allowed_ip" => {
                        if let Ok(net) = v.parse::<IpNet>() {
                            p.allowed_ips.push(net);
                        } else if let Ok(ip) = v.parse::<IpAddr>() {
                            p.allowed_ips.push(IpNet::from(ip));
                        }
                    }
                    // boringtun reports the time since the handshake here, not a timestamp.
                    "last_handshake_time_sec" => {
                        p.last_handshake = v.parse::<u64>().ok().map(|ago| now.saturating_sub(ago));
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(p) = current.take() {
        dev.peers.insert(p.public_key, p);
    }
    for p in dev.peers.values_mut() {
        p.allowed_ips.sort();
        p.allowed_ips.dedup();
    }
    dev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get_reply() {
        let pk = hex::encode([9u8; 32]);
        let text = format!(
            "own_public_key={}\nlisten_port=51871\npublic_key={pk}\npreshared_key={}\nendpoint=192.0.2.2:51871\nallowed_ip=10.2.0.0/24\nallowed_ip=10.3.0.0/24\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n",
            hex::encode([1u8; 32]),
            hex::encode([7u8; 32])
        );
        let d = parse_get(&text);
        assert_eq!(d.listen_port, 51871);
        let p = &d.peers[&PublicKey([9; 32])];
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.endpoint, Some("192.0.2.2:51871".parse().unwrap()));
        assert_eq!(
            p.preshared_key,
            Some(Key32::from_bytes([7; 32]).fingerprint())
        );
        assert_eq!(find_errno_end(text.as_bytes()), Some(text.len()));
    }
}
