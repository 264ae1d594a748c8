//! The pure PEC core: classification, taking a message apart, the
//! certification data (`daticert.xml`).
//!
//! This module tree knows the PEC rules and nothing about I/O: it takes
//! bytes and returns values. It never names tokio, openssl, rusqlite,
//! lettre, async_imap, `std::fs` or `std::net` (a test checks it), never
//! reads the clock (time is an argument) and never panics on input.
#![deny(missing_docs)]

pub mod classify;
pub mod compose;
pub mod daticert;
pub mod envelope;
pub mod ids;
pub mod inspect;
pub mod kind;
pub mod policy;
pub mod state;
pub mod wire;

pub use classify::classify;
pub use daticert::Daticert;
pub use envelope::PecMessage;
pub use kind::Kind;
