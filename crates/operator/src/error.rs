//! The operator's one error type: each kind has a metric label and says whether trying
//! again can help.

use std::net::SocketAddr;
use std::time::Duration;

use virus_scanner_runtime::env::ConfigErrors;

use crate::bootstrap::MergeError;
use crate::envoy::RenderError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the policy has no {0}")]
    MissingField(&'static str),
    /// Generated configuration that has no YAML form; it holds what a tenant wrote.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Every invalid setting, each message naming its setting.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    ClientConfig(kube::Error),
    #[error("cannot bind {setting} {addr}: {error}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("lost the leader lease to another replica")]
    LeaseLost,
    #[error("could not renew the leader lease for {0:?}")]
    LeaseNotRenewed(Duration),
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not a VirusScanPolicy: {reason}")]
    NotAPolicy { path: String, reason: String },
    #[error("merging into {path}: {error}")]
    Merge { path: String, error: MergeError },
    #[error("--piece must be filter, cluster, connection-manager, routes or bootstrap, got {0:?}")]
    UnknownPiece(String),
    #[error("--piece and --bootstrap are for --target envoy only")]
    NotForTarget,
    /// The policy cannot take the form its gateway's API needs.
    #[error(transparent)]
    Gateway(#[from] crate::gateways::RenderError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "api_unreachable",
            Error::MissingField(_) => "invalid_object",
            Error::Render(_) => "render_failed",
            Error::Config(_) => "invalid_config",
            Error::ClientConfig(_) => "client_config",
            Error::Bind { .. } => "bind_failed",
            Error::LeaseLost | Error::LeaseNotRenewed(_) => "lease_lost",
            Error::Read { .. } => "read_failed",
            Error::NotAPolicy { .. } => "invalid_policy",
            Error::Merge { .. } => "invalid_bootstrap",
            Error::UnknownPiece(_) | Error::NotForTarget => "invalid_argument",
            Error::Gateway(_) => "invalid_policy",
        }
    }

    /// Whether the same work can succeed later without the policy or a setting changing: a
    /// conflict, a permission not granted yet (RBAC applied with the operator), an
    /// overloaded or unreachable API server, a lost lease.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => matches!(s.code, 403 | 409 | 429) || s.code >= 500,
            Error::Kube(_) => true,
            Error::LeaseLost | Error::LeaseNotRenewed(_) => true,
            Error::MissingField(_)
            | Error::Render(_)
            | Error::Config(_)
            | Error::ClientConfig(_)
            | Error::Bind { .. }
            | Error::Read { .. }
            | Error::NotAPolicy { .. }
            | Error::Merge { .. }
            | Error::UnknownPiece(_)
            | Error::NotForTarget
            | Error::Gateway(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure("test", "Test")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn api_errors_are_labelled_by_code_and_retried_when_the_server_may_recover() {
        assert_eq!(
            (api(409).metric_label(), api(409).is_retryable()),
            ("conflict", true)
        );
        assert_eq!(
            (api(403).metric_label(), api(403).is_retryable()),
            ("forbidden", true)
        );
        assert_eq!(
            (api(500).metric_label(), api(500).is_retryable()),
            ("api_error", true)
        );
        assert_eq!(
            (api(422).metric_label(), api(422).is_retryable()),
            ("api_error", false)
        );
    }

    #[test]
    fn tenant_content_errors_are_not_retried() {
        let render = Error::Render(RenderError("x".to_owned()));
        assert_eq!(render.metric_label(), "render_failed");
        assert!(!render.is_retryable());
        assert!(!Error::MissingField("uid").is_retryable());
    }
}
