//! Per-workload routes: `reserved_for` on a backend names consumers that exist, and a consumer is
//! warned about when every backend serving one of its deployments is reserved for others.

use std::collections::BTreeSet;

use super::super::locate::{Locator, field, index};
use super::super::{Policy, PolicyError};
use super::Checker;

// === impl Checker ===

impl Checker<'_> {
    pub(super) fn routes(&mut self, policy: &Policy) {
        let consumers: BTreeSet<&str> = policy.consumers.iter().map(|c| c.name.as_str()).collect();
        for (i, backend) in policy.backends.iter().enumerate() {
            if let Some(headroom) = &backend.headroom {
                let path = field(&index("backends", i), "headroom");
                for (tier, share) in [
                    ("critical", headroom.critical),
                    ("standard", headroom.standard),
                    ("low", headroom.low),
                ] {
                    if share.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
                        self.at_value(
                            &field(&path, tier),
                            "must be a share of capacity between 0.0 and 1.0, e.g. 0.30",
                        );
                    }
                }
            }
            let Some(reserved) = &backend.reserved_for else {
                continue;
            };
            let path = field(&index("backends", i), "reserved_for");
            if reserved.is_empty() {
                self.at_value(
                    &path,
                    "must name at least one consumer; leave it out for a backend every consumer shares",
                );
            }
            for (j, name) in reserved.iter().enumerate() {
                if !consumers.contains(name.as_str()) {
                    self.at_value(
                        &index(&path, j),
                        format!("unknown consumer `{name}`: not declared in `[[consumers]]`"),
                    );
                }
            }
        }
    }
}

/// A consumer allowed to call a deployment that only backends reserved for other consumers serve:
/// every such call would fail, which is allowed (the workload may be on its way) but unintended.
pub(super) fn warnings(policy: &Policy, locator: &Locator<'_>, warnings: &mut Vec<PolicyError>) {
    for (i, consumer) in policy.consumers.iter().enumerate() {
        for deployment in &policy.deployments {
            let name = deployment.name.as_str();
            if consumer
                .deployments
                .as_ref()
                .is_some_and(|allowed| !allowed.iter().any(|d| d == name))
            {
                continue;
            }
            let mut serving = policy
                .backends
                .iter()
                .filter(|b| b.deployments.contains_key(name))
                .peekable();
            if serving.peek().is_none() {
                continue;
            }
            let mut open = serving.filter(|b| {
                b.reserved_for
                    .as_ref()
                    .is_none_or(|r| r.contains(&consumer.name))
            });
            if open.next().is_none() {
                warnings.push(locator.at_value(
                    &field(&index("consumers", i), "name"),
                    format!(
                        "consumer `{}` may call `{name}`, but only backends reserved for other consumers serve it: its calls to `{name}` will fail",
                        consumer.name
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    const POLICY: &str = r#"
[[deployments]]
name = "gpt-4o"

[[deployments]]
name = "claims-model"

[[backends]]
name = "claims-ptu"
region = "Sweden Central"
endpoint = "https://claims.openai.azure.com"
api_key = "env:A"
reserved_for = ["claims-bot"]
deployments = { gpt-4o = "gpt-4o", claims-model = "claims" }

[[backends]]
name = "pool"
region = "France Central"
endpoint = "https://pool.openai.azure.com"
api_key = "env:B"
deployments = { gpt-4o = "gpt-4o" }

[[consumers]]
name = "claims-bot"
keys = ["env:C"]

[[consumers]]
name = "hr-assistant"
keys = ["env:D"]
"#;

    #[test]
    fn reservations_name_known_consumers() {
        let bad = POLICY.replace(r#"["claims-bot"]"#, r#"["claims-bot", "claims-bott"]"#);
        let errors = Policy::from_toml_str(&bad, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains(
                "p.toml:13:31: backends[0].reserved_for[1]: unknown consumer `claims-bott`: not declared in `[[consumers]]`"
            ),
            "{errors}"
        );
        let empty = POLICY.replace(r#"["claims-bot"]"#, "[]");
        let errors = Policy::from_toml_str(&empty, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains("backends[0].reserved_for: must name at least one consumer"),
            "{errors}"
        );
    }

    #[test]
    fn headroom_is_a_share_and_tiers_are_named() {
        let with = |headroom: &str| {
            POLICY.replace(
                "deployments = { gpt-4o = \"gpt-4o\" }\n",
                &format!("deployments = {{ gpt-4o = \"gpt-4o\" }}\nheadroom = {{ {headroom} }}\n"),
            )
        };
        let policy = Policy::from_toml_str(&with("low = 0.3, standard = 0.1"), "p.toml").unwrap();
        let headroom = policy.backends[1].headroom.clone().unwrap();
        assert_eq!(
            (headroom.low, headroom.standard, headroom.critical),
            (Some(0.3), Some(0.1), None)
        );
        let errors = Policy::from_toml_str(&with("low = 30.0"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains(
                "backends[1].headroom.low: must be a share of capacity between 0.0 and 1.0"
            ),
            "{errors}"
        );
        let errors = Policy::from_toml_str(&with("lowest = 0.3"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(errors.contains("unknown field `lowest`"), "{errors}");
        let tiered = POLICY.replace(
            "name = \"hr-assistant\"\n",
            "name = \"hr-assistant\"\ntier = \"low\"\n",
        );
        let policy = Policy::from_toml_str(&tiered, "p.toml").unwrap();
        assert_eq!(policy.consumers[1].tier, crate::TierSpec::Low);
        assert_eq!(policy.consumers[0].tier, crate::TierSpec::Standard);
        let errors = Policy::from_toml_str(&tiered.replace("\"low\"", "\"lowest\""), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(errors.contains("consumers[1].tier"), "{errors}");
    }

    #[test]
    fn a_deployment_only_reserved_backends_serve_is_a_warning_for_the_others() {
        let policy = Policy::from_toml_str(POLICY, "p.toml").unwrap();
        let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "p.toml:28:8: consumers[1].name: consumer `hr-assistant` may call `claims-model`, but only backends reserved for other consumers serve it: its calls to `claims-model` will fail"
            ]
        );
        // Restricted to the deployments it can use, it is fine.
        let scoped = POLICY.replace(
            "name = \"hr-assistant\"\n",
            "name = \"hr-assistant\"\ndeployments = [\"gpt-4o\"]\n",
        );
        assert!(
            Policy::from_toml_str(&scoped, "p.toml")
                .unwrap()
                .warnings()
                .is_empty()
        );
    }
}
