//! Pure decisions: no I/O, no clock of their own (`now` is a parameter).
//! Each takes what a reconcile read and says what it should write.

pub mod classify;
pub mod grant;
pub mod outcome;
pub mod preset;
pub mod refresh;
pub mod secrets;
pub mod status;
pub mod validate;
