//! An AdmissionReview body as the API server posts it to the webhook: `review::parse`, then the
//! response the webhook would send for it.
#![no_main]

use keyd_webhook::review::{self, Action};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = review::parse(data) else {
        return;
    };
    let body = match &r.action {
        Action::Check(c) => {
            std::hint::black_box(c.object.display_name());
            review::respond(r.api_version, &r.uid, false, Some((403, "denied")), &[])
        }
        Action::Pass(_) => review::respond(r.api_version, &r.uid, true, None, &[]),
        Action::Reject { code, message } => {
            review::respond(r.api_version, &r.uid, false, Some((*code, message)), &[])
        }
    };
    let out: serde_json::Value = serde_json::from_slice(&body).expect("the response is JSON");
    assert_eq!(out["response"]["uid"].as_str(), Some(r.uid.as_str()));
});
