use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {problem}")]
    BadModel { path: PathBuf, problem: String },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}, only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: unsupported {field} `{value}` (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("no model is named `{name}`; the models served are: {}", known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },
    #[error("prompt `{name}` is not defined; this model's prompts: {available}")]
    UnknownPrompt { name: String, available: String },
    #[error("{path}: {problem}")]
    InputFile { path: PathBuf, problem: String },
    #[error("no GPU adapter found{detail}. {hint}")]
    NoAdapter { detail: String, hint: String },
    #[error("the GPU device could not be created on {adapter}: {message}")]
    Device { adapter: String, message: String },
    #[error("the model needs {what} of {needed}, but the adapter {adapter} allows at most {limit}")]
    AdapterLimit {
        adapter: String,
        what: &'static str,
        needed: u64,
        limit: u64,
    },
    #[error("the {family} kernel family cannot run on {adapter}: {reason}")]
    KernelFamily {
        family: &'static str,
        adapter: String,
        reason: String,
    },
    #[error("unknown kernel choice `{value}` in SURF_KERNELS (accepted: {accepted})")]
    KernelChoice { value: String, accepted: String },
    #[error("unknown device limits `{value}` in SURF_LIMITS (accepted: {accepted})")]
    LimitsChoice { value: String, accepted: String },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("weight source: {0}")]
    WeightSource(String),
    #[error("weight server: {0}")]
    Transport(#[from] surf_transport::Error),
    #[error("fetching {component} from the weight server: {source}")]
    Fetch {
        component: String,
        #[source]
        source: surf_transport::Error,
    },
}

/// What a caller can do about an error: the one classification that exit
/// codes and HTTP statuses are derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's to fix: a model folder, a flag, a text, a kernel choice.
    BadInput,
    /// A weight server refused the token (or its absence).
    Unauthorized,
    /// Weights could not be had in time, or arrived damaged; asking again
    /// later may work.
    Unavailable,
    /// The GPU or its driver failed, or the adapter is too small.
    Gpu,
    /// A fault of this program.
    Internal,
}

impl From<surf_transport::ErrorKind> for ErrorKind {
    fn from(kind: surf_transport::ErrorKind) -> Self {
        match kind {
            surf_transport::ErrorKind::BadInput => ErrorKind::BadInput,
            surf_transport::ErrorKind::Unauthorized => ErrorKind::Unauthorized,
            surf_transport::ErrorKind::Unavailable => ErrorKind::Unavailable,
            surf_transport::ErrorKind::Internal => ErrorKind::Internal,
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. }
            | Error::Json { .. }
            | Error::BadModel { .. }
            | Error::MissingTensor { .. }
            | Error::WrongShape { .. }
            | Error::UnsupportedDtype { .. }
            | Error::Unsupported { .. }
            | Error::Tokenizer { .. }
            | Error::InvalidInput(_)
            | Error::UnknownModel { .. }
            | Error::UnknownPrompt { .. }
            | Error::InputFile { .. }
            | Error::KernelFamily { .. }
            | Error::KernelChoice { .. }
            | Error::LimitsChoice { .. } => ErrorKind::BadInput,
            Error::NoAdapter { .. }
            | Error::Device { .. }
            | Error::AdapterLimit { .. }
            | Error::Gpu(_) => ErrorKind::Gpu,
            Error::WeightSource(_) => ErrorKind::Unavailable,
            Error::Transport(source) | Error::Fetch { source, .. } => source.kind().into(),
        }
    }

    /// True when the error is the caller's to fix (bad model folder, bad text, bad
    /// options) rather than a fault of the machine.
    pub fn is_bad_input(&self) -> bool {
        self.kind() == ErrorKind::BadInput
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_model(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
