//! AdmissionReview in, AdmissionReview out (`admission.k8s.io/v1`, and `v1beta1`, whose fields
//! used here are the same).
//!
//! What cannot be answered as a review (not JSON, not an AdmissionReview, no `request`, no
//! `uid`, an unknown review version) is a [`BadReview`], which the server turns into a 400. The
//! API server then applies the webhook's failure policy. Everything else gets an
//! AdmissionResponse with the request's `uid`:
//! - a kind the webhook does not check, a subresource, or an operation other than CREATE and
//!   UPDATE: allowed (the webhook has nothing to say about it);
//! - a kind it checks, in an unknown API version, or an object it cannot read: denied with
//!   code 400 and the reason, since a pod the webhook cannot read might be sensitive.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::decision::Operation;
use crate::workload::{KindMatch, Workload, WorkloadKind};

pub const V1: &str = "admission.k8s.io/v1";
pub const V1BETA1: &str = "admission.k8s.io/v1beta1";

/// A body that is not an AdmissionReview the webhook can answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    NotJson(String),
    #[error("apiVersion {0:?} is not admission.k8s.io/v1 or admission.k8s.io/v1beta1")]
    Version(String),
    #[error("kind {0:?} is not AdmissionReview")]
    Kind(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview request has no uid")]
    NoUid,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a> {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(borrow)]
    request: Option<RequestIn<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<'a> {
    #[serde(default)]
    uid: String,
    kind: Option<Gvk>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    user_info: Option<UserInfo>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    old_object: Option<&'a RawValue>,
    #[serde(default)]
    dry_run: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct Gvk {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Debug, Deserialize, Default)]
struct UserInfo {
    #[serde(default)]
    username: Option<String>,
}

/// A parsed review: what to do with it.
#[derive(Debug)]
pub struct Review {
    /// Echoed in the response.
    pub api_version: &'static str,
    pub uid: String,
    pub action: Action,
}

#[derive(Debug)]
pub enum Action {
    /// Decide on this object.
    Check(Box<Checked>),
    /// Not the webhook's business: allow. The text says why (for the log).
    Pass(&'static str),
    /// Refuse without a decision: code and message.
    Reject { code: u16, message: String },
}

/// Everything the decision needs from the request.
#[derive(Debug)]
pub struct Checked {
    pub kind: WorkloadKind,
    pub operation: Operation,
    pub namespace: String,
    pub object: Workload,
    pub old_object: Option<Workload>,
    pub user: String,
    pub dry_run: bool,
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<Review, BadReview> {
    let review: ReviewIn<'_> =
        serde_json::from_slice(body).map_err(|e| BadReview::NotJson(e.to_string()))?;
    let api_version = match review.api_version.as_deref() {
        Some(V1) => V1,
        Some(V1BETA1) => V1BETA1,
        other => return Err(BadReview::Version(other.unwrap_or_default().to_owned())),
    };
    match review.kind.as_deref() {
        Some("AdmissionReview") => {}
        other => return Err(BadReview::Kind(other.unwrap_or_default().to_owned())),
    }
    let req = review.request.ok_or(BadReview::NoRequest)?;
    if req.uid.is_empty() {
        return Err(BadReview::NoUid);
    }
    let action = classify(&req);
    Ok(Review {
        api_version,
        uid: req.uid,
        action,
    })
}

fn classify(req: &RequestIn<'_>) -> Action {
    let gvk = req.kind.as_ref();
    let kind = match gvk.map(|k| WorkloadKind::from_gvk(&k.group, &k.version, &k.kind)) {
        Some(KindMatch::Checked(k)) => k,
        Some(KindMatch::NotChecked) => return Action::Pass("not a kind the webhook checks"),
        Some(KindMatch::UnknownVersion(k)) => {
            let (g, v) = gvk
                .map(|k| (k.group.as_str(), k.version.as_str()))
                .unwrap_or_default();
            return Action::Reject {
                code: 400,
                message: format!(
                    "keyd: cannot check {k} in API version {}{v}: the webhook reads {}. Register \
                     it with matchPolicy: Equivalent so the API server converts requests.",
                    if g.is_empty() {
                        String::new()
                    } else {
                        format!("{g}/")
                    },
                    supported(k)
                ),
            };
        }
        None => {
            return Action::Reject {
                code: 400,
                message: "keyd: the AdmissionReview request has no kind".into(),
            };
        }
    };
    if req.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
        return Action::Pass("a subresource");
    }
    let operation = match req.operation.as_deref() {
        Some("CREATE") => Operation::Create,
        Some("UPDATE") => Operation::Update,
        _ => return Action::Pass("not a CREATE or UPDATE"),
    };
    let Some(namespace) = req.namespace.clone().filter(|n| !n.is_empty()) else {
        return Action::Reject {
            code: 400,
            message: format!("keyd: the request for a {kind} names no namespace"),
        };
    };
    let object = match req.object.map(|raw| Workload::from_json(kind, raw.get())) {
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            return Action::Reject {
                code: 400,
                message: format!("keyd: cannot read the {kind} in the request: {e}"),
            };
        }
        None => {
            return Action::Reject {
                code: 400,
                message: format!("keyd: the {} request carries no object", operation.as_str()),
            };
        }
    };
    // An unreadable old object only loses the "unchanged" shortcut: judge the new one fully.
    let old_object = match operation {
        Operation::Update => req
            .old_object
            .and_then(|raw| Workload::from_json(kind, raw.get()).ok()),
        Operation::Create => None,
    };
    Action::Check(Box::new(Checked {
        kind,
        operation,
        namespace,
        object,
        old_object,
        user: req
            .user_info
            .as_ref()
            .and_then(|u| u.username.clone())
            .unwrap_or_default(),
        dry_run: req.dry_run.unwrap_or(false),
    }))
}

fn supported(k: WorkloadKind) -> String {
    let (g, versions, _) = k.registration();
    versions
        .iter()
        .map(|v| {
            if g.is_empty() {
                (*v).to_owned()
            } else {
                format!("{g}/{v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

#[derive(Debug, Serialize)]
struct StatusOut<'a> {
    code: u16,
    message: &'a str,
    reason: &'static str,
    status: &'static str,
}

/// The AdmissionReview response body. A denial carries `code` (403 for a policy decision, 400
/// for a request the webhook cannot read) and `message`, which kubectl prints.
pub fn respond(
    api_version: &str,
    uid: &str,
    allowed: bool,
    denial: Option<(u16, &str)>,
    warnings: &[String],
) -> Vec<u8> {
    let status = denial
        .filter(|_| !allowed)
        .map(|(code, message)| StatusOut {
            code,
            message,
            reason: if code == 403 {
                "Forbidden"
            } else {
                "BadRequest"
            },
            status: "Failure",
        });
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response: ResponseOut {
            uid,
            allowed,
            status,
            warnings,
        },
    };
    // Serializing plain strings, bools and integers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{request}}}"#
        )
        .into_bytes()
    }

    const POD: &str = r#"{"uid":"u1","kind":{"group":"","version":"v1","kind":"Pod"},
        "resource":{"group":"","version":"v1","resource":"pods"},"namespace":"team-a",
        "operation":"CREATE","userInfo":{"username":"alice","groups":["dev"]},
        "object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"a":"b"}},"spec":{}},
        "oldObject":null,"dryRun":false}"#;

    #[test]
    fn a_pod_create_is_checked() {
        let r = parse(&review(POD)).unwrap();
        assert_eq!((r.api_version, r.uid.as_str()), (V1, "u1"));
        let Action::Check(c) = r.action else {
            panic!("{:?}", r.action)
        };
        assert_eq!(c.kind, WorkloadKind::Pod);
        assert_eq!(c.operation, Operation::Create);
        assert_eq!(c.namespace, "team-a");
        assert_eq!(c.user, "alice");
        assert_eq!(c.object.name, "p");
        assert!(c.old_object.is_none() && !c.dry_run);
    }

    #[test]
    fn what_is_not_ours_passes() {
        let cm = POD.replace(r#""kind":"Pod"}"#, r#""kind":"ConfigMap"}"#);
        assert!(matches!(
            parse(&review(&cm)).unwrap().action,
            Action::Pass(_)
        ));
        let sub = POD.replace(r#""namespace""#, r#""subResource":"status","namespace""#);
        assert!(matches!(
            parse(&review(&sub)).unwrap().action,
            Action::Pass(_)
        ));
        let del = POD.replace("CREATE", "DELETE");
        assert!(matches!(
            parse(&review(&del)).unwrap().action,
            Action::Pass(_)
        ));
    }

    #[test]
    fn unreadable_requests_are_refused_with_a_reason() {
        let reject = |req: &str| match parse(&review(req)).unwrap().action {
            Action::Reject { code, message } => (code, message),
            other => panic!("{other:?}"),
        };
        let v9 = POD.replace(
            r#""version":"v1","kind":"Pod""#,
            r#""version":"v9","kind":"Pod""#,
        );
        let (code, m) = reject(&v9);
        assert_eq!(code, 400);
        assert!(
            m.contains("Pod in API version v9") && m.contains("matchPolicy: Equivalent"),
            "{m}"
        );
        let dep = POD.replace(
            r#""group":"","version":"v1","kind":"Pod""#,
            r#""group":"apps","version":"v1beta9","kind":"Deployment""#,
        );
        assert!(
            reject(&dep).1.contains("apps/v1beta9"),
            "{}",
            reject(&dep).1
        );
        let bad_labels = POD.replace(r#"{"a":"b"}"#, "[1,2]");
        assert!(
            reject(&bad_labels)
                .1
                .starts_with("keyd: cannot read the Pod in the request")
        );
        let no_object = POD.replace(r#""object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"a":"b"}},"spec":{}},"#, "");
        assert!(reject(&no_object).1.contains("carries no object"));
        let no_ns = POD.replace(r#""namespace":"team-a","#, "");
        assert!(reject(&no_ns).1.contains("names no namespace"));
    }

    #[test]
    fn what_is_not_a_review_is_a_bad_request() {
        assert!(matches!(parse(b"not json"), Err(BadReview::NotJson(_))));
        assert!(matches!(parse(b""), Err(BadReview::NotJson(_))));
        assert!(matches!(parse(b"[]"), Err(BadReview::NotJson(_))));
        assert_eq!(
            parse(br#"{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview"}"#).unwrap_err(),
            BadReview::Version("admission.k8s.io/v2".into())
        );
        assert_eq!(
            parse(br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#).unwrap_err(),
            BadReview::Kind("Pod".into())
        );
        assert_eq!(
            parse(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).unwrap_err(),
            BadReview::NoRequest
        );
        assert_eq!(
            parse(&review(&POD.replace(r#""uid":"u1","#, ""))).unwrap_err(),
            BadReview::NoUid
        );
        // v1beta1 is answered in v1beta1.
        let beta = String::from_utf8(review(POD))
            .unwrap()
            .replace("admission.k8s.io/v1", V1BETA1);
        assert_eq!(parse(beta.as_bytes()).unwrap().api_version, V1BETA1);
    }

    #[test]
    fn responses_carry_uid_status_and_warnings() {
        let body = respond(V1, "u1", false, Some((403, "no policy")), &[]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["apiVersion"], V1);
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], "u1");
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(v["response"]["status"]["code"], 403);
        assert_eq!(v["response"]["status"]["message"], "no policy");
        assert!(v["response"].get("warnings").is_none());

        let body = respond(V1, "u2", true, None, &["careful".to_owned()]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("status").is_none());
        assert_eq!(v["response"]["warnings"][0], "careful");
    }
}
