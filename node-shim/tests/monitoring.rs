//! node-shim's ops listener serves every `node_shim_*` metric the shipped alerting rules and
//! dashboard (deploy/monitoring/) query, before the agent has done anything: a rule over a
//! metric that appears only later would look healthy until then.
#![allow(clippy::unwrap_used)]

use keyd_node_shim::status::{Shared, ops_router};

#[tokio::test]
async fn alerting_rules_read_metrics_node_shim_serves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, ops_router(Shared::default()))
            .await
            .unwrap();
    });
    let (status, body) = keyd_tests::http::request(addr, "GET", "/metrics", &[], vec![])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let missing = keyd_tests::monitoring::missing(&text, "node_shim_", &[]);
    assert!(
        missing.is_empty(),
        "deploy/monitoring/ queries metrics node-shim does not serve: {missing:?}\n{text}"
    );
    server.abort();
}
