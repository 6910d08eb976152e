//! wandapp's Rust core: Wanda++ statistics, scores, masks and the block schedule on libtorch
//! tensors. Only `bindings` knows Python; everything else is plain Rust testable with `cargo test`.

pub mod block;
pub mod cpu;
pub mod error;
pub mod io;
pub mod mask;
pub mod owl;
pub mod ro;
pub mod rng;
pub mod schedule;
pub mod score;
pub mod sparsegpt;
pub mod stats;
pub mod tensor_check;

#[cfg(feature = "python")]
mod bindings;

pub use error::{Error, Result};

/// The torch version this build links against (build.rs).
pub const TORCH_VERSION: &str = env!("WANDAPP_TORCH_VERSION");

/// The same version as a marker in the shared library's bytes: when the dynamic loader refuses
/// the library (another torch is installed), Python finds this string in the file to say which
/// torch it was built for.
#[used]
static TORCH_VERSION_MARKER: &str = concat!("wandapp-built-for-torch=", env!("WANDAPP_TORCH_VERSION"), ";");

/// The compiled module `wandapp._core`; `bindings` holds its contents.
#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    bindings::register(m)
}
