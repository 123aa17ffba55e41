//! One error type for the runtime. Every variant names what the user supplied that was wrong
//! (a file, a tensor, a key, a value) so that messages can be acted on without a debugger.

use std::fmt;
use std::path::PathBuf;

/// The runtime's error.
#[derive(Debug)]
pub enum Error {
    /// An I/O failure on a named file.
    Io { path: PathBuf, source: std::io::Error },
    /// A file that exists but whose contents are not what its format requires.
    Format { path: PathBuf, msg: String },
    /// A required tensor is missing from a checkpoint.
    MissingTensor { path: PathBuf, name: String },
    /// A tensor whose shape or dtype does not match what the model expects.
    BadTensor { name: String, msg: String },
    /// A missing or invalid key in a configuration file.
    Config { path: PathBuf, key: String, msg: String },
    /// Shapes that an op cannot combine.
    Shape { op: &'static str, msg: String },
    /// A dtype an op does not support.
    DType { op: &'static str, msg: String },
    /// Bad user input that is not tied to a file (token ids, arguments).
    Input(String),
    /// A feature that is not available in this build or on this machine.
    Unsupported(String),
}

/// Shorthand for `std::result::Result<T, temper_runtime::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, msg } => write!(f, "{}: {msg}", path.display()),
            Error::MissingTensor { path, name } => {
                write!(f, "{}: tensor `{name}` is missing", path.display())
            }
            Error::BadTensor { name, msg } => write!(f, "tensor `{name}`: {msg}"),
            Error::Config { path, key, msg } => write!(f, "{}: key `{key}`: {msg}", path.display()),
            Error::Shape { op, msg } => write!(f, "{op}: shape error: {msg}"),
            Error::DType { op, msg } => write!(f, "{op}: dtype error: {msg}"),
            Error::Input(msg) => write!(f, "{msg}"),
            Error::Unsupported(msg) => write!(f, "unsupported: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    /// A shape error raised by `op`.
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    /// A dtype error raised by `op`.
    pub fn dtype(op: &'static str, msg: impl Into<String>) -> Self {
        Error::DType { op, msg: msg.into() }
    }
}

/// Fails with a shape error unless `cond` holds.
macro_rules! ensure_shape {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::shape($op, format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_shape;
