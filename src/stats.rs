//! Streaming statistics for scoring. Accumulators are float64 whatever the input dtype, so
//! half-precision models do not lose the small terms and sums added up in another order (batches,
//! processes) round to the same float32 statistic.

use crate::cpu::{elements, elements_mut};
use crate::error::{Error, Result};
use crate::tensor_check::{require_bool, require_finite, require_float, require_rank, require_same_device, require_shape};
use tch::{Device, Kind, Tensor};

/// The processes that share the calibration (torch.distributed ranks) as the sums over sequences
/// see them: a `Block`, or the reduction Python hands `ActivationStats`. A single process (the
/// defaults) has nothing to add.
pub trait Processes {
    /// Processes that share the calibration (1: this one alone).
    fn world_size(&self) -> usize {
        1
    }
    /// Sums each of `tensors` in place over the processes. Every process calls it at the same
    /// point with tensors of the same shapes and dtypes; called only when `world_size() > 1`.
    fn all_reduce(&self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }
}

/// A sum over calibration sequences with its counts: what processes that share the calibration
/// (torch.distributed) add up before a statistic is read.
pub trait SequenceSum {
    /// The running sum; zeros where this process added nothing, or an error where it must have.
    fn sum_mut(&mut self) -> Result<&mut Tensor>;
    fn counts_mut(&mut self) -> Vec<&mut i64>;
}

/// Adds each of `sums` over the processes in one `Processes::all_reduce` call: the sums in place
/// and the counts. Nothing to do for a single process.
pub fn all_reduce_sums<S: SequenceSum>(processes: &dyn Processes, sums: &mut [S]) -> Result<()> {
    if processes.world_size() == 1 {
        return Ok(());
    }
    let mut tensors = Vec::with_capacity(sums.len() + 1);
    let mut counts = Vec::new();
    for s in sums.iter_mut() {
        tensors.push(s.sum_mut()?.shallow_clone());
        counts.extend(s.counts_mut().into_iter().map(|c| *c));
    }
    let counted = Tensor::from_slice(&counts);
    tensors.push(counted.shallow_clone());
    processes.all_reduce(&tensors)?;
    let mut reduced = Vec::<i64>::try_from(&counted)?.into_iter();
    for s in sums.iter_mut() {
        for c in s.counts_mut() {
            *c = reduced.next().expect("one reduced count per count");
        }
    }
    Ok(())
}

/// The error for a sum a process must have fed before a reduction.
pub fn never_fed(what: &'static str) -> Error {
    Error::InvalidArgument { arg: what, reason: "summed over processes before this process fed it; every process needs at least one sequence".into() }
}

/// Per-feature input norms of one linear layer, fed one batch at a time.
///
/// `norm()` is SPEC's ||X_j||: sqrt of the mean over sequences of each sequence's sum of
/// squares of feature j, with padded tokens left out. A mixture-of-experts expert sees only the
/// tokens routed to it (`update_routed`); a sequence that routed none adds zero to its sums.
pub struct ActivationStats {
    in_features: i64,
    /// Where the sum lives when this process feeds none (the other processes' sums are there).
    device: Device,
    sum_sq: Option<Tensor>,
    nsamples: i64,
    /// Token rows fed, counted from shapes (padding included): 0 means no token reached it.
    rows: i64,
}

impl ActivationStats {
    pub fn new(in_features: i64) -> Result<Self> {
        Self::on(in_features, Device::Cpu)
    }

    /// Statistics whose sum is on `device` also when this process feeds no batch.
    pub fn on(in_features: i64, device: Device) -> Result<Self> {
        if in_features < 1 {
            return Err(Error::InvalidArgument {
                arg: "in_features",
                reason: format!("must be a positive integer, got {in_features}"),
            });
        }
        Ok(Self { in_features, device, sum_sq: None, nsamples: 0, rows: 0 })
    }

    pub fn in_features(&self) -> i64 {
        self.in_features
    }

    pub fn nsamples(&self) -> i64 {
        self.nsamples
    }

    /// Whether any token reached this layer (an expert may receive none).
    pub fn saw_tokens(&self) -> bool {
        self.rows > 0
    }

    /// Adds a batch `x` of shape [batch, seq, in]; `token_mask` [batch, seq] marks real tokens.
    pub fn update(&mut self, x: &Tensor, token_mask: Option<&Tensor>) -> Result<()> {
        require_rank(x, "x", 3)?;
        require_float(x, "x")?;
        let s = x.size();
        if s[2] != self.in_features {
            return Err(Error::Shape {
                arg: "x",
                got: s,
                expected: format!("[batch, seq, {}] (in_features of this ActivationStats)", self.in_features),
            });
        }
        let mut sq = x.f_to_kind(Kind::Double)?.f_square()?;
        if let Some(m) = token_mask {
            require_bool(m, "token_mask")?;
            require_shape(m, "token_mask", &s[..2], "[batch, seq] of x")?;
            require_same_device(m, "token_mask", x, "x")?;
            sq = sq.f_masked_fill(&m.f_logical_not()?.f_unsqueeze(-1)?, 0.0)?;
        }
        // Sum over tokens (per sequence), then over sequences.
        self.add(sq.f_sum_dim_intlist(&[0i64, 1][..], false, Kind::Double)?, s[0], s[0] * s[1])
    }

    /// Adds the `x` [rows, in] routed to one expert from a batch of `sequences` sequences (their
    /// real tokens only, in any order): every sequence of the batch counts in the mean, also one
    /// that routed no token here.
    pub fn update_routed(&mut self, x: &Tensor, sequences: i64) -> Result<()> {
        require_rank(x, "x", 2)?;
        require_float(x, "x")?;
        let s = x.size();
        if s[1] != self.in_features {
            return Err(Error::Shape {
                arg: "x",
                got: s,
                expected: format!("[rows, {}] (in_features of this ActivationStats)", self.in_features),
            });
        }
        let sum = x.f_to_kind(Kind::Double)?.f_square()?.f_sum_dim_intlist(&[0i64][..], false, Kind::Double)?;
        self.add(sum, sequences, s[0])
    }

    fn add(&mut self, batch_sum: Tensor, sequences: i64, rows: i64) -> Result<()> {
        self.sum_sq = Some(match self.sum_sq.take() {
            None => batch_sum,
            Some(acc) => {
                require_same_device(&batch_sum, "x", &acc, "earlier batches")?;
                acc.f_add(&batch_sum)?
            }
        });
        self.nsamples += sequences;
        self.rows += rows;
        Ok(())
    }

    /// float32 tensor [in_features] on the device of the data. NonFinite when an activation
    /// was infinite or NaN (or the norm overflows float32): such a norm would make whole input
    /// columns win or lose in every row.
    pub fn norm(&self) -> Result<Tensor> {
        match &self.sum_sq {
            None => Err(Error::InvalidArgument {
                arg: "ActivationStats",
                reason: "norm() called before any update(); feed at least one batch".into(),
            }),
            Some(acc) => {
                let norm = acc.f_div_scalar(self.nsamples as f64)?.f_sqrt()?.f_to_kind(Kind::Float)?;
                require_finite(&norm, "activation norms")?;
                Ok(norm)
            }
        }
    }
}

impl SequenceSum for ActivationStats {
    fn sum_mut(&mut self) -> Result<&mut Tensor> {
        let (n, device) = (self.in_features, self.device);
        Ok(self.sum_sq.get_or_insert_with(|| Tensor::zeros([n], (Kind::Double, device))))
    }

    fn counts_mut(&mut self) -> Vec<&mut i64> {
        vec![&mut self.nsamples, &mut self.rows]
    }
}

/// Fails unless a block recorded one input per weight (`Block::linear_inputs`).
pub fn check_inputs(inputs: &[Tensor], weights: usize) -> Result<()> {
    if inputs.len() != weights {
        return Err(Error::InvalidArgument {
            arg: "block.linear_inputs",
            reason: format!("returned {} tensors for {weights} weights", inputs.len()),
        });
    }
    Ok(())
}

/// The activation statistics of every weight of a block, in the order of the weights, fed from
/// the passes that record linear inputs ([b, seq, in] with a token mask, or [rows, in] routed to
/// an expert).
pub struct InputStats(Vec<ActivationStats>);

/// ||X_j|| per weight; None for a weight that no token reached.
pub type InputNorms = Vec<Option<Tensor>>;

impl InputStats {
    pub fn new(weights: &[Tensor]) -> Result<Self> {
        weights.iter().map(|w| ActivationStats::on(w.size()[1], w.device())).collect::<Result<Vec<_>>>().map(InputStats)
    }

    /// Adds the statistics over the processes that share the calibration.
    pub fn all_reduce(&mut self, processes: &dyn Processes) -> Result<()> {
        all_reduce_sums(processes, &mut self.0)
    }

    pub fn update(&mut self, inputs: &[Tensor], mask: Option<&Tensor>, sequences: i64) -> Result<()> {
        check_inputs(inputs, self.0.len())?;
        for (st, x) in self.0.iter_mut().zip(inputs) {
            if x.dim() == 2 {
                st.update_routed(&x.f_detach()?, sequences)?;
            } else {
                st.update(&x.f_detach()?, mask)?;
            }
        }
        Ok(())
    }

    pub fn finish(&self) -> Result<InputNorms> {
        self.0.iter().map(|st| if st.saw_tokens() { st.norm().map(Some) } else { Ok(None) }).collect()
    }
}

/// Input norms over all sequences brought up to date from a subset of them: `all` was measured on
/// every sequence and `subset_then` on some of them at the same time; `subset_now` is the subset
/// measured again after the weights changed. Each feature's norm is scaled by its change on the
/// subset, now / then (1 where it was 0 then): exact for the inputs the change did not touch
/// (within a block, the first layers' inputs), an estimate from the subset for the others. A
/// weight the subset never reached keeps its norm.
pub fn rescaled_norms(all: &InputNorms, subset_then: &InputNorms, subset_now: &InputNorms) -> Result<InputNorms> {
    let _guard = tch::no_grad_guard();
    all.iter()
        .zip(subset_then.iter().zip(subset_now))
        .map(|(all, pair)| -> Result<Option<Tensor>> {
            Ok(match (all, pair) {
                (Some(all), (Some(then), Some(now))) => {
                    let ratio = now.f_div(then)?.f_where_self(&then.f_gt(0.0)?, &now.f_ones_like()?)?;
                    Some(all.f_mul(&ratio)?)
                }
                (all, _) => all.as_ref().map(Tensor::shallow_clone),
            })
        })
        .collect()
}

/// Root mean square of per-sample gradients of one weight (squares summed in float64).
pub struct GradientStats {
    shape: Vec<i64>,
    sum_sq: Option<Tensor>,
    /// float64 scratch a gradient the CPU loop cannot take (another device, dtype or layout) is
    /// copied into before it is squared and summed, allocated once: an update allocates nothing
    /// (fresh tensors of a weight's size cost a page fault per 4 KiB on a CPU, and the regional
    /// gradients take one update per sequence and weight).
    scratch: Option<Tensor>,
    nsamples: i64,
}

impl GradientStats {
    pub fn new(shape: Vec<i64>) -> Result<Self> {
        if shape.is_empty() || shape.iter().any(|&d| d < 1) {
            return Err(Error::InvalidArgument {
                arg: "shape",
                reason: format!("must be a non-empty list of positive sizes, got {shape:?}"),
            });
        }
        Ok(Self { shape, sum_sq: None, scratch: None, nsamples: 0 })
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    pub fn nsamples(&self) -> i64 {
        self.nsamples
    }

    /// Adds one sample's gradient.
    pub fn update(&mut self, grad: &Tensor) -> Result<()> {
        require_float(grad, "grad")?;
        require_shape(grad, "grad", &self.shape, "the shape given to GradientStats")?;
        let _guard = tch::no_grad_guard();
        let acc = match &mut self.sum_sq {
            Some(acc) => {
                require_same_device(grad, "grad", acc, "earlier gradients")?;
                acc
            }
            empty => empty.insert(Tensor::f_zeros(grad.size(), (Kind::Double, grad.device()))?),
        };
        // SAFETY: the sum is this object's own tensor, distinct from the gradient, no tensor op
        // runs while the slices live, and any bits are a valid float.
        if let (Some(sum), Some(g)) = unsafe { (elements_mut::<f64>(acc), elements::<f32>(grad)) } {
            // One pass over memory (crate::cpu): the same float64 products and sums as below.
            for (sum, &g) in sum.iter_mut().zip(g) {
                let g = f64::from(g);
                *sum += g * g;
            }
        } else {
            let scratch = match &mut self.scratch {
                Some(scratch) => scratch,
                empty => empty.insert(acc.f_empty_like()?),
            };
            scratch.f_copy_(grad)?;
            let _ = acc.f_addcmul_(scratch, scratch)?;
        }
        self.nsamples += 1;
        Ok(())
    }

    /// float32 tensor of `shape`: sqrt(sum of squares / nsamples). NonFinite when a gradient
    /// was infinite or NaN.
    pub fn rms(&self) -> Result<Tensor> {
        match &self.sum_sq {
            None => Err(Error::InvalidArgument {
                arg: "GradientStats",
                reason: "rms() called before any update(); feed at least one gradient".into(),
            }),
            Some(acc) => {
                let rms = acc.f_div_scalar(self.nsamples as f64)?.f_sqrt()?.f_to_kind(Kind::Float)?;
                require_finite(&rms, "gradients")?;
                Ok(rms)
            }
        }
    }
}

impl SequenceSum for GradientStats {
    fn sum_mut(&mut self) -> Result<&mut Tensor> {
        self.sum_sq.as_mut().ok_or_else(|| never_fed("GradientStats"))
    }

    fn counts_mut(&mut self) -> Vec<&mut i64> {
        vec![&mut self.nsamples]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescaled_norms_are_exact_where_the_subset_did_not_change() {
        let t = |v: &[f32]| Some(Tensor::from_slice(v));
        let all = vec![t(&[3.0, 4.0, 5.0]), t(&[1.0, 2.0]), None];
        let then = vec![t(&[1.0, 2.0, 0.0]), t(&[2.0, 2.0]), None];
        let now = vec![t(&[1.0, 2.0, 7.0]), t(&[4.0, 1.0]), None];
        let got = rescaled_norms(&all, &then, &now).unwrap();
        // Unchanged features keep their norm; a feature that was 0 on the subset keeps its norm.
        assert!(got[0].as_ref().unwrap().equal(all[0].as_ref().unwrap()));
        assert!(got[1].as_ref().unwrap().equal(&Tensor::from_slice(&[2.0f32, 2.0 * 0.5])));
        assert!(got[2].is_none());
        // A weight the subset never reached keeps its norm.
        let unreached = rescaled_norms(&all, &vec![None, None, None], &vec![None, None, None]).unwrap();
        assert!(unreached[1].as_ref().unwrap().equal(all[1].as_ref().unwrap()));
    }

    #[test]
    fn activation_norm_is_rms_over_sequences_of_per_sequence_sums() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2, 1]);
        let mut st = ActivationStats::new(1).unwrap();
        st.update(&x, None).unwrap();
        // per-sequence sums: 1+4=5, 9+16=25; mean 15; sqrt(15)
        let n = f64::try_from(st.norm().unwrap().get(0)).unwrap();
        assert!((n - 15f64.sqrt()).abs() < 1e-6);
        assert_eq!(st.nsamples(), 2);
    }

    #[test]
    fn padding_is_excluded() {
        let x = Tensor::from_slice(&[1.0f32, 100.0]).view([1, 2, 1]);
        let mask = Tensor::from_slice(&[true, false]).view([1, 2]);
        let mut st = ActivationStats::new(1).unwrap();
        st.update(&x, Some(&mask)).unwrap();
        assert_eq!(f64::try_from(st.norm().unwrap().get(0)).unwrap(), 1.0);
    }

    #[test]
    fn routed_rows_count_every_sequence_of_the_batch() {
        // A batch of two sequences routed rows 1, 2 and 3 to this expert: (1 + 4 + 9) / 2 sequences.
        let mut st = ActivationStats::new(1).unwrap();
        st.update_routed(&Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]), 2).unwrap();
        let n = f64::try_from(st.norm().unwrap().get(0)).unwrap();
        assert!((n - (14.0f64 / 2.0).sqrt()).abs() < 1e-6);
        assert!(st.saw_tokens());
        let mut idle = ActivationStats::new(1).unwrap();
        idle.update_routed(&Tensor::zeros([0, 1], (Kind::Float, tch::Device::Cpu)), 4).unwrap();
        assert!(!idle.saw_tokens());
        assert_eq!(f64::try_from(idle.norm().unwrap().get(0)).unwrap(), 0.0);
    }

    #[test]
    fn gradient_rms() {
        let mut st = GradientStats::new(vec![1, 1]).unwrap();
        st.update(&Tensor::from_slice(&[3.0f32]).view([1, 1])).unwrap();
        st.update(&Tensor::from_slice(&[4.0f32]).view([1, 1])).unwrap();
        let r = f64::try_from(st.rms().unwrap().view([-1]).get(0)).unwrap();
        assert!((r - 12.5f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn the_cpu_loop_and_the_tensor_ops_sum_the_same_squares() {
        // Contiguous float32 gradients take the CPU loop; transposed views, float64 and bfloat16
        // gradients the tensor ops. A float32 square is exact in float64, so the sums agree bit
        // for bit; both match a float64 reference.
        let mut rng = crate::rng::SplitMix64::new(3);
        let (rows, cols) = (37i64, 53i64);
        let grads: Vec<Vec<f64>> = (0..6).map(|k| (0..rows * cols).map(|_| (rng.unit() - 0.5) * 10f64.powi(-3 * k)).collect()).collect();
        let as_f32 = |g: &Vec<f64>| Tensor::from_slice(g).to_kind(Kind::Float).view([rows, cols]);
        let mut looped = GradientStats::new(vec![rows, cols]).unwrap();
        let mut transposed = GradientStats::new(vec![rows, cols]).unwrap();
        let mut double = GradientStats::new(vec![rows, cols]).unwrap();
        for g in &grads {
            looped.update(&as_f32(g)).unwrap();
            let t = as_f32(g).tr().contiguous().tr();
            assert!(!t.is_contiguous());
            transposed.update(&t).unwrap();
            double.update(&as_f32(g).to_kind(Kind::Double)).unwrap();
        }
        assert!(looped.scratch.is_none() && transposed.scratch.is_some() && double.scratch.is_some(), "each took the path it was meant to");
        let rms = looped.rms().unwrap();
        assert!(rms.equal(&transposed.rms().unwrap()) && rms.equal(&double.rms().unwrap()));
        let reference: Vec<f64> = (0..(rows * cols) as usize)
            .map(|j| (grads.iter().map(|g| (g[j] as f32 as f64).powi(2)).sum::<f64>() / grads.len() as f64).sqrt())
            .collect();
        let got = Vec::<f64>::try_from(rms.to_kind(Kind::Double).view([-1])).unwrap();
        for (j, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "entry {j}: {a} vs {b}");
        }
        let mut bf16 = GradientStats::new(vec![rows, cols]).unwrap();
        bf16.update(&as_f32(&grads[0]).to_kind(Kind::BFloat16)).unwrap();
        assert!(bf16.rms().unwrap().allclose(&as_f32(&grads[0]).abs(), 1e-2, 0.0, false));
    }

    #[test]
    fn infinite_or_nan_statistics_are_refused() {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let x = Tensor::from_slice(&[1.0f32, bad]).view([1, 1, 2]);
            let mut act = ActivationStats::new(2).unwrap();
            act.update(&x, None).unwrap();
            assert!(matches!(act.norm(), Err(Error::NonFinite { .. })), "{bad}");
            let mut grad = GradientStats::new(vec![1, 2]).unwrap();
            grad.update(&x.view([1, 2])).unwrap();
            assert!(matches!(grad.rms(), Err(Error::NonFinite { .. })), "{bad}");
        }
        // Squares beyond float32's range are summed in float64: the RMS is the finite gradient.
        let mut grad = GradientStats::new(vec![1, 1]).unwrap();
        grad.update(&Tensor::from_slice(&[1e30f32]).view([1, 1])).unwrap();
        assert_eq!(f64::try_from(grad.rms().unwrap().view([-1]).get(0)).unwrap(), 1e30f32 as f64);
        // A padded token's infinity is not a statistic.
        let x = Tensor::from_slice(&[1.0f32, f32::INFINITY]).view([1, 2, 1]);
        let mut act = ActivationStats::new(1).unwrap();
        act.update(&x, Some(&Tensor::from_slice(&[true, false]).view([1, 2]))).unwrap();
        assert_eq!(f64::try_from(act.norm().unwrap().get(0)).unwrap(), 1.0);
    }

    #[test]
    fn wrong_width_is_a_shape_error() {
        let mut st = ActivationStats::new(3).unwrap();
        let err = st.update(&Tensor::zeros([1, 2, 4], (Kind::Float, tch::Device::Cpu)), None);
        assert!(matches!(err, Err(Error::Shape { .. })));
    }
}
