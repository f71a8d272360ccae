//! Wiring: from a validated [`Config`] and a Kubernetes client to a serving webhook.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::keyd::{AuditQueue, KeydClient, StatusCache, run_audit_flusher, run_status_poller};
use crate::kube_cache::{ClusterSource, KubeCache};
use crate::metrics::Metrics;
use crate::server::{AppState, ops_app, router, serve_plain, serve_tls};
use crate::tls::{client_config, install_default_provider, watch_server_config};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the serving certificate")]
    ServingTls(#[source] crate::tls::TlsError),
    #[error("loading the client certificate for keyd")]
    KeydTls(#[source] crate::tls::TlsError),
    #[error(transparent)]
    Keyd(#[from] crate::keyd::KeydError),
    #[error("binding {what} {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How long open connections and background tasks get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

/// A webhook whose listeners are bound and whose background tasks run.
pub struct Running {
    pub addr: SocketAddr,
    pub ops_addr: Option<SocketAddr>,
    pub state: AppState,
    pub cache: KubeCache,
    serve: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .field("ops_addr", &self.ops_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Serves until `shutdown` turns true, then drains connections and delivers what it can of
    /// the audit queue.
    pub async fn serve(self) {
        self.serve.await;
    }
}

/// Loads certificates, starts the caches, the keyd status poller and the audit flusher, and
/// binds the listeners. `/readyz` answers 503 until the caches have synced.
pub async fn start(
    config: Config,
    client: kube::Client,
    shutdown: watch::Receiver<bool>,
) -> Result<Running, StartError> {
    install_default_provider();
    let (tls_rx, _reloader) = watch_server_config(config.tls.clone(), config.tls_reload_interval)
        .map_err(StartError::ServingTls)?;
    let keyd_tls = client_config(&config.keyd.tls).map_err(StartError::KeydTls)?;
    let metrics = Metrics::default();
    let mut tasks = JoinSet::new();

    let keyd_status = Arc::new(StatusCache::new(config.keyd.max_staleness));
    let poller_client = Arc::new(
        KeydClient::new(&config.keyd.url, Arc::clone(&keyd_tls), config.keyd.timeout)?
            .with_reload(config.keyd.tls.clone()),
    );
    tasks.spawn(run_status_poller(
        poller_client,
        Arc::clone(&keyd_status),
        config.keyd.refresh_interval,
        metrics.clone(),
        shutdown.clone(),
    ));
    let audit = Arc::new(AuditQueue::new(config.keyd.audit_queue, metrics.clone()));
    let audit_client = Arc::new(
        KeydClient::new(&config.keyd.url, keyd_tls, config.keyd.timeout)?
            .with_reload(config.keyd.tls.clone()),
    );
    tasks.spawn(run_audit_flusher(
        audit_client,
        Arc::clone(&audit),
        shutdown.clone(),
    ));

    let cache = KubeCache::start(
        client.clone(),
        metrics.clone(),
        &mut tasks,
        shutdown.clone(),
    );
    if let Some(interval) = config.status_interval {
        tasks.spawn(crate::status::run_status_loop(
            client,
            cache.clone(),
            interval,
            shutdown.clone(),
        ));
    }

    let state = AppState {
        cluster: ClusterSource::Kube(Box::new(cache.clone())),
        keyd: keyd_status,
        audit,
        decision: Arc::new(config.decision.clone()),
        limits: config.limits.clone(),
        metrics,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "listen",
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "listen",
        addr: config.listen,
        source,
    })?;
    let ops_listener = match config.ops_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Bind {
                    what: "ops_listen",
                    addr: a,
                    source,
                })?,
        ),
        None => None,
    };
    let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());

    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let app = router(state.clone());
    let ops = ops_app(state.clone());
    let handshake_timeout = config.limits.handshake_timeout;
    let serve = async move {
        let tls = serve_tls(
            listener,
            tls_rx,
            app,
            handshake_timeout,
            DRAIN,
            wait(shutdown.clone()),
        );
        let plain = async {
            if let Some(l) = ops_listener {
                serve_plain(l, ops, wait(shutdown.clone())).await;
            }
        };
        tokio::join!(tls, plain);
        // Background tasks watch the same signal; the audit flusher makes its last delivery.
        let finish = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN, finish).await.is_err() {
            tracing::warn!("background tasks did not stop within the drain timeout");
        }
    };
    tracing::info!(%addr, ?ops_addr, "keyd-webhook is serving");
    Ok(Running {
        addr,
        ops_addr,
        state,
        cache,
        serve: Box::pin(serve),
    })
}
