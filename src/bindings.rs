//! The Python surface of the core: argument conversion, the error mapping, and the `Block`
//! implementation that calls back into Python. No math lives here.

use crate::block::Block;
use crate::schedule::{prune_block_ as run_schedule, Method, Plan};
use crate::error::{Error, Result};
use crate::io;
use crate::mask::{self, Pattern};
use crate::owl;
use crate::ro::{LrSearch, RoSettings};
use crate::score;
use crate::sparsegpt;
use crate::stats::{all_reduce_sums, ActivationStats, GradientStats, Processes};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3_tch::PyTensor;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::Tensor;

/// The one mapping from core errors to the classes of `wandapp.errors`.
impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let class = match &err {
            Error::InvalidSparsity(_) | Error::InvalidPattern { .. } => "SparsityError",
            Error::Rank { .. } | Error::Shape { .. } => "ShapeError",
            Error::Device { .. } => "DeviceMismatchError",
            Error::Dtype { .. } | Error::NotATensor { .. } => "DtypeError",
            Error::NonFinite { .. } => "NonFiniteError",
            Error::InvalidArgument { .. } => "InvalidArgumentError",
            Error::MaskFile { .. } => "MaskFileError",
            Error::Callback(_) | Error::Torch(_) => "WandappError",
        };
        let message = err.to_string();
        Python::with_gil(|py| {
            py.import("wandapp.errors")
                .and_then(|module| module.getattr(class))
                .and_then(|cls| cls.call1((message.clone(),)))
                .map(PyErr::from_value)
                .unwrap_or_else(|_| PyRuntimeError::new_err(message))
        })
    }
}

/// Checked conversion: a non-tensor is a typed error naming the argument.
fn tensor_arg(ob: &Bound<'_, PyAny>, arg: &'static str) -> Result<Tensor> {
    ob.extract::<PyTensor>()
        .map(|t| t.0)
        .map_err(|_| Error::NotATensor { arg, got: ob.get_type().name().map(|n| n.to_string()).unwrap_or_default() })
}

/// Checked conversion back to Python (pyo3-tch would turn a failure into None).
fn to_py(py: Python<'_>, t: Tensor) -> PyResult<PyObject> {
    let ptr = t.pyobject_wrap().map_err(Error::from)?;
    // SAFETY: pyobject_wrap returns a new reference to a torch.Tensor.
    Ok(unsafe { PyObject::from_owned_ptr(py, ptr as *mut pyo3::ffi::PyObject) })
}

/// The pattern of the Python arguments `sparsity` and `nm` (an (n, m) tuple wins when given).
fn pattern_arg(sparsity: f64, nm: Option<(i64, i64)>) -> Result<Pattern> {
    match nm {
        Some((n, m)) => Pattern::nm(n, m),
        None => Pattern::unstructured(sparsity),
    }
}

/// How many weights each row of `in_features` loses: with `nm`, (m - n) per group of m; else
/// floor(in_features x sparsity) with the sparsity read as the decimal it prints as (100 x 0.58 =
/// 58, not 57). The one rule behind the masks, the report and `wandapp.testing.assert_sparsity`.
/// Raises SparsityError (sparsity outside [0, 1), an invalid N:M) or InvalidArgumentError
/// (`in_features` < 0).
#[pyfunction]
#[pyo3(signature = (in_features, sparsity = 0.5, nm = None))]
fn pruned_per_row(in_features: i64, sparsity: f64, nm: Option<(i64, i64)>) -> PyResult<i64> {
    if in_features < 0 {
        return Err(Error::InvalidArgument { arg: "in_features", reason: format!("must be >= 0, got {in_features}") }.into());
    }
    Ok(pattern_arg(sparsity, nm)?.pruned_per_row(in_features))
}

/// Per-row unstructured keep-mask (True = keep): every row of `scores` drops exactly
/// `pruned_per_row(in_features, sparsity)` of its lowest scores; at equal score the lower column
/// is dropped first. `scores` [out, in], any float dtype, CPU or CUDA; returns bool [out, in] on
/// the same device (CPU: rayon partial selection). Raises ShapeError (not 2-D), DtypeError (not a
/// float tensor), SparsityError, NonFiniteError (NaN or infinite scores).
#[pyfunction]
fn unstructured_mask(py: Python<'_>, scores: &Bound<'_, PyAny>, sparsity: f64) -> PyResult<PyObject> {
    let scores = tensor_arg(scores, "scores")?;
    let mask = py.allow_threads(move || mask::unstructured_mask(&scores, sparsity))?;
    to_py(py, mask)
}

/// N:M keep-mask: each group of `m` consecutive inputs of a row keeps its `n` highest scores
/// ("2:4" keeps 2 of 4); at equal score the higher column is kept. `scores` [out, in], any float
/// dtype, CPU or CUDA; returns bool [out, in] on the same device. Raises SparsityError (n > m, or
/// `in` not divisible by m) and the errors of `unstructured_mask`.
#[pyfunction]
fn nm_mask(py: Python<'_>, scores: &Bound<'_, PyAny>, n: i64, m: i64) -> PyResult<PyObject> {
    let scores = tensor_arg(scores, "scores")?;
    let mask = py.allow_threads(move || mask::nm_mask(&scores, n, m))?;
    to_py(py, mask)
}

/// The magnitude baseline's score |W_ij|: float32 [out, in] from `weight` [out, in] of any float
/// dtype, on its device. Raises ShapeError, DtypeError.
#[pyfunction]
fn magnitude_score(py: Python<'_>, weight: &Bound<'_, PyAny>) -> PyResult<PyObject> {
    to_py(py, score::magnitude_score(&tensor_arg(weight, "weight")?)?)
}

/// Wanda's score S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2023; SPEC step 1): float32 [out, in] from
/// `weight` [out, in] and `act_norm` [in] (`ActivationStats.norm`), any float dtypes, one device.
/// Raises ShapeError (`act_norm` not [in]), DtypeError, DeviceMismatchError.
#[pyfunction]
fn wanda_score(py: Python<'_>, weight: &Bound<'_, PyAny>, act_norm: &Bound<'_, PyAny>) -> PyResult<PyObject> {
    to_py(py, score::wanda_score(&tensor_arg(weight, "weight")?, &tensor_arg(act_norm, "act_norm")?)?)
}

/// Wanda++'s regional gradient score S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij| (Yang et al. 2025;
/// SPEC step 3): float32 [out, in] from `weight` and `grad_rms` [out, in] (`GradientStats.rms`) and
/// `act_norm` [in], any float dtypes, one device; the paper's alpha is 100. Raises ShapeError,
/// DtypeError, DeviceMismatchError.
#[pyfunction]
#[pyo3(signature = (weight, grad_rms, act_norm, alpha = 100.0))]
fn rgs_score(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    grad_rms: &Bound<'_, PyAny>,
    act_norm: &Bound<'_, PyAny>,
    alpha: f64,
) -> PyResult<PyObject> {
    let (w, g, a) = (tensor_arg(weight, "weight")?, tensor_arg(grad_rms, "grad_rms")?, tensor_arg(act_norm, "act_norm")?);
    to_py(py, score::rgs_score(&w, &g, &a, alpha)?)
}

/// SparseGPT (Frantar & Alistarh 2023) on one weight [out, in] given the Hessian [in, in] of its
/// inputs (H = 2/N sum x x^T): the OBS column sweep in blocks of `blocksize` with `percdamp` x
/// mean(diag H) dampening, per-row unstructured (`sparsity`) or N:M (`nm`) masks chosen as it
/// sweeps, and the error-compensating update. Changes `weight` in place; returns the keep-mask.
/// Runs in the Hessian's precision (float32, or float64 when given float64) on its device. The
/// defaults are `sparsegpt::BLOCK_SIZE` and `sparsegpt::PERCDAMP` (literal here for the signature).
/// Raises ShapeError (`hessian` not [in, in]), SparsityError, DtypeError, DeviceMismatchError,
/// NonFiniteError.
#[pyfunction]
#[pyo3(signature = (weight, hessian, *, sparsity = 0.5, nm = None, blocksize = 128, percdamp = 0.01))]
fn sparsegpt_prune_(
    py: Python<'_>,
    weight: &Bound<'_, PyAny>,
    hessian: &Bound<'_, PyAny>,
    sparsity: f64,
    nm: Option<(i64, i64)>,
    blocksize: i64,
    percdamp: f64,
) -> PyResult<PyObject> {
    let (w, h, pattern) = (tensor_arg(weight, "weight")?, tensor_arg(hessian, "hessian")?, pattern_arg(sparsity, nm)?);
    let mask = py.allow_threads(move || sparsegpt::sparsegpt_prune_(&w, &h, pattern, blocksize, percdamp))?;
    to_py(py, mask)
}

/// OWL's outlier ratio of one block (Yin et al. 2024): the fraction of its Wanda scores
/// |W_ij| ||X_j|| (all `weights` [out, in] together, `act_norms[k]` [in] the norms of weight k's
/// input) above `m` times their mean.
#[pyfunction]
fn owl_outlier_ratio(py: Python<'_>, weights: Vec<Bound<'_, PyAny>>, act_norms: Vec<Bound<'_, PyAny>>, m: f64) -> PyResult<f64> {
    let weights = weights.iter().map(|w| tensor_arg(w, "weights")).collect::<Result<Vec<_>>>()?;
    let norms = act_norms.iter().map(|n| tensor_arg(n, "act_norms")).collect::<Result<Vec<_>>>()?;
    Ok(py.allow_threads(move || owl::outlier_ratio(&weights, &norms, m))?)
}

/// OWL's per-block sparsities for the mean `sparsity`: outlier ratios scaled to [0, 2 x lambda]
/// and centred; block l gets sparsity - (scaled_l - mean).
#[pyfunction]
fn owl_sparsities(ratios: Vec<f64>, sparsity: f64, lambda_: f64) -> PyResult<Vec<f64>> {
    Ok(owl::layer_sparsities(&ratios, sparsity, lambda_)?)
}

/// Whole numbers of weights pruned per row for matrices of one shape ([out, `in_features`]) with
/// ideal sparsities `sparsities`, summing to exactly `total` (largest-remainder rounding).
#[pyfunction]
fn allocate_pruned_per_row(sparsities: Vec<f64>, in_features: i64, total: i64) -> PyResult<Vec<i64>> {
    Ok(owl::allocate_pruned_per_row(&sparsities, in_features, total)?)
}

/// Zeroes `weight` [out, in] where the bool `mask` [out, in] is False, in place: same storage,
/// outside autograd. Raises ShapeError, DtypeError (`mask` not bool), DeviceMismatchError.
#[pyfunction]
fn apply_mask_(weight: &Bound<'_, PyAny>, mask: &Bound<'_, PyAny>) -> PyResult<()> {
    Ok(mask::apply_mask_(&tensor_arg(weight, "weight")?, &tensor_arg(mask, "mask")?)?)
}

/// SHA-256 (64 hex characters) of a bool mask's shape and bits, bit-packed: the hash stored in
/// mask files and the report (`LayerReport.mask_hash`). Raises DtypeError (not bool).
#[pyfunction]
fn mask_hash(mask: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(io::mask_hash(&tensor_arg(mask, "mask")?)?)
}

/// Writes bool masks, bit-packed, to a safetensors file with string metadata.
#[pyfunction]
fn save_masks(path: PathBuf, masks: Vec<(String, Bound<'_, PyAny>)>, metadata: HashMap<String, String>) -> PyResult<()> {
    let masks = masks.iter().map(|(name, m)| Ok((name.clone(), tensor_arg(m, "masks")?))).collect::<Result<Vec<_>>>()?;
    Ok(io::save_masks(&path, &masks, &metadata)?)
}

/// A mask file as Python sees it: ([(name, bool mask on CPU)], metadata).
type PyMaskFile = (Vec<(String, PyObject)>, HashMap<String, String>);

/// Reads a mask file. Verifies every hash.
#[pyfunction]
fn load_masks(py: Python<'_>, path: PathBuf) -> PyResult<PyMaskFile> {
    let (masks, metadata) = io::load_masks(&path)?;
    let masks = masks.into_iter().map(|(name, m)| Ok((name, to_py(py, m)?))).collect::<PyResult<Vec<_>>>()?;
    Ok((masks, metadata))
}

/// Streaming ||X_j||_2 of one linear layer's inputs over calibration sequences, as Wanda's code
/// computes it (SPEC step 1; padding excluded): `ActivationStats(in_features)`, `update` per batch,
/// `norm()` at the end. Raises ShapeError for an input whose last dimension is not `in_features`.
#[pyclass(name = "ActivationStats", module = "wandapp._core", unsendable)]
struct PyActivationStats(ActivationStats);

#[pymethods]
impl PyActivationStats {
    #[new]
    fn new(in_features: i64) -> PyResult<Self> {
        Ok(Self(ActivationStats::new(in_features)?))
    }

    /// Adds x [batch, seq, in]; tokens where `token_mask` [batch, seq] is False do not count.
    #[pyo3(signature = (x, token_mask = None))]
    fn update(&mut self, x: &Bound<'_, PyAny>, token_mask: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let mask = token_mask.map(|m| tensor_arg(m, "token_mask")).transpose()?;
        Ok(self.0.update(&tensor_arg(x, "x")?, mask.as_ref())?)
    }

    /// Adds the statistics of the other processes that share the calibration (torch.distributed):
    /// `reduce(tensors)` sums each tensor in place over the `world_size` processes
    /// (``wandapp.distributed.World.all_reduce``). Every process calls it at the same point.
    fn all_reduce(&mut self, reduce: Bound<'_, PyAny>, world_size: usize) -> PyResult<()> {
        let processes = PyReduce { reduce, world_size, error: KeptError::default() };
        all_reduce_sums(&processes, std::slice::from_mut(&mut self.0)).map_err(|e| processes.error.raise(e))
    }

    /// float32 [in]: sqrt of the mean over sequences of each sequence's sum of squares.
    fn norm(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, self.0.norm()?)
    }

    #[getter]
    fn nsamples(&self) -> i64 {
        self.0.nsamples()
    }

    #[getter]
    fn in_features(&self) -> i64 {
        self.0.in_features()
    }

    fn __repr__(&self) -> String {
        format!("ActivationStats(in_features={}, nsamples={})", self.0.in_features(), self.0.nsamples())
    }
}

/// Streaming RMS over samples of a weight's gradient, the regional gradient G of Wanda++ (SPEC
/// step 2): `GradientStats(list(weight.shape))`, `update` with each sample's d loss / d W, `rms()`
/// at the end.
#[pyclass(name = "GradientStats", module = "wandapp._core", unsendable)]
struct PyGradientStats(GradientStats);

#[pymethods]
impl PyGradientStats {
    #[new]
    fn new(shape: Vec<i64>) -> PyResult<Self> {
        Ok(Self(GradientStats::new(shape)?))
    }

    /// Adds one sample's gradient [shape] (its square, summed in float64). Raises ShapeError.
    fn update(&mut self, grad: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.0.update(&tensor_arg(grad, "grad")?)?)
    }

    /// G: float32 [shape], sqrt(sum of squares / nsamples), the RMS over samples of SPEC step 2.
    fn rms(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, self.0.rms()?)
    }

    #[getter]
    fn nsamples(&self) -> i64 {
        self.0.nsamples()
    }

    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.0.shape().to_vec()
    }

    fn __repr__(&self) -> String {
        format!("GradientStats(shape={:?}, nsamples={})", self.0.shape(), self.0.nsamples())
    }
}

/// A Python object with `__len__`, `batches(indices)`, `forward`, `linear_inputs` (returning
/// (inputs, output)), `target` and `token_mask` taking a list of indices (one batch), and
/// `set_targets` / `set_outputs` taking a batch and a tensor; with `world_size()` > 1 also
/// `local()` and `all_reduce(tensors)`; optionally `training_forward` (else `forward` serves RO's
/// training steps) (`Block`). The first exception it raises is kept and
/// re-raised unchanged.
struct PyBlock<'py> {
    obj: Bound<'py, PyAny>,
    len: usize,
    world_size: usize,
    /// Whether the object has its own `training_forward`.
    training_forward: bool,
    error: KeptError,
}

impl<'py> PyBlock<'py> {
    fn call(&self, method: &str, batch: &[usize]) -> Result<Bound<'py, PyAny>> {
        self.invoke(method, (batch.to_vec(),))
    }

    /// Calls `method(*args)`; a Python exception is kept (re-raised unchanged at the end).
    fn invoke<A: pyo3::call::PyCallArgs<'py>>(&self, method: &str, args: A) -> Result<Bound<'py, PyAny>> {
        let py = self.obj.py();
        py.check_signals().and_then(|_| self.obj.call_method1(method, args)).map_err(|e| self.error.keep(e))
    }

    /// Calls `method(batch, tensor)`, handing a tensor of the core's to Python.
    fn hand(&self, method: &str, batch: &[usize], t: &Tensor) -> Result<()> {
        let t = to_py(self.obj.py(), t.shallow_clone()).map_err(|e| Error::Callback(e.to_string()))?;
        self.invoke(method, (batch.to_vec(), t)).map(|_| ())
    }

    fn tensor(&self, method: &'static str, batch: &[usize]) -> Result<Tensor> {
        tensor_arg(&self.call(method, batch)?, method)
    }

    fn list<T: FromPyObject<'py>>(&self, method: &'static str, batch: &[usize], what: &str) -> Result<Vec<T>> {
        self.call(method, batch)?
            .extract()
            .map_err(|_| Error::InvalidArgument { arg: method, reason: format!("must return a list of {what}") })
    }
}

impl Block for PyBlock<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn batches(&self, indices: &[usize]) -> Result<Vec<Vec<usize>>> {
        let batches: Vec<Vec<usize>> = self.list("batches", indices, "lists of indices")?;
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        let mut wanted = indices.to_vec();
        wanted.sort_unstable();
        if seen != wanted || batches.iter().any(Vec::is_empty) {
            return Err(Error::InvalidArgument { arg: "block.batches", reason: "must split the given indices into non-empty lists".into() });
        }
        Ok(batches)
    }

    fn forward(&self, batch: &[usize]) -> Result<Tensor> {
        self.tensor("forward", batch)
    }

    fn training_forward(&self, batch: &[usize]) -> Result<Tensor> {
        self.tensor(if self.training_forward { "training_forward" } else { "forward" }, batch)
    }

    fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
        let (items, out): (Vec<Bound<'_, PyAny>>, Bound<'_, PyAny>) = self
            .call("linear_inputs", batch)?
            .extract()
            .map_err(|_| Error::InvalidArgument { arg: "linear_inputs", reason: "must return (a list of tensors, the block output)".into() })?;
        let inputs = items.iter().map(|x| tensor_arg(x, "linear_inputs")).collect::<Result<_>>()?;
        Ok((inputs, tensor_arg(&out, "linear_inputs")?))
    }

    fn set_targets(&self, batch: &[usize], out: &Tensor) -> Result<()> {
        self.hand("set_targets", batch, out)
    }

    fn target(&self, batch: &[usize]) -> Result<Tensor> {
        self.tensor("target", batch)
    }

    fn set_outputs(&self, batch: &[usize], out: &Tensor) -> Result<()> {
        self.hand("set_outputs", batch, out)
    }

    fn token_mask(&self, batch: &[usize]) -> Result<Option<Tensor>> {
        let m = self.call("token_mask", batch)?;
        if m.is_none() {
            return Ok(None);
        }
        tensor_arg(&m, "token_mask").map(Some)
    }

    fn gradients(&self, loss: &Tensor, weights: &[Tensor]) -> Result<Vec<Tensor>> {
        let loss = loss.shallow_clone();
        let weights: Vec<Tensor> = weights.iter().map(Tensor::shallow_clone).collect();
        Ok(self.obj.py().allow_threads(move || Tensor::f_run_backward(&[loss], &weights, false, false))?)
    }

    fn local(&self) -> Result<Vec<usize>> {
        if self.world_size == 1 {
            return Ok((0..self.len).collect());
        }
        self.invoke("local", ())?
            .extract()
            .map_err(|_| Error::InvalidArgument { arg: "block.local", reason: "must return a list of indices".into() })
    }

}

impl Processes for PyBlock<'_> {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, tensors: &[Tensor]) -> Result<()> {
        self.invoke("all_reduce", (py_tensors(self.obj.py(), tensors)?,)).map(|_| ())
    }
}

/// The core's tensors handed to Python (sharing storage: Python's in-place changes reach the core).
fn py_tensors(py: Python<'_>, tensors: &[Tensor]) -> Result<Vec<PyObject>> {
    tensors.iter().map(|t| to_py(py, t.shallow_clone())).collect::<PyResult<Vec<_>>>().map_err(|e| Error::Callback(e.to_string()))
}

/// The first exception Python code called by the core raised: the core sees `Error::Callback`,
/// and the caller gets the original exception back, unchanged.
#[derive(Default)]
struct KeptError(RefCell<Option<PyErr>>);

impl KeptError {
    fn keep(&self, err: PyErr) -> Error {
        let message = err.to_string();
        self.0.borrow_mut().get_or_insert(err);
        Error::Callback(message)
    }

    /// The Python exception for `err`: the kept one when the core stopped on a callback.
    fn raise(&self, err: Error) -> PyErr {
        match err {
            Error::Callback(message) => self.0.take().unwrap_or_else(|| Error::Callback(message).into()),
            other => other.into(),
        }
    }
}

/// `Processes` whose sum is a Python callable `reduce(tensors)` (torch.distributed through
/// `wandapp.distributed.World.all_reduce`); its first exception is kept and re-raised unchanged.
struct PyReduce<'py> {
    reduce: Bound<'py, PyAny>,
    world_size: usize,
    error: KeptError,
}

impl Processes for PyReduce<'_> {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, tensors: &[Tensor]) -> Result<()> {
        self.reduce.call1((py_tensors(self.reduce.py(), tensors)?,)).map(|_| ()).map_err(|e| self.error.keep(e))
    }
}

/// Runs one block's whole schedule (SPEC step 6) on `weights`, in place; returns a dict with
/// `masks` (bool, one per weight), `mse_before_ro` (with RO: on its held-out sequences),
/// `holdout_mse_final` (with RO: the final error on them; None without), `mse_final` (every
/// sequence), `rounds` (one dict per RO round)
/// and `ro_stop` (why the rounds ended: "rounds", "converged", "rolled back"; None without RO).
/// `ro_min_improvement` > 0 ends a block's rounds early (see `PruneConfig.ro_min_improvement`).
/// `pruned_per_row` (one count per weight) replaces the unstructured `sparsity` with per-layer
/// counts (OWL); `ro_lr_search` ("off", "backtrack", "full") scales RO's first round by a line search on the
/// held-out sequences.
#[pyfunction]
#[pyo3(signature = (block, weights, *, method, sparsity = 0.5, nm = None, pruned_per_row = None, alpha = 100.0,
                    ro_rounds = 5, ro_samples = 32, ro_holdout = 8, ro_lr = 3e-7, ro_lr_search = "off", ro_batch_size = 1, ro_min_improvement = 0.0, ro_extrapolate = false, seed = 0))]
#[allow(clippy::too_many_arguments)]
fn prune_block_<'py>(
    py: Python<'py>,
    block: Bound<'py, PyAny>,
    weights: Vec<Bound<'py, PyAny>>,
    method: &str,
    sparsity: f64,
    nm: Option<(i64, i64)>,
    pruned_per_row: Option<Vec<i64>>,
    alpha: f64,
    ro_rounds: usize,
    ro_samples: usize,
    ro_holdout: usize,
    ro_lr: f64,
    ro_lr_search: &str,
    ro_batch_size: usize,
    ro_min_improvement: f64,
    ro_extrapolate: bool,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let weights = weights.iter().map(|w| tensor_arg(w, "weights")).collect::<Result<Vec<_>>>()?;
    let patterns = match (pruned_per_row, nm) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidArgument { arg: "pruned_per_row", reason: "is for unstructured sparsity; it cannot be combined with nm".into() }.into())
        }
        (Some(counts), None) => counts.into_iter().map(Pattern::PrunedPerRow).collect(),
        (None, _) => vec![pattern_arg(sparsity, nm)?; weights.len()],
    };
    let plan = Plan {
        method: Method::parse(method)?,
        patterns,
        alpha,
        ro: RoSettings { rounds: ro_rounds, samples: ro_samples, holdout: ro_holdout, lr: ro_lr, lr_search: LrSearch::parse(ro_lr_search)?, seed, batch: ro_batch_size, min_improvement: ro_min_improvement, extrapolate: ro_extrapolate },
    };
    let len = block.len()?;
    // A block without `world_size` (the trait's own tests, user blocks) runs alone.
    let world_size = if block.hasattr("world_size")? { block.call_method0("world_size")?.extract()? } else { 1 };
    let training_forward = block.hasattr("training_forward")?;
    let block = PyBlock { obj: block, len, world_size, training_forward, error: KeptError::default() };
    let outcome = run_schedule(&block, &weights, &plan).map_err(|e| block.error.raise(e))?;
    let result = PyDict::new(py);
    let masks = outcome.masks.into_iter().map(|m| to_py(py, m)).collect::<PyResult<Vec<_>>>()?;
    result.set_item("masks", PyList::new(py, masks)?)?;
    result.set_item("mse_before_ro", outcome.mse_before_ro)?;
    result.set_item("holdout_mse_final", outcome.holdout_mse_final)?;
    result.set_item("mse_final", outcome.mse_final)?;
    result.set_item("magnitude_fallback", PyList::new(py, outcome.magnitude_fallback)?)?;
    let rounds = PyList::empty(py);
    for r in outcome.rounds {
        let d = PyDict::new(py);
        d.set_item("loss", r.loss)?;
        d.set_item("lr", r.lr)?;
        d.set_item("holdout_before", r.holdout_before)?;
        d.set_item("holdout_after", r.holdout_after)?;
        d.set_item("rolled_back", r.rolled_back)?;
        d.set_item("steps", r.steps)?;
        rounds.append(d)?;
    }
    result.set_item("rounds", rounds)?;
    result.set_item("ro_stop", outcome.ro_stop.map(|s| s.as_str()))?;
    Ok(result)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("TORCH_VERSION", crate::TORCH_VERSION)?;
    m.add("MASK_FORMAT", io::FORMAT)?;
    m.add("MASK_FORMAT_VERSION", io::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(pruned_per_row, m)?)?;
    m.add_function(wrap_pyfunction!(unstructured_mask, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(magnitude_score, m)?)?;
    m.add_function(wrap_pyfunction!(wanda_score, m)?)?;
    m.add_function(wrap_pyfunction!(rgs_score, m)?)?;
    m.add_function(wrap_pyfunction!(apply_mask_, m)?)?;
    m.add_function(wrap_pyfunction!(sparsegpt_prune_, m)?)?;
    m.add_function(wrap_pyfunction!(owl_outlier_ratio, m)?)?;
    m.add_function(wrap_pyfunction!(owl_sparsities, m)?)?;
    m.add_function(wrap_pyfunction!(allocate_pruned_per_row, m)?)?;
    m.add_function(wrap_pyfunction!(mask_hash, m)?)?;
    m.add_function(wrap_pyfunction!(save_masks, m)?)?;
    m.add_function(wrap_pyfunction!(load_masks, m)?)?;
    m.add_function(wrap_pyfunction!(prune_block_, m)?)?;
    m.add_class::<PyActivationStats>()?;
    m.add_class::<PyGradientStats>()?;
    Ok(())
}
