//! The errors of the Python layer, and the one place where every error
//! becomes a Python exception.

use pyo3::PyErr;
use pyo3::exceptions::{PyConnectionError, PyPermissionError, PyRuntimeError, PyValueError};
use surf_engine::ErrorKind;

pyo3::create_exception!(
    surfing_weights,
    WeightServerError,
    PyConnectionError,
    "A weight server could not be reached, or did not deliver the weights."
);

/// Everything that can fail behind a call from Python.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(transparent)]
    Engine(#[from] surf_engine::Error),
    #[error(transparent)]
    Server(#[from] surf_server::Error),
    #[error(transparent)]
    Transport(#[from] surf_transport::Error),
    /// An argument the caller must change: a name, a number, a combination.
    #[error("{0}")]
    InvalidArgument(String),
    /// The default model could not be found or fetched.
    #[error("{0}")]
    DefaultModel(String),
    #[error("the weight server is not running; call start() first or use it in a `with` block")]
    ServerNotRunning,
    #[error("the async runtime of the weight server could not start: {0}")]
    Runtime(std::io::Error),
    #[error("internal error (a bug in surfing_weights): {0}")]
    Panic(String),
}

impl BindingError {
    pub fn invalid(message: impl Into<String>) -> Self {
        BindingError::InvalidArgument(message.into())
    }

    /// The engine's classification, which the command line's exit statuses
    /// and the HTTP statuses also come from.
    fn kind(&self) -> ErrorKind {
        match self {
            BindingError::Engine(error) => error.kind(),
            BindingError::Server(surf_server::Error::Transport(error)) => error.kind().into(),
            BindingError::Server(error) if error.is_bad_input() => ErrorKind::BadInput,
            BindingError::Server(_) => ErrorKind::Unavailable,
            BindingError::Transport(error) => error.kind().into(),
            BindingError::InvalidArgument(_) | BindingError::DefaultModel(_) => ErrorKind::BadInput,
            BindingError::ServerNotRunning | BindingError::Runtime(_) | BindingError::Panic(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<BindingError> for PyErr {
    fn from(error: BindingError) -> PyErr {
        let message = error.to_string();
        match error.kind() {
            ErrorKind::BadInput => PyValueError::new_err(message),
            ErrorKind::Unauthorized => PyPermissionError::new_err(message),
            ErrorKind::Unavailable => WeightServerError::new_err(message),
            ErrorKind::Gpu | ErrorKind::Internal => PyRuntimeError::new_err(message),
        }
    }
}

/// Runs `work` with the GIL released, so that other Python threads run
/// meanwhile; a panic inside becomes a `RuntimeError` instead of crossing
/// into the interpreter.
pub fn without_gil<T, F>(py: pyo3::Python<'_>, work: F) -> Result<T, BindingError>
where
    T: Send,
    F: FnOnce() -> Result<T, BindingError> + Send,
{
    py.detach(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(BindingError::Panic(message))
        })
    })
}
