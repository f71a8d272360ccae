//! Every JSON body keyd's `/v1` API accepts, read by the handlers' own extractor (`ApiJson`,
//! whose errors redact quoted values) and then checked by the pure validation the handler
//! runs before it touches the store. The first byte picks the endpoint; the rest is the body.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{Request, header};
use keyd::api::{ApiJson, PruneRequest};
use keyd::ipsec::CiliumKey;
use keyd::rotation;
use keyd::service::{StoredSchedules, check_registration, updated_schedule, validate_report};
use keyd_proto::kek::{KekMigrateRequest, KekRotateRequest};
use keyd_proto::rules::DataplaneReport;
use keyd_proto::{
    Ack, AdmissionDecisions, Bounds, ImportRequest, KeyClass, NodeRegistration, RotateRequest,
    ScheduleUpdate, SkipRequest,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// The body through `ApiJson`, as a handler receives it: `None` when it is refused (the
/// refusal, an `ApiError`, is built all the same).
fn extract<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/fuzz")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    // The body is in memory, so the extractor completes on its first poll.
    let fut = pin!(ApiJson::<T>::from_request(req, &()));
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(ApiJson(v))) => Some(v),
        Poll::Ready(Err(e)) => {
            std::hint::black_box(e);
            None
        }
        Poll::Pending => panic!("ApiJson waited on an in-memory body"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    // `a` to `n` pick the endpoints, so the seed corpus stays readable text.
    match which.wrapping_sub(b'a') % 14 {
        // PUT /v1/nodes/{name}
        0 => {
            if let Some(reg) = extract::<NodeRegistration>(body) {
                let _ = check_registration(reg);
            }
        }
        // POST /v1/nodes/{name}/dataplane: against the rules it names and against none.
        1 => {
            if let Some(report) = extract::<DataplaneReport>(body) {
                let names: Vec<String> = report.policies.iter().map(|p| p.name.clone()).collect();
                let _ = validate_report(&report, Some(&names));
                let _ = validate_report(&report, Some(&[]));
                let _ = validate_report(&report, None);
            }
        }
        // POST /v1/nodes/{name}/ack
        2 => {
            let _ = extract::<Ack>(body);
        }
        // POST /v1/ipsec/rotate
        3 => {
            let _ = extract::<RotateRequest>(body);
        }
        // POST /v1/ipsec/rollout/skip
        4 => {
            if let Some(req) = extract::<SkipRequest>(body) {
                let _ = keyd_proto::identity::validate_name(&req.node);
            }
        }
        // POST /v1/ipsec/import
        5 => {
            if let Some(req) = extract::<ImportRequest>(body) {
                let _ = CiliumKey::parse_line(req.keys.expose());
            }
        }
        // POST /v1/audit/admission
        6 => {
            let _ = extract::<AdmissionDecisions>(body);
        }
        // PUT /v1/schedules/{class}: applied to every class's default schedule.
        7 => {
            if let Some(update) = extract::<ScheduleUpdate>(body) {
                let stored = StoredSchedules::default();
                for class in KeyClass::ALL {
                    let _ = updated_schedule(class, &stored.get(class), update.clone());
                }
            }
        }
        // PUT /v1/schedules/{class}/bounds
        8 => {
            if let Some(bounds) = extract::<Bounds>(body)
                && rotation::validate_bounds(&bounds).is_ok()
            {
                for class in KeyClass::ALL {
                    let s = rotation::default_schedule(class);
                    let _ = rotation::validate_schedule(class, &s, &bounds);
                }
            }
        }
        // POST /v1/audit/prune
        9 => {
            let _ = extract::<PruneRequest>(body);
        }
        // POST /v1/kek/rotate
        10 => {
            let _ = extract::<KekRotateRequest>(body);
        }
        // POST /v1/kek/migrate
        11 => {
            if let Some(req) = extract::<KekMigrateRequest>(body) {
                let _ = keyd::custody::spec::validate_spec(&req.to, "to");
            }
        }
        // PUT /v1/nodes/{name}/allocation
        13 => {
            if let Some(allocation) = extract::<keyd_proto::NodeAllocation>(body) {
                let _ = keyd::service::check_allocation(allocation);
            }
        }
        // POST /v1/ipsec/rotate and the rest again, as any JSON: the extractor's refusals.
        _ => {
            let _ = extract::<serde_json::Value>(body);
        }
    }
});
