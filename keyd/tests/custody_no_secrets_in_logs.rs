//! The real `keyd` binary with a Vault transit custodian (the test double) at `trace` log
//! level, through a start-up, an IPsec rotation, a Vault custodian outage, a KEK rotation (new
//! Vault key version and rewrap) and a restart; then every log line is searched for the Vault
//! tokens and for every data key that crossed the wire.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::kek::{KekSpec, VaultAuth};
use support::{Backend, Kind};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn run(cmd: Command) -> std::process::Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap()
}

async fn wait_ready(ops: u16, log: &std::path::Path) {
    let addr = format!("127.0.0.1:{ops}").parse().unwrap();
    let t = Instant::now();
    loop {
        if let Ok((200, _)) = keyd_tests::http::request(addr, "GET", "/readyz", &[], vec![]).await {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "keyd did not get ready: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn no_vault_token_or_data_key_reaches_the_logs() {
    let b = Backend::new(Kind::VaultTransit).await.unwrap();
    let Some(double) = b.vault().double_server() else {
        eprintln!("SKIPPED against a real Vault: the test reads the double's record of data keys");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (api, ops) = (free_port(), free_port());
    let setup = keyd::app::prepare_dev(
        dir.path(),
        &format!("127.0.0.1:{api}"),
        &format!("127.0.0.1:{ops}"),
    )
    .unwrap();
    let KekSpec::VaultTransit(v) = b.spec() else {
        unreachable!()
    };
    let VaultAuth::Token { token_file } = &v.auth else {
        unreachable!()
    };
    // keyd.toml from `keyd dev`, with the Vault custodian instead of the local KEK.
    let toml = std::fs::read_to_string(&setup.keyd_toml).unwrap().replace(
        "[kek]\nbackend = \"local\"\n",
        &format!(
            "[kek]\nbackend = \"vault-transit\"\nprobe_interval = \"300ms\"\n\
                 [kek.vault]\naddress = {:?}\nmount = {:?}\nkey = {:?}\nauth = \"token\"\n\
                 token_file = {:?}\n",
            v.address, v.mount, v.key, token_file
        ),
    );
    let config = dir.path().join("vault.toml");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("keyd.log");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_keyd"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--log-level", "trace"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    };
    let keyctl = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keyctl"));
        c.arg("--config").arg(&setup.keyctl_toml).args(args);
        c
    };

    let mut keyd = start();
    wait_ready(ops, &log).await;
    let out = run(keyctl(&["ipsec", "rotate"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An outage and recovery, with their error paths logged.
    double.stop().await;
    let out = run(keyctl(&["ipsec", "rotate"])).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    double.start_again().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = run(keyctl(&["kek", "rotate", "--wait"])).await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    keyd.kill().unwrap();
    keyd.wait().unwrap();
    // A restart opens every record again.
    let mut keyd = start();
    wait_ready(ops, &log).await;
    keyd.kill().unwrap();
    keyd.wait().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("TRACE") || text.contains("\"level\":\"TRACE\""),
        "not at trace level"
    );
    let mut secrets: Vec<(String, String)> = double
        .tokens()
        .into_iter()
        .map(|t| ("a Vault token".to_owned(), t))
        .collect();
    let plaintexts = double.plaintexts();
    assert!(
        plaintexts.len() >= 6,
        "expected data keys to cross the wire"
    );
    for p in plaintexts {
        secrets.push(("a data key (base64)".into(), STANDARD.encode(&p)));
        secrets.push(("a data key (hex)".into(), hex::encode(&p)));
    }
    for (what, s) in &secrets {
        assert!(!text.contains(s.as_str()), "{what} is in keyd's log");
    }
}
