//! The agent against a real keyd (in-process, mTLS on loopback) and the stateful fake kernel:
//! registration, acknowledgements of each rotation step, keyd going away, restart adoption and
//! WireGuard keypair rotation. No privileges needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keyd_node_shim::kernel::fake::FakeKernel;
use keyd_proto::identity::Identity;
use keyd_proto::{Ack, RotateRequest};

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

#[tokio::test]
async fn ipsec_rotation_steps_are_programmed_and_acknowledged() {
    let keyd = KeydHarness::start().await;
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    let mut cfg_a = keyd.point_at(
        config_ipsec("node-a", "192.168.0.1", "10.1.0.0/24"),
        "node-a",
    );
    cfg_a.ipsec.outbound_switch_delay = Duration::from_millis(400);
    let cfg_b = keyd.point_at(
        config_ipsec("node-b", "192.168.0.2", "10.2.0.0/24"),
        "node-b",
    );
    let ka = FakeKernel::new();
    let kb = FakeKernel::new();
    let (mut a, sa) = start_fake_agent(cfg_a, ka.clone());
    let (mut b, _) = start_fake_agent(cfg_b, kb.clone());
    for _ in 0..2 {
        a.step().await;
        b.step().await;
    }
    let one = Ack {
        ipsec_spis: vec![1],
        ipsec_outbound_spi: Some(1),
        wireguard_epoch: None,
    };
    assert_eq!(acked(&keyd, "node-a"), one);
    assert_eq!(acked(&keyd, "node-b"), one);
    // a: in and out state for b, three policies, one mark filter.
    assert_eq!(ka.state().states.len(), 2);
    assert_eq!(ka.state().policies.len(), 3);
    assert_eq!(ka.state().filters.len(), 1);

    // Rotation: keyd makes key 2 current at once. a installs it, holds outbound on 1 ...
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    let wait = a.step().await;
    assert!(
        wait <= Duration::from_millis(400),
        "looks again when the switch is due: {wait:?}"
    );
    assert_eq!(
        acked(&keyd, "node-a"),
        Ack {
            ipsec_spis: vec![1, 2],
            ipsec_outbound_spi: Some(1),
            wireguard_epoch: None
        }
    );
    assert_eq!(sa.snapshot().ipsec_pending_outbound.map(|p| p.0), Some(2));
    // ... and switches once the delay has passed.
    tokio::time::sleep(Duration::from_millis(450)).await;
    a.step().await;
    assert_eq!(acked(&keyd, "node-a").ipsec_outbound_spi, Some(2));
    assert!(
        ka.state()
            .policies
            .values()
            .filter(|p| p.id.dir == keyd_node_shim::model::PolicyDir::Out)
            .all(|p| p.tmpl.spi == 2)
    );

    // The next rotation retires key 1 at keyd: its states leave the kernel.
    keyd.keyd
        .rotate_ipsec(&admin(), RotateRequest::default())
        .await
        .unwrap();
    a.step().await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    a.step().await;
    assert!(!ka.state().states.keys().any(|id| id.spi == 1));
    assert_eq!(
        acked(&keyd, "node-a"),
        Ack {
            ipsec_spis: vec![2, 3],
            ipsec_outbound_spi: Some(3),
            wireguard_epoch: None
        }
    );
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
