//! An AdmissionReview body as the API server posts it to the webhook: `review::parse`, the
//! decision on what it names (the pure `decision::decide`, with the default configuration, no
//! policy and keyd unknown), and the response the webhook sends.
#![no_main]

use keyd_webhook::decision::{DecisionConfig, Input, KeydView, decide};
use keyd_webhook::policy::PolicySet;
use keyd_webhook::review::{self, Action};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = review::parse(data) else {
        return;
    };
    let body = match &r.action {
        Action::Check(c) => {
            let input = Input {
                operation: c.operation,
                namespace: &c.namespace,
                object: &c.object,
                old_object: c.old_object.as_ref(),
                user: &c.user,
            };
            let d = decide(
                &input,
                None,
                &PolicySet::default(),
                &KeydView::Unknown("not asked while fuzzing".into()),
                &DecisionConfig::default(),
            );
            std::hint::black_box(c.object.display_name());
            review::respond(
                r.api_version,
                &r.uid,
                d.allowed,
                Some((403, &d.message)),
                &d.warnings,
            )
        }
        Action::Pass(_) => review::respond(r.api_version, &r.uid, true, None, &[]),
        Action::Reject { code, message } => {
            review::respond(r.api_version, &r.uid, false, Some((*code, message)), &[])
        }
    };
    let out: serde_json::Value = serde_json::from_slice(&body).expect("the response is JSON");
    assert_eq!(out["response"]["uid"].as_str(), Some(r.uid.as_str()));
});
