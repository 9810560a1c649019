//! Access control: the access token the control plane sets through `/init`, the gate every
//! REST route and RPC passes, and signed `/files` URLs (reference §2.1–2.4).
//!
//! This module decides; it never builds a response. The REST middleware
//! ([`crate::http::access`]), the RPC stack ([`crate::rpc::access`]) and the `/files`
//! handlers turn its [`crate::error::Error`]s into their own wire forms.

pub mod gate;
pub mod signature;
pub mod token;
