//! Decode errors for untrusted bytes. Never a panic: every malformed input maps to one of these.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The multipart message has fewer frames than the protocol needs (uid + op).
    #[error("message has {got} frames, expected at least {want}")]
    TooFewFrames { got: usize, want: usize },
    /// The op frame is neither a known legacy id nor a msgpack string.
    #[error("unknown operation {0}")]
    UnknownOp(String),
    /// The payload count does not match the operation's arity.
    #[error("operation {op} takes {want} payload frames, got {got}")]
    Arity {
        op: &'static str,
        want: usize,
        got: usize,
    },
    /// A payload is not the msgpack the parameter needs.
    #[error("bad {what}: {reason}")]
    Payload { what: &'static str, reason: String },
}

impl DecodeError {
    pub fn payload(what: &'static str, reason: impl ToString) -> Self {
        DecodeError::Payload {
            what,
            reason: reason.to_string(),
        }
    }
}
