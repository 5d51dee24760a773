//! `virus-scan-operator`: the VirusScanPolicy CRD, the controller that turns policies into
//! Envoy configuration, the sidecar injector, and the tools to render both offline.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod certs;
pub mod check;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod envoy;
pub mod envoy_config;
pub mod error;
pub mod gateways;
pub mod inject;
pub mod lease;
pub mod metrics;
pub mod run;
pub mod selector;
pub mod tenants;
pub mod webhook;

pub use cli::{Cli, Command, EnvoyConfigArgs, RunArgs};
pub use envoy_config::envoy_config;
pub use error::Error;
pub use run::run;
