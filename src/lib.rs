//! pecgate: a certified-email (PEC) gateway.
pub mod cli;
pub mod config;
pub mod pec;
pub mod pki;
pub mod sandbox;
pub mod smtp;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
