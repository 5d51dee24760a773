//! The policy's answer to a verdict: a pure function.

use virus_scanner_protocol::task::VerdictStatus;

use super::Decision;
use crate::config::ScanPolicy;

/// The policy's answer to a verdict. `refused` marks a body refused for its shape, which
/// no setting lets through.
pub fn decision(policy: &ScanPolicy, status: VerdictStatus, refused: bool) -> Decision {
    match status {
        VerdictStatus::Clean if !refused => Decision::Allow,
        VerdictStatus::Infected => Decision::Block {
            status: policy.infected_status,
        },
        VerdictStatus::Unscannable if policy.allow_unscannable && !refused => Decision::Allow,
        VerdictStatus::Error | VerdictStatus::Unspecified if policy.fail_open && !refused => {
            Decision::Allow
        }
        VerdictStatus::Error | VerdictStatus::Unspecified => Decision::Block {
            status: policy.error_status,
        },
        VerdictStatus::Clean | VerdictStatus::Unscannable => Decision::Block {
            status: policy.unscannable_status,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProducerArgs;

    fn config(extra: &[&str]) -> ScanPolicy {
        let mut argv = vec!["virus-scanner-producer"];
        argv.extend_from_slice(extra);
        let no_env: &[(&str, &str)] = &[];
        virus_scanner_runtime::env::parse_from::<ProducerArgs, _, _>(argv, no_env)
            .expect("flags")
            .validate()
            .expect("valid")
            .scan
    }

    #[test]
    fn the_default_policy_passes_only_clean_bodies() {
        let c = config(&[]);
        let block = |status| Decision::Block { status };
        assert_eq!(decision(&c, VerdictStatus::Clean, false), Decision::Allow);
        assert_eq!(decision(&c, VerdictStatus::Infected, false), block(406));
        assert_eq!(decision(&c, VerdictStatus::Unscannable, false), block(413));
        assert_eq!(decision(&c, VerdictStatus::Error, false), block(503));
        assert_eq!(decision(&c, VerdictStatus::Unspecified, false), block(503));
    }

    #[test]
    fn fail_open_and_allow_unscannable_never_pass_infected_or_refused_bodies() {
        let c = config(&[
            "--fail-open",
            "--allow-unscannable",
            "--infected-status",
            "451",
            "--unscannable-status",
            "415",
        ]);
        assert_eq!(decision(&c, VerdictStatus::Error, false), Decision::Allow);
        assert_eq!(
            decision(&c, VerdictStatus::Unscannable, false),
            Decision::Allow
        );
        assert_eq!(
            decision(&c, VerdictStatus::Infected, false),
            Decision::Block { status: 451 }
        );
        for status in [
            VerdictStatus::Unscannable,
            VerdictStatus::Clean,
            VerdictStatus::Error,
        ] {
            assert_ne!(decision(&c, status, true), Decision::Allow, "{status:?}");
        }
        assert_eq!(
            decision(&c, VerdictStatus::Unscannable, true),
            Decision::Block { status: 415 }
        );
    }
}
