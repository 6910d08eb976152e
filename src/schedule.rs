//! One decoder block's schedule (SPEC step 6): gradients once, K rounds of
//! score -> mask -> RO, a final prune, on a `Block` (block.rs).
//!
//! With calibration spread over processes, every sum over sequences is added up through
//! `Block::all_reduce` before a decision is taken from it (block.rs), so that every process
//! ends with the same weights.

use crate::block::{regional_norm, summed_mse, Block, DeviceSum};
use crate::error::{Error, Result};
use crate::mask::{apply_mask_, select, Pattern};
use crate::ro::{GradTracking, RoRun, RoSettings, RoStop, RoundRecord};
use crate::score::{magnitude_score, rgs_score, wanda_score};
use crate::sparsegpt::{sparsegpt_prune_, HessianStats, BLOCK_SIZE, PERCDAMP};
use crate::stats::{all_reduce_sums, check_inputs, rescaled_norms, GradientStats, InputNorms, InputStats};
use tch::Tensor;

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
    /// One per weight, in the order of the weights (uniform sparsity repeats one pattern).
    pub patterns: Vec<Pattern>,
    pub alpha: f64,
    pub ro: RoSettings,
}

#[derive(Debug)]
pub struct BlockOutcome {
    /// Keep-masks, one per weight, as applied.
    pub masks: Vec<Tensor>,
    /// Block-output MSE against the dense block after the first prune, before any RO, on RO's
    /// held-out sequences (the guard's; measuring the others would cost a pass the guard does
    /// not need). Without RO: `mse_final`.
    pub mse_before_ro: f64,
    /// With RO: the block-output MSE after the final prune on the same held-out sequences as
    /// `mse_before_ro`, from the final pass's forwards.
    pub holdout_mse_final: Option<f64>,
    /// Block-output MSE after the final prune, over every sequence.
    pub mse_final: f64,
    /// Per weight: scored by magnitude in the final prune because no calibration token reached
    /// it (an expert the router never chose); its activation statistics would all be zero.
    pub magnitude_fallback: Vec<bool>,
    pub rounds: Vec<RoundRecord>,
    /// Why RO's rounds ended; None without RO.
    pub ro_stop: Option<RoStop>,
}


/// G: RMS over sequences of d||f(X_n)||_2 / dW, one backward per sequence, on the dense block.
/// The same forwards record the linear inputs (the activation norms of the first prune, over all
/// sequences and over `subset`, RO's held-out ones) and the dense outputs (the targets): no
/// separate pass runs for either.
fn gradient_rms(block: &dyn Block, weights: &[Tensor], subset: &[usize]) -> Result<(Vec<Tensor>, InputNorms, InputNorms)> {
    let mut stats = weights.iter().map(|w| GradientStats::new(w.size())).collect::<Result<Vec<_>>>()?;
    let mut norms = InputStats::new(weights)?;
    let mut subset_norms = InputStats::new(weights)?;
    let _tracking = GradTracking::enable(weights);
    for i in block.local()? {
        let grads = tch::with_grad(|| -> Result<Vec<Tensor>> {
            let mask = block.token_mask(&[i])?;
            let (inputs, out) = block.linear_inputs(&[i])?;
            norms.update(&inputs, mask.as_ref(), 1)?;
            if subset.contains(&i) {
                subset_norms.update(&inputs, mask.as_ref(), 1)?;
            }
            block.set_targets(&[i], &out.f_detach()?)?;
            block.gradients(&regional_norm(&out, mask.as_ref())?, weights)
        })?;
        for ((st, g), w) in stats.iter_mut().zip(grads).zip(weights) {
            // A weight this sequence does not reach (an expert it routes no token to) has gradient 0.
            st.update(&if g.defined() { g } else { w.f_zeros_like()? })?;
        }
    }
    norms.all_reduce(block)?;
    subset_norms.all_reduce(block)?;
    all_reduce_sums(block, &mut stats)?;
    let subset_norms = if subset.is_empty() { Vec::new() } else { subset_norms.finish()? };
    Ok((stats.iter().map(GradientStats::rms).collect::<Result<_>>()?, norms.finish()?, subset_norms))
}

/// One pass over this process's sequences, batch by batch on the dense block, recording linear inputs:
/// feeds them to `feed(x, mask, sequences)` (x is [b, seq, in] with the batch's token mask, or
/// [rows, in] routed to an expert); the outputs become the targets.
fn for_each_input(block: &dyn Block, weights: &[Tensor], mut feed: impl FnMut(&[Tensor], Option<&Tensor>, i64) -> Result<()>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for batch in block.batches(&block.local()?)? {
        let (inputs, out) = block.linear_inputs(&batch)?;
        check_inputs(&inputs, weights.len())?;
        block.set_targets(&batch, &out)?;
        feed(&inputs, block.token_mask(&batch)?.as_ref(), batch.len() as i64)?;
    }
    Ok(())
}

/// ||X_j|| of every linear layer's input on the dense block (whose outputs become the targets);
/// None for a weight that no token reached.
fn activation_norms(block: &dyn Block, weights: &[Tensor]) -> Result<InputNorms> {
    let mut norms = InputStats::new(weights)?;
    for_each_input(block, weights, |inputs, mask, sequences| norms.update(inputs, mask, sequences))?;
    norms.all_reduce(block)?;
    norms.finish()
}

/// SparseGPT's Hessian of every weight's input on the dense block (whose outputs become the
/// targets); None for a weight no token reached.
fn hessians(block: &dyn Block, weights: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    let mut stats = weights.iter().map(|w| HessianStats::new(w.size()[1])).collect::<Result<Vec<_>>>()?;
    for_each_input(block, weights, |inputs, mask, sequences| {
        for (st, x) in stats.iter_mut().zip(inputs) {
            if x.dim() == 2 {
                st.update_routed(x, sequences)?;
            } else {
                st.update(x, mask)?;
            }
        }
        Ok(())
    })?;
    all_reduce_sums(block, &mut stats)?;
    stats.iter().map(|st| if st.saw_tokens() { st.hessian().map(Some) } else { Ok(None) }).collect()
}

/// The dense outputs as targets, for a method that records no linear input (magnitude).
fn dense_targets(block: &dyn Block) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for batch in block.batches(&block.local()?)? {
        block.set_targets(&batch, &block.forward(&batch)?)?;
    }
    Ok(())
}

/// SparseGPT on every weight (magnitude where no token reached it): masks and fallback flags.
fn sparsegpt_once(block: &dyn Block, weights: &[Tensor], plan: &Plan) -> Result<(Vec<Tensor>, Vec<bool>)> {
    let hessians = hessians(block, weights)?;
    let mut masks = Vec::with_capacity(weights.len());
    for ((w, h), &pattern) in weights.iter().zip(&hessians).zip(&plan.patterns) {
        masks.push(match h {
            Some(h) => sparsegpt_prune_(w, h, pattern, BLOCK_SIZE, PERCDAMP)?,
            None => {
                let mask = select(&magnitude_score(w)?, pattern)?;
                apply_mask_(w, &mask)?;
                mask
            }
        });
    }
    Ok((masks, hessians.iter().map(Option::is_none).collect()))
}

/// Scores every weight by the plan's method (by magnitude where no token reached it, or for
/// magnitude, whose `norms` are None), selects and applies the masks; returns them with the
/// fallback flags.
fn prune_once(weights: &[Tensor], plan: &Plan, grad_rms: Option<&[Tensor]>, norms: Option<&InputNorms>) -> Result<(Vec<Tensor>, Vec<bool>)> {
    let mut masks = Vec::with_capacity(weights.len());
    let mut fallback = Vec::with_capacity(weights.len());
    for (k, w) in weights.iter().enumerate() {
        let norm = norms.map(|n| n[k].as_ref());
        let score = match (plan.method, norm, grad_rms) {
            (Method::Magnitude, _, _) | (_, Some(None), _) => magnitude_score(w)?,
            (Method::Wanda, Some(Some(n)), _) => wanda_score(w, n)?,
            (_, Some(Some(n)), Some(g)) => rgs_score(w, &g[k], n, plan.alpha)?,
            _ => unreachable!("the schedule computes what each method needs"),
        };
        fallback.push(matches!(norm, Some(None)));
        let mask = select(&score, plan.patterns[k])?;
        apply_mask_(w, &mask)?;
        masks.push(mask);
    }
    Ok((masks, fallback))
}

/// The block error, refused when NaN or infinite: a block whose output overflows is never
/// reported as pruned.
fn finite(mse: f64) -> Result<f64> {
    if !mse.is_finite() {
        return Err(Error::NonFinite { arg: "block output (its error against the dense block)", what: "NaN or infinity" });
    }
    Ok(mse)
}

/// The last pass: the pruned block's outputs (handed to `set_outputs` as the next block's
/// inputs) and, from the same forwards, its mean error against the dense outputs over every
/// sequence and over `holdout` (RO's guard; None when it is empty).
fn final_outputs(block: &dyn Block, holdout: &[usize]) -> Result<(f64, Option<f64>)> {
    let _guard = tch::no_grad_guard();
    let (mut total, mut held) = (DeviceSum::default(), DeviceSum::default());
    for batch in block.batches(&block.local()?)? {
        let out = block.forward(&batch)?;
        let mask = block.token_mask(&batch)?;
        let target = block.target(&batch)?;
        total.add(&summed_mse(&out, &target, mask.as_ref())?)?;
        for (row, i) in batch.iter().enumerate() {
            if holdout.contains(i) {
                let pick = |t: &Tensor| t.f_narrow(0, row as i64, 1);
                held.add(&summed_mse(&pick(&out)?, &pick(&target)?, mask.as_ref().map(pick).transpose()?.as_ref())?)?;
            }
        }
        block.set_outputs(&batch, &out)?;
    }
    let all = finite(total.all_reduced(block)? / block.len().max(1) as f64)?;
    let held = if holdout.is_empty() { None } else { Some(finite(held.all_reduced(block)? / holdout.len() as f64)?) };
    Ok((all, held))
}

/// Prunes `weights` (the block's linear weights, shared with the model) in place. Forward passes
/// per block: magnitude 2, wanda 2, sparsegpt 2, rgs 2 plus one backward per sequence; wanda++
/// and sparsegpt+ro add RO (README: cost of each method).
pub fn prune_block_(block: &dyn Block, weights: &[Tensor], plan: &Plan) -> Result<BlockOutcome> {
    if plan.patterns.len() != weights.len() {
        return Err(Error::InvalidArgument {
            arg: "patterns",
            reason: format!("{} patterns for {} weights; give one per weight", plan.patterns.len(), weights.len()),
        });
    }
    for (w, pattern) in weights.iter().zip(&plan.patterns) {
        pattern.check_fits(crate::tensor_check::weight_dims(w, "weights")?.1)?;
    }
    if block.is_empty() {
        return Err(Error::InvalidArgument { arg: "block", reason: "has no calibration sequences".into() });
    }
    let local = block.local()?;
    if local.is_empty() || local.windows(2).any(|w| w[0] >= w[1]) || local.last().is_some_and(|&i| i >= block.len()) {
        return Err(Error::InvalidArgument {
            arg: "block.local",
            reason: format!("must list this process's sequences, at least one, sorted, each below {}", block.len()),
        });
    }
    let n = block.len();
    // RO after re-pruning (wanda++) records the input norms of its held-out passes for the next prune.
    let reprunes = !matches!(plan.method, Method::SparseGpt | Method::SparseGptRo);
    let mut ro = if plan.method.uses_ro() && plan.ro.rounds > 0 { Some(RoRun::new(&plan.ro, n, reprunes)?) } else { None };
    let holdout = ro.as_ref().map_or(&[][..], RoRun::holdout).to_vec();
    let mut mse_before_ro = None;
    let (masks, magnitude_fallback) = if matches!(plan.method, Method::SparseGpt | Method::SparseGptRo) {
        let (masks, fallback) = sparsegpt_once(block, weights, plan)?;
        if let Some(ro) = &mut ro {
            mse_before_ro = Some(finite(ro.start(block, weights, &masks)?)?);
            while !ro.done() {
                ro.round(block, weights, &masks)?;
            }
        }
        (masks, fallback)
    } else {
        // The first pass over the dense block gives the targets and the first activation norms,
        // over all sequences and over RO's held-out ones.
        let (grad_rms, first, holdout_first) = match plan.method {
            _ if plan.method.uses_gradients() => {
                let (g, norms, subset) = gradient_rms(block, weights, &holdout)?;
                (Some(g), Some(norms), subset)
            }
            Method::Magnitude => (None, dense_targets(block).map(|_| None)?, Vec::new()),
            _ => (None, Some(activation_norms(block, weights)?), Vec::new()),
        };
        // After an RO round the norms are those of the first pass, rescaled by their change on
        // the held-out sequences, which the round's guard measured (stats::rescaled_norms).
        let mut norms = None;
        if let Some(ro) = &mut ro {
            while !ro.done() {
                let (masks, _) = prune_once(weights, plan, grad_rms.as_deref(), norms.as_ref().or(first.as_ref()))?;
                if ro.rounds_run() == 0 {
                    mse_before_ro = Some(finite(ro.start(block, weights, &masks)?)?);
                }
                if let (Some(first), Some(now)) = (&first, ro.round(block, weights, &masks)?) {
                    norms = Some(rescaled_norms(first, &holdout_first, &now)?);
                }
            }
        }
        prune_once(weights, plan, grad_rms.as_deref(), norms.as_ref().or(first.as_ref()))?
    };
    let (mse_final, holdout_mse_final) = final_outputs(block, &holdout)?;
    let (rounds, ro_stop) = match ro.map(RoRun::finish) {
        Some((rounds, stop)) => (rounds, Some(stop)),
        None => (Vec::new(), None),
    };
    Ok(BlockOutcome { masks, mse_before_ro: mse_before_ro.unwrap_or(mse_final), holdout_mse_final, mse_final, magnitude_fallback, rounds, ro_stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::block_mse;
    use crate::ro::LrSearch;
    use crate::rng::SplitMix64;
    use crate::stats::Processes;
    use std::cell::RefCell;
    use tch::Kind;

    /// y = W2 relu(W1 x): two linears, enough to exercise every step without Python.
    struct ToyBlock {
        w1: Tensor,
        w2: Tensor,
        xs: Vec<Tensor>,
        /// What the core hands to `set_targets` and `set_outputs`, per sequence.
        targets: RefCell<Vec<Option<Tensor>>>,
        outputs: RefCell<Vec<Option<Tensor>>>,
        /// Sequences per batch in `batches` (1: one by one, the trait's default).
        batch_size: usize,
        /// Sequences run through the block so far (forwards, with or without autograd).
        forwards: std::cell::Cell<usize>,
    }

    /// Uniform in [-scale, scale) from the crate's own generator: cargo runs tests on parallel
    /// threads, and libtorch's global generator (`tch::manual_seed`) would be shared between them.
    fn uniform(rng: &mut SplitMix64, shape: &[i64], scale: f32) -> Tensor {
        let n = shape.iter().product::<i64>() as usize;
        let values: Vec<f32> = (0..n).map(|_| ((rng.unit() * 2.0 - 1.0) * scale as f64) as f32).collect();
        Tensor::from_slice(&values).view(shape)
    }

    fn keep_rows(store: &RefCell<Vec<Option<Tensor>>>, batch: &[usize], out: &Tensor) {
        for (k, &i) in batch.iter().enumerate() {
            store.borrow_mut()[i] = Some(out.narrow(0, k as i64, 1).detach().copy());
        }
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
            let n = xs.len();
            let empty = || RefCell::new((0..n).map(|_| None).collect());
            ToyBlock { w1, w2, xs, targets: empty(), outputs: empty(), batch_size: 1, forwards: Default::default() }
        }
        fn inputs(&self, batch: &[usize]) -> Tensor {
            self.forwards.set(self.forwards.get() + batch.len());
            stack_rows(&self.xs, batch)
        }
        fn weights(&self) -> Vec<Tensor> {
            vec![self.w1.shallow_clone(), self.w2.shallow_clone()]
        }
    }

    impl Processes for ToyBlock {}

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
        fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
            let x = self.inputs(batch);
            let hidden = x.matmul(&self.w1.tr()).relu();
            let out = hidden.matmul(&self.w2.tr());
            Ok((vec![x, hidden.detach()], out))
        }
        fn set_targets(&self, batch: &[usize], out: &Tensor) -> Result<()> {
            keep_rows(&self.targets, batch, out);
            Ok(())
        }
        fn target(&self, batch: &[usize]) -> Result<Tensor> {
            let rows = self.targets.borrow();
            let rows: Vec<Tensor> = batch.iter().map(|&i| rows[i].as_ref().expect("the core sets every target before reading it").shallow_clone()).collect();
            Ok(Tensor::cat(&rows, 0))
        }
        fn set_outputs(&self, batch: &[usize], out: &Tensor) -> Result<()> {
            keep_rows(&self.outputs, batch, out);
            Ok(())
        }
        fn token_mask(&self, _: &[usize]) -> Result<Option<Tensor>> {
            Ok(None)
        }
    }

    fn plan(method: Method, lr: f64) -> Plan {
        Plan {
            method,
            patterns: vec![Pattern::nm(2, 4).unwrap(); 2],
            alpha: 100.0,
            ro: RoSettings { rounds: 3, samples: 8, holdout: 4, lr, lr_search: LrSearch::Off, seed: 0, batch: 1, min_improvement: 0.0, extrapolate: false },
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
        let after = out.holdout_mse_final.expect("RO ran");
        assert!(after < out.mse_before_ro, "{after} !< {}", out.mse_before_ro);
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
        assert!(with_ro.holdout_mse_final.unwrap() <= with_ro.mse_before_ro && with_ro.rounds.len() == 3);
        assert!(sparsegpt.holdout_mse_final.is_none() && sparsegpt.mse_before_ro == sparsegpt.mse_final);
        for (a, b) in sparsegpt.masks.iter().zip(&with_ro.masks) {
            assert!(a.equal(b), "RO keeps SparseGPT's masks");
        }
    }

    /// The relative drop of the held-out error in each round.
    fn gains(out: &BlockOutcome) -> Vec<f64> {
        out.rounds.iter().map(|r| (r.holdout_before - r.holdout_after) / r.holdout_before).collect()
    }

    #[test]
    fn early_stopping_ends_a_blocks_rounds_and_says_why() {
        for method in [Method::WandaPlusPlus, Method::SparseGptRo] {
            let run = |min_improvement: f64, lr: f64| {
                let b = ToyBlock::new(12);
                let mut p = plan(method, lr);
                p.ro.min_improvement = min_improvement;
                prune_block_(&b, &b.weights(), &p).unwrap()
            };
            let all = run(0.0, 1e-3);
            assert_eq!((all.rounds.len(), all.ro_stop), (3, Some(RoStop::Rounds)), "{method:?}");
            let g = gains(&all);
            assert!(g[0] > g[1] && g[1] > 0.0, "{method:?}: the toy's rounds help less and less: {g:?}");
            // A threshold between the first two rounds' gains stops after the second round.
            let stopped = run((g[0] + g[1]) / 2.0, 1e-3);
            assert_eq!((stopped.rounds.len(), stopped.ro_stop), (2, Some(RoStop::Converged)), "{method:?}");
            // The rounds that ran are those of the full run, bit for bit.
            for (a, b) in stopped.rounds.iter().zip(&all.rounds) {
                assert_eq!((a.holdout_before, a.holdout_after, a.steps), (b.holdout_before, b.holdout_after, b.steps), "{method:?}");
            }
            // Every round of a huge rate is undone; the first ends the block's rounds.
            let harmful = run(0.01, 10.0);
            assert_eq!((harmful.rounds.len(), harmful.ro_stop), (1, Some(RoStop::RolledBack)), "{method:?}");
        }
        let b = ToyBlock::new(12);
        assert_eq!(prune_block_(&b, &b.weights(), &plan(Method::Wanda, 1e-3)).unwrap().ro_stop, None);
    }

    #[test]
    fn a_round_starts_where_the_last_one_left_without_measuring_again() {
        // 12 sequences: RO trains on M = 8, 4 held out guard it; one sequence per step.
        let (m, h, n) = (8, 4, 12);
        for method in [Method::WandaPlusPlus, Method::SparseGptRo] {
            let run = |rounds: usize| {
                let b = ToyBlock::new(13);
                let mut p = plan(method, 1e-3);
                p.ro.rounds = rounds;
                let out = prune_block_(&b, &b.weights(), &p).unwrap();
                (out, b.forwards.get(), b)
            };
            let (_, base, none) = run(0);
            let (one, first, _) = run(1);
            let (three, total, _) = run(3);
            // Before RO: one held-out pass gives the first round's starting error (the report's
            // mse_before_ro); a round: M training forwards and one held-out pass.
            assert_eq!(first - base, h + m + h, "{method:?}");
            assert_eq!(total - first, 2 * (m + h), "{method:?}");
            for pair in three.rounds.windows(2) {
                let left = if pair[0].rolled_back { pair[0].holdout_before } else { pair[0].holdout_after };
                assert_eq!(pair[1].holdout_before, left, "{method:?}");
            }
            // The held-out error after the first prune, measured afresh on the block that ran
            // without RO (its weights are the first prune's).
            let holdout = plan(method, 1e-3).ro.split(n).unwrap().holdout;
            let expected = block_mse(&none, &holdout).unwrap();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
            assert!(close(one.mse_before_ro, expected) && close(three.mse_before_ro, expected), "{method:?}");
            assert!(one.rounds.iter().chain(&three.rounds).all(|r| r.steps == m), "{method:?}");
        }
    }

    #[test]
    fn extrapolation_scales_later_rounds_up_by_powers_of_two() {
        let run = |extrapolate: bool| {
            let b = ToyBlock::new(14);
            let mut p = plan(Method::WandaPlusPlus, 1e-4);
            p.ro.extrapolate = extrapolate;
            prune_block_(&b, &b.weights(), &p).unwrap()
        };
        let (plain, extrapolated) = (run(false), run(true));
        // The first round is the same; the second starts from the same weights, and its update
        // scaled by t >= 1 is kept only where it lowers the held-out error further.
        assert_eq!(plain.rounds[0].holdout_after, extrapolated.rounds[0].holdout_after);
        assert!(extrapolated.rounds[1].holdout_after <= plain.rounds[1].holdout_after);
        let mut scaled = false;
        for r in &extrapolated.rounds[1..] {
            let exponent = (r.lr / 1e-4).log2().round();
            assert!(exponent >= 0.0 && (r.lr / 1e-4 - 2f64.powf(exponent)).abs() < 1e-12, "{}", r.lr);
            scaled |= exponent > 0.0;
        }
        assert!(scaled, "a small rate on the toy is extrapolated at least once: {:?}", extrapolated.rounds);
        assert!(plain.rounds.iter().all(|r| r.lr == 1e-4));
    }

    #[test]
    fn a_harmful_round_is_rolled_back() {
        let b = ToyBlock::new(3);
        // A huge learning rate makes every round worse; each must be undone.
        let out = prune_block_(&b, &b.weights(), &plan(Method::WandaPlusPlus, 10.0)).unwrap();
        assert!(out.rounds.iter().all(|r| r.rolled_back));
        let after = out.holdout_mse_final.unwrap();
        assert!((after - out.mse_before_ro).abs() <= 1e-12 * out.mse_before_ro.max(1.0));
    }

    #[test]
    fn targets_come_from_the_dense_block_and_outputs_from_the_pruned_one() {
        for method in [Method::Magnitude, Method::Wanda, Method::Rgs, Method::WandaPlusPlus, Method::SparseGpt, Method::SparseGptRo] {
            let b = ToyBlock::new(9);
            let dense: Vec<Tensor> = {
                let _g = tch::no_grad_guard();
                (0..b.len()).map(|i| b.forward(&[i]).unwrap()).collect()
            };
            prune_block_(&b, &b.weights(), &plan(method, 1e-3)).unwrap();
            let _g = tch::no_grad_guard();
            for (i, expected) in dense.iter().enumerate() {
                assert!(b.targets.borrow()[i].as_ref().unwrap().allclose(expected, 1e-6, 1e-7, false), "{method:?} target {i}");
                assert!(b.outputs.borrow()[i].as_ref().unwrap().equal(&b.forward(&[i]).unwrap()), "{method:?} output {i}");
            }
        }
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
                match (expected.holdout_mse_final, got.holdout_mse_final) {
                    (Some(x), Some(y)) => assert!(close(x, y), "{method:?} batch {batch_size}"),
                    (x, y) => assert!(x.is_none() && y.is_none(), "{method:?} batch {batch_size}: {x:?} against {y:?}"),
                }
            }
        }
    }

    /// The `Block` methods a wrapper of the toy block (in field `$inner`) hands on unchanged:
    /// its length, targets, outputs and token masks.
    macro_rules! toy_block_storage {
        ($inner:tt) => {
            fn len(&self) -> usize {
                self.$inner.len()
            }
            fn set_targets(&self, batch: &[usize], out: &Tensor) -> Result<()> {
                self.$inner.set_targets(batch, out)
            }
            fn target(&self, batch: &[usize]) -> Result<Tensor> {
                self.$inner.target(batch)
            }
            fn set_outputs(&self, batch: &[usize], out: &Tensor) -> Result<()> {
                self.$inner.set_outputs(batch, out)
            }
            fn token_mask(&self, batch: &[usize]) -> Result<Option<Tensor>> {
                self.$inner.token_mask(batch)
            }
        };
    }

    /// The toy block as a mixture of one expert that no token reaches: its second weight gets
    /// routed inputs with no rows.
    struct IdleExpert(ToyBlock);

    impl Processes for IdleExpert {}

    impl Block for IdleExpert {
        toy_block_storage!(0);
        fn forward(&self, batch: &[usize]) -> Result<Tensor> {
            self.0.forward(batch)
        }
        fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
            let (mut inputs, out) = self.0.linear_inputs(batch)?;
            inputs[1] = Tensor::zeros([0, 16], (Kind::Float, tch::Device::Cpu));
            Ok((inputs, out))
        }
    }

    #[test]
    fn a_weight_no_token_reaches_is_pruned_by_magnitude() {
        for method in [Method::Wanda, Method::Rgs] {
            let b = IdleExpert(ToyBlock::new(7));
            let expected = select(&magnitude_score(&b.0.w2).unwrap(), plan(method, 1e-3).patterns[1]).unwrap();
            let out = prune_block_(&b, &b.0.weights(), &plan(method, 1e-3)).unwrap();
            assert_eq!(out.magnitude_fallback, vec![false, true], "{method:?}");
            assert!(out.masks[1].equal(&expected), "{method:?}");
        }
    }

    /// A toy block pruned by Wanda at `lr`, its masks and pruned weights kept, so that the first
    /// RO round can run again and again from the same point.
    struct FirstRound {
        block: ToyBlock,
        plan: Plan,
        masks: Vec<Tensor>,
        start: Vec<Tensor>,
    }

    impl FirstRound {
        fn new(lr: f64) -> Self {
            let block = ToyBlock::new(10);
            let plan = plan(Method::Wanda, lr);
            prune_block_(&block, &block.weights(), &plan).unwrap();
            let masks = block.weights().iter().map(|w| w.ne(0.0)).collect();
            let start = block.weights().iter().map(|w| w.copy()).collect();
            FirstRound { block, plan, masks, start }
        }

        /// Sets the block's weights to `values`.
        fn set(&self, values: &[Tensor]) {
            let _g = tch::no_grad_guard();
            for (w, v) in self.block.weights().iter().zip(values) {
                w.shallow_clone().copy_(v);
            }
        }

        /// The first round with step search `search`, from the pruned weights: its record and
        /// the weights it leaves.
        fn run(&self, search: LrSearch) -> (RoundRecord, Vec<Tensor>) {
            self.set(&self.start);
            let mut settings = self.plan.ro.clone();
            settings.lr_search = search;
            let mut run = RoRun::new(&settings, self.block.len(), false).unwrap();
            run.round(&self.block, &self.block.weights(), &self.masks).unwrap();
            (run.finish().0.remove(0), self.block.weights().iter().map(|w| w.copy()).collect())
        }
    }

    #[test]
    fn the_lr_search_keeps_the_best_scale_of_the_first_rounds_update() {
        for lr in [1e-5, 1e-3, 1e-1, 10.0] {
            let first = FirstRound::new(lr);
            // The plain round gives the update direction.
            let (plain, after_plain) = first.run(LrSearch::Off);
            let (record, _) = first.run(LrSearch::Full);
            if plain.rolled_back {
                // The plain round's update is undone, so its direction is not observable here:
                // the search must still find a smaller scale that beats it.
                assert!(record.lr < lr && record.holdout_after < plain.holdout_after, "{lr}: {record:?}");
                continue;
            }
            let step: Vec<Tensor> = after_plain.iter().zip(&first.start).map(|(w, s)| w - s).collect();
            // Every scale the search may reach, by hand.
            let holdout = first.plan.ro.split(first.block.len()).unwrap().holdout;
            let errors: Vec<(i32, f64)> = (crate::ro::LR_SEARCH_MIN_EXPONENT..=crate::ro::LR_SEARCH_MAX_EXPONENT)
                .map(|e| {
                    let point: Vec<Tensor> = first.start.iter().zip(&step).map(|(s, d)| s + d * 2f64.powi(e)).collect();
                    first.set(&point);
                    (e, block_mse(&first.block, &holdout).unwrap())
                })
                .collect();
            let exponent = (record.lr / lr).log2().round() as i32;
            assert!((record.lr / lr - 2f64.powi(exponent)).abs() < 1e-12, "{lr}: {}", record.lr);
            let chosen = errors.iter().find(|(e, _)| *e == exponent).unwrap().1;
            assert!((record.holdout_after - chosen).abs() <= 1e-9 * chosen, "{lr}: {} vs {chosen}", record.holdout_after);
            // A local minimum along the powers of two, and never worse than the plain round.
            let at_one = errors.iter().find(|(e, _)| *e == 0).unwrap().1;
            assert!(record.holdout_after <= at_one);
            for (e, err) in &errors {
                if (e - exponent).abs() == 1 {
                    assert!(record.holdout_after <= *err, "{lr}: scale 2^{e} is better than the chosen 2^{exponent}");
                }
            }
            if lr <= 1e-5 {
                assert!(exponent > 0, "a tiny rate must be scaled up");
            }
        }
    }

    #[test]
    fn backtracking_searches_only_when_the_first_round_at_the_rate_fails() {
        let mut seen = (false, false);
        for lr in [1e-5, 1e-3, 1e-1, 10.0] {
            let first = FirstRound::new(lr);
            let (plain, plain_weights) = first.run(LrSearch::Off);
            let (record, weights) = first.run(LrSearch::Backtrack);
            if plain.rolled_back {
                // Halved until the error stops falling: a smaller power of two, better than the rate.
                seen.0 = true;
                let exponent = (record.lr / lr).log2().round() as i32;
                assert!(exponent < 0 && (record.lr / lr - 2f64.powi(exponent)).abs() < 1e-12, "{lr}: {record:?}");
                assert!(record.holdout_after < plain.holdout_after, "{lr}: {record:?} vs {plain:?}");
            } else {
                // The rate worked: the plain round, bit for bit, with no search pass.
                seen.1 = true;
                assert_eq!((record.lr, record.holdout_after, record.rolled_back), (plain.lr, plain.holdout_after, false), "{lr}");
                assert!(weights.iter().zip(&plain_weights).all(|(a, b)| a.equal(b)), "{lr}");
            }
        }
        assert!(seen.0 && seen.1, "the rates tried must give both a failed and a working first round: {seen:?}");
    }

    /// The toy block whose measured passes overflow (an infinite output) once a weight is more
    /// than `limit` from `start`; its training steps run the toy block as it is, and so do the
    /// passes that record input norms (`linear_inputs`), which a run without them never makes.
    struct Overflowing<'a> {
        inner: &'a ToyBlock,
        start: Vec<Tensor>,
        limit: f64,
    }

    /// The largest |w - s| over the weights.
    fn moved(weights: &[Tensor], start: &[Tensor]) -> f64 {
        weights.iter().zip(start).map(|(w, s)| f64::try_from((w - s).abs().max()).unwrap()).fold(0.0, f64::max)
    }

    impl Processes for Overflowing<'_> {}

    impl Block for Overflowing<'_> {
        toy_block_storage!(inner);
        fn forward(&self, batch: &[usize]) -> Result<Tensor> {
            let out = self.inner.forward(batch)?;
            Ok(if moved(&self.inner.weights(), &self.start) > self.limit { out * f64::INFINITY } else { out })
        }
        fn training_forward(&self, batch: &[usize]) -> Result<Tensor> {
            self.inner.forward(batch)
        }
        fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
            self.inner.linear_inputs(batch)
        }
    }

    #[test]
    fn backtracking_halves_past_steps_that_overflow() {
        let first = FirstRound::new(1e-3);
        let (plain, after) = first.run(LrSearch::Off);
        assert!(!plain.rolled_back, "{plain:?}");
        // The round's full step and its half overflow; a quarter of it does not.
        let block = Overflowing { inner: &first.block, start: first.start.iter().map(Tensor::copy).collect(), limit: 0.3 * moved(&after, &first.start) };
        first.set(&first.start);
        let mut settings = first.plan.ro.clone();
        settings.lr_search = LrSearch::Backtrack;
        let mut run = RoRun::new(&settings, first.block.len(), false).unwrap();
        run.round(&block, &first.block.weights(), &first.masks).unwrap();
        let record = run.finish().0.remove(0);
        assert!(!record.rolled_back && record.holdout_after < record.holdout_before, "{record:?}");
        assert!(record.lr <= 1e-3 / 4.0, "{record:?}");
    }

    /// Ranks of one process group as threads: `all_reduce` adds every rank's tensors into a
    /// shared sum (in the order the threads arrive), then hands each rank the total.
    struct Ranks {
        size: usize,
        barrier: std::sync::Barrier,
        sums: std::sync::Mutex<Vec<Tensor>>,
    }

    impl Ranks {
        fn all_reduce(&self, tensors: &[Tensor]) {
            {
                let mut sums = self.sums.lock().unwrap();
                if sums.is_empty() {
                    *sums = tensors.iter().map(|t| t.zeros_like()).collect();
                }
                for (acc, t) in sums.iter_mut().zip(tensors) {
                    *acc = &*acc + t;
                }
            }
            self.barrier.wait();
            for (t, acc) in tensors.iter().zip(self.sums.lock().unwrap().iter()) {
                t.shallow_clone().copy_(acc);
            }
            if self.barrier.wait().is_leader() {
                self.sums.lock().unwrap().clear();
            }
            self.barrier.wait();
        }
    }

    /// Rank `rank`'s view of the toy block: sequences rank, rank + size, ...
    struct Shard<'a> {
        toy: ToyBlock,
        rank: usize,
        ranks: &'a Ranks,
    }

    impl Block for Shard<'_> {
        toy_block_storage!(toy);
        fn forward(&self, batch: &[usize]) -> Result<Tensor> {
            self.toy.forward(batch)
        }
        fn linear_inputs(&self, batch: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
            self.toy.linear_inputs(batch)
        }
        fn local(&self) -> Result<Vec<usize>> {
            Ok((self.rank..self.toy.len()).step_by(self.ranks.size).collect())
        }
    }

    impl Processes for Shard<'_> {
        fn world_size(&self) -> usize {
            self.ranks.size
        }
        fn all_reduce(&self, tensors: &[Tensor]) -> Result<()> {
            self.ranks.all_reduce(tensors);
            Ok(())
        }
    }

    /// Every rank's outcome of `plan` on the toy block of `seed` (its 12 sequences shared by `size`
    /// ranks), weights after, and the outputs handed to `set_outputs`.
    #[allow(clippy::type_complexity)]
    fn on_ranks(size: usize, seed: u64, plan: &Plan) -> Vec<(BlockOutcome, Vec<Tensor>, Vec<Option<Tensor>>)> {
        let ranks = Ranks { size, barrier: std::sync::Barrier::new(size), sums: std::sync::Mutex::new(Vec::new()) };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let ranks = &ranks;
                    scope.spawn(move || {
                        let shard = Shard { toy: ToyBlock::new(seed), rank, ranks };
                        let outcome = prune_block_(&shard, &shard.toy.weights(), plan).unwrap();
                        (outcome, shard.toy.weights(), shard.toy.outputs.into_inner())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ranks_that_share_the_sequences_agree_with_one_process() {
        for method in [Method::Wanda, Method::Rgs, Method::SparseGpt, Method::WandaPlusPlus] {
            let mut p = plan(method, 1e-3);
            p.ro.batch = 3; // RO steps of 3 sequences whatever the number of ranks
            let one = ToyBlock::new(11);
            let alone = prune_block_(&one, &one.weights(), &p).unwrap();
            for size in [2, 3, 5] {
                let results = on_ranks(size, 11, &p);
                for (rank, (outcome, weights, outputs)) in results.iter().enumerate() {
                    // Every rank holds the same weights and masks.
                    for (w, w0) in weights.iter().zip(&results[0].1) {
                        assert!(w.equal(w0), "{method:?} {size} ranks");
                    }
                    for (m, m0) in outcome.masks.iter().zip(&alone.masks) {
                        assert!(m.equal(m0), "{method:?} {size} ranks: masks differ from one process");
                    }
                    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-12);
                    assert!(close(outcome.mse_final, alone.mse_final), "{method:?} {size} ranks: {} vs {}", outcome.mse_final, alone.mse_final);
                    // A rank keeps the next block's inputs of its own sequences only.
                    for (i, out) in outputs.iter().enumerate() {
                        let expected = one.outputs.borrow()[i].as_ref().unwrap().shallow_clone();
                        match out {
                            Some(out) => assert!(i % size == rank && out.allclose(&expected, 1e-5, 1e-6, false), "{method:?} {size} ranks: output {i}"),
                            None => assert!(i % size != rank, "{method:?} {size} ranks: rank {rank} lacks output {i}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_that_share_the_sequences_stop_after_the_same_rounds() {
        let mut p = plan(Method::WandaPlusPlus, 1e-3);
        p.ro.batch = 3;
        p.ro.extrapolate = true;
        let one = ToyBlock::new(15);
        let g = gains(&prune_block_(&one, &one.weights(), &p).unwrap());
        p.ro.min_improvement = (g[0] + g[1]) / 2.0;
        let one = ToyBlock::new(15);
        let alone = prune_block_(&one, &one.weights(), &p).unwrap();
        // Below the gain of one of the first two rounds: the rounds end before the third.
        assert!(alone.rounds.len() < 3 && alone.ro_stop == Some(RoStop::Converged), "{g:?}: {:?}", alone.rounds);
        for size in [2, 3] {
            for (outcome, _, _) in on_ranks(size, 15, &p) {
                assert_eq!((outcome.rounds.len(), outcome.ro_stop), (alone.rounds.len(), alone.ro_stop), "{size} ranks");
                let lrs = |o: &BlockOutcome| o.rounds.iter().map(|r| r.lr).collect::<Vec<_>>();
                assert_eq!(lrs(&outcome), lrs(&alone), "{size} ranks: the same extrapolation scales");
            }
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
