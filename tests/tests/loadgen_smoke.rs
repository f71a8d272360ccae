//! Keeps the load generator honest without timing anything: every scenario runs briefly with 5
//! nodes against an in-process keyd (wired as `keyd dev` wires it) and against the real ceiling
//! child process, and must finish with zero errors and requests served by both. The numbers are
//! not checked; targets belong to the benchmark (`docs/benchmarks.md`), never to tests.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use keyd_tests::loadgen::{self, KeydTarget, Options, Scenario, ServerKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_cleanly_against_keyd_and_the_ceiling() {
    keyd_mtls::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let setup =
        keyd::app::prepare_dev(&dir.path().join("keyd"), "127.0.0.1:0", "127.0.0.1:0").unwrap();
    let flags = keyd::config::Flags {
        listen: Some("127.0.0.1:0".into()),
        ops_listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let config = keyd::config::load(Some(&setup.keyd_toml), &HashMap::new(), &flags).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = keyd::app::start(config, stopped).await.unwrap();
    let target = KeydTarget {
        api: running.api_addr,
        pki_dir: setup.pki.dir.clone(),
        pid: None,
    };
    let keyd_task = tokio::spawn(running.serve());

    let opts = Options {
        nodes: 5,
        concurrency: 3,
        // Long enough that even a handshake-per-request scenario completes requests on a
        // loaded 2-core CI machine; short enough to keep the test to a few seconds.
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(500),
        scenarios: Scenario::ALL.to_vec(),
        ..Options::default()
    };
    let ceiling_exe = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let report = loadgen::run(&opts, &target, ceiling_exe, dir.path())
        .await
        .unwrap_or_else(|e| panic!("{}", loadgen::error_chain(&e)));
    eprintln!("{}", report.render());

    for scenario in Scenario::ALL {
        for server in [ServerKind::Keyd, ServerKind::Ceiling] {
            let r = report
                .results
                .iter()
                .find(|r| r.scenario == scenario && r.server == server)
                .unwrap_or_else(|| panic!("no {scenario} run against {}", server.name()));
            assert_eq!(
                r.errors,
                0,
                "{scenario} against {}: {:?}",
                server.name(),
                r.error_samples
            );
            assert!(
                r.requests > 0,
                "{scenario}: {} served nothing",
                server.name()
            );
            if scenario == Scenario::Keepalive304 || scenario == Scenario::WgMesh304 {
                assert_eq!(r.mean_body_bytes, 0.0, "304s carry no body");
            } else {
                assert!(r.mean_body_bytes > 0.0);
            }
        }
    }
    // The mesh bundle holds the other four nodes, and the ceiling served exactly its bytes.
    assert_eq!(report.setup.wireguard_peers, Some(4));
    let wg = report.setup.wireguard_bundle_bytes.unwrap();
    assert!(wg > report.setup.ipsec_bundle_bytes.unwrap());
    let ceiling_wg = report
        .results
        .iter()
        .find(|r| r.scenario == Scenario::WgMesh && r.server == ServerKind::Ceiling)
        .unwrap();
    assert_eq!(ceiling_wg.mean_body_bytes, wg as f64);
    assert!(report.render().contains("wg-mesh-304"));
    assert_eq!(report.targets.iter().filter(|t| t.met.is_some()).count(), 0);
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 10);

    // The open loop, once: a rate far below capacity is met, so about rate x duration requests.
    let paced = Options {
        scenarios: vec![Scenario::Keepalive],
        rate: Some(200.0),
        duration: Duration::from_millis(500),
        ..opts
    };
    let report = loadgen::run(&paced, &target, ceiling_exe, dir.path())
        .await
        .unwrap_or_else(|e| panic!("{}", loadgen::error_chain(&e)));
    for r in &report.results {
        assert_eq!(r.errors, 0, "{:?}", r.error_samples);
        assert!(
            (50..=150).contains(&r.requests),
            "{} at 200/s for 0.5 s: {} requests",
            r.server.name(),
            r.requests
        );
    }

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), keyd_task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn bad_options_are_refused_with_the_field_named() {
    let wg_first = Options {
        scenarios: vec![Scenario::WgMesh, Scenario::Keepalive],
        ..Options::default()
    };
    let e = wg_first.validate().unwrap_err().to_string();
    assert!(e.contains("--scenarios") && e.contains("keepalive"), "{e}");
    let e = Options {
        nodes: 0,
        ..Options::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--nodes"), "{e}");
    Options::default().validate().unwrap();
}
