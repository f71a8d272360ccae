//! `kube-cluster DIR`: a real etcd and kube-apiserver (the harness of `keyd_tests::cluster`) with
//! keyd's CRDs installed, running until SIGTERM or SIGINT. The VM test's policy phase runs it in
//! the guest (tests/vm/guest.sh); it also serves to try the policy watcher by hand.
//!
//! Once ready it writes, under DIR: `url` (the API server's address), `apiserver-ca.pem`,
//! `kubeconfig`, and `token` (a bearer token in `system:masters`, for curl or keyd's
//! `[policy] kube_token_file`), then prints `ready URL`. Everything under DIR is removed when it
//! stops.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use keyd_tests::cluster::Cluster;
use tokio::signal::unix::{SignalKind, signal};

/// How long the API server may take to become ready: minutes under TCG emulation.
const READY_WITHIN: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: kube-cluster DIR");
        return ExitCode::from(64);
    };
    let dir = PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("kube-cluster: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kube-cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(dir))
}

async fn run(dir: PathBuf) -> ExitCode {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("kube-cluster: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let start = async {
        let cluster = Cluster::start_within(&dir, READY_WITHIN).await;
        let client = cluster.client().await;
        cluster.install_crds(&client).await;
        cluster
    };
    // A stop while the servers start stops them at once (dropping the start kills them).
    let cluster = tokio::select! {
        c = start => c,
        _ = term.recv() => return ExitCode::SUCCESS,
        _ = int.recv() => return ExitCode::SUCCESS,
    };
    let files = [
        // No trailing newline: keyd's `[policy]` refuses one (the Kubernetes client would send it).
        ("token", "admin-token".to_owned()),
        ("url", format!("{}\n", cluster.url)),
    ];
    for (name, content) in files {
        if let Err(e) = std::fs::write(dir.join(name), content) {
            eprintln!("kube-cluster: cannot write {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("ready {}", cluster.url);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Dropping the cluster stops the API server, then etcd.
    drop(cluster);
    ExitCode::SUCCESS
}
