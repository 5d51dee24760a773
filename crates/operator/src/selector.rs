//! Label selectors evaluated in process, the way the API server evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy the selector. An empty selector matches every pod, as in a
/// Deployment; an operator it does not know matches nothing (fail closed: no injection
/// on a rule we cannot read).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
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
