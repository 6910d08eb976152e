//! One decoder block's schedule (SPEC step 6): gradients once, K rounds of
//! score -> mask -> RO, a final prune. The block itself runs behind the `Block` trait, so the
//! HuggingFace module runs unchanged in Python while autograd does the backward here.

use crate::error::{Error, Result};
use crate::mask::{apply_mask_, select, Pattern};
use crate::ro::{block_mse, guarded_round, regional_norm, GradTracking, RoSettings, RoundRecord};
use crate::score::{magnitude_score, rgs_score, wanda_score};
use crate::sparsegpt::{sparsegpt_prune_, HessianStats, BLOCK_SIZE, PERCDAMP};
use crate::stats::{ActivationStats, GradientStats};
use tch::Tensor;

/// A decoder block over its captured calibration sequences, addressed by index. Methods take a
/// batch of indices (one element of `batches`, or a single sequence) and return tensors with
/// that many rows in the leading dimension.
pub trait Block {
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
    /// The input of each weight (in the order of the weights): [b, seq, in] for a layer that
    /// sees every token (padding is left out with `token_mask`), or [rows, in] for an expert of a
    /// mixture of experts: the real tokens of the batch routed to it, possibly none.
    fn linear_inputs(&self, batch: &[usize]) -> Result<Vec<Tensor>>;
    /// The dense block's output [b, seq, hidden] (the RO target).
    fn target(&self, batch: &[usize]) -> Result<Tensor>;
    /// [b, seq] bool, True on real tokens; None when no sequence of the batch has padding.
    fn token_mask(&self, batch: &[usize]) -> Result<Option<Tensor>>;
    /// Backpropagates `loss`; an implementation that holds a lock the autograd engine needs
    /// (the GIL) releases it here.
    fn backward(&self, loss: &Tensor) -> Result<()> {
        Ok(loss.f_backward()?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Magnitude,
    Wanda,
    Rgs,
    WandaPlusPlus,
    SparseGpt,
    /// SparseGPT, then regional optimization with its masks fixed.
    SparseGptRo,
}

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "magnitude" => Ok(Method::Magnitude),
            "wanda" => Ok(Method::Wanda),
            "rgs" => Ok(Method::Rgs),
            "wanda++" => Ok(Method::WandaPlusPlus),
            "sparsegpt" => Ok(Method::SparseGpt),
            "sparsegpt+ro" => Ok(Method::SparseGptRo),
            other => Err(Error::InvalidArgument {
                arg: "method",
                reason: format!("unknown method {other:?}; use one of magnitude, wanda, rgs, wanda++, sparsegpt, sparsegpt+ro"),
            }),
        }
    }

    fn uses_gradients(self) -> bool {
        matches!(self, Method::Rgs | Method::WandaPlusPlus)
    }

    fn uses_ro(self) -> bool {
        matches!(self, Method::WandaPlusPlus | Method::SparseGptRo)
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub method: Method,
    pub pattern: Pattern,
    pub alpha: f64,
    pub ro: RoSettings,
}

#[derive(Debug)]
pub struct BlockOutcome {
    /// Keep-masks, one per weight, as applied.
    pub masks: Vec<Tensor>,
    /// Block-output MSE against the dense block after the first prune, before any RO.
    pub mse_before_ro: f64,
    /// Block-output MSE after the final prune.
    pub mse_final: f64,
    /// Per weight: scored by magnitude in the final prune because no calibration token reached
    /// it (an expert the router never chose); its activation statistics would all be zero.
    pub magnitude_fallback: Vec<bool>,
    pub rounds: Vec<RoundRecord>,
}

/// G: RMS over sequences of d||f(X_n)||_2 / dW, one backward per sequence.
fn gradient_rms(block: &dyn Block, weights: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut stats = weights.iter().map(|w| GradientStats::new(w.size())).collect::<Result<Vec<_>>>()?;
    let tracking = GradTracking::enable(weights);
    for i in 0..block.len() {
        tracking.zero_grads();
        tch::with_grad(|| -> Result<()> {
            let mask = block.token_mask(&[i])?;
            block.backward(&regional_norm(&block.forward(&[i])?, mask.as_ref())?)?;
            Ok(())
        })?;
        for (st, w) in stats.iter_mut().zip(weights) {
            st.update(&w.grad())?;
        }
    }
    tracking.zero_grads();
    stats.iter().map(GradientStats::rms).collect()
}

/// Feeds every weight's input, batch by batch on the block as it is now, to `feed(k, x, mask,
/// sequences)`: x is [b, seq, in] with the batch's token mask, or [rows, in] routed to an expert.
fn for_each_input(block: &dyn Block, weights: &[Tensor], mut feed: impl FnMut(usize, &Tensor, Option<&Tensor>, i64) -> Result<()>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let all: Vec<usize> = (0..block.len()).collect();
    for batch in block.batches(&all)? {
        let inputs = block.linear_inputs(&batch)?;
        if inputs.len() != weights.len() {
            return Err(Error::InvalidArgument {
                arg: "block.linear_inputs",
                reason: format!("returned {} tensors for {} weights", inputs.len(), weights.len()),
            });
        }
        let mask = block.token_mask(&batch)?;
        for (k, x) in inputs.iter().enumerate() {
            feed(k, x, if x.dim() == 2 { None } else { mask.as_ref() }, batch.len() as i64)?;
        }
    }
    Ok(())
}

/// ||X_j|| of every linear layer's input, on the block as it is now; None for a weight that no
/// token reached.
fn activation_norms(block: &dyn Block, weights: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    let mut stats = weights.iter().map(|w| ActivationStats::new(w.size()[1])).collect::<Result<Vec<_>>>()?;
    for_each_input(block, weights, |k, x, mask, sequences| {
        if x.dim() == 2 {
            stats[k].update_routed(x, sequences)
        } else {
            stats[k].update(x, mask)
        }
    })?;
    stats.iter().map(|st| if st.saw_tokens() { st.norm().map(Some) } else { Ok(None) }).collect()
}

/// SparseGPT's Hessian of every weight's input (dense block); None for a weight no token reached.
fn hessians(block: &dyn Block, weights: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    let mut stats = weights.iter().map(|w| HessianStats::new(w.size()[1])).collect::<Result<Vec<_>>>()?;
    for_each_input(block, weights, |k, x, mask, sequences| {
        if x.dim() == 2 {
            stats[k].update_routed(x, sequences)
        } else {
            stats[k].update(x, mask)
        }
    })?;
    stats.iter().map(|st| if st.saw_tokens() { st.hessian().map(Some) } else { Ok(None) }).collect()
}

/// SparseGPT on every weight (magnitude where no token reached it): masks and fallback flags.
fn sparsegpt_once(block: &dyn Block, weights: &[Tensor], plan: &Plan) -> Result<(Vec<Tensor>, Vec<bool>)> {
    let hessians = hessians(block, weights)?;
    let mut masks = Vec::with_capacity(weights.len());
    for (w, h) in weights.iter().zip(&hessians) {
        masks.push(match h {
            Some(h) => sparsegpt_prune_(w, h, plan.pattern, BLOCK_SIZE, PERCDAMP)?,
            None => {
                let mask = select(&magnitude_score(w)?, plan.pattern)?;
                apply_mask_(w, &mask)?;
                mask
            }
        });
    }
    Ok((masks, hessians.iter().map(Option::is_none).collect()))
}

/// Scores every weight by the plan's method (by magnitude where no token reached it), selects
/// and applies the masks; returns them with the fallback flags.
fn prune_once(block: &dyn Block, weights: &[Tensor], plan: &Plan, grad_rms: Option<&[Tensor]>) -> Result<(Vec<Tensor>, Vec<bool>)> {
    let norms = match plan.method {
        Method::Magnitude => None,
        _ => Some(activation_norms(block, weights)?),
    };
    let mut masks = Vec::with_capacity(weights.len());
    let mut fallback = Vec::with_capacity(weights.len());
    for (k, w) in weights.iter().enumerate() {
        let norm = norms.as_ref().map(|n| n[k].as_ref());
        let score = match (plan.method, norm, grad_rms) {
            (Method::Magnitude, _, _) | (_, Some(None), _) => magnitude_score(w)?,
            (Method::Wanda, Some(Some(n)), _) => wanda_score(w, n)?,
            (_, Some(Some(n)), Some(g)) => rgs_score(w, &g[k], n, plan.alpha)?,
            _ => unreachable!("the schedule computes what each method needs"),
        };
        fallback.push(matches!(norm, Some(None)));
        let mask = select(&score, plan.pattern)?;
        apply_mask_(w, &mask)?;
        masks.push(mask);
    }
    Ok((masks, fallback))
}

/// The pruned block's output error, refused when NaN or infinite: a block whose output
/// overflows is never reported as pruned.
fn finite_block_mse(block: &dyn Block, samples: &[usize]) -> Result<f64> {
    let mse = block_mse(block, samples)?;
    if !mse.is_finite() {
        return Err(Error::NonFinite { arg: "block output (its error against the dense block)", what: "NaN or infinity" });
    }
    Ok(mse)
}

/// Prunes `weights` (the block's linear weights, shared with the model) in place.
pub fn prune_block_(block: &dyn Block, weights: &[Tensor], plan: &Plan) -> Result<BlockOutcome> {
    for w in weights {
        plan.pattern.check_fits(crate::tensor_check::weight_dims(w, "weights")?.1)?;
    }
    if block.is_empty() {
        return Err(Error::InvalidArgument { arg: "block", reason: "has no calibration sequences".into() });
    }
    let n = block.len();
    let split = if plan.method.uses_ro() && plan.ro.rounds > 0 { Some(plan.ro.split(n)?) } else { None };
    let all: Vec<usize> = (0..n).collect();
    if matches!(plan.method, Method::SparseGpt | Method::SparseGptRo) {
        let (masks, magnitude_fallback) = sparsegpt_once(block, weights, plan)?;
        let mut rounds = Vec::new();
        let mut mse_before_ro = None;
        if let Some(split) = &split {
            mse_before_ro = Some(finite_block_mse(block, &all)?);
            for r in 0..plan.ro.rounds {
                rounds.push(guarded_round(block, weights, &masks, split, &plan.ro, r)?);
            }
        }
        let mse_final = finite_block_mse(block, &all)?;
        return Ok(BlockOutcome { masks, mse_before_ro: mse_before_ro.unwrap_or(mse_final), mse_final, magnitude_fallback, rounds });
    }
    let grad_rms = if plan.method.uses_gradients() { Some(gradient_rms(block, weights)?) } else { None };

    let mut rounds = Vec::new();
    let mut mse_before_ro = None;
    if let Some(split) = &split {
        for r in 0..plan.ro.rounds {
            let (masks, _) = prune_once(block, weights, plan, grad_rms.as_deref())?;
            if r == 0 {
                mse_before_ro = Some(finite_block_mse(block, &all)?);
            }
            rounds.push(guarded_round(block, weights, &masks, split, &plan.ro, r)?);
        }
    }
    let (masks, magnitude_fallback) = prune_once(block, weights, plan, grad_rms.as_deref())?;
    let mse_final = finite_block_mse(block, &all)?;
    Ok(BlockOutcome { masks, mse_before_ro: mse_before_ro.unwrap_or(mse_final), mse_final, magnitude_fallback, rounds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use tch::Kind;

    /// y = W2 relu(W1 x): two linears, enough to exercise every step without Python.
    struct ToyBlock {
        w1: Tensor,
        w2: Tensor,
        xs: Vec<Tensor>,
        targets: Vec<Tensor>,
        /// Sequences per batch in `batches` (1: one by one, the trait's default).
        batch_size: usize,
    }

    /// Uniform in [-scale, scale) from the crate's own generator: cargo runs tests on parallel
    /// threads, and libtorch's global generator (`tch::manual_seed`) would be shared between them.
    fn uniform(rng: &mut SplitMix64, shape: &[i64], scale: f32) -> Tensor {
        let n = shape.iter().product::<i64>() as usize;
        let values: Vec<f32> = (0..n).map(|_| ((rng.unit() * 2.0 - 1.0) * scale as f64) as f32).collect();
        Tensor::from_slice(&values).view(shape)
    }

    /// The per-sequence tensors [1, ...] of `batch`, concatenated along the batch dimension.
    fn stack_rows(rows: &[Tensor], batch: &[usize]) -> Tensor {
        Tensor::cat(&batch.iter().map(|&i| rows[i].shallow_clone()).collect::<Vec<_>>(), 0)
    }

    impl ToyBlock {
        fn new(seed: u64) -> Self {
            let mut rng = SplitMix64::new(seed);
            let w1 = uniform(&mut rng, &[16, 8], 0.5);
            let w2 = uniform(&mut rng, &[8, 16], 0.5);
            let xs: Vec<Tensor> = (0..12).map(|_| uniform(&mut rng, &[1, 5, 8], 1.7)).collect();
            let mut b = ToyBlock { w1, w2, xs, targets: vec![], batch_size: 1 };
            let _g = tch::no_grad_guard();
            b.targets = (0..b.xs.len()).map(|i| b.forward(&[i]).unwrap()).collect();
            b
        }
        fn inputs(&self, batch: &[usize]) -> Tensor {
            stack_rows(&self.xs, batch)
        }
        fn weights(&self) -> Vec<Tensor> {
            vec![self.w1.shallow_clone(), self.w2.shallow_clone()]
        }
    }

    impl Block for ToyBlock {
        fn len(&self) -> usize {
            self.xs.len()
        }
        fn batches(&self, indices: &[usize]) -> Result<Vec<Vec<usize>>> {
            Ok(indices.chunks(self.batch_size).map(<[usize]>::to_vec).collect())
        }
        fn forward(&self, batch: &[usize]) -> Result<Tensor> {
            Ok(self.inputs(batch).matmul(&self.w1.tr()).relu().matmul(&self.w2.tr()))
        }
        fn linear_inputs(&self, batch: &[usize]) -> Result<Vec<Tensor>> {
            let x = self.inputs(batch);
            let hidden = x.matmul(&self.w1.tr()).relu();
            Ok(vec![x, hidden])
        }
        fn target(&self, batch: &[usize]) -> Result<Tensor> {
            Ok(stack_rows(&self.targets, batch))
        }
        fn token_mask(&self, _: &[usize]) -> Result<Option<Tensor>> {
            Ok(None)
        }
    }

    fn plan(method: Method, lr: f64) -> Plan {
        Plan {
            method,
            pattern: Pattern::nm(2, 4).unwrap(),
            alpha: 100.0,
            ro: RoSettings { rounds: 3, samples: 8, holdout: 4, lr, seed: 0 },
        }
    }

    #[test]
    fn every_method_gives_valid_two_four_masks() {
        for method in [Method::Magnitude, Method::Wanda, Method::Rgs, Method::WandaPlusPlus, Method::SparseGpt, Method::SparseGptRo] {
            let b = ToyBlock::new(1);
            let out = prune_block_(&b, &b.weights(), &plan(method, 1e-3)).unwrap();
            for (w, m) in b.weights().iter().zip(&out.masks) {
                let kept = m.to_kind(Kind::Int64).view([w.size()[0], -1, 4]).sum_dim_intlist(&[2i64][..], false, Kind::Int64);
                assert_eq!(i64::try_from(kept.ne(2).sum(Kind::Int64)).unwrap(), 0, "{method:?}");
                let zeros_where_pruned = w.masked_select(&m.logical_not()).abs().sum(Kind::Float);
                assert_eq!(f64::try_from(zeros_where_pruned).unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn ro_lowers_block_error_and_never_revives_pruned_weights() {
        let b = ToyBlock::new(2);
        let out = prune_block_(&b, &b.weights(), &plan(Method::WandaPlusPlus, 1e-3)).unwrap();
        assert!(out.mse_final < out.mse_before_ro, "{} !< {}", out.mse_final, out.mse_before_ro);
        assert_eq!(out.rounds.len(), 3);
    }

    #[test]
    fn sparsegpt_beats_wanda_and_ro_after_it_helps() {
        let run = |method| {
            let b = ToyBlock::new(8);
            prune_block_(&b, &b.weights(), &plan(method, 1e-3)).unwrap()
        };
        let (wanda, sparsegpt, with_ro) = (run(Method::Wanda), run(Method::SparseGpt), run(Method::SparseGptRo));
        assert!(sparsegpt.mse_final < wanda.mse_final, "{} !< {}", sparsegpt.mse_final, wanda.mse_final);
        assert!(with_ro.mse_final <= with_ro.mse_before_ro && with_ro.rounds.len() == 3);
        assert!((with_ro.mse_before_ro - sparsegpt.mse_final).abs() <= 1e-12 * sparsegpt.mse_final);
        for (a, b) in sparsegpt.masks.iter().zip(&with_ro.masks) {
            assert!(a.equal(b), "RO keeps SparseGPT's masks");
        }
    }

    #[test]
    fn a_harmful_round_is_rolled_back() {
        let b = ToyBlock::new(3);
        // A huge learning rate makes every round worse; each must be undone.
        let out = prune_block_(&b, &b.weights(), &plan(Method::WandaPlusPlus, 10.0)).unwrap();
        assert!(out.rounds.iter().all(|r| r.rolled_back));
        assert!((out.mse_final - out.mse_before_ro).abs() <= 1e-12 * out.mse_before_ro.max(1.0));
    }

    #[test]
    fn an_infinite_activation_is_refused_by_every_method() {
        for method in [Method::Magnitude, Method::Wanda, Method::Rgs, Method::WandaPlusPlus] {
            let b = ToyBlock::new(5);
            let _ = b.xs[3].get(0).get(2).fill_(f64::INFINITY);
            let err = prune_block_(&b, &b.weights(), &plan(method, 1e-3)).unwrap_err();
            assert!(matches!(err, Error::NonFinite { .. }), "{method:?}: {err}");
        }
    }

    #[test]
    fn batches_change_only_the_summation_order() {
        for method in [Method::Wanda, Method::WandaPlusPlus] {
            let one = ToyBlock::new(6);
            let expected = prune_block_(&one, &one.weights(), &plan(method, 1e-3)).unwrap();
            for batch_size in [2, 5, 12] {
                let mut b = ToyBlock::new(6);
                b.batch_size = batch_size;
                let got = prune_block_(&b, &b.weights(), &plan(method, 1e-3)).unwrap();
                for (x, y) in expected.masks.iter().zip(&got.masks) {
                    assert!(x.equal(y), "{method:?} batch {batch_size}");
                }
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(1e-12);
                assert!(close(expected.mse_before_ro, got.mse_before_ro) && close(expected.mse_final, got.mse_final));
            }
        }
    }

    /// The toy block as a mixture of one expert that no token reaches: its second weight gets
    /// routed inputs with no rows.
    struct IdleExpert(ToyBlock);

    impl Block for IdleExpert {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn forward(&self, batch: &[usize]) -> Result<Tensor> {
            self.0.forward(batch)
        }
        fn linear_inputs(&self, batch: &[usize]) -> Result<Vec<Tensor>> {
            let x = self.0.inputs(batch);
            Ok(vec![x, Tensor::zeros([0, 16], (Kind::Float, tch::Device::Cpu))])
        }
        fn target(&self, batch: &[usize]) -> Result<Tensor> {
            self.0.target(batch)
        }
        fn token_mask(&self, batch: &[usize]) -> Result<Option<Tensor>> {
            self.0.token_mask(batch)
        }
    }

    #[test]
    fn a_weight_no_token_reaches_is_pruned_by_magnitude() {
        for method in [Method::Wanda, Method::Rgs] {
            let b = IdleExpert(ToyBlock::new(7));
            let expected = select(&magnitude_score(&b.0.w2).unwrap(), plan(method, 1e-3).pattern).unwrap();
            let out = prune_block_(&b, &b.0.weights(), &plan(method, 1e-3)).unwrap();
            assert_eq!(out.magnitude_fallback, vec![false, true], "{method:?}");
            assert!(out.masks[1].equal(&expected), "{method:?}");
        }
    }

    #[test]
    fn same_seed_same_masks() {
        let run = || {
            let b = ToyBlock::new(4);
            prune_block_(&b, &b.weights(), &plan(Method::WandaPlusPlus, 1e-3)).unwrap().masks
        };
        let (a, b) = (run(), run());
        for (x, y) in a.iter().zip(&b) {
            assert!(x.equal(y));
        }
    }
}
