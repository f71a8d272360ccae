//! A real keyd process on a real etcd (`[store] backend = "etcd"`): its state lives in etcd, not
//! in its data directory; it survives a restart of keyd; and while etcd is down keyd keeps
//! answering, refuses writes with 503 `store_unavailable`, says so on /readyz, and writes again
//! once etcd is back, without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use keyd_tests::etcd::EtcdCluster;
use serde_json::json;

mod process;
use process::{
    Identity, Keyd, audit_verifies, call, export, put_dev_node, register_dev_node, request,
};

fn etcd_env(endpoints: &[String]) -> Vec<(&'static str, String)> {
    vec![
        ("KEYD_STORE_BACKEND", "etcd".to_owned()),
        ("KEYD_STORE_ETCD_ENDPOINTS", endpoints.join(",")),
        ("KEYD_STORE_ETCD_PREFIX", "/keyd-e2e/".to_owned()),
    ]
}

async fn readyz(k: &Keyd) -> (u16, String) {
    k.readyz().await.expect("the ops port answers")
}

/// node-a's bundle from `k`: the status and the body, whatever they are.
async fn bundle_of_node_a(k: &Keyd) -> (StatusCode, serde_json::Value) {
    request(
        k,
        Identity::Node("node-a"),
        Method::GET,
        "/v1/nodes/node-a/bundle",
        None,
    )
    .await
    .unwrap()
}

/// Moves node-a to another endpoint: a write that is always allowed.
async fn move_node_a(k: &Keyd, to: usize) -> (StatusCode, serde_json::Value) {
    put_dev_node(k, "node-a", 0, &format!("192.0.2.{to}"))
        .await
        .unwrap()
}

/// `k` once it answers; the test fails with its log if it exits first.
async fn started(mut k: Keyd) -> Keyd {
    k.ready()
        .await
        .unwrap_or_else(|s| panic!("keyd exited {s}: {}", k.log()));
    k
}

/// keyd on `data` with `env`, ready, with node-a and node-b registered and one IPsec rotation.
async fn keyd_with_history(data: &std::path::Path, env: &[(&str, String)]) -> Keyd {
    let keyd = started(Keyd::spawn(data, env)).await;
    register_dev_node(&keyd, "node-a", 0).await.unwrap();
    register_dev_node(&keyd, "node-b", 1).await.unwrap();
    call(
        &keyd,
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    keyd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_keeps_its_state_in_etcd_and_rides_out_an_outage() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let env = etcd_env(&etcd.endpoints());
    let data = dir.path().join("data");

    let keyd = keyd_with_history(&data, &env).await;
    let status = call(&keyd, Identity::Admin, Method::GET, "/v1/status", None)
        .await
        .unwrap();
    // The store and this process as its leader (host/pid/nonce).
    let store = status["store"].as_str().unwrap();
    assert!(
        store.starts_with("etcd:"),
        "status names the store: {status}"
    );
    assert!(
        store.contains(" (leader: ") && store.contains(&format!("/{}/", keyd.child.id())),
        "status names the leader: {status}"
    );
    // Nothing of the state is in the data directory: no redb file.
    assert!(!data.join("keyd.redb").exists());
    keyd.stop().await;

    // A new keyd process on the same etcd has every node and key, and the chain goes on.
    let mut keyd = started(Keyd::spawn(&data, &env)).await;
    let nodes = call(&keyd, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    for n in ["node-a", "node-b"] {
        assert!(
            nodes.to_string().contains(n),
            "{n} missing after restart: {nodes}"
        );
    }
    audit_verifies(&keyd, dir.path()).await;

    // node-a fetches its bundle (handing out key material is audited, so this needs the store).
    call(
        &keyd,
        Identity::Node("node-a"),
        Method::GET,
        "/v1/nodes/node-a/bundle",
        None,
    )
    .await
    .unwrap();

    // etcd goes away: keyd still answers reads from what it holds, refuses writes with 503,
    // and says it is degraded.
    etcd.stop(0);
    let (code, body) = move_node_a(&keyd, 50).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{body}"
    );
    let (code, text) = readyz(&keyd).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("degraded"), "{text}");
    let (code, _) = request(&keyd, Identity::Admin, Method::GET, "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    // Nodes still get the keys they were handed (audited before the outage).
    let (code, bundle) = bundle_of_node_a(&keyd).await;
    assert_eq!(code, StatusCode::OK, "{bundle}");

    // etcd returns: the same keyd writes again by itself.
    etcd.restart(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = move_node_a(&keyd, 51).await;
        if code.is_success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still failing after etcd returned: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, text) = readyz(&keyd).await;
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains("degraded"), "{text}");
    audit_verifies(&keyd, dir.path()).await;
    // The same process all along: it kept its leadership through the outage.
    assert!(
        keyd.child.try_wait().unwrap().is_none(),
        "keyd exited: {}",
        keyd.log()
    );
    keyd.stop().await;
}

/// Waits until the ops port answers /readyz at all.
async fn readyz_when_up(k: &Keyd) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(answer) = k.readyz().await {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "ops port never answered: {}",
            k.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to `within`) until `k`'s /readyz says it leads; how long that took.
async fn leads_within(k: &Keyd, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some((200, text)) = k.readyz().await
            && text.contains("(leader)")
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not leading after {within:?}: {:?}\n{}",
            k.readyz().await,
            k.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node record `name` as replica `k` serves it.
async fn node_on(k: &Keyd, name: &str) -> serde_json::Value {
    let nodes = call(k, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// Two keyd over one etcd: both serve the API, each sees what the other writes at once (an etcd
/// watch keeps their caches coherent), and when the leader is SIGKILLed the other leads within
/// the lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_together_and_one_takes_over_when_the_leader_is_killed() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let ttl = 2;
    let mut env = etcd_env(&etcd.endpoints());
    env.push(("KEYD_STORE_ETCD_LEASE_TTL", format!("{ttl}s")));
    // Both processes share the data directory for the dev PKI and the local KEK; their state
    // is in etcd.
    let data = dir.path().join("data");
    let mut a = started(Keyd::spawn(&data, &env)).await;
    leads_within(&a, Duration::from_secs(10)).await;
    register_dev_node(&a, "node-a", 0).await.unwrap();

    let b = started(Keyd::spawn(&data, &env)).await;
    let (code, text) = readyz(&b).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("replica"), "{text}");
    // b serves the API: what a wrote is there, and what b writes a serves at once.
    assert_eq!(node_on(&b, "node-a").await["endpoint"], "192.0.2.1");
    register_dev_node(&b, "node-b", 1).await.unwrap();
    let written = Instant::now();
    while node_on(&a, "node-b").await.is_null() {
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "a never saw node-b"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "a write on one replica served by the other after {:?}",
        written.elapsed()
    );
    // A long poll held by b answers when a takes a write.
    let poll = {
        let mut c = b.connect(&Identity::Node("node-b")).await.unwrap();
        let r = c.get("/v1/nodes/node-b/bundle").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
        let etag = r.headers[http::header::ETAG].to_str().unwrap().to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = c
                .send(
                    Method::GET,
                    "/v1/nodes/node-b/bundle?wait=20s",
                    None,
                    &[(http::header::IF_NONE_MATCH, etag.as_str())],
                )
                .await
                .unwrap();
            (r.status, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = move_node_a(&a, 50).await;
    assert!(code.is_success(), "{code} {body}");
    let (status, took) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        took < Duration::from_secs(10),
        "the long poll waited {took:?}"
    );
    // keyctl status on either replica lists both, and which one leads.
    let status = call(&b, Identity::Admin, Method::GET, "/v1/status", None)
        .await
        .unwrap();
    let replicas = status["replication"]["replicas"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(replicas.len(), 2, "{status}");
    let leader: Vec<_> = replicas.iter().filter(|r| r["leader"] == true).collect();
    assert_eq!(leader.len(), 1, "{status}");
    assert!(
        leader[0]["name"]
            .as_str()
            .unwrap()
            .contains(&format!("/{}/", a.child.id())),
        "{status}"
    );

    a.child.kill().unwrap(); // SIGKILL: no resignation, the lease must expire
    a.child.wait().unwrap();
    let took = leads_within(&b, Duration::from_secs(ttl + 5)).await;
    println!("failover after SIGKILL of the leader: {took:?} (lease TTL {ttl}s)");
    // The lease TTL, a poll (250 ms), and the new leader's take-over.
    assert!(took < Duration::from_secs(ttl + 1), "took {took:?}");
    for n in ["node-a", "node-b"] {
        assert!(
            !node_on(&b, n).await.is_null(),
            "{n} missing after failover"
        );
    }
    let (code, body) = move_node_a(&b, 60).await;
    assert!(code.is_success(), "{code} {body}");
    audit_verifies(&b, dir.path()).await;

    // The old leader, restarted, serves as a replica behind the new one.
    let a2 = started(Keyd::spawn(&data, &env)).await;
    let (code, text) = readyz(&a2).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("replica"), "{text}");
    // A clean stop of the leader resigns at once: the other leads well within the TTL.
    let stopped = Instant::now();
    b.stop().await;
    leads_within(&a2, Duration::from_secs(ttl + 5)).await;
    println!("handover after a clean stop: {:?}", stopped.elapsed());
    audit_verifies(&a2, dir.path()).await;
    a2.stop().await;
}

fn keyd_store_copy(config: &std::path::Path, from: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keyd"))
        .args(["store", "copy", "--config"])
        .arg(config)
        .arg("--from")
        .arg(from)
        .env_remove("KEYD_LOG_LEVEL")
        .output()
        .unwrap()
}

fn count_keys(endpoints: &[String], prefix: &str) -> i64 {
    keyd::store::etcd::EtcdStore::connect(&keyd_tests::etcd::settings(endpoints, prefix))
        .unwrap()
        .count_keys()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_store_copy_moves_a_redb_store_into_etcd_and_keyd_serves_it() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A keyd on redb with some history.
    let keyd = keyd_with_history(&data, &[]).await;
    let before = call(&keyd, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    keyd.stop().await;

    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let endpoints = etcd.endpoints();
    let config = dir.path().join("keyd-etcd.toml");
    let base = std::fs::read_to_string(data.join("keyd.toml")).unwrap();
    std::fs::write(
        &config,
        format!(
            "{base}\n[store]\nbackend = \"etcd\"\n\n[store.etcd]\nendpoints = {endpoints:?}\n\
             prefix = \"/copied/\"\nlease_ttl = \"2s\"\n"
        ),
    )
    .unwrap();
    let redb = data.join("keyd.redb");
    let out = keyd_store_copy(&config, &redb);
    assert!(
        out.status.success(),
        "copy failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("keyd store copy: {report}");
    assert!(
        report["sealed_records_opened"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["audit_records"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["to"].as_str().unwrap().contains("/copied/"),
        "{report}"
    );

    // A second copy into the same prefix is refused, and changes nothing.
    let keys = count_keys(&endpoints, "/copied/");
    let out = keyd_store_copy(&config, &redb);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(count_keys(&endpoints, "/copied/"), keys);

    // keyd on the copy: the same nodes and keys, and the moved chain verifies with the copy's
    // own record at its end.
    let mut keyd = Keyd::spawn_serving(&data, &config, &[]);
    keyd.ready()
        .await
        .unwrap_or_else(|s| panic!("keyd exited {s}: {}", keyd.log()));
    let after = call(&keyd, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    assert_eq!(before, after);
    let status = call(&keyd, Identity::Admin, Method::GET, "/v1/status", None)
        .await
        .unwrap();
    assert!(
        status["store"].as_str().unwrap().starts_with("etcd:"),
        "{status}"
    );
    audit_verifies(&keyd, dir.path()).await;
    let exported = process::export(&keyd).await.unwrap();
    assert!(exported.contains("\"store.copied\""));
    keyd.stop().await;

    // A source whose records cannot be opened (its KEK file replaced) is not copied at all.
    let kek = data.join("kek.key");
    let original = std::fs::read(&kek).unwrap();
    {
        use base64::Engine as _;
        let wrong = base64::engine::general_purpose::STANDARD.encode([0x5a; 32]);
        std::fs::write(&kek, format!("{wrong}\n")).unwrap();
    }
    let other = dir.path().join("keyd-etcd-2.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("/copied/", "/second/"),
    )
    .unwrap();
    let out = keyd_store_copy(&other, &redb);
    assert_eq!(out.status.code(), Some(1));
    println!(
        "copy with a wrong KEK: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open"), "{err}");
    assert_eq!(
        count_keys(&endpoints, "/second/"),
        0,
        "nothing may be written"
    );
    std::fs::write(&kek, original).unwrap();

    // A copy that stopped half way (its marker left behind) is named as such, and keyd will
    // not lead that prefix.
    {
        let half = std::sync::Arc::new(
            keyd::store::etcd::EtcdStore::connect(&keyd_tests::etcd::settings(
                &endpoints, "/broken/",
            ))
            .unwrap(),
        );
        let (_tx, stop) = tokio::sync::watch::channel(false);
        half.lead("test", Duration::from_secs(2), |_| {}, stop)
            .await
            .unwrap()
            .unwrap();
        half.set_copy_incomplete(true, "test").unwrap();
        keyd::store::Store::commit(
            half.as_ref(),
            keyd::store::Txn::default().put(keyd::store::Table::Meta, "partial", b"x".to_vec()),
        )
        .unwrap();
        half.resign();
    }
    let broken = dir.path().join("keyd-etcd-broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("/copied/", "/broken/"),
    )
    .unwrap();
    let out = keyd_store_copy(&broken, &redb);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not finish"), "{err}");
    let mut refused = Keyd::spawn_serving(&data, &broken, &[]);
    let status = refused
        .ready()
        .await
        .expect_err("keyd must not serve a half-copied prefix");
    assert!(!status.success());
    assert!(
        refused.log().contains("did not finish"),
        "{}",
        refused.log()
    );
}

/// keyd (re)started while etcd is down waits for it, not in a crash loop, and leads once etcd
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_started_without_etcd_waits_for_it() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let env = etcd_env(&etcd.endpoints());
    etcd.stop(0);
    let data = dir.path().join("data");
    let mut keyd = Keyd::spawn(&data, &env);
    let (code, text) = readyz_when_up(&keyd).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("waiting for etcd"), "{text}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(keyd.child.try_wait().unwrap().is_none(), "{}", keyd.log());
    etcd.restart(0);
    keyd.ready()
        .await
        .unwrap_or_else(|s| panic!("keyd exited {s}: {}", keyd.log()));
    register_dev_node(&keyd, "node-a", 0).await.unwrap();
    keyd.stop().await;
}

// ---- three replicas over three etcd members, the leader killed twenty times ----------------

/// The simulated nodes: each follows its bundle as node-shim does (install the new keys, switch
/// outbound, remove what the bundle dropped) and acknowledges.
const FLEET: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

#[derive(Debug, Default)]
struct SimNode {
    installed: Vec<u8>,
    outbound: Option<u8>,
    /// The ETag of the bundle it follows, sent as `If-None-Match` as node-shim does.
    etag: Option<String>,
    /// The last acknowledgement keyd answered with success: (SPIs, outbound SPI).
    acked: Option<(Vec<u8>, Option<u8>)>,
}

/// One step of node `name` against replica `k`: `false` when the replica did not answer it
/// (killed under it), which a real node retries against another.
async fn follow(k: &Keyd, name: &'static str, n: &mut SimNode) -> bool {
    let Some(mut c) = k.connect(&Identity::Node(name)).await else {
        return false;
    };
    let held: Vec<_> = n
        .etag
        .iter()
        .map(|e| (http::header::IF_NONE_MATCH, e.as_str()))
        .collect();
    let Ok(r) = c
        .send(
            Method::GET,
            &format!("/v1/nodes/{name}/bundle"),
            None,
            &held,
        )
        .await
    else {
        return false;
    };
    if r.status == StatusCode::NOT_MODIFIED {
        return true;
    }
    assert_eq!(
        r.status,
        StatusCode::OK,
        "bundle of {name}: {}",
        r.error_message()
    );
    n.etag = Some(r.headers[http::header::ETAG].to_str().unwrap().to_owned());
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let Some(ipsec) = body["ipsec"].as_object() else {
        return true;
    };
    let spis: Vec<u8> = ipsec["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| u8::try_from(k["spi"].as_u64().unwrap()).unwrap())
        .collect();
    let outbound = ipsec["outbound_spi"]
        .as_u64()
        .map(|s| u8::try_from(s).unwrap());
    // Programming order: install the new keys, switch outbound, remove what the bundle dropped.
    for s in &spis {
        if !n.installed.contains(s) {
            n.installed.push(*s);
        }
    }
    n.outbound = outbound;
    n.installed.retain(|s| spis.contains(s));
    match request(
        k,
        Identity::Node(name),
        Method::POST,
        &format!("/v1/nodes/{name}/ack"),
        Some(json!({ "ipsec_spis": spis, "ipsec_outbound_spi": outbound })),
    )
    .await
    {
        Ok((status, _)) if status.is_success() => {
            n.acked = Some((spis, outbound));
            true
        }
        // The rollout moved on between the fetch and the acknowledgement (a key it names was
        // retired meanwhile): refused, and the node's next fetch has the newer bundle.
        Ok((StatusCode::UNPROCESSABLE_ENTITY, body))
            if body["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not a key keyd holds")) =>
        {
            true
        }
        Ok((status, body)) => panic!("ack of {name}: {status} {body}"),
        Err(_) => false,
    }
}

/// Every node's outbound key is installed at every other node.
fn no_pair_lacks_a_shared_key(fleet: &[SimNode], when: &str) {
    for (a, na) in FLEET.iter().zip(fleet) {
        for (b, nb) in FLEET.iter().zip(fleet) {
            if let Some(out) = na.outbound {
                assert!(
                    nb.installed.contains(&out),
                    "{when}: {a} sends with SPI {out}, which {b} lacks ({fleet:?})"
                );
            }
        }
    }
}

/// The replicas (by index) that answer; the ones that say they lead.
async fn leaders(replicas: &[Keyd], down: Option<usize>) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, k) in replicas.iter().enumerate() {
        if Some(i) == down {
            continue;
        }
        if let Some((200, text)) = k.readyz().await
            && text.contains("(leader)")
        {
            out.push(i);
        }
    }
    out
}

/// The rollout as replica `k` reports it (`Null` when none).
async fn rollout(k: &Keyd) -> Option<serde_json::Value> {
    let (status, body) = request(k, Identity::Admin, Method::GET, "/v1/ipsec", None)
        .await
        .ok()?;
    status.is_success().then(|| body["rollout"].clone())
}

/// Every node takes one step, each against the next replica that answers.
async fn fleet_step(
    replicas: &[Keyd],
    down: Option<usize>,
    fleet: &mut [SimNode],
    turn: &mut usize,
) {
    for (name, node) in FLEET.iter().zip(fleet.iter_mut()) {
        for _ in 0..replicas.len() {
            *turn += 1;
            let i = *turn % replicas.len();
            if Some(i) != down && follow(&replicas[i], name, node).await {
                break;
            }
        }
    }
    no_pair_lacks_a_shared_key(fleet, "after a fleet step");
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KillAt {
    /// Right after the rotation: the new key inbound only.
    Staged,
    /// Once the new key is outbound.
    Active,
    /// Every node acknowledged the new outbound key: the old one waits out the overlap.
    Retiring,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_their_leader_twenty_times_during_rollouts() {
    if !keyd_tests::etcd::available() {
        return;
    }
    const KILLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3);
    let ttl = 2;
    let mut env = etcd_env(&etcd.endpoints());
    env.push(("KEYD_STORE_ETCD_LEASE_TTL", format!("{ttl}s")));
    let data = dir.path().join("data");
    // Certificates for four nodes (keyd dev makes two), before any keyd starts.
    let names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    keyd::pki::ensure_dev_pki(&data, &names, &FLEET).unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let k = started(Keyd::spawn(&data, &env)).await;
        replicas.push(k);
    }
    assert_eq!(leaders(&replicas, None).await.len(), 1);
    // The old key leaves 2 s after the new one is outbound everywhere: a window to kill in.
    call(
        &replicas[1],
        Identity::Admin,
        Method::PUT,
        "/v1/schedules/ipsec",
        Some(json!({ "overlap": "2s" })),
    )
    .await
    .unwrap();
    call(
        &replicas[2],
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    for (i, name) in FLEET.iter().enumerate() {
        register_dev_node(&replicas[i % 3], name, i).await.unwrap();
    }
    let mut fleet: Vec<SimNode> = FLEET.iter().map(|_| SimNode::default()).collect();
    let mut turn = 0;
    fleet_step(&replicas, None, &mut fleet, &mut turn).await;
    let before = export(&replicas[0]).await.unwrap();
    let count = |log: &str, event: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("\"action\":\"{event}\"")))
            .count()
    };

    let mut failovers = Vec::new();
    for round in 0..KILLS {
        let at = [KillAt::Staged, KillAt::Active, KillAt::Retiring][round % 3];
        // Rotate through a replica that does not lead: any replica takes admin writes.
        let leader = leaders(&replicas, None).await;
        assert_eq!(leader.len(), 1, "round {round}: leaders {leader:?}");
        let other = (leader[0] + 1) % replicas.len();
        call(
            &replicas[other],
            Identity::Admin,
            Method::POST,
            "/v1/ipsec/rotate",
            Some(json!({})),
        )
        .await
        .unwrap();
        // Play the nodes until the rollout stands where this round kills.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = rollout(&replicas[other]).await.unwrap_or_default();
            let reached = match at {
                KillAt::Staged => r["phase"] == "staged",
                KillAt::Active => r["phase"] == "active",
                KillAt::Retiring => {
                    r["phase"] == "active" && r["waiting_for"].as_array().is_some_and(Vec::is_empty)
                }
            };
            if reached {
                break;
            }
            assert!(
                !r.is_null(),
                "round {round}: the rollout ended before {at:?}"
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: never reached {at:?}: {r}"
            );
            fleet_step(&replicas, None, &mut fleet, &mut turn).await;
        }
        let killed = leaders(&replicas, None).await;
        assert_eq!(killed.len(), 1, "round {round}: leaders {killed:?}");
        let killed = killed[0];
        replicas[killed].child.kill().unwrap();
        replicas[killed].child.wait().unwrap();
        let since = Instant::now();
        // Nodes keep following the replicas that remain while they elect a leader.
        let took = loop {
            let now_leading = leaders(&replicas, Some(killed)).await;
            assert!(now_leading.len() <= 1, "two leaders: {now_leading:?}");
            if !now_leading.is_empty() {
                break since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(ttl + 5),
                "round {round}: no leader after {:?}",
                since.elapsed()
            );
            fleet_step(&replicas, Some(killed), &mut fleet, &mut turn).await;
        };
        println!("round {round}: killed the leader at {at:?}; another led after {took:?}");
        failovers.push(took);
        // The killed replica comes back (as its supervisor would restart it).
        let back = started(Keyd::spawn(&data, &env)).await;
        replicas[killed] = back;
        // The rollout completes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rollout(&replicas[killed])
            .await
            .is_none_or(|r| !r.is_null())
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the rollout did not complete: {:?}",
                rollout(&replicas[killed]).await
            );
            fleet_step(&replicas, None, &mut fleet, &mut turn).await;
        }
        fleet_step(&replicas, None, &mut fleet, &mut turn).await;
    }
    failovers.sort();
    println!(
        "failover after SIGKILL of the leader, {KILLS} times (lease TTL {ttl}s): p50 {:?}, max {:?}",
        failovers[KILLS / 2],
        failovers[KILLS - 1]
    );
    // Within the lease TTL plus one second, every time.
    assert!(
        failovers[KILLS - 1] < Duration::from_secs(ttl + 1),
        "{failovers:?}"
    );
    // Every rollout ran each of its steps exactly once, and every acknowledged write is there.
    let after = export(&replicas[0]).await.unwrap();
    for event in [
        "ipsec.key.staged",
        "ipsec.key.activated",
        "ipsec.key.retired",
    ] {
        assert_eq!(
            count(&after, event) - count(&before, event),
            KILLS,
            "{event} in the audit log"
        );
    }
    for (name, node) in FLEET.iter().zip(&fleet) {
        let record = node_on(&replicas[0], name).await;
        let (spis, outbound) = node.acked.clone().unwrap();
        assert_eq!(
            record["acked"]["ipsec_spis"],
            json!(spis),
            "{name}: {record}"
        );
        assert_eq!(
            record["acked"]["ipsec_outbound_spi"],
            json!(outbound),
            "{name}: {record}"
        );
    }
    // One term per leader, and what only a leader does was done by that term's leader.
    let terms = leader_terms(&after);
    assert_eq!(terms.len(), KILLS + 1, "{terms:?}");
    audit_verifies(&replicas[0], dir.path()).await;
}

/// The holders of the leader terms in an audit export (`store.leader.elected`, in order),
/// having checked the actors of what keyd wrote by itself once a replica first led: each names
/// its replica (`keyd/ROLE@NAME`, none plain `keyd`), and what only a leader does (`rollout`,
/// `scheduler`, `leader`) names the leader of the term it is in: two leaders never acted in one
/// term. (Every replica records its own view of the KEK custodian: `custodian` may name any.)
fn leader_terms(export: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    let mut acted = 0;
    for line in export.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(action) = r["action"].as_str() else {
            continue; // the export's header and checkpoints
        };
        let actor = r["actor"].as_str().unwrap_or_default();
        if action == "store.leader.elected" {
            let replica = r["details"]["replica"].as_str().unwrap().to_owned();
            assert!(
                !terms.contains(&replica),
                "{replica} elected twice in one process: {line}"
            );
            terms.push(replica);
        }
        if actor != "keyd" && !actor.starts_with("keyd/") {
            continue;
        }
        let Some(leader) = terms.last() else {
            continue; // set-up records of the first start, before any election
        };
        let (role, by) = actor
            .strip_prefix("keyd/")
            .and_then(|a| a.split_once('@'))
            .unwrap_or_else(|| panic!("a record of keyd without its replica: {line}"));
        match role {
            "rollout" | "scheduler" | "leader" => {
                assert_eq!(
                    by, leader,
                    "a record of another replica in this term: {line}"
                );
                if action != "store.leader.elected" {
                    acted += 1;
                }
            }
            "custodian" => {}
            other => panic!("an unknown role {other:?}: {line}"),
        }
    }
    assert!(acted > 0, "no leader's records beside the elections");
    terms
}

/// A network namespace holding one keyd, joined to the host by a veth pair: taking the host's
/// end down cuts that keyd off from etcd (and from everything else), as a partition would.
struct Island {
    ns: String,
    dev: String,
    /// The host's end.
    outside: std::net::IpAddr,
    /// The namespace's end, where its keyd listens.
    inside: std::net::IpAddr,
}

impl Island {
    fn prerequisites() -> bool {
        let check = if !keyd_tests::prereq::is_root() {
            Err("not root".to_owned())
        } else if std::process::Command::new("ip").arg("-V").output().is_err() {
            Err("no `ip` command (iproute2)".to_owned())
        } else {
            Ok(())
        };
        keyd_tests::prereq::require("root and `ip` (network namespaces)", check)
    }

    fn new() -> Self {
        let pid = std::process::id();
        // Namespaces that a killed run left behind (their Drop never ran) hold subnets.
        let listed = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(owner) = name.strip_prefix("keyd-island-")
                && !std::path::Path::new(&format!("/proc/{owner}")).exists()
            {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", name])
                    .status();
            }
        }
        // A /30 no interface of the host is in (another run's, or a real network's).
        let free = |net: u8| {
            let out = std::process::Command::new("ip")
                .args(["-o", "addr", "show", "to", &format!("10.252.{net}.0/30")])
                .output()
                .unwrap();
            out.status.success() && out.stdout.is_empty()
        };
        let net = (0..=255u16)
            .map(|i| u8::try_from((u16::try_from(pid % 256).unwrap() + i) % 256).unwrap())
            .find(|n| free(*n))
            .expect("a free /30 in 10.252.0.0/16");
        let island = Self {
            ns: format!("keyd-island-{pid}"),
            dev: format!("kisl{pid}"),
            outside: std::net::IpAddr::from([10, 252, net, 1]),
            inside: std::net::IpAddr::from([10, 252, net, 2]),
        };
        let (ns, dev) = (&island.ns, &island.dev);
        island.run(&format!("ip netns add {ns}"));
        island.run(&format!(
            "ip link add {dev} type veth peer name eth0 netns {ns}"
        ));
        island.run(&format!("ip addr add {}/30 dev {dev}", island.outside));
        island.run(&format!("ip link set {dev} up"));
        island.run(&format!("ip -n {ns} link set lo up"));
        island.run(&format!(
            "ip -n {ns} addr add {}/30 dev eth0",
            island.inside
        ));
        island.run(&format!("ip -n {ns} link set eth0 up"));
        island
    }

    fn run(&self, cmd: &str) {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Takes the link down: nothing passes either way.
    fn cut(&self) {
        self.run(&format!("ip link set {} down", self.dev));
    }

    fn heal(&self) {
        self.run(&format!("ip link set {} up", self.dev));
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.dev])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The leader, in its own network namespace, loses its link to etcd during a rollout: it stops
/// acting (and exits) before its lease can expire, and only then does another replica lead; the
/// rollout completes under the new leader, and the audit log shows one leader per term. etcd
/// runs with TLS and client certificates here, so keyd's etcd client is proven over TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_before_its_lease_can_expire() {
    if !keyd_tests::etcd::available() || !Island::prerequisites() {
        return;
    }
    let island = Island::new();
    let dir = tempfile::tempdir().unwrap();
    // etcd as production runs it: TLS, client certificates required (and keyd refuses plain
    // http beyond loopback).
    let etcd = EtcdCluster::start_tls(&dir.path().join("etcd"), 1, &[island.outside]);
    let tls = etcd.client_tls().unwrap();
    let ttl = Duration::from_secs(2);
    let common = [
        ("KEYD_STORE_ETCD_LEASE_TTL", "2s".to_owned()),
        ("KEYD_STORE_ETCD_CA", tls.ca.display().to_string()),
        ("KEYD_STORE_ETCD_CERT", tls.cert.display().to_string()),
        ("KEYD_STORE_ETCD_KEY", tls.key.display().to_string()),
    ];
    let mut env = etcd_env(&etcd.endpoints());
    env.extend(common.clone());
    let mut island_env = etcd_env(&etcd.endpoints_on(island.outside));
    island_env.extend(common);
    let data = dir.path().join("data");
    let names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        island.inside.to_string(),
    ];
    keyd::pki::ensure_dev_pki(&data, &names, &FLEET).unwrap();
    // The island's keyd starts first, so it leads.
    let first = started(Keyd::spawn_in_netns(
        &data,
        &island.ns,
        island.inside,
        &island_env,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaders(std::slice::from_ref(&first), None).await.is_empty() {
        assert!(Instant::now() < deadline, "{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_pid = first.child.id();
    let mut replicas = vec![first];
    for _ in 0..2 {
        let k = started(Keyd::spawn(&data, &env)).await;
        replicas.push(k);
    }
    assert_eq!(leaders(&replicas, None).await, [0]);
    call(
        &replicas[1],
        Identity::Admin,
        Method::PUT,
        "/v1/schedules/ipsec",
        Some(json!({ "overlap": "2s" })),
    )
    .await
    .unwrap();
    call(
        &replicas[2],
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    for (i, name) in FLEET.iter().enumerate() {
        register_dev_node(&replicas[1 + i % 2], name, i)
            .await
            .unwrap();
    }
    let mut fleet: Vec<SimNode> = FLEET.iter().map(|_| SimNode::default()).collect();
    let mut turn = 0;
    fleet_step(&replicas, Some(0), &mut fleet, &mut turn).await;
    let before = export(&replicas[1]).await.unwrap();
    // A rollout, moved on by the leader as the nodes acknowledge.
    call(
        &replicas[2],
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rollout(&replicas[1]).await.unwrap_or_default()["phase"] != "active" {
        assert!(Instant::now() < deadline, "the rollout did not activate");
        fleet_step(&replicas, Some(0), &mut fleet, &mut turn).await;
    }

    island.cut();
    let cut = Instant::now();
    // Watched in this order, each pass: the island's leader exits, then another leads. Another
    // leading while it still runs would be two leaders at once.
    let stepped_down = loop {
        if let Some(status) = replicas[0].child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(75), "{}", replicas[0].log());
            break cut.elapsed();
        }
        let others = leaders(&replicas, Some(0)).await;
        assert!(
            others.is_empty(),
            "replica {others:?} leads while the cut-off leader still runs, {:?} after the cut",
            cut.elapsed()
        );
        assert!(
            cut.elapsed() < ttl * 3,
            "the cut-off leader still runs: {}",
            replicas[0].log()
        );
        fleet_step(&replicas, Some(0), &mut fleet, &mut turn).await;
    };
    println!("the cut-off leader stepped down {stepped_down:?} after the cut (lease TTL {ttl:?})");
    // It gives up two thirds of the TTL after sending the last keep-alive that was answered,
    // which was before the cut; etcd counts the lease from when it received that keep-alive,
    // so the lease was still running. (The ordering checked above is what matters; this bound
    // only allows for the exit's own latency.)
    assert!(
        stepped_down < ttl * 2 / 3 + Duration::from_millis(500),
        "{stepped_down:?}"
    );
    assert!(
        replicas[0].log().contains("lost the leadership"),
        "{}",
        replicas[0].log()
    );
    let took_over = loop {
        let now_leading = leaders(&replicas, Some(0)).await;
        assert!(now_leading.len() <= 1, "two leaders: {now_leading:?}");
        if !now_leading.is_empty() {
            break cut.elapsed();
        }
        assert!(cut.elapsed() < ttl * 3, "no leader after the cut");
        fleet_step(&replicas, Some(0), &mut fleet, &mut turn).await;
    };
    println!("another replica led {took_over:?} after the cut");
    // The lease expires at most a TTL after the cut, etcd sweeps expired leases every 500 ms,
    // and a replica polls the leader key every 100 ms: a loaded machine needs some slack.
    assert!(took_over < ttl * 2, "{took_over:?}");

    // The link comes back, and so does the island's keyd (as its supervisor would start it):
    // as a replica now.
    island.heal();
    let back = started(Keyd::spawn_in_netns(
        &data,
        &island.ns,
        island.inside,
        &island_env,
    ))
    .await;
    replicas[0] = back;
    let (code, text) = readyz(&replicas[0]).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("replica"), "{text}");
    // The rollout completes under the new leader, nodes following all three replicas.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rollout(&replicas[0]).await.is_none_or(|r| !r.is_null()) {
        assert!(
            Instant::now() < deadline,
            "the rollout did not complete: {:?}",
            rollout(&replicas[0]).await
        );
        fleet_step(&replicas, None, &mut fleet, &mut turn).await;
    }
    let log = export(&replicas[1]).await.unwrap();
    let terms = leader_terms(&log);
    assert_eq!(terms.len(), 2, "{terms:?}");
    assert!(terms[0].contains(&format!("/{first_pid}/")), "{terms:?}");
    assert!(!terms[1].contains(&format!("/{first_pid}/")), "{terms:?}");
    let count = |log: &str, event: &str| log.matches(&format!("\"action\":\"{event}\"")).count();
    for event in [
        "ipsec.key.staged",
        "ipsec.key.activated",
        "ipsec.key.retired",
    ] {
        assert_eq!(
            count(&log, event) - count(&before, event),
            1,
            "{event} in the audit log"
        );
    }
    audit_verifies(&replicas[1], dir.path()).await;
}

/// Writes node-a's endpoint through `k` until one is taken (or `within` passes): how long that
/// took, or the last refusal.
async fn write_within(
    k: &Keyd,
    to: &mut usize,
    within: Duration,
) -> Result<Duration, (StatusCode, serde_json::Value)> {
    let started = Instant::now();
    loop {
        *to += 1;
        let (code, body) = move_node_a(k, 10 + *to % 200).await;
        if code.is_success() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err((code, body));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two replicas over three etcd members. One member stopped (each in turn): both replicas keep
/// serving and writing. Two stopped: writes are refused with 503, bundles still served. Both
/// back: writes resume by themselves, and every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_ride_out_etcd_members_stopping() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(&dir.path().join("etcd"), 3);
    let mut env = etcd_env(&etcd.endpoints());
    // Longer than the quorum loss below lasts, so that the leader rides it out (a leader cut
    // off for two thirds of its lease exits: tested apart).
    env.push(("KEYD_STORE_ETCD_LEASE_TTL", "30s".to_owned()));
    let data = dir.path().join("data");
    let first = keyd_with_history(&data, &env).await;
    let second = started(Keyd::spawn(&data, &env)).await;
    let mut replicas = [first, second];
    for k in &replicas {
        let (code, body) = bundle_of_node_a(k).await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
    let mut to = 0;
    let mut acked = Vec::new();
    // One member of three down, each in turn: every write is taken (after the first, which
    // may wait for an etcd election when the stopped member led), on both replicas.
    let taken_out = |k: &Keyd| k.log().matches("etcd member does not answer").count();
    for m in 0..3 {
        let before: Vec<usize> = replicas.iter().map(taken_out).collect();
        etcd.stop(m);
        for (i, k) in replicas.iter().enumerate() {
            let took = write_within(k, &mut to, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("member {m} down, replica {i}: {e:?}"));
            println!("member {m} down: replica {i} wrote after {took:?}");
            for _ in 0..5 {
                to += 1;
                let (code, body) = move_node_a(k, 10 + to % 200).await;
                assert!(
                    code.is_success(),
                    "member {m} down, replica {i}: {code} {body}"
                );
                acked.push(10 + to % 200);
                let (code, body) = bundle_of_node_a(k).await;
                assert_eq!(code, StatusCode::OK, "member {m} down, replica {i}: {body}");
            }
        }
        // Each replica took the stopped member out of the set it sends requests to.
        for (i, k) in replicas.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while taken_out(k) <= before[i] {
                assert!(
                    Instant::now() < deadline,
                    "replica {i} kept member {m}: {}",
                    k.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        etcd.restart(m);
    }
    // Two down: no quorum. Writes are refused (once the remaining member knows it has no
    // leader), bundles are still served, /readyz says degraded.
    etcd.stop(0);
    etcd.stop(1);
    for (i, k) in replicas.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let body = loop {
            to += 1;
            let (code, body) = move_node_a(k, 10 + to % 200).await;
            if code == StatusCode::SERVICE_UNAVAILABLE {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} still writes without quorum: {code} {body}"
            );
            // Taken before the member noticed: acknowledged, so it must survive.
            assert!(code.is_success(), "{code} {body}");
            acked.push(10 + to % 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(body["error"], "store_unavailable", "replica {i}: {body}");
        let (code, body) = bundle_of_node_a(k).await;
        assert_eq!(code, StatusCode::OK, "replica {i} without quorum: {body}");
        let (code, text) = readyz(k).await;
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("degraded"), "replica {i}: {text}");
    }
    etcd.restart(0);
    etcd.restart(1);
    for (i, k) in replicas.iter().enumerate() {
        let took = write_within(k, &mut to, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("replica {i} after quorum returned: {e:?}"));
        println!("quorum back: replica {i} wrote after {took:?}");
        acked.push(10 + to % 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        while readyz(k).await.1.contains("degraded") {
            assert!(Instant::now() < deadline, "replica {i} still degraded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The last acknowledged endpoint is what both replicas serve, and the log verifies.
    let last = format!("192.0.2.{}", acked.last().unwrap());
    for k in &replicas {
        let deadline = Instant::now() + Duration::from_secs(5);
        while node_on(k, "node-a").await["endpoint"] != last.as_str() {
            assert!(Instant::now() < deadline, "{}", node_on(k, "node-a").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (i, k) in replicas.iter_mut().enumerate() {
        assert!(
            k.child.try_wait().ok().flatten().is_none(),
            "replica {i} exited: {}",
            k.log()
        );
    }
    // Every acknowledged write is in the audit log.
    let log = export(&replicas[0]).await.unwrap();
    for to in &acked {
        let endpoint = format!("\"endpoint\":\"192.0.2.{to}\"");
        assert!(
            log.lines()
                .any(|l| l.contains("\"node.updated\"") && l.contains(&endpoint)),
            "the write of 192.0.2.{to} is not in the audit log"
        );
    }
    audit_verifies(&replicas[0], dir.path()).await;
}

/// Two nodes claim one address at the same moment, each through another replica: exactly one
/// gets it, every time, and the other is refused naming the holder. (Each replica checks claims
/// against its own cache; the write also requires that no node record changed since, so two
/// replicas cannot both decide on what the other has not seen yet.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_give_one_address_to_two_nodes() {
    if !keyd_tests::etcd::available() {
        return;
    }
    const ROUNDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let env = etcd_env(&etcd.endpoints());
    let data = dir.path().join("data");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let k = started(Keyd::spawn(&data, &env)).await;
        replicas.push(k);
    }
    register_dev_node(&replicas[0], "node-a", 0).await.unwrap();
    register_dev_node(&replicas[1], "node-b", 1).await.unwrap();
    for round in 0..ROUNDS {
        let endpoint = format!("198.51.100.{}", 10 + round);
        let (a, b) = tokio::join!(
            put_dev_node(&replicas[round % 2], "node-a", 0, &endpoint),
            put_dev_node(&replicas[(round + 1) % 2], "node-b", 1, &endpoint),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let won: Vec<&str> = [("node-a", &a), ("node-b", &b)]
            .iter()
            .filter(|(_, (code, _))| code.is_success())
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {a:?} {b:?}");
        let (lost_code, lost_body) = if won[0] == "node-a" { &b } else { &a };
        assert_eq!(
            *lost_code,
            StatusCode::CONFLICT,
            "round {round}: {lost_body}"
        );
        assert!(
            lost_body["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("held by node \"{}\"", won[0]))),
            "round {round}: {lost_body}"
        );
        // Both replicas agree on who holds it.
        for k in &replicas {
            let deadline = Instant::now() + Duration::from_secs(5);
            while node_on(k, won[0]).await["endpoint"] != endpoint.as_str() {
                assert!(Instant::now() < deadline, "round {round}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A replica cut off from etcd keeps handing out the bundles it holds for
/// `store.etcd.max_unavailable`, then refuses (503 `replica_behind`, /readyz 503), and serves
/// again by itself once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_serves_held_bundles_for_a_bounded_time() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let mut env = etcd_env(&etcd.endpoints());
    env.push(("KEYD_STORE_ETCD_MAX_UNAVAILABLE", "3s".to_owned()));
    let data = dir.path().join("data");
    let keyd = keyd_with_history(&data, &env).await;
    let (code, body) = bundle_of_node_a(&keyd).await;
    assert_eq!(code, StatusCode::OK, "{body}");

    etcd.stop(0);
    let lost = Instant::now();
    // Within the bound: the held bundle, and /readyz says degraded until when.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, text) = readyz(&keyd).await;
        assert_eq!(code, 200, "{text}");
        if text.contains("cut off from the store") {
            assert!(text.contains("serving held bundles until"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "never degraded: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = bundle_of_node_a(&keyd).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // Past the bound: no keys, and not ready.
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(lost.elapsed()) + Duration::from_secs(1),
    )
    .await;
    let (code, body) = bundle_of_node_a(&keyd).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "replica_behind", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("store.etcd.max_unavailable"),
        "{body}"
    );
    let (code, text) = readyz(&keyd).await;
    assert_eq!(code, 503, "{text}");

    // etcd returns: the replica (restarted as a supervisor would if it had led) serves again.
    etcd.restart(0);
    let mut keyd = keyd;
    if keyd.child.try_wait().unwrap().is_some() {
        keyd = Keyd::spawn(&data, &env);
        keyd.ready()
            .await
            .unwrap_or_else(|s| panic!("keyd exited {s}: {}", keyd.log()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _) = bundle_of_node_a(&keyd).await;
        if code == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refusing after etcd returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, text) = readyz(&keyd).await;
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains("degraded"), "{text}");
    keyd.stop().await;
}

/// A KEK rotation runs on the leader; a replica refuses it (409 naming the leader), and once
/// the leader has rotated, the replica restarts (exit 75) to load the new keyring and serves
/// records sealed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_rotation_runs_on_the_leader_and_replicas_reload_the_keyring() {
    if !keyd_tests::etcd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1);
    let env = etcd_env(&etcd.endpoints());
    let data = dir.path().join("data");
    let a = keyd_with_history(&data, &env).await;
    leads_within(&a, Duration::from_secs(10)).await;
    let mut b = started(Keyd::spawn(&data, &env)).await;
    let (code, body) = request(
        &b,
        Identity::Admin,
        Method::POST,
        "/v1/kek/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("/{}/", a.child.id())),
        "names the leader: {body}"
    );
    call(
        &a,
        Identity::Admin,
        Method::POST,
        "/v1/kek/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    let status = b.exited().await.expect("the replica restarts");
    assert_eq!(status.code(), Some(75), "{}", b.log());
    assert!(b.log().contains("KEK keyring"), "{}", b.log());
    // Restarted, it opens what the leader sealed under the new KEK.
    call(
        &a,
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    let b = started(Keyd::spawn(&data, &env)).await;
    let (code, body) = bundle_of_node_a(&b).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // The migration's own records are the leader's, in its term.
    let log = export(&a).await.unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"kek.migration.completed\"")
                && l.contains("\"actor\":\"keyd/leader@")),
        "{log}"
    );
    assert_eq!(leader_terms(&log).len(), 1);
    b.stop().await;
    a.stop().await;
}
