//! OAuth 2.0: token requests and what they return, the sealed grant, the
//! state Secret of a consent, and the consent flow's HTTP endpoints.

pub mod authorize;
pub mod client;
pub mod destination;
pub mod response;
pub mod seal;
pub mod state_secret;
pub mod token;
