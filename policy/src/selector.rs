//! Label selectors, validated once and matched many times.
//!
//! The rules are Kubernetes' (`k8s.io/apimachinery/pkg/labels`): `matchLabels` pairs and
//! `matchExpressions` requirements are ANDed; `In` needs the key present with one of the values,
//! `NotIn` matches when the key is absent or its value is not listed, `Exists` / `DoesNotExist`
//! test presence only. A selector with no requirement matches everything.
//!
//! Compilation rejects what the API server's own validation would: an unknown operator, `In` /
//! `NotIn` without values, `Exists` / `DoesNotExist` with values, and keys or values that are not
//! valid label syntax. The CRD schema cannot express all of these on Kubernetes 1.20 (no CEL), so
//! a policy may hold a malformed selector; such a policy selects nothing, and the denial message
//! and the policy's status say why.

use std::fmt;

use crate::crd::{LabelSelector, Labels};

/// Why a selector cannot be used. The message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}]: unknown operator {operator:?} (use In, NotIn, Exists or DoesNotExist)"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    MissingValues {
        index: usize,
        operator: &'static str,
    },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    UnexpectedValues {
        index: usize,
        operator: &'static str,
    },
    #[error("{place}: {key:?} is not a valid label key")]
    InvalidKey { place: String, key: String },
    #[error("{place}: {value:?} is not a valid label value")]
    InvalidValue { place: String, value: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Validates `s`; every problem is reported with where it is.
    pub fn compile(s: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::with_capacity(s.match_labels.len() + s.match_expressions.len());
        for (key, value) in &s.match_labels {
            let place = || format!("matchLabels[{key:?}]");
            ensure(is_label_key(key), || SelectorError::InvalidKey {
                place: place(),
                key: key.clone(),
            })?;
            ensure(is_label_value(value), || SelectorError::InvalidValue {
                place: place(),
                value: value.clone(),
            })?;
            requirements.push(Requirement::Equals(key.clone(), value.clone()));
        }
        for (index, expr) in s.match_expressions.iter().enumerate() {
            let place = || format!("matchExpressions[{index}]");
            ensure(is_label_key(&expr.key), || SelectorError::InvalidKey {
                place: place(),
                key: expr.key.clone(),
            })?;
            for value in &expr.values {
                ensure(is_label_value(value), || SelectorError::InvalidValue {
                    place: place(),
                    value: value.clone(),
                })?;
            }
            let key = expr.key.clone();
            let with_values = |operator: &'static str| {
                if expr.values.is_empty() {
                    Err(SelectorError::MissingValues { index, operator })
                } else {
                    Ok(expr.values.clone())
                }
            };
            let without_values = |operator: &'static str| {
                if expr.values.is_empty() {
                    Ok(())
                } else {
                    Err(SelectorError::UnexpectedValues { index, operator })
                }
            };
            let r = match expr.operator.as_str() {
                "In" => Requirement::In(key, with_values("In")?),
                "NotIn" => Requirement::NotIn(key, with_values("NotIn")?),
                "Exists" => {
                    without_values("Exists")?;
                    Requirement::Exists(key)
                }
                "DoesNotExist" => {
                    without_values("DoesNotExist")?;
                    Requirement::DoesNotExist(key)
                }
                other => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        operator: other.to_owned(),
                    });
                }
            };
            requirements.push(r);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether this selector selects everything.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for Selector {
    /// The `kubectl -l` form, e.g. `app=web,tier in (api),!legacy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("<everything>");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

fn ensure(ok: bool, err: impl FnOnce() -> SelectorError) -> Result<(), SelectorError> {
    if ok { Ok(()) } else { Err(err()) }
}

/// A label key: an optional DNS-subdomain prefix (at most 253 characters) and `/`, then a name
/// of 1..=63 characters, alphanumeric at both ends, `-`, `_` or `.` inside.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let dns_ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !dns_ok {
            return false;
        }
    }
    !name.is_empty() && is_label_token(name)
}

/// A label value: empty, or 1..=63 characters with the same rules as a key's name.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_token(value)
}

fn is_label_token(s: &str) -> bool {
    let b = s.as_bytes();
    let ends_ok = |c: u8| c.is_ascii_alphanumeric();
    s.len() <= 63
        && b.first().is_some_and(|&c| ends_ok(c))
        && b.last().is_some_and(|&c| ends_ok(c))
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::compile(&LabelSelector {
            match_labels: labels(match_labels),
            match_expressions: exprs,
        })
        .expect("valid selector")
    }

    #[test]
    fn an_empty_selector_matches_everything() {
        let s = sel(&[], vec![]);
        assert!(s.is_everything());
        assert!(s.matches(&Labels::new()));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.to_string(), "<everything>");
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = sel(&[("app", "web"), ("tier", "api")], vec![]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "api"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "db")])));
    }

    #[test]
    fn in_needs_the_key_with_a_listed_value() {
        let s = sel(&[], vec![expr("tier", "In", &["api", "worker"])]);
        assert!(s.matches(&labels(&[("tier", "api")])));
        assert!(s.matches(&labels(&[("tier", "worker")])));
        assert!(!s.matches(&labels(&[("tier", "db")])));
        assert!(!s.matches(&Labels::new()), "absent key is not In");
    }

    #[test]
    fn not_in_matches_an_absent_key() {
        let s = sel(&[], vec![expr("tier", "NotIn", &["db"])]);
        assert!(
            s.matches(&Labels::new()),
            "absent key is NotIn (Kubernetes rule)"
        );
        assert!(s.matches(&labels(&[("tier", "api")])));
        assert!(!s.matches(&labels(&[("tier", "db")])));
    }

    #[test]
    fn exists_and_does_not_exist_test_presence_only() {
        let exists = sel(&[], vec![expr("pci", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("pci", "")])));
        assert!(exists.matches(&labels(&[("pci", "anything")])));
        assert!(!exists.matches(&Labels::new()));
        let absent = sel(&[], vec![expr("pci", "DoesNotExist", &[])]);
        assert!(absent.matches(&Labels::new()));
        assert!(!absent.matches(&labels(&[("pci", "")])));
    }

    #[test]
    fn requirements_are_anded() {
        let s = sel(
            &[("app", "pay")],
            vec![
                expr("tier", "In", &["api"]),
                expr("legacy", "DoesNotExist", &[]),
            ],
        );
        assert!(s.matches(&labels(&[("app", "pay"), ("tier", "api")])));
        assert!(!s.matches(&labels(&[("app", "pay"), ("tier", "api"), ("legacy", "1")])));
        assert_eq!(s.to_string(), "app=pay,tier in (api),!legacy");
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_place() {
        let bad = |m: &[(&str, &str)], e: Vec<LabelSelectorRequirement>| {
            Selector::compile(&LabelSelector {
                match_labels: labels(m),
                match_expressions: e,
            })
            .expect_err("malformed")
        };
        assert_eq!(
            bad(&[], vec![expr("a", "Equals", &["b"])]),
            SelectorError::UnknownOperator {
                index: 0,
                operator: "Equals".into()
            }
        );
        // Operators are case-sensitive, as in Kubernetes.
        assert!(matches!(
            bad(&[], vec![expr("a", "in", &["b"])]),
            SelectorError::UnknownOperator { .. }
        ));
        assert_eq!(
            bad(&[], vec![expr("a", "Exists", &[]), expr("b", "In", &[])]),
            SelectorError::MissingValues {
                index: 1,
                operator: "In"
            }
        );
        assert!(matches!(
            bad(&[], vec![expr("a", "NotIn", &[])]),
            SelectorError::MissingValues { .. }
        ));
        assert_eq!(
            bad(&[], vec![expr("a", "Exists", &["x"])]),
            SelectorError::UnexpectedValues {
                index: 0,
                operator: "Exists"
            }
        );
        assert!(matches!(
            bad(&[], vec![expr("a", "DoesNotExist", &["x"])]),
            SelectorError::UnexpectedValues { .. }
        ));
        let e = bad(&[("bad key!", "v")], vec![]);
        assert!(matches!(e, SelectorError::InvalidKey { .. }), "{e:?}");
        assert!(e.to_string().contains("matchLabels"), "{e}");
        assert!(matches!(
            bad(&[("k", "-starts-with-dash")], vec![]),
            SelectorError::InvalidValue { .. }
        ));
        assert!(matches!(
            bad(&[], vec![expr("", "Exists", &[])]),
            SelectorError::InvalidKey { .. }
        ));
        assert!(matches!(
            bad(&[], vec![expr("k", "In", &["has space"])]),
            SelectorError::InvalidValue { .. }
        ));
    }

    #[test]
    fn label_syntax() {
        for ok in [
            "app",
            "keyd.io/sensitive",
            "app.kubernetes.io/name",
            "a_b.c-d",
            "A1",
        ] {
            assert!(is_label_key(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "/x",
            "x/",
            "Keyd.IO/x",
            "-a",
            "a-",
            "a/b/c",
            long.as_str(),
            "ü",
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value(""));
        assert!(is_label_value("true"));
        assert!(!is_label_value("a b"));
        assert!(!is_label_value(&"v".repeat(64)));
    }
}
