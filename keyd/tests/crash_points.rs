//! Crash consistency: the real `keyd` binary, built with its `fault-injection` crash points (a
//! dev-dependency of keyd on itself turns them on for `cargo test` only; see keyd/Cargo.toml),
//! is killed with `SIGABRT` at every store commit point of six operations in turn: an IPsec
//! rollout with two simulated nodes, a KEK rotation on the local-file custodian, an audit prune,
//! keyd's first start (the bootstrap of its store: WireGuard master, KEK document, audit
//! signing key), a node removal, and a node's bootstrap (a certificate for its projected
//! service account token, checked against a stand-in Kubernetes API server) and first
//! registration. A first clean run of each records the points it passes
//! (`KEYD_FAULT_TRACE`); then each point gets a run of its own that aborts there
//! (`KEYD_FAULT_ABORT_AT`), a restart without it, and the checks: every key keyd had handed out
//! is still served with the same bytes (keyd opens every sealed record before it listens), the
//! operation completes (resumed by keyd, or retried by the client when keyd never acknowledged
//! it), and the exported audit log passes `keyctl audit verify` with keyd's public key.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::Path as UrlPath;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use http::{Method, StatusCode};
use keyd_mtls::client::Connector;
use keyd_proto::{BootstrapResponse, IpsecAlgorithm, IpsecStatus, NodeBundle};
use serde_json::{Value, json};

const NODES: [&str; 2] = ["node-a", "node-b"];
const SIGABRT: i32 = 6;

mod process;
use process::{Gone, Identity, Keyd, audit_verifies, call, export, prepare_dev, register_dev_node};

/// Every IPsec key a node was served, by SPI (hex of the key bytes), newest first as served.
type Keys = Vec<(u8, String)>;

fn bundle_keys(b: &NodeBundle) -> Keys {
    b.ipsec
        .as_ref()
        .map(|i| {
            i.keys
                .iter()
                .map(|k| {
                    let bytes = match &k.algorithm {
                        IpsecAlgorithm::Aead { key, .. } => hex::encode(key.expose()),
                        other => format!("{other:?}"),
                    };
                    (k.spi, bytes)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the client side saw before the crash.
#[derive(Default)]
struct Seen {
    /// The last bundle keys each node was served.
    keys: BTreeMap<&'static str, Keys>,
    /// Each node's WireGuard peer PSKs (hex), by peer.
    psks: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// SPIs keyd acknowledged generating (rotate answered 200).
    rotated_to: Vec<u8>,
    /// Nodes registered before the operation under test.
    nodes: Vec<String>,
    /// The WireGuard PSK epoch after the setup.
    psk_epoch: u64,
    /// The serial number (hex) of each certificate the bootstrap listener handed out.
    certificates: Vec<String>,
}

/// Each node fetches its bundle and acknowledges what it would program (as the node shim does).
async fn nodes_fetch_and_ack(
    k: &Keyd,
    seen: &mut Seen,
    nodes: &[&'static str],
) -> Result<(), Gone> {
    for &name in nodes {
        let b = call(
            k,
            Identity::Node(name),
            Method::GET,
            &format!("/v1/nodes/{name}/bundle"),
            None,
        )
        .await?;
        let b: NodeBundle = serde_json::from_value(b).unwrap();
        seen.keys.insert(name, bundle_keys(&b));
        seen.psks.insert(
            name,
            b.wireguard
                .peers
                .iter()
                .map(|p| (p.node.clone(), hex::encode(p.preshared_key.expose())))
                .collect(),
        );
        if let Some(ipsec) = b.ipsec {
            let spis: Vec<u8> = ipsec.keys.iter().map(|k| k.spi).collect();
            call(
                k,
                Identity::Node(name),
                Method::POST,
                &format!("/v1/nodes/{name}/ack"),
                Some(json!({ "ipsec_spis": spis, "ipsec_outbound_spi": ipsec.outbound_spi })),
            )
            .await?;
        }
    }
    Ok(())
}

async fn ipsec(k: &Keyd) -> Result<IpsecStatus, Gone> {
    Ok(
        serde_json::from_value(call(k, Identity::Admin, Method::GET, "/v1/ipsec", None).await?)
            .unwrap(),
    )
}

/// Plays the nodes until no rollout is in progress (at most ~15 s).
async fn drive_rollout(k: &Keyd, seen: &mut Seen, nodes: &[&'static str]) -> Result<(), Gone> {
    for _ in 0..150 {
        nodes_fetch_and_ack(k, seen, nodes).await?;
        if ipsec(k).await?.rollout.is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the rollout did not complete: {:?}",
        ipsec(k).await.ok().and_then(|s| s.rollout)
    );
}

async fn rotate_ipsec(k: &Keyd, seen: &mut Seen) -> Result<(), Gone> {
    let before = ipsec(k).await?.outbound_spi;
    call(
        k,
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await?;
    // Acknowledged: the new key exists (the rollout's target, or the outbound key when there
    // was nothing to roll out from).
    let s = ipsec(k).await?;
    let new = s.rollout.map(|r| r.to_spi).or(s.outbound_spi).unwrap();
    assert_ne!(Some(new), before);
    seen.rotated_to.push(new);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Rollout,
    KekRotation,
    Prune,
    Bootstrap,
    NodeRemoval,
    NodeBootstrap,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Bootstrap,
        Scenario::Rollout,
        Scenario::KekRotation,
        Scenario::Prune,
        Scenario::NodeRemoval,
        Scenario::NodeBootstrap,
    ];

    fn env(self) -> Vec<(&'static str, String)> {
        match self {
            // Small segments, so that the setup can close one for the prune.
            Scenario::Prune => vec![("KEYD_AUDIT_SEGMENT_RECORDS", "10".into())],
            _ => vec![],
        }
    }

    /// Brings keyd to the state the operation starts from: two registered nodes holding the
    /// first IPsec key, no overlap (so a rollout waits for acknowledgements only).
    async fn setup(self, k: &Keyd, seen: &mut Seen) -> Result<(), Gone> {
        if matches!(self, Scenario::Bootstrap | Scenario::NodeBootstrap) {
            return Ok(());
        }
        call(
            k,
            Identity::Admin,
            Method::PUT,
            "/v1/schedules/ipsec",
            Some(json!({ "overlap": "0s" })),
        )
        .await?;
        rotate_ipsec(k, seen).await?;
        for (i, name) in NODES.iter().enumerate() {
            register_dev_node(k, name, i).await?;
        }
        nodes_fetch_and_ack(k, seen, &NODES).await?;
        seen.nodes = NODES.iter().map(|n| n.to_string()).collect();
        let b = call(
            k,
            Identity::Node("node-a"),
            Method::GET,
            "/v1/nodes/node-a/bundle",
            None,
        )
        .await?;
        seen.psk_epoch = b["wireguard"]["epoch"].as_u64().unwrap();
        if self == Scenario::Prune {
            // The tick closes the segment once it holds 10 records.
            for _ in 0..100 {
                if closed_segment(k).await?.is_some() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("no audit segment was closed");
        }
        Ok(())
    }

    /// The operation under test, up to where keyd has acknowledged all of it (or is gone).
    async fn drive(
        self,
        k: &Keyd,
        seen: &mut Seen,
        nb: Option<&NodeBootstrap>,
    ) -> Result<(), Gone> {
        match self {
            Scenario::Bootstrap => Ok(()),
            Scenario::NodeBootstrap => {
                let nb = nb.unwrap();
                nb.bootstrap(seen).await?;
                nb.register(k).await
            }
            Scenario::Rollout => {
                rotate_ipsec(k, seen).await?;
                drive_rollout(k, seen, &NODES).await
            }
            Scenario::KekRotation => {
                call(
                    k,
                    Identity::Admin,
                    Method::POST,
                    "/v1/kek/rotate",
                    Some(json!({})),
                )
                .await?;
                wait_kek(k).await
            }
            Scenario::Prune => {
                let through = prune(k).await?;
                wait_pruned(k, through).await
            }
            Scenario::NodeRemoval => {
                call(k, Identity::Admin, Method::DELETE, "/v1/nodes/node-b", None).await?;
                drive_rollout(k, seen, &NODES[..1]).await
            }
        }
    }

    /// After the restart: the operation completes, resumed by keyd or (when it was never
    /// acknowledged) retried as a client would.
    async fn complete(self, k: &Keyd, seen: &mut Seen, nb: Option<&NodeBootstrap>) {
        let done = async {
            match self {
                Scenario::Bootstrap => Ok(()),
                Scenario::NodeBootstrap => {
                    let nb = nb.unwrap();
                    // The agent retries until it has a certificate, then registers (again).
                    if seen.certificates.is_empty() {
                        nb.bootstrap(seen).await?;
                    }
                    nb.register(k).await?;
                    certificates_audited(&export(k).await?, seen);
                    Ok(())
                }
                Scenario::Rollout => {
                    let s = ipsec(k).await?;
                    let resumed =
                        s.rollout.is_some() || s.outbound_spi != Some(last_setup_spi(seen));
                    if !resumed {
                        rotate_ipsec(k, seen).await?;
                    }
                    drive_rollout(k, seen, &NODES).await
                }
                Scenario::KekRotation => {
                    let kek = call(k, Identity::Admin, Method::GET, "/v1/kek", None).await?;
                    if kek["migration"].is_null() {
                        call(
                            k,
                            Identity::Admin,
                            Method::POST,
                            "/v1/kek/rotate",
                            Some(json!({})),
                        )
                        .await?;
                    }
                    wait_kek(k).await
                }
                Scenario::Prune => {
                    let log = export(k).await?;
                    if !log.contains("\"audit.pruned\"") {
                        prune(k).await?;
                    }
                    let through = pruned_through(&export(k).await?);
                    wait_pruned(k, through).await
                }
                Scenario::NodeRemoval => {
                    let nodes = call(k, Identity::Admin, Method::GET, "/v1/nodes", None).await?;
                    if nodes
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|n| n["name"] == "node-b")
                    {
                        call(k, Identity::Admin, Method::DELETE, "/v1/nodes/node-b", None).await?;
                    }
                    // No key node-b held stays in use: keyd finishes the rotations the removal
                    // started, even when the crash came between the removal and them.
                    let held = last_setup_spi(seen);
                    for _ in 0..100 {
                        let s = ipsec(k).await?;
                        if s.rollout.is_some() || s.outbound_spi != Some(held) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    drive_rollout(k, seen, &NODES[..1]).await?;
                    let s = ipsec(k).await?;
                    assert!(
                        s.outbound_spi != Some(held) && s.keys.iter().all(|x| x.spi != held),
                        "node-b's key {held} is still in use: {s:?}"
                    );
                    let b = call(
                        k,
                        Identity::Node("node-a"),
                        Method::GET,
                        "/v1/nodes/node-a/bundle",
                        None,
                    )
                    .await?;
                    let epoch = b["wireguard"]["epoch"].as_u64().unwrap();
                    assert!(
                        epoch > seen.psk_epoch,
                        "the WireGuard PSK epoch was not advanced past node-b's ({epoch})"
                    );
                    Ok(())
                }
            }
        };
        let r: Result<(), Gone> = done.await;
        r.unwrap_or_else(|_| panic!("keyd went away after the restart: {}", k.log()));
    }
}

/// The outbound SPI the setup ended with.
fn last_setup_spi(seen: &Seen) -> u8 {
    seen.rotated_to[0]
}

/// Prunes through the first closed segment. The tick may close another segment meanwhile
/// (409: the segments document changed); a client retries that.
async fn prune(k: &Keyd) -> Result<u64, Gone> {
    for _ in 0..20 {
        let (through, hash) = closed_segment(k).await?.unwrap();
        let mut c = k.connect(&Identity::Admin).await.ok_or(Gone)?;
        let r = c
            .post_json(
                "/v1/audit/prune",
                &json!({ "through_seq": through, "last_hash": hash }),
            )
            .await
            .map_err(|_| Gone)?;
        match r.status {
            StatusCode::OK => return Ok(through),
            StatusCode::CONFLICT => tokio::time::sleep(Duration::from_millis(50)).await,
            s => panic!("POST /v1/audit/prune: {s} {}", r.error_message()),
        }
    }
    panic!("the prune conflicted 20 times");
}

async fn wait_kek(k: &Keyd) -> Result<(), Gone> {
    for _ in 0..300 {
        let kek = call(k, Identity::Admin, Method::GET, "/v1/kek", None).await?;
        if kek["migration"]["state"] == "completed"
            && kek["retired"].as_array().is_none_or(|r| r.is_empty())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the KEK rotation did not complete");
}

/// The first closed segment: its last sequence number and hash.
async fn closed_segment(k: &Keyd) -> Result<Option<(u64, String)>, Gone> {
    let segs = call(k, Identity::Admin, Method::GET, "/v1/audit/segments", None).await?;
    Ok(segs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| !s["closed_at"].is_null())
        .map(|s| {
            (
                s["last_seq"].as_u64().unwrap(),
                s["last_hash"].as_str().unwrap().to_owned(),
            )
        }))
}

fn first_seq(log: &str) -> u64 {
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["type"] == "record")
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or(0)
}

fn pruned_through(log: &str) -> u64 {
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "record" && v["action"] == "audit.pruned")
        .filter_map(|v| v["details"]["through_seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Waits (up to 10 s) until the records up to `through` are gone (keyd's tick finishes a prune
/// a crash cut short).
async fn wait_pruned(k: &Keyd, through: u64) -> Result<(), Gone> {
    for _ in 0..200 {
        if first_seq(&export(k).await?) > through {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("records up to {through} were not pruned");
}

/// The keys keyd had handed out are still there with the same bytes: the newest key each node
/// was served (older ones may have been retired by a rollout that committed), any key whose
/// generation keyd acknowledged, and every served key that is still served is unchanged.
async fn keys_survived(k: &Keyd, seen: &Seen, scenario: Scenario) {
    let mut now = Seen::default();
    // A removed node is refused its bundle.
    let nodes: Vec<&'static str> = seen
        .keys
        .keys()
        .copied()
        .filter(|n| !(scenario == Scenario::NodeRemoval && *n == "node-b"))
        .collect();
    for &name in &nodes {
        let Ok(b) = call(
            k,
            Identity::Node(name),
            Method::GET,
            &format!("/v1/nodes/{name}/bundle"),
            None,
        )
        .await
        else {
            panic!("keyd went away: {}", k.log());
        };
        let b: NodeBundle = serde_json::from_value(b).unwrap();
        now.keys.insert(name, bundle_keys(&b));
        now.psks.insert(
            name,
            b.wireguard
                .peers
                .iter()
                .map(|p| (p.node.clone(), hex::encode(p.preshared_key.expose())))
                .collect(),
        );
    }
    for (name, before) in seen.keys.iter().filter(|(n, _)| nodes.contains(n)) {
        let after = &now.keys[name];
        for (spi, bytes) in before {
            if let Some((_, b)) = after.iter().find(|(s, _)| s == spi) {
                assert_eq!(b, bytes, "{name}: key {spi} changed across the crash");
            }
        }
        if let Some((spi, _)) = before.first() {
            assert!(
                after.iter().any(|(s, _)| s == spi),
                "{name}: newest key {spi} lost: {after:?}"
            );
        }
        // A key whose generation keyd acknowledged but no node fetched yet (a fetched one is
        // covered above: it stays unless a newer one replaced it).
        if let Some(spi) = seen.rotated_to.last()
            && !before.iter().any(|(s, _)| s == spi)
        {
            assert!(
                after.iter().any(|(s, _)| s == spi),
                "{name}: acknowledged key {spi} lost: {after:?}"
            );
        }
        // Nothing rotates the WireGuard PSKs in these, so every one is unchanged.
        if matches!(
            scenario,
            Scenario::KekRotation | Scenario::Prune | Scenario::Rollout
        ) {
            assert_eq!(
                seen.psks[name], now.psks[name],
                "{name}: WireGuard PSKs changed"
            );
        }
    }
    let listed = call(k, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    for n in &seen.nodes {
        let present = listed
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == n.as_str());
        assert!(
            present || (scenario == Scenario::NodeRemoval && n == "node-b"),
            "node {n} lost"
        );
    }
}

/// One run of a scenario from an empty data directory; with `abort_at`, until keyd aborts
/// there. Returns the commit points passed during the operation (after the setup).
async fn run(scenario: Scenario, abort_at: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let trace = dir.path().join("trace");
    let mut env = scenario.env();
    env.push(("KEYD_FAULT_TRACE", trace.display().to_string()));
    if let Some(p) = abort_at {
        env.push(("KEYD_FAULT_ABORT_AT", p.to_owned()));
    }
    let nb = (scenario == Scenario::NodeBootstrap).then(|| NodeBootstrap::prepare(&data));
    let spawn = |env: &[(&str, String)]| match &nb {
        None => Keyd::spawn(&data, env),
        Some(nb) => Keyd::spawn_serving(&data, &nb.config, env),
    };
    let mut k = spawn(&env);
    let mut seen = Seen::default();
    let started = k.ready().await;
    let mut setup_points = 0;
    let outcome = match started {
        Err(status) => Err(status),
        Ok(()) => {
            scenario
                .setup(&k, &mut seen)
                .await
                .unwrap_or_else(|_| panic!("keyd went away during the setup: {}", k.log()));
            if scenario != Scenario::Bootstrap {
                setup_points = points(&trace).len();
            }
            match scenario.drive(&k, &mut seen, nb.as_ref()).await {
                Ok(()) => Ok(()),
                Err(Gone) => Err(k
                    .exited()
                    .await
                    .unwrap_or_else(|| panic!("keyd stopped answering: {}", k.log()))),
            }
        }
    };
    let passed: Vec<String> = points(&trace).split_off(setup_points);
    let Some(point) = abort_at else {
        outcome.unwrap_or_else(|s| {
            panic!("the clean run of {scenario:?} ended with {s}: {}", k.log())
        });
        k.stop().await;
        return passed;
    };
    // The process must end by the abort at this very point (a later tick may reach it).
    let status = match outcome {
        Err(s) => s,
        Ok(()) => k
            .exited()
            .await
            .unwrap_or_else(|| panic!("{scenario:?}: point {point} was not reached: {passed:?}")),
    };
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "{scenario:?} at {point}: keyd ended with {status}: {}",
        k.log()
    );
    assert!(
        k.log()
            .contains(&format!("aborting at commit point {point}")),
        "{}",
        k.log()
    );
    drop(k);

    let mut k = spawn(&scenario.env());
    k.ready().await.unwrap_or_else(|s| {
        panic!(
            "{scenario:?} at {point}: keyd did not restart ({s}): {}",
            k.log()
        )
    });
    keys_survived(&k, &seen, scenario).await;
    scenario.complete(&k, &mut seen, nb.as_ref()).await;
    audit_verifies(&k, dir.path()).await;
    k.stop().await;
    passed
}

/// The node the bootstrap scenario's agent runs on. `keyd dev` made it no certificate: the one
/// from the bootstrap listener is its only way in.
const NEW_NODE: &str = "node-c";
/// The agent's projected service account token, as the stand-in API server knows it.
const SHIM_TOKEN: &str = "projected-token-of-keyd-node-shim-on-node-c";
/// keyd's own service account token, which the stand-in API server requires.
const KEYD_TOKEN: &str = "token-of-keyd";

/// The node bootstrap scenario's world: `keyd serve` with `[bootstrap]` (and `[nodes] claims =
/// "node-object"`) against a stand-in Kubernetes API server over HTTPS that answers TokenReview,
/// the agent's pod and its Node object in the API's own shapes, and only to keyd's token.
struct NodeBootstrap {
    config: PathBuf,
    /// The bootstrap listener.
    listen: u16,
    /// The CA of keyd's (and the stand-in's) server certificate.
    ca: PathBuf,
    /// Where [`Keyd::connect`] finds the node's certificate and key.
    pki: PathBuf,
    kube: tokio::task::JoinHandle<()>,
}

impl Drop for NodeBootstrap {
    fn drop(&mut self) {
        self.kube.abort();
    }
}

impl NodeBootstrap {
    /// Prepares `data` as `keyd dev` does, starts the stand-in API server and writes keyd's
    /// configuration next to `data`.
    fn prepare(data: &Path) -> Self {
        let setup = prepare_dev(data);
        let dir = data.parent().unwrap();
        let token = dir.join("kube-token");
        std::fs::write(&token, KEYD_TOKEN).unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let kube_port = std_listener.local_addr().unwrap().port();
        std_listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        // The stand-in serves keyd's dev server certificate (localhost, 127.0.0.1).
        let tls = keyd_mtls::tls::serving_config(&keyd_mtls::tls::ServerTlsPaths {
            cert: setup.pki.server.cert.clone(),
            key: setup.pki.server.key.clone(),
            client_ca: None,
        })
        .unwrap();
        let kube = tokio::spawn(async move {
            let (_keep, rx) = tokio::sync::watch::channel(tls);
            keyd_mtls::server::serve_tls_router(
                listener,
                rx,
                stand_in_kube(),
                keyd_mtls::server::Limits::default(),
                |_| {},
                std::future::pending(),
            )
            .await;
        });
        let listen = process::free_port();
        let keyd_toml = std::fs::read_to_string(&setup.keyd_toml).unwrap();
        let open = "claims = \"open\"";
        assert!(keyd_toml.contains(open), "{keyd_toml}");
        let text = format!(
            "{}\n[bootstrap]\nlisten = \"127.0.0.1:{listen}\"\n\
             kube_api = \"https://127.0.0.1:{kube_port}\"\nkube_ca = {ca:?}\n\
             kube_token_file = {token:?}\nservice_accounts = [\"keyd/node-shim\"]\n\
             ca_key = {ca_key:?}\n",
            keyd_toml.replace(open, "claims = \"node-object\""),
            ca = setup.pki.ca,
            ca_key = setup.pki.dir.join("ca-key.pem"),
        );
        let config = dir.join("keyd-serve.toml");
        std::fs::write(&config, text).unwrap();
        Self {
            config,
            listen,
            ca: setup.pki.ca.clone(),
            pki: setup.pki.dir.clone(),
            kube,
        }
    }

    /// What node-shim does without a certificate: a fresh key, a CSR and the token to the
    /// bootstrap listener (server-authenticated TLS only). The certificate and key go where
    /// [`Keyd::connect`] looks for `Identity::Node(NEW_NODE)`.
    async fn bootstrap(&self, seen: &mut Seen) -> Result<(), Gone> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let tls = keyd_mtls::tls::server_auth_client_config(&self.ca).unwrap();
        let url = format!("https://127.0.0.1:{}", self.listen);
        let mut c = Connector::new(&url, tls)
            .unwrap()
            .connect()
            .await
            .map_err(|_| Gone)?;
        let r = c
            .post_json(
                "/v1/bootstrap/node",
                &json!({ "node": NEW_NODE, "token": SHIM_TOKEN, "csr": csr }),
            )
            .await
            .map_err(|_| Gone)?;
        assert_eq!(r.status, StatusCode::OK, "bootstrap: {}", r.error_message());
        let issued: BootstrapResponse = serde_json::from_slice(&r.body).unwrap();
        let name = format!("node-{NEW_NODE}");
        std::fs::write(self.pki.join(format!("{name}.pem")), &issued.certificate).unwrap();
        std::fs::write(
            self.pki.join(format!("{name}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        seen.certificates.push(hex::encode(cert.raw_serial()));
        Ok(())
    }

    /// With its new certificate the node registers what its Node object says and fetches its
    /// bundle.
    async fn register(&self, k: &Keyd) -> Result<(), Gone> {
        // Node number 2: 192.0.2.3 and 10.0.2.0/24, as its Node object says.
        register_dev_node(k, NEW_NODE, 2).await?;
        let b = call(
            k,
            Identity::Node(NEW_NODE),
            Method::GET,
            &format!("/v1/nodes/{NEW_NODE}/bundle"),
            None,
        )
        .await?;
        serde_json::from_value::<NodeBundle>(b).unwrap();
        Ok(())
    }
}

/// Every certificate that left keyd has its `node.certificate.issued` record: an issuance
/// nobody can audit does not happen. (A record without a certificate is a crash between the
/// commit and the answer; the agent asked again.)
fn certificates_audited(log: &str, seen: &Seen) {
    let recorded: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| {
            v["type"] == "record"
                && v["action"] == "node.certificate.issued"
                && v["details"]["node"] == NEW_NODE
        })
        .map(|v| v["details"]["serial"].as_str().unwrap().to_owned())
        .collect();
    assert!(!seen.certificates.is_empty());
    for c in &seen.certificates {
        assert!(
            recorded.contains(c),
            "certificate {c} was handed out unaudited: {recorded:?}"
        );
    }
}

/// The stand-in Kubernetes API server: the agent's pod `keyd/shim-on-c` runs on node-c, whose
/// Node object gives 192.0.2.3 and 10.0.2.0/24; [`SHIM_TOKEN`] is its bound token for audience
/// `keyd`. Without keyd's bearer token every call is 401, as with a real API server.
fn stand_in_kube() -> axum::Router {
    fn authorized(h: &HeaderMap) -> Result<(), StatusCode> {
        let want = format!("Bearer {KEYD_TOKEN}");
        (h.get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&want))
        .then_some(())
        .ok_or(StatusCode::UNAUTHORIZED)
    }
    fn not_found(kind: &str, name: &str) -> (StatusCode, Json<Value>) {
        (
            StatusCode::NOT_FOUND,
            Json(
                json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404,
                         "message": format!("{kind} \"{name}\" not found") }),
            ),
        )
    }
    let review = |h: HeaderMap, Json(body): Json<Value>| async move {
        authorized(&h)?;
        let valid = body["spec"]["token"] == SHIM_TOKEN
            && body["spec"]["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "keyd"));
        let status = if valid {
            json!({ "authenticated": true, "audiences": ["keyd"],
                    "user": { "username": "system:serviceaccount:keyd:node-shim",
                              "uid": "uid-of-node-shim-sa",
                              "extra": {
                                  "authentication.kubernetes.io/pod-name": ["shim-on-c"],
                                  "authentication.kubernetes.io/pod-uid": ["uid-of-shim-on-c"],
                                  "authentication.kubernetes.io/node-name": [NEW_NODE] } } })
        } else {
            json!({ "authenticated": false, "error": "invalid bearer token" })
        };
        Ok::<_, StatusCode>(Json(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": body["spec"], "status": status })))
    };
    let pod = |h: HeaderMap, UrlPath((ns, name)): UrlPath<(String, String)>| async move {
        authorized(&h).map_err(|s| (s, Json(Value::Null)))?;
        if (ns.as_str(), name.as_str()) != ("keyd", "shim-on-c") {
            return Err(not_found("pods", &name));
        }
        Ok(Json(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "namespace": ns, "name": name, "uid": "uid-of-shim-on-c" },
            "spec": { "nodeName": NEW_NODE, "serviceAccountName": "node-shim" },
            "status": { "phase": "Running" } })))
    };
    let node = |h: HeaderMap, UrlPath(name): UrlPath<String>| async move {
        authorized(&h).map_err(|s| (s, Json(Value::Null)))?;
        if name != NEW_NODE {
            return Err(not_found("nodes", &name));
        }
        Ok(Json(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": { "name": name },
            "spec": { "podCIDR": "10.0.2.0/24", "podCIDRs": ["10.0.2.0/24"] },
            "status": { "addresses": [
                { "type": "InternalIP", "address": "192.0.2.3" },
                { "type": "Hostname", "address": NEW_NODE } ] } })))
    };
    axum::Router::new()
        .route("/apis/authentication.k8s.io/v1/tokenreviews", post(review))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(pod))
        .route("/api/v1/nodes/{name}", get(node))
}

fn points(trace: &Path) -> Vec<String> {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_survives_a_crash_at_every_commit_point() {
    keyd_mtls::tls::install_default_provider();
    let started = Instant::now();
    let (mut total, mut survived) = (0, 0);
    for scenario in Scenario::ALL {
        let points = run(scenario, None).await;
        assert!(!points.is_empty(), "{scenario:?} passed no commit point");
        println!(
            "{scenario:?}: {} commit points: {}",
            points.len(),
            points.join(" ")
        );
        for p in &points {
            total += 1;
            run(scenario, Some(p)).await;
            survived += 1;
        }
    }
    println!(
        "crash points: {survived} of {total} crashes survived \
         (no key lost, operation completed, audit verified) in {:.0?}",
        started.elapsed()
    );
}
