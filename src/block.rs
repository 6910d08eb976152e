//! A decoder block over its captured calibration sequences: the `Block` trait (the HuggingFace
//! module runs unchanged in Python behind it, while autograd does the backward here), and what
//! the schedule (`schedule.rs`) and regional optimization (`ro.rs`) measure on it in batches:
//! block-output errors, and sums kept on the device and read back once.
//!
//! Calibration may be spread over processes (torch.distributed): each runs its own share of the
//! sequences (`Block::local`) and every sum over sequences is added up over the processes through
//! `Block::all_reduce` before anything is decided from it, so every process takes the same
//! decisions and ends with the same weights. The hook keeps the core free of any process-group API.

use crate::error::Result;
use crate::stats::Processes;
use tch::{Kind, Tensor};

/// A decoder block over its captured calibration sequences, addressed by index. Methods take a
/// batch of indices (one element of `batches`, or a single sequence) and return tensors with
/// that many rows in the leading dimension. As `Processes`, it sums over the processes that share
/// the calibration.
pub trait Block: Processes {
    /// Number of calibration sequences.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Partition of `indices` into batches that may run in one call (same length, no padding).
    /// The default runs each sequence alone.
    fn batches(&self, indices: &[usize]) -> Result<Vec<Vec<usize>>> {
        Ok(indices.iter().map(|&i| vec![i]).collect())
    }
    /// Block output [b, seq, hidden]; tracks gradients when grad mode is on.
    fn forward(&self, batch: &[usize]) -> Result<Tensor>;
    /// The forward of an RO training step [b, seq, hidden], under grad mode: its output serves
    /// only the step's gradient, so an implementation may run it in lower precision (PyTorch's
    /// autocast, `PruneConfig.ro_autocast`). Every measured forward (targets, errors, activation
    /// statistics, the next block's inputs) goes through `forward` or `linear_inputs`.
    fn training_forward(&self, batch: &[usize]) -> Result<Tensor> {
        self.forward(batch)
    }
    /// One forward that also records each weight's input (in the order of the weights): [b, seq,
    /// in] for a layer that sees every token (padding is left out with `token_mask`), or [rows,
    /// in] for an expert of a mixture of experts: the real tokens of the batch routed to it,
    /// possibly none. Returns them with the block output (tracking gradients when grad mode is on).
    fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)>;
    /// Keeps `out` [b, seq, hidden], the dense block's output, as the target of `batch`; the core
    /// calls it from its first pass over the dense block, so no pass runs only for the targets.
    fn set_targets(&self, batch: &[usize], out: &Tensor) -> Result<()>;
    /// The dense block's output [b, seq, hidden] (the RO target and the error reference).
    fn target(&self, batch: &[usize]) -> Result<Tensor>;
    /// Keeps `out`, the pruned block's final output, as the next block's input for `batch`.
    fn set_outputs(&self, batch: &[usize], out: &Tensor) -> Result<()>;
    /// [b, seq] bool, True on real tokens; None when no sequence of the batch has padding.
    fn token_mask(&self, batch: &[usize]) -> Result<Option<Tensor>>;
    /// d loss / d weight for each of `weights` (undefined for a weight `loss` does not reach),
    /// returned rather than accumulated into `.grad`: no zeroing pass and no accumulation pass per
    /// call. An implementation that holds a lock the autograd engine needs (the GIL) releases it.
    fn gradients(&self, loss: &Tensor, weights: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(Tensor::f_run_backward(&[loss], weights, false, false)?)
    }
    /// The sequences this process runs, sorted: all of them, or its share when the calibration is
    /// spread over processes. The core passes the methods above only these indices.
    fn local(&self) -> Result<Vec<usize>> {
        Ok((0..self.len()).collect())
    }
}

/// The indices of `samples` this process runs (`Block::local`), in the order given.
pub fn local_share(block: &dyn Block, samples: &[usize]) -> Result<Vec<usize>> {
    let local = block.local()?;
    Ok(samples.iter().copied().filter(|i| local.binary_search(i).is_ok()).collect())
}

/// Mean squared error over real tokens, in float32.
pub fn masked_mse(out: &Tensor, target: &Tensor, token_mask: Option<&Tensor>) -> Result<Tensor> {
    let diff = out.f_to_kind(Kind::Float)?.f_sub(&target.f_to_kind(Kind::Float)?)?.f_square()?;
    match token_mask {
        None => Ok(diff.f_mean(Kind::Float)?),
        Some(m) => {
            // masked_fill, not a product: padding may hold inf, and inf * 0 is NaN.
            let padding = m.f_logical_not()?.f_unsqueeze(-1)?;
            let count = m.f_sum(Kind::Float)?.f_mul_scalar(diff.size()[2] as f64)?.f_clamp_min(1.0)?;
            Ok(diff.f_masked_fill(&padding, 0.0)?.f_sum(Kind::Float)?.f_div(&count)?)
        }
    }
}

/// SPEC's regional loss ||f(X_n)||_2 over real tokens, in float32.
pub fn regional_norm(out: &Tensor, token_mask: Option<&Tensor>) -> Result<Tensor> {
    let out = out.f_to_kind(Kind::Float)?;
    let out = match token_mask {
        None => out,
        Some(m) => out.f_masked_fill(&m.f_logical_not()?.f_unsqueeze(-1)?, 0.0)?,
    };
    Ok(out.f_square()?.f_sum(Kind::Float)?.f_sqrt()?)
}

/// A float64 sum of scalars kept on their device and read back once, so that a loop adding one
/// value per step does not wait for the device at every step.
#[derive(Default)]
pub struct DeviceSum(Option<Tensor>);

impl DeviceSum {
    pub fn add(&mut self, value: &Tensor) -> Result<()> {
        let value = value.f_detach()?.f_to_kind(Kind::Double)?;
        self.0 = Some(match self.0.take() {
            None => value,
            Some(sum) => sum.f_add(&value)?,
        });
        Ok(())
    }

    pub fn read(self) -> Result<f64> {
        Ok(self.0.map_or(Ok(0.0), f64::try_from)?)
    }

    /// The sum over the processes (`Processes::all_reduce`), read back.
    pub fn all_reduced(self, processes: &dyn Processes) -> Result<f64> {
        if processes.world_size() == 1 {
            return self.read();
        }
        let sum = self.0.unwrap_or_else(|| Tensor::zeros([], (Kind::Double, tch::Device::Cpu)));
        processes.all_reduce(&[sum.shallow_clone()])?;
        Ok(f64::try_from(sum)?)
    }
}

/// Sum over a batch [b, seq, hidden] of each sequence's MSE over its real tokens (float32). A
/// batch of one is exactly `masked_mse`, so one-by-one runs keep their bits.
pub fn summed_mse(out: &Tensor, target: &Tensor, token_mask: Option<&Tensor>) -> Result<Tensor> {
    if out.size()[0] == 1 {
        return masked_mse(out, target, token_mask);
    }
    let diff = out.f_to_kind(Kind::Float)?.f_sub(&target.f_to_kind(Kind::Float)?)?.f_square()?;
    let per_sequence = match token_mask {
        None => diff.f_mean_dim(&[1i64, 2][..], false, Kind::Float)?,
        Some(m) => {
            let padding = m.f_logical_not()?.f_unsqueeze(-1)?;
            let count = m.f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?.f_mul_scalar(diff.size()[2] as f64)?.f_clamp_min(1.0)?;
            diff.f_masked_fill(&padding, 0.0)?.f_sum_dim_intlist(&[1i64, 2][..], false, Kind::Float)?.f_div(&count)?
        }
    };
    Ok(per_sequence.f_sum(Kind::Float)?)
}

/// Mean block-output MSE against the dense outputs over `samples` (those this process holds, then
/// summed over the processes), without autograd, in the block's batches; read back once (no host
/// synchronisation per batch).
pub fn block_mse(block: &dyn Block, samples: &[usize]) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut total = DeviceSum::default();
    for batch in block.batches(&local_share(block, samples)?)? {
        let mask = block.token_mask(&batch)?;
        total.add(&summed_mse(&block.forward(&batch)?, &block.target(&batch)?, mask.as_ref())?)?;
    }
    Ok(total.all_reduced(block)? / samples.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_mse_ignores_padding() {
        let out = Tensor::from_slice(&[1.0f32, 5.0]).view([1, 2, 1]);
        let target = Tensor::from_slice(&[0.0f32, 0.0]).view([1, 2, 1]);
        let mask = Tensor::from_slice(&[true, false]).view([1, 2]);
        assert_eq!(f64::try_from(masked_mse(&out, &target, Some(&mask)).unwrap()).unwrap(), 1.0);
    }
}
