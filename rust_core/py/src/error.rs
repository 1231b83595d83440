//! The one place core errors become Python exceptions.

use allocsvc_core::CoreError;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::PyErr;

/// ValueError for bad arguments, KeyError for an experiment the engine does not know.
pub fn to_py(err: CoreError) -> PyErr {
    match err {
        CoreError::InvalidArgument(_) => PyValueError::new_err(err.to_string()),
        CoreError::UnknownExperiment(_) => PyKeyError::new_err(err.to_string()),
    }
}

/// A ValueError naming the argument.
pub fn invalid(message: String) -> PyErr {
    PyValueError::new_err(message)
}
