//! Label selectors evaluated in process, with kube's own selector semantics.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// The selector in kube's form; `None` for one the API would refuse (an unknown operator,
/// `In` without values), which selects nothing: no injection on a rule we cannot read.
pub fn parse(selector: &LabelSelector) -> Option<Selector> {
    Selector::try_from(selector.clone()).ok()
}

/// Whether `labels` satisfy the selector. An empty selector matches every pod, as in a
/// Deployment.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    parse(selector).is_some_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn requirement(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: op.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions_all_apply() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("app", "gateway")])),
            match_expressions: Some(vec![
                requirement("tier", "In", &["edge", "public"]),
                requirement("canary", "DoesNotExist", &[]),
            ]),
        };
        assert!(matches(
            &s,
            &labels(&[("app", "gateway"), ("tier", "edge")])
        ));
        assert!(!matches(&s, &labels(&[("app", "gateway")])));
        assert!(!matches(
            &s,
            &labels(&[("app", "gateway"), ("tier", "edge"), ("canary", "1")])
        ));
        assert!(!matches(&s, &labels(&[("app", "api"), ("tier", "edge")])));
    }

    #[test]
    fn empty_selector_matches_and_unknown_operator_does_not() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        let s = LabelSelector {
            match_expressions: Some(vec![requirement("a", "Like", &["x"])]),
            ..LabelSelector::default()
        };
        assert!(!matches(&s, &labels(&[("a", "x")])));
    }
}
