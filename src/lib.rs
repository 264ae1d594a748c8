//! pecgate: a certified-email (PEC) gateway.
pub mod archive;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod imap;
pub mod ingest;
pub mod outbound;
pub mod outbox;
pub mod pec;
pub mod pki;
pub mod sandbox;
pub mod sent;
pub mod smtp;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
