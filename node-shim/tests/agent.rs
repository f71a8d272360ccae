//! The agent against a real keyd (in-process, mTLS on loopback) and the stateful fake kernel:
//! registration, acknowledgements of each rotation step, keyd going away, restart adoption and
//! WireGuard keypair rotation. No privileges needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keyd_node_shim::kernel::fake::FakeKernel;
use keyd_proto::identity::Identity;
use keyd_proto::{Ack, KeyClass, RotateRequest, ScheduleUpdate};

fn admin() -> Identity {
    Identity::Admin("test".into())
}

fn acked(keyd: &KeydHarness, node: &str) -> Ack {
    keyd.keyd
        .list_nodes()
        .into_iter()
        .find(|n| n.name == node)
        .map(|n| n.acked.ack)
        .unwrap_or_default()
}

/// Steps both agents until `done` holds (keyd's scheduler advances rollouts on its own tick).
async fn until<K: keyd_node_shim::kernel::Kernel>(
    agents: &mut [&mut keyd_node_shim::agent::Agent<K>],
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    for _ in 0..200 {
        for a in agents.iter_mut() {
            a.step().await;
        }
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn ipsec_rollout_steps_are_programmed_and_acknowledged() {
    let keyd = KeydHarness::start().await;
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    keyd.keyd
        .update_schedule(
            &admin(),
            KeyClass::Ipsec,
            ScheduleUpdate {
                overlap: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut cfg_a = keyd.point_at(
        config_ipsec("node-a", "192.168.0.1", "10.1.0.0/24"),
        "node-a",
    );
    cfg_a.ipsec.outbound_switch_delay = Duration::from_millis(300);
    let cfg_b = keyd.point_at(
        config_ipsec("node-b", "192.168.0.2", "10.2.0.0/24"),
        "node-b",
    );
    let ka = FakeKernel::new();
    let kb = FakeKernel::new();
    let (mut a, _) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, kb.clone());
    let ack = |spis: &[u8], out: u8| Ack {
        ipsec_spis: spis.to_vec(),
        ipsec_outbound_spi: Some(out),
        wireguard_epoch: None,
    };
    // Acknowledgements are vacuous while a node has no peers: wait for the states too.
    until(&mut [&mut a, &mut b], "key 1 everywhere", || {
        acked(&keyd, "node-a") == ack(&[1], 1)
            && acked(&keyd, "node-b") == ack(&[1], 1)
            && ka.state().states.len() == 2
            && kb.state().states.len() == 2
    })
    .await;
    // a: in and out state for b, three policies, one mark filter.
    assert_eq!(ka.state().states.len(), 2);
    assert_eq!(ka.state().policies.len(), 3);
    assert_eq!(ka.state().filters.len(), 1);

    // Staged: key 2 is installed everywhere (inbound) while outbound stays on 1 ...
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    a.step().await;
    b.step().await;
    assert_eq!(
        acked(&keyd, "node-a"),
        ack(&[1, 2], 1),
        "step 1: staged key installed"
    );
    let out_spis = |k: &FakeKernel| {
        k.state()
            .policies
            .values()
            .filter(|p| p.id.dir == keyd_node_shim::model::PolicyDir::Out)
            .map(|p| p.tmpl.spi)
            .collect::<Vec<_>>()
    };
    assert_eq!(out_spis(&ka), vec![1]);
    // ... then keyd activates it once both acknowledged, and both switch outbound.
    until(&mut [&mut a, &mut b], "outbound on key 2", || {
        acked(&keyd, "node-a") == ack(&[1, 2], 2) && acked(&keyd, "node-b") == ack(&[1, 2], 2)
    })
    .await;
    assert_eq!(out_spis(&ka), vec![2], "step 2: outbound switched");
    // Retired after the overlap: key 1's states leave the kernel.
    until(&mut [&mut a, &mut b], "key 1 retired", || {
        acked(&keyd, "node-a") == ack(&[2], 2) && acked(&keyd, "node-b") == ack(&[2], 2)
    })
    .await;
    assert!(
        !ka.state().states.keys().any(|id| id.spi == 1),
        "step 3: old key gone"
    );
    assert!(!kb.state().states.keys().any(|id| id.spi == 1));
}

#[tokio::test]
async fn a_long_poll_returns_when_the_bundle_changes() {
    let keyd = KeydHarness::start().await;
    let mut cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    cfg_a.long_poll = Some(Duration::from_secs(20));
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let ka = FakeKernel::new();
    let (mut a, _) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    // First step fetches (no etag yet); the second long-polls.
    a.step().await;
    let t = std::time::Instant::now();
    let waiter = tokio::spawn(async move {
        a.step().await;
        a
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.step().await; // b registers: a's peer set changes.
    let a = waiter.await.unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "long poll did not return on the change: {took:?}"
    );
    assert_eq!(ka.state().wg.as_ref().unwrap().peers.len(), 1);
    drop(a);
}

#[tokio::test]
async fn keyd_away_keeps_the_kernel_and_backs_off() {
    let keyd = KeydHarness::start().await;
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    let cfg_a = keyd.point_at(
        config_ipsec("node-a", "192.168.0.1", "10.1.0.0/24"),
        "node-a",
    );
    let cfg_b = keyd.point_at(
        config_ipsec("node-b", "192.168.0.2", "10.2.0.0/24"),
        "node-b",
    );
    let ka = FakeKernel::new();
    let (mut a, sa) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    b.step().await;
    a.step().await;
    let programmed = ka.state().states.clone();
    assert_eq!(programmed.len(), 2);
    assert!(sa.snapshot().keyd.reachable);

    keyd.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Something else deletes a state while keyd is away: it is put back; nothing is removed.
    let victim = *programmed.keys().next().unwrap();
    ka.state().states.remove(&victim);
    let mut delays = Vec::new();
    for _ in 0..5 {
        delays.push(a.step().await);
    }
    assert_eq!(
        ka.state().states.keys().collect::<Vec<_>>(),
        programmed.keys().collect::<Vec<_>>()
    );
    let s = sa.snapshot();
    assert!(!s.keyd.reachable, "{s:?}");
    assert_eq!(s.keyd.consecutive_failures, 5);
    assert!(
        s.keyd
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("unreachable"),
        "{s:?}"
    );
    // Backoff doubles (with jitter within [half, full]) up to the 1s cap of the test config.
    assert!(delays[0] <= Duration::from_millis(100), "{delays:?}");
    assert!(delays[4] >= Duration::from_millis(500), "{delays:?}");
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(1)),
        "{delays:?}"
    );
    let metrics = common_metrics(&sa);
    assert!(metrics.contains("node_shim_keyd_reachable 0"), "{metrics}");
    assert!(
        metrics.contains("node_shim_keyd_consecutive_failures 5"),
        "{metrics}"
    );
    assert!(metrics.contains("outcome=\"unreachable\""), "{metrics}");
}

fn common_metrics(s: &keyd_node_shim::status::Shared) -> String {
    s.metrics.encode()
}

#[tokio::test]
async fn restart_adopts_instead_of_flushing() {
    let keyd = KeydHarness::start().await;
    let cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let ka = FakeKernel::new();
    let (mut a, _) = start_fake_agent(cfg_a.clone(), ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    for _ in 0..2 {
        a.step().await;
        b.step().await;
    }
    let key_before = a.public_key().unwrap();
    assert_eq!(ka.state().wg.as_ref().unwrap().peers.len(), 1);
    let ops_before = ka.state().log.len();
    drop(a);

    // A new process: same kernel, no key file. It reads the private key back and changes nothing.
    let (mut a2, s2) = start_fake_agent(cfg_a, ka.clone());
    assert_eq!(a2.public_key(), Some(key_before));
    let adopted = s2.snapshot().adopted;
    assert!(adopted.wireguard_private_key);
    assert_eq!(adopted.wireguard_peers, 1);
    a2.step().await;
    a2.step().await;
    assert_eq!(
        ka.state().log.len(),
        ops_before,
        "restart changed the kernel: {:?}",
        &ka.state().log[ops_before..]
    );
    assert_eq!(acked(&keyd, "node-a").wireguard_epoch, Some(1));
}

#[tokio::test]
async fn wireguard_keypair_rotation_reaches_the_peer() {
    let keyd = KeydHarness::start().await;
    let cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let ka = FakeKernel::new();
    let kb = FakeKernel::new();
    let (mut a, sa) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, kb.clone());
    for _ in 0..2 {
        a.step().await;
        b.step().await;
    }
    let old = a.public_key().unwrap();
    assert!(kb.state().wg.as_ref().unwrap().peers.contains_key(&old));
    a.rotate_keypair().await.unwrap();
    let new = a.public_key().unwrap();
    assert_ne!(old, new);
    // Programmed locally at once, and registered with keyd.
    let dev = ka.state().wg.as_ref().unwrap().config.clone().unwrap();
    assert_eq!(dev.private_key.public_key(), new);
    assert_eq!(sa.snapshot().wireguard_public_key, Some(new.to_base64()));
    // b learns it on its next fetch; the old key is gone from b's kernel.
    b.step().await;
    let peers: Vec<_> = kb
        .state()
        .wg
        .as_ref()
        .unwrap()
        .peers
        .keys()
        .copied()
        .collect();
    assert_eq!(peers, vec![new]);
    assert!(common_metrics(&sa).contains("node_shim_wireguard_keypair_rotations_total 1"));
}

#[tokio::test]
async fn keyd_node_key_epochs_rotate_every_keypair_once() {
    let keyd = KeydHarness::start().await;
    let cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let ka = FakeKernel::new();
    let kb = FakeKernel::new();
    let (mut a, _) = start_fake_agent(cfg_a.clone(), ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, kb.clone());
    let epochs = |keyd: &KeydHarness| {
        keyd.keyd
            .list_nodes()
            .iter()
            .map(|n| n.wireguard_key_epoch)
            .collect::<Vec<_>>()
    };
    until(&mut [&mut a, &mut b], "both registered at epoch 1", || {
        epochs(&keyd) == vec![Some(1), Some(1)]
    })
    .await;
    let (old_a, old_b) = (a.public_key().unwrap(), b.public_key().unwrap());
    keyd.keyd
        .rotate_class(&admin(), KeyClass::WireguardNodeKeys)
        .await
        .unwrap();
    until(&mut [&mut a, &mut b], "both at epoch 2", || {
        epochs(&keyd) == vec![Some(2), Some(2)]
    })
    .await;
    let (new_a, new_b) = (a.public_key().unwrap(), b.public_key().unwrap());
    assert_ne!(old_a, new_a);
    assert_ne!(old_b, new_b);
    until(&mut [&mut a, &mut b], "peers updated", || {
        ka.state()
            .wg
            .as_ref()
            .unwrap()
            .peers
            .keys()
            .copied()
            .collect::<Vec<_>>()
            == vec![new_b]
            && kb
                .state()
                .wg
                .as_ref()
                .unwrap()
                .peers
                .keys()
                .copied()
                .collect::<Vec<_>>()
                == vec![new_a]
    })
    .await;
    // A restart adopts the key and its epoch (kept in the device alias): no new rotation.
    drop(a);
    let (mut a2, _) = start_fake_agent(cfg_a, ka.clone());
    a2.step().await;
    a2.step().await;
    assert_eq!(a2.public_key(), Some(new_a));
    assert_eq!(epochs(&keyd), vec![Some(2), Some(2)]);
}

#[tokio::test]
async fn new_peers_that_do_not_handshake_are_re_added_a_few_times() {
    let keyd = KeydHarness::start().await;
    let cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let ka = FakeKernel::new();
    let (mut a, _) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    b.step().await;
    a.step().await;
    assert_eq!(ka.state().wg.as_ref().unwrap().peers.len(), 1);
    let readds = |k: &FakeKernel| {
        k.state()
            .log
            .iter()
            .filter(|op| **op == "wg_peers_remove")
            .count()
    };
    assert_eq!(readds(&ka), 0);
    // The fake kernel never reports a handshake: the peer is re-added every second, five times.
    for _ in 0..14 {
        tokio::time::sleep(Duration::from_millis(750)).await;
        a.step().await;
    }
    assert_eq!(readds(&ka), 5);
    assert_eq!(
        ka.state().wg.as_ref().unwrap().peers.len(),
        1,
        "the peer is still there"
    );
}

/// State removed behind node-shim's back (a route deleted by hand, another agent flushing) is put
/// back within `resync_interval`, although the bundle did not change: the long poll is cut short
/// to compare the kernel with it.
#[tokio::test]
async fn drift_is_repaired_without_a_bundle_change() {
    use keyd_node_shim::kernel::Kernel as _;
    use keyd_node_shim::model::Op;

    let keyd = KeydHarness::start().await;
    let mut cfg_a = keyd.point_at(config_wg("node-a", "192.168.0.1", "10.1.0.0/24"), "node-a");
    cfg_a.long_poll = Some(Duration::from_secs(20));
    cfg_a.resync_interval = Duration::from_secs(1);
    let cfg_b = keyd.point_at(config_wg("node-b", "192.168.0.2", "10.2.0.0/24"), "node-b");
    let mut ka = FakeKernel::new();
    let (mut a, shared_a) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    let routes = |k: &FakeKernel| k.state().wg.as_ref().map_or(0, |w| w.routes.len());
    until(&mut [&mut a, &mut b], "node-a routes node-b's pods", || {
        routes(&ka) == 1
    })
    .await;
    // A route, not a peer: peers that have not handshaken yet are re-added anyway.
    let route = *ka
        .state()
        .wg
        .as_ref()
        .unwrap()
        .routes
        .iter()
        .next()
        .unwrap();
    ka.apply(&[Op::RouteDel(route)]).unwrap();
    assert_eq!(routes(&ka), 0);

    // The long poll (20 s) is cut short at the resync (1 s): a few steps at most, each short.
    let t = std::time::Instant::now();
    while routes(&ka) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the route was not put back within 5 s: the long poll was not cut short"
        );
        a.step().await;
    }
    assert_eq!(shared_a.snapshot().peers, 1);
}

/// An outbound ESP state flushed behind node-shim's back is added again at the next resync, and
/// counted: its sequence numbers restart, which the peer refuses as replays until the next key.
#[tokio::test]
async fn a_recreated_outbound_state_is_counted() {
    use keyd_node_shim::kernel::Kernel as _;
    use keyd_node_shim::model::Op;

    let keyd = KeydHarness::start().await;
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    let mut cfg_a = keyd.point_at(
        config_ipsec("node-a", "192.168.0.1", "10.1.0.0/24"),
        "node-a",
    );
    cfg_a.resync_interval = Duration::from_secs(1);
    let cfg_b = keyd.point_at(
        config_ipsec("node-b", "192.168.0.2", "10.2.0.0/24"),
        "node-b",
    );
    let mut ka = FakeKernel::new();
    let (mut a, shared_a) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, FakeKernel::new());
    until(&mut [&mut a, &mut b], "node-a's states for node-b", || {
        ka.state().states.len() == 2
    })
    .await;
    let recreated = |s: &keyd_node_shim::status::Shared| {
        s.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("node_shim_ipsec_states_recreated_total "))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(recreated(&shared_a).as_deref(), Some("0"));
    let outbound = *ka
        .state()
        .states
        .keys()
        .find(|id| id.src.to_string() == "192.168.0.1")
        .unwrap();
    ka.apply(&[Op::XfrmStateDel(outbound)]).unwrap();
    let t = std::time::Instant::now();
    while ka.state().states.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(5), "state not put back");
        a.step().await;
    }
    assert_eq!(recreated(&shared_a).as_deref(), Some("1"));
    // An inbound state put back is not counted: its sequence numbers are the peer's.
    let inbound = *ka
        .state()
        .states
        .keys()
        .find(|id| id.dst.to_string() == "192.168.0.1")
        .unwrap();
    ka.apply(&[Op::XfrmStateDel(inbound)]).unwrap();
    while ka.state().states.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "state not put back");
        a.step().await;
    }
    assert_eq!(recreated(&shared_a).as_deref(), Some("1"));
}
