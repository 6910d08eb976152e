//! The one error type of the core. Every variant names the argument, what was wrong and what
//! would be valid; `bindings.rs` maps each variant to a Python exception class in one place.

use tch::TchError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sparsity must be a number in [0, 1), got {0}; use 0.5 for 50% of each row, or an N:M pattern such as 2:4")]
    InvalidSparsity(f64),

    #[error("invalid N:M pattern {n}:{m}: {reason}")]
    InvalidPattern { n: i64, m: i64, reason: String },

    #[error("`{arg}` must be a {expected}-D tensor, got shape {got:?}")]
    Rank { arg: &'static str, expected: usize, got: Vec<i64> },

    #[error("`{arg}` has shape {got:?}, expected {expected}")]
    Shape { arg: &'static str, got: Vec<i64>, expected: String },

    #[error("`{arg}` is on {got} but `{other}` is on {expected}; move both to the same device")]
    Device { arg: &'static str, got: String, other: &'static str, expected: String },

    #[error("`{arg}` has dtype {got}, expected {expected}")]
    Dtype { arg: &'static str, got: String, expected: &'static str },

    #[error("`{arg}` must be a torch.Tensor, got {got}")]
    NotATensor { arg: &'static str, got: String },

    #[error("`{arg}` contains {what}; check the model weights and calibration data for overflow (try float32 or bfloat16)")]
    NonFinite { arg: &'static str, what: &'static str },

    #[error("{arg}: {reason}")]
    InvalidArgument { arg: &'static str, reason: String },

    #[error("mask file {path}: {reason}")]
    MaskFile { path: String, reason: String },

    /// The block callable (Python) raised; the binding layer re-raises the original exception.
    #[error("the block callback failed: {0}")]
    Callback(String),

    #[error("libtorch: {}", without_backtrace(.0))]
    Torch(#[from] TchError),
}

/// libtorch appends a C++ backtrace to its messages; users need the first part only.
fn without_backtrace(err: &TchError) -> String {
    let text = err.to_string();
    text.split("\nException raised from").next().unwrap_or(&text).trim_end().to_string()
}
