//! Errors of the core, as plain Rust values (the binding maps them to Python exceptions).

use std::fmt;

/// What went wrong in a core call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// An argument is out of its domain; the message starts with the argument's name.
    InvalidArgument(String),
    /// The experiment handle is not configured.
    UnknownExperiment(u64),
}

impl CoreError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        CoreError::InvalidArgument(message.into())
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument(m) => f.write_str(m),
            CoreError::UnknownExperiment(id) => write!(f, "experiment: {id} is not configured"),
        }
    }
}

impl std::error::Error for CoreError {}
