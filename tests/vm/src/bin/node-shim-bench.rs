//! node-shim's kernel programming against iproute2 and wireguard-tools doing the same work on the
//! same kernel (run it in the VM: the host kernel has neither WireGuard nor ESP).
//!
//! Each measurement runs in a fresh network namespace:
//! - WireGuard, 1,000 peers from empty: node-shim (device, peers with preshared keys, routes)
//!   vs `ip link add` + `wg setconf` + `ip -batch` (routes);
//! - IPsec for 1,000 peers from empty: node-shim (2,000 ESP states with per-tunnel keys, 3,000
//!   policies, 1,000 tc mark filters) vs `ip -batch` (states and policies) + `tc -batch`;
//! - one incremental change (a 1,001st peer) on top of each: node-shim's full reconcile pass
//!   (dump, diff, apply) vs the handful of single commands an operator would run.
//!
//! node-shim's time includes computing the desired state (key derivation) and reading the
//! kernel back; the tools' time includes their process start-up. Both program identical
//! objects: the tools' input files are generated from node-shim's desired state.
//!
//! Usage: node-shim-bench --peers N [--rounds R] --work DIR --out FILE (root).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use keyd_node_shim::config::{Config, RawConfig};
use keyd_node_shim::kernel::Kernel;
use keyd_node_shim::kernel::netlink::NetlinkKernel;
use keyd_node_shim::model::{Desired, PolicyDir, XfrmAlgo};
use keyd_node_shim::reconcile::{self, Inputs, NodeFacts};
use keyd_node_shim::secret::Key32;
use keyd_proto::{
    IpsecAlgorithm, IpsecBundle, IpsecKey, IpsecPeer, KeyRole, NodeBundle, SecretBytes,
    WireguardBundle, WireguardPeer,
};

const BOOT: &str = "11111111-2222-3333-4444-555555555555";

struct Args {
    peers: usize,
    rounds: usize,
    work: PathBuf,
    out: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        peers: 1000,
        rounds: 3,
        work: PathBuf::from("/tmp/node-shim-bench"),
        out: PathBuf::from("bench.txt"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--peers" => a.peers = v.parse()?,
            "--rounds" => a.rounds = v.parse::<usize>()?.max(1),
            "--work" => a.work = v.into(),
            "--out" => a.out = v.into(),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// A network namespace for one run, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ))?;
        // The underlay device holding the node's address (IPsec marks ESP arriving on it).
        sh(&format!(
            "ip -n {name} link add bul0 type veth peer name bul1 && ip -n {name} addr add 192.168.0.1/16 dev bul0 && ip -n {name} link set bul0 up && ip -n {name} link set bul1 up"
        ))?;
        Ok(Ns(name.to_owned()))
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = PathBuf::from("/run/netns").join(&self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path)?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh").args(["-c", cmd]).output()?;
    ensure!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn timed(cmd: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    sh(cmd)?;
    Ok(t.elapsed())
}

fn peer_ip(i: usize) -> IpAddr {
    format!("192.168.{}.{}", 1 + i / 250, 1 + i % 250)
        .parse()
        .expect("valid")
}

fn peer_cidr(i: usize) -> ipnet::IpNet {
    format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
        .parse()
        .expect("valid")
}

fn config(mode: &str, device: &str) -> anyhow::Result<Config> {
    let text = format!(
        r#"
node_name = "bench"
endpoint = "192.168.0.1"
pod_cidrs = ["10.1.0.0/24"]
mode = "{mode}"
[keyd]
server = "https://127.0.0.1:1"
ca = "/x"
cert = "/x"
key = "/x"
[wireguard]
backend = "kernel"
device = "{device}"
"#
    );
    Ok(RawConfig::from_toml(&text)?.validate()?)
}

fn facts() -> NodeFacts {
    NodeFacts {
        name: "bench".into(),
        endpoint: "192.168.0.1".parse().expect("valid"),
        pod_cidrs: vec!["10.1.0.0/24".parse().expect("valid")],
        boot_id: BOOT.into(),
    }
}

fn wg_bundle(peers: &[(Key32, Key32)]) -> NodeBundle {
    NodeBundle {
        node: "bench".into(),
        revision: "bench".into(),
        ipsec: None,
        wireguard: WireguardBundle {
            epoch: 1,
            node_key_epoch: 1,
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, (k, psk))| WireguardPeer {
                    node: format!("peer-{i}"),
                    public_key: k.public_key().to_base64(),
                    endpoint: peer_ip(i),
                    allowed_ips: vec![peer_cidr(i)],
                    preshared_key: SecretBytes::new(psk.expose().to_vec()),
                })
                .collect(),
        },
    }
}

fn ipsec_bundle(n: usize, key: &[u8]) -> NodeBundle {
    NodeBundle {
        node: "bench".into(),
        revision: "bench".into(),
        ipsec: Some(IpsecBundle {
            outbound_spi: 1,
            keys: vec![IpsecKey {
                spi: 1,
                role: KeyRole::Current,
                per_tunnel: true,
                algorithm: IpsecAlgorithm::Aead {
                    name: "rfc4106(gcm(aes))".into(),
                    key: SecretBytes::new(key.to_vec()),
                    icv_bits: 128,
                },
            }],
            peers: (0..n)
                .map(|i| IpsecPeer {
                    node: format!("peer-{i}"),
                    endpoint: peer_ip(i),
                    pod_cidrs: vec![peer_cidr(i)],
                    boot_id: Some(BOOT.into()),
                })
                .collect(),
        }),
        wireguard: WireguardBundle {
            epoch: 1,
            node_key_epoch: 1,
            peers: vec![],
        },
    }
}

/// One reconcile pass as the agent does it; returns (total, apply only, desired state).
fn pass(
    k: &mut NetlinkKernel,
    cfg: &Config,
    bundle: &NodeBundle,
    wg_key: Option<&Key32>,
) -> anyhow::Result<(Duration, Duration, Desired)> {
    let t = Instant::now();
    let observed = k.observe()?;
    let marks = match &bundle.ipsec {
        Some(i) => reconcile::assign_marks(
            i.peers.iter().map(|p| p.endpoint),
            &observed,
            cfg.ipsec.mark_mask,
        ),
        None => BTreeMap::new(),
    };
    let facts = facts();
    let c = reconcile::desired(&Inputs {
        bundle,
        facts: &facts,
        config: cfg,
        wg_private_key: wg_key,
        wg_key_epoch: 1,
        outbound_spi: None,
        marks: &marks,
    });
    let plan = reconcile::plan(&c.desired, &observed);
    let ta = Instant::now();
    k.apply(&plan.ensure)?;
    k.apply(&plan.remove)?;
    let apply = ta.elapsed();
    Ok((t.elapsed(), apply, c.desired))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    std::fs::create_dir_all(&a.work)?;
    // Several rounds: under emulation on a shared machine single timings wander; the median is
    // reported, with every round's value next to it.
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        println!("round {round}");
        rounds.push(run(a.peers, &a.work)?);
    }
    let mut out = format!("bench_peers={}\nbench_rounds={}\n", a.peers, a.rounds);
    for (i, (k, _)) in rounds[0].iter().enumerate() {
        let mut vals: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.get(i).and_then(|(_, v)| v.parse().ok()))
            .collect();
        let all = vals
            .iter()
            .map(|v| format!("{v}"))
            .collect::<Vec<_>>()
            .join(",");
        vals.sort_by(f64::total_cmp);
        let median = vals.get(vals.len() / 2).copied().unwrap_or(f64::NAN);
        let _ = writeln!(out, "bench_{k}={median}");
        let _ = writeln!(out, "bench_{k}_rounds={all}");
    }
    print!("{out}");
    write(&a.out, &out)?;
    Ok(())
}

/// One round of every measurement, as (name, value) in a fixed order.
fn run(n: usize, work: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut put = |k: &str, v: String| {
        println!("{k}={v}");
        out.push((k.to_owned(), v));
    };

    // ---- WireGuard -----------------------------------------------------------------------------
    let own = rng(Key32::random())?;
    let mut peers: Vec<(Key32, Key32)> = (0..=n)
        .map(|_| Ok((rng(Key32::random())?, rng(Key32::random())?)))
        .collect::<anyhow::Result<_>>()?;
    let extra = peers.pop().expect("n + 1 generated");
    let b_full = wg_bundle(&peers);
    let mut with_extra = peers.clone();
    with_extra.push(extra.clone());
    let b_incr = wg_bundle(&with_extra);

    let ns = Ns::new("bench-wg-shim")?;
    let cfg = config("wireguard", "bench-wg0")?;
    let (full, apply, incr, incr_apply, peers_seen, routes_seen) = ns.run(move || {
        let mut k = NetlinkKernel::open(&cfg)?;
        let (full, apply, _) = pass(&mut k, &cfg, &b_full, Some(&own))?;
        let o = k.observe()?;
        let w = o.wg.context("device missing")?;
        let (incr, incr_apply, _) = pass(&mut k, &cfg, &b_incr, Some(&own))?;
        Ok((full, apply, incr, incr_apply, w.peers.len(), w.routes.len()))
    })?;
    ensure!(
        peers_seen == n && routes_seen == n,
        "node-shim programmed {peers_seen} peers, {routes_seen} routes"
    );
    drop(ns);
    put("wg_nodeshim_full_ms", ms(full));
    put("wg_nodeshim_full_apply_ms", ms(apply));
    put("wg_nodeshim_incr_ms", ms(incr));
    put("wg_nodeshim_incr_apply_ms", ms(incr_apply));

    // The same with wg(8) and ip(8).
    let mut conf = String::from("[Interface]\n");
    let _ = writeln!(
        conf,
        "PrivateKey = {}",
        b64(own_bytes(&rng(Key32::random())?))
    );
    conf.push_str("ListenPort = 51871\n");
    let mut routes = String::new();
    for (i, (k, psk)) in peers.iter().enumerate() {
        let _ = writeln!(
            conf,
            // node-shim's default keepalive, so that both sides do the same work.
            "[Peer]\nPublicKey = {}\nPresharedKey = {}\nEndpoint = {}:51871\nAllowedIPs = {}\nPersistentKeepalive = 25",
            k.public_key().to_base64(),
            b64(own_bytes(psk)),
            peer_ip(i),
            peer_cidr(i)
        );
        let _ = writeln!(routes, "route add {} dev bench-wg1", peer_cidr(i));
    }
    let conf_path = work.join("wg.conf");
    let routes_path = work.join("wg-routes.batch");
    let psk_path = work.join("psk");
    write(&conf_path, &conf)?;
    write(&routes_path, &routes)?;
    write(&psk_path, &b64(own_bytes(&extra.1)))?;
    let ns = Ns::new("bench-wg-tools")?;
    let tools_full = timed(&format!(
        "ip -n {0} link add bench-wg1 type wireguard && ip -n {0} link set bench-wg1 up && ip netns exec {0} wg setconf bench-wg1 {1} && ip -n {0} -batch {2}",
        ns.0,
        conf_path.display(),
        routes_path.display()
    ))?;
    let count = sh(&format!(
        "ip netns exec {} wg show bench-wg1 peers | wc -l",
        ns.0
    ))?;
    ensure!(
        count.trim() == n.to_string(),
        "wg setconf programmed {count} peers"
    );
    let tools_incr = timed(&format!(
        "ip netns exec {0} wg set bench-wg1 peer {1} preshared-key {2} endpoint {3}:51871 persistent-keepalive 25 allowed-ips {4} && ip -n {0} route add {4} dev bench-wg1",
        ns.0,
        extra.0.public_key().to_base64(),
        psk_path.display(),
        peer_ip(n),
        peer_cidr(n)
    ))?;
    drop(ns);
    put("wg_tools_full_ms", ms(tools_full));
    put("wg_tools_incr_ms", ms(tools_incr));
    put("wg_full_ratio", ratio(full, tools_full));
    put("wg_incr_ratio", ratio(incr, tools_incr));

    // ---- IPsec ---------------------------------------------------------------------------------
    let mut global = vec![0u8; 20];
    rng(getrandom::fill(&mut global))?;
    let b_full = ipsec_bundle(n, &global);
    let b_incr = ipsec_bundle(n + 1, &global);
    let ns = Ns::new("bench-esp-shim")?;
    let cfg = config("ipsec", "unused0")?;
    let cfg2 = cfg.clone();
    let (full, apply, incr, incr_apply, counts, desired_full, desired_incr) =
        ns.run(move || {
            let mut k = NetlinkKernel::open(&cfg2)?;
            let (full, apply, desired_full) = pass(&mut k, &cfg2, &b_full, None)?;
            let o = k.observe()?;
            let counts = (o.states.len(), o.policies.len(), o.filters.len());
            let (incr, incr_apply, desired_incr) = pass(&mut k, &cfg2, &b_incr, None)?;
            Ok((
                full,
                apply,
                incr,
                incr_apply,
                counts,
                desired_full,
                desired_incr,
            ))
        })?;
    ensure!(
        counts == (2 * n, 3 * n, n),
        "node-shim programmed {counts:?} (states, policies, filters)"
    );
    drop(ns);
    put("esp_states", (2 * n).to_string());
    put("esp_policies", (3 * n).to_string());
    put("esp_filters", n.to_string());
    put("esp_nodeshim_full_ms", ms(full));
    put("esp_nodeshim_full_apply_ms", ms(apply));
    put("esp_nodeshim_incr_ms", ms(incr));
    put("esp_nodeshim_incr_apply_ms", ms(incr_apply));

    // The same objects through ip -batch and tc -batch.
    let (xfrm, tc) = iproute2_batches(&desired_full, &cfg, None);
    let xfrm_path = work.join("xfrm.batch");
    let tc_path = work.join("tc.batch");
    write(&xfrm_path, &xfrm)?;
    write(&tc_path, &format!("qdisc add dev bul0 clsact\n{tc}"))?;
    let ns = Ns::new("bench-esp-tools")?;
    let tools_full = timed(&format!(
        "ip -n {0} -batch {1} && tc -n {0} -batch {2}",
        ns.0,
        xfrm_path.display(),
        tc_path.display()
    ))?;
    let states = sh(&format!("ip -n {} xfrm state | grep -c '^src'", ns.0))?;
    ensure!(
        states.trim() == (2 * n).to_string(),
        "ip -batch programmed {states} states"
    );
    let filters = sh(&format!(
        "tc -n {} filter show dev bul0 ingress | grep -c skbedit",
        ns.0
    ))?;
    ensure!(
        filters.trim() == n.to_string(),
        "tc -batch programmed {filters} filters"
    );
    // Incremental: the new peer's objects, one command each.
    let (xfrm1, tc1) = iproute2_batches(&desired_incr, &cfg, Some(peer_ip(n)));
    let mut cmds = Vec::new();
    for line in xfrm1.lines() {
        cmds.push(format!("ip -n {} {line}", ns.0));
    }
    for line in tc1.lines() {
        cmds.push(format!("tc -n {} {line}", ns.0));
    }
    let tools_incr = timed(&cmds.join(" && "))?;
    drop(ns);
    put("esp_tools_full_ms", ms(tools_full));
    put("esp_tools_incr_ms", ms(tools_incr));
    put("esp_tools_incr_commands", cmds.len().to_string());
    put("esp_full_ratio", ratio(full, tools_full));
    put("esp_incr_ratio", ratio(incr, tools_incr));
    Ok(out)
}

/// getrandom's error is not a `std::error::Error` without its `std` feature.
fn rng<T>(r: Result<T, getrandom::Error>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("random number generator: {e}"))
}

fn ratio(ours: Duration, theirs: Duration) -> String {
    format!("{:.2}", ours.as_secs_f64() / theirs.as_secs_f64())
}

fn own_bytes(k: &Key32) -> [u8; 32] {
    *k.expose()
}

fn b64(b: [u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `ip -batch` lines for the states and policies and `tc -batch` lines for the filters of
/// `d` (only those involving `only` when given).
fn iproute2_batches(d: &Desired, cfg: &Config, only: Option<IpAddr>) -> (String, String) {
    let reqid = cfg.ipsec.reqid;
    let mut xfrm = String::new();
    for s in d.states.values() {
        if only.is_some_and(|ip| s.id.src != ip && s.id.dst != ip) {
            continue;
        }
        let XfrmAlgo::Aead {
            name,
            key,
            icv_bits,
        } = &s.algo
        else {
            continue;
        };
        let _ = write!(
            xfrm,
            "xfrm state add src {} dst {} proto esp spi {:#x} reqid {reqid} mode tunnel replay-window {} flag esn aead \"{name}\" 0x{} {icv_bits}",
            s.id.src,
            s.id.dst,
            s.id.spi,
            s.shape.replay_window,
            hex::encode(key.expose())
        );
        if let Some(m) = s.id.mark {
            let _ = write!(xfrm, " mark {:#x} mask {:#x}", m.value, m.mask);
        }
        if let Some(m) = s.shape.output_mark {
            let _ = write!(xfrm, " output-mark {:#x} mask {:#x}", m.value, m.mask);
        }
        xfrm.push('\n');
    }
    for p in d.policies.values() {
        if only.is_some_and(|ip| p.tmpl.src != ip && p.tmpl.dst != ip) {
            continue;
        }
        let dir = match p.id.dir {
            PolicyDir::In => "in",
            PolicyDir::Out => "out",
            PolicyDir::Fwd => "fwd",
        };
        let spi = if p.tmpl.spi != 0 {
            format!(" spi {:#x}", p.tmpl.spi)
        } else {
            String::new()
        };
        let _ = writeln!(
            xfrm,
            "xfrm policy add src {} dst {} dir {dir} priority {} tmpl src {} dst {} proto esp{spi} reqid {} mode tunnel",
            p.id.src, p.id.dst, p.priority, p.tmpl.src, p.tmpl.dst, p.tmpl.reqid
        );
    }
    let mut tc = String::new();
    for f in d.filters.values() {
        if only.is_some_and(|ip| f.src != ip) {
            continue;
        }
        let _ = writeln!(
            tc,
            "filter add dev bul0 ingress protocol ip prio {} handle {} flower skip_hw ip_proto 0x32 src_ip {} action skbedit mark {:#x}/{:#x}",
            cfg.ipsec.filter_priority, f.handle, f.src, f.mark.value, f.mark.mask
        );
    }
    (xfrm, tc)
}
