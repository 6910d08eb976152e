//! Regional optimization (SPEC step 5): make the pruned block's output match the dense one with
//! masked RMSprop, `batch` calibration sequences per step (the paper: one), and roll a round back
//! when it makes the held-out block error worse or non-finite.

use crate::block::{block_mse, local_share, masked_mse, summed_mse, Block, DeviceSum};
use crate::cpu::{elements, elements_mut};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::stats::{InputNorms, InputStats};
use tch::{Kind, Tensor};

/// torch.optim.RMSprop's defaults, which the paper uses.
const RMSPROP_ALPHA: f64 = 0.99;
const RMSPROP_EPS: f64 = 1e-8;
/// Square averages below this are raised to it before their square root: in float32 the root of
/// anything below it is under half an ulp of RMSPROP_EPS, so sqrt(max(v, floor)) + eps equals
/// sqrt(v) + eps bit for bit, while zeros (every pruned entry) and subnormals never reach sqrt,
/// which runs 7x to 30x slower on them on x86 CPUs.
const SQUARE_AVG_FLOOR: f64 = 1e-32;

#[derive(Clone, Debug)]
pub struct RoSettings {
    pub rounds: usize,
    pub samples: usize,
    pub holdout: usize,
    pub lr: f64,
    /// Whether and how the first round's update is scaled by a line search on the held-out
    /// sequences, the later rounds running at the learning rate found (`search_scale`).
    pub lr_search: LrSearch,
    pub seed: u64,
    /// Sequences per step: the step's gradient is their mean. Processes that share the
    /// calibration each take the step's sequences they hold, so more processes than `batch`
    /// leave some idle.
    pub batch: usize,
    /// Early stopping: a block's rounds end after a round that lowers the held-out error by
    /// less than this fraction of its error before the round (a rolled-back round lowers it by
    /// nothing). 0 runs every round.
    pub min_improvement: f64,
    /// Extrapolate every round after the first along its own update: scale it by the power of
    /// two t >= 1 that minimises the held-out error (doubling while the error falls), at the
    /// cost of one held-out pass per doubling tried.
    pub extrapolate: bool,
}

/// The first round's step-size search (`PruneConfig.ro_lr_search`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrSearch {
    /// `lr` everywhere (the paper).
    Off,
    /// Backtracking: only when the first round at `lr` does not lower the held-out error, halve
    /// its update while the error falls. No extra pass when the rate works.
    Backtrack,
    /// Doubling or halving the first round's update while the held-out error falls.
    Full,
}

impl LrSearch {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(LrSearch::Off),
            "backtrack" => Ok(LrSearch::Backtrack),
            "full" => Ok(LrSearch::Full),
            other => Err(Error::InvalidArgument { arg: "ro_lr_search", reason: format!("must be 'off', 'backtrack' or 'full', got {other:?}") }),
        }
    }
}

/// Why a block's RO rounds ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoStop {
    /// All `rounds` ran.
    Rounds,
    /// A kept round lowered the held-out error by less than `min_improvement`.
    Converged,
    /// A round was rolled back (with `min_improvement` > 0).
    RolledBack,
}

impl RoStop {
    pub fn as_str(self) -> &'static str {
        match self {
            RoStop::Rounds => "rounds",
            RoStop::Converged => "converged",
            RoStop::RolledBack => "rolled back",
        }
    }
}

/// The line search's scales of the first round's update: powers of two from 2^-10 to 2^6, so
/// wandapp's default base learning rate, 3e-4, reaches any of 2.9e-7 .. 1.9e-2 (the paper's 3e-7
/// for 7B models inside).
pub const LR_SEARCH_MIN_EXPONENT: i32 = -10;
pub const LR_SEARCH_MAX_EXPONENT: i32 = 6;

/// Which calibration sequences RO trains on and which it uses to guard a round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoSplit {
    pub train: Vec<usize>,
    /// `holdout` sequences (fewer only when N is smaller): those beyond `train` first, then the
    /// first of `train` where too few are left; all of `train` with `holdout` 0.
    pub holdout: Vec<usize>,
}

impl RoSettings {
    pub fn split(&self, nsamples: usize) -> Result<RoSplit> {
        if self.batch == 0 {
            return Err(Error::InvalidArgument { arg: "ro_batch_size", reason: "must be at least 1".into() });
        }
        if !(self.min_improvement >= 0.0 && self.min_improvement < 1.0) {
            return Err(Error::InvalidArgument { arg: "ro_min_improvement", reason: format!("must be in [0, 1), got {}", self.min_improvement) });
        }
        if self.samples == 0 || self.samples > nsamples {
            return Err(Error::InvalidArgument {
                arg: "ro_samples",
                reason: format!("must be in [1, {nsamples}] (the calibration sequences), got {}", self.samples),
            });
        }
        let perm = SplitMix64::new(self.seed).permutation(nsamples);
        let train = perm[..self.samples].to_vec();
        let rest = &perm[self.samples..];
        let holdout = if self.holdout == 0 {
            train.clone()
        } else {
            // Up to `holdout` of the sequences RO does not train on, filled up with training ones
            // where fewer are left: the guard has the same size (and cost) whatever N.
            let held_out = &rest[..self.holdout.min(rest.len())];
            let fill = (self.holdout - held_out.len()).min(train.len());
            [held_out, &train[..fill]].concat()
        };
        Ok(RoSplit { train, holdout })
    }
}


/// Marks `weights` as requiring gradients for as long as it lives, then restores each flag.
pub struct GradTracking<'a> {
    weights: &'a [Tensor],
    before: Vec<bool>,
}

impl<'a> GradTracking<'a> {
    pub fn enable(weights: &'a [Tensor]) -> Self {
        let before = weights.iter().map(|w| w.requires_grad()).collect();
        for w in weights {
            let _ = w.set_requires_grad(true);
        }
        Self { weights, before }
    }

}

impl Drop for GradTracking<'_> {
    fn drop(&mut self) {
        for (w, &flag) in self.weights.iter().zip(&self.before) {
            let _ = w.set_requires_grad(flag);
        }
    }
}

/// RMSprop whose update never touches a pruned weight. It steps float32 weights in place and
/// keeps a float32 master copy of any other, written back after each step, so bfloat16/float16
/// models still receive updates smaller than their ulp.
///
/// A step allocates nothing: on a CPU, fresh tensors of a block's weight size cost a page fault per
/// 4 KiB on every step, and `masked_fill_` with a random boolean mask and `sqrt` of zeros run many
/// times slower than plain arithmetic; together they made the step about 3.5x slower than the
/// tensor-op step below, for bit-identical weights (bench/results/rmsprop_step.md). On a CPU, where
/// the step is bound by memory traffic (nine passes over weight-sized tensors), float32 weights take
/// `fused_cpu_step` instead: one pass, the same float32 operations in the same order (the weights
/// agree to float32 rounding: ATen's vectorised root and addcmul's fused multiply-add round some
/// last bits otherwise).
pub struct MaskedRmsprop {
    lr: f64,
    /// 1 where a weight is kept, 0 where it is pruned (float32): each step's gradient is
    /// multiplied by it.
    keep: Vec<Tensor>,
    /// True where a weight is pruned, for `finish`.
    pruned: Vec<Tensor>,
    /// The float32 copy each step updates: None for a float32 weight, stepped in place.
    master: Vec<Option<Tensor>>,
    square_avg: Vec<Tensor>,
    /// Per weight, float32 scratch for the masked gradient and for the denominator of the
    /// tensor-op step, allocated when a weight first takes it.
    scratch: Vec<Option<(Tensor, Tensor)>>,
}

impl MaskedRmsprop {
    pub fn new(weights: &[Tensor], masks: &[Tensor], lr: f64) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let float = |w: &Tensor| Tensor::f_zeros(w.size(), (Kind::Float, w.device()));
        let mut master = Vec::with_capacity(weights.len());
        let mut square_avg = Vec::with_capacity(weights.len());
        for w in weights {
            square_avg.push(float(w)?);
            master.push(if w.kind() == Kind::Float { None } else { Some(w.f_detach()?.f_to_kind(Kind::Float)?) });
        }
        let keep = masks.iter().map(|m| m.f_to_kind(Kind::Float)).collect::<std::result::Result<_, _>>()?;
        let pruned = masks.iter().map(|m| m.f_logical_not()).collect::<std::result::Result<_, _>>()?;
        let scratch = weights.iter().map(|_| None).collect();
        Ok(Self { lr, keep, pruned, master, square_avg, scratch })
    }

    /// One step with `grads` (one per weight; undefined: no step for that weight), in place, the
    /// update of torch.optim.RMSprop on the gradient with its pruned entries zeroed (g * keep):
    /// v = a v + (1 - a) g^2 (addcmul), w -= lr g / (sqrt(v) + eps) (addcdiv). A pruned weight
    /// stays exactly 0 wherever its gradient is finite; a non-finite one (an overflow) turns it
    /// NaN, which makes the round's held-out error non-finite, so the guard rolls the round back,
    /// and `finish` zeroes it in any case.
    pub fn step(&mut self, weights: &[Tensor], grads: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (k, (w, grad)) in weights.iter().zip(grads).enumerate() {
            if !grad.defined() {
                continue;
            }
            let target = self.master[k].as_ref().unwrap_or(w);
            if fused_cpu_step(grad, &self.keep[k], &self.square_avg[k], target, self.lr) {
                if let Some(master) = &self.master[k] {
                    w.shallow_clone().f_copy_(master)?;
                }
                continue;
            }
            let (g, denom) = match &mut self.scratch[k] {
                Some(scratch) => scratch,
                empty => empty.insert((self.square_avg[k].f_empty_like()?, self.square_avg[k].f_empty_like()?)),
            };
            let _ = grad.f_mul_out(g, &self.keep[k])?;
            let _ = g.f_mul_scalar_out(denom, 1.0 - RMSPROP_ALPHA)?;
            let _ = self.square_avg[k].f_mul_scalar_(RMSPROP_ALPHA)?.f_addcmul_(g, denom)?;
            let _ = self.square_avg[k].f_clamp_min_out(denom, SQUARE_AVG_FLOOR)?.f_sqrt_()?.f_add_scalar_(RMSPROP_EPS)?;
            let _ = g.f_mul_scalar_(-self.lr)?;
            match &mut self.master[k] {
                None => {
                    let _ = w.shallow_clone().f_addcdiv_(g, denom)?;
                }
                Some(master) => {
                    let _ = master.f_addcdiv_(g, denom)?;
                    w.shallow_clone().f_copy_(master)?;
                }
            }
        }
        Ok(())
    }

    /// Sets every pruned weight to exactly 0 (once per round: `masked_fill_` is slow on a CPU),
    /// whatever the steps left there.
    pub fn finish(self, weights: &[Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (w, pruned) in weights.iter().zip(&self.pruned) {
            let _ = w.shallow_clone().f_masked_fill_(pruned, 0.0)?;
        }
        Ok(())
    }
}

/// `MaskedRmsprop::step` for one weight in a single pass over memory, when every tensor is a
/// contiguous float32 CPU tensor of one size (`target` the weight or its float32 master copy);
/// returns false, touching nothing, otherwise. Per element, in float32 and in the tensor-op step's
/// order: g = grad * keep; v = v * alpha + g * (g * (1 - alpha)); target += (g * -lr) /
/// (sqrt(max(v, floor)) + eps), a NaN v staying NaN as under `clamp_min`.
fn fused_cpu_step(grad: &Tensor, keep: &Tensor, square_avg: &Tensor, target: &Tensor, lr: f64) -> bool {
    if [grad, keep, square_avg].iter().any(|t| t.size() != target.size()) {
        return false;
    }
    // SAFETY: `square_avg` (the optimizer's state) and `target` (the weight or its master copy)
    // are distinct from each other and from the gradient and the keep-mask, no tensor op runs
    // while the slices live, and any bits are a valid float.
    let slices = unsafe { (elements::<f32>(grad), elements::<f32>(keep), elements_mut::<f32>(square_avg), elements_mut::<f32>(target)) };
    let (Some(g), Some(keep), Some(v), Some(w)) = slices else {
        return false;
    };
    let (alpha, one_minus_alpha, neg_lr) = (RMSPROP_ALPHA as f32, (1.0 - RMSPROP_ALPHA) as f32, -lr as f32);
    let (floor, eps) = (SQUARE_AVG_FLOOR as f32, RMSPROP_EPS as f32);
    // Zipped iterators: no bounds checks, so the loop vectorises.
    for ((w, v), (&g, &keep)) in w.iter_mut().zip(v.iter_mut()).zip(g.iter().zip(keep)) {
        let g = g * keep;
        *v = *v * alpha + g * (g * one_minus_alpha);
        let floored = if *v < floor { floor } else { *v };
        *w += (g * neg_lr) / (floored.sqrt() + eps);
    }
    true
}

/// The gradient of one RO step on the sequences `step`: one backward per sequence this process
/// holds, their mean over the step (summed over the processes). A step of one sequence in a
/// single process keeps autograd's gradients as they are (undefined for a weight the sequence does
/// not reach: no update); otherwise such a weight's gradient counts as 0, as in PyTorch's
/// DistributedDataParallel. Adds each sequence's loss to `loss_sum`.
fn step_gradients(block: &dyn Block, weights: &[Tensor], step: &[usize], loss_sum: &mut DeviceSum) -> Result<Vec<Tensor>> {
    let mut sum: Vec<Option<Tensor>> = weights.iter().map(|_| None).collect();
    for i in local_share(block, step)? {
        let (loss, grads) = tch::with_grad(|| -> Result<(Tensor, Vec<Tensor>)> {
            let mask = block.token_mask(&[i])?;
            let loss = masked_mse(&block.training_forward(&[i])?, &block.target(&[i])?, mask.as_ref())?;
            let grads = block.gradients(&loss, weights)?;
            Ok((loss.f_detach()?, grads))
        })?;
        loss_sum.add(&loss)?;
        for (acc, g) in sum.iter_mut().zip(grads) {
            if g.defined() {
                *acc = Some(match acc.take() {
                    None => g,
                    Some(a) => a.f_to_kind(Kind::Float)?.f_add(&g)?,
                });
            }
        }
    }
    if block.world_size() == 1 && step.len() == 1 {
        return Ok(sum.into_iter().map(|g| g.unwrap_or_else(Tensor::new)).collect());
    }
    let _guard = tch::no_grad_guard();
    let sum = sum
        .into_iter()
        .zip(weights)
        .map(|(g, w)| match g {
            Some(g) => g.f_to_kind(Kind::Float),
            None => Tensor::f_zeros(w.size(), (Kind::Float, w.device())),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if block.world_size() > 1 {
        block.all_reduce(&sum)?;
    }
    sum.iter().map(|g| Ok(g.f_div_scalar(step.len() as f64)?)).collect()
}

/// What one RO round did.
#[derive(Clone, Debug)]
pub struct RoundRecord {
    /// Mean training loss over the round's steps.
    pub loss: f64,
    /// The learning rate the round's update corresponds to: `lr` times the line search's
    /// scale in a searched round, else the rate it ran at.
    pub lr: f64,
    pub holdout_before: f64,
    pub holdout_after: f64,
    pub rolled_back: bool,
    /// Optimizer steps the round took.
    pub steps: usize,
}

impl RoundRecord {
    /// Whether the block's rounds end after this one (`RoSettings::min_improvement`).
    pub fn stop(&self, min_improvement: f64) -> Option<RoStop> {
        if min_improvement <= 0.0 {
            None
        } else if self.rolled_back {
            Some(RoStop::RolledBack)
        } else if self.holdout_before - self.holdout_after < min_improvement * self.holdout_before {
            Some(RoStop::Converged)
        } else {
            None
        }
    }
}

/// Sets every weight to `base + scale * step` (float32 arithmetic, written in the weight's dtype).
fn set_along(weights: &[Tensor], base: &[Tensor], step: &[Tensor], scale: f64) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for ((w, b), d) in weights.iter().zip(base).zip(step) {
        w.shallow_clone().f_copy_(&b.f_to_kind(Kind::Float)?.f_add(&d.f_mul_scalar(scale)?)?)?;
    }
    Ok(())
}

/// The held-out error of the block as it is now (one pass, no autograd) and, with `record`, each
/// weight's input norms on the held-out sequences from the same forwards.
fn holdout_pass(block: &dyn Block, weights: &[Tensor], holdout: &[usize], record: bool) -> Result<Measured> {
    if !record {
        return Ok((block_mse(block, holdout)?, None));
    }
    let _guard = tch::no_grad_guard();
    let mut stats = InputStats::new(weights)?;
    let mut sum = DeviceSum::default();
    for batch in block.batches(&local_share(block, holdout)?)? {
        let mask = block.token_mask(&batch)?;
        let (inputs, out) = block.linear_inputs(&batch)?;
        stats.update(&inputs, mask.as_ref(), batch.len() as i64)?;
        sum.add(&summed_mse(&out, &block.target(&batch)?, mask.as_ref())?)?;
    }
    stats.all_reduce(block)?;
    Ok((sum.all_reduced(block)? / holdout.len().max(1) as f64, Some(stats.finish()?)))
}

/// The held-out error and, with `record`, the input norms it was measured with.
type Measured = (f64, Option<InputNorms>);

/// How a round's update is scaled before the guard judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Search {
    /// Kept as it is.
    None,
    /// Doubled or halved (the first round's step-size search).
    Both,
    /// Halved, only when the round did not lower the held-out error (backtracking).
    Down,
    /// Only doubled (extrapolation).
    Up,
}

/// Whether a held-out error `after` is strictly below `before`; never when either is NaN, so an
/// overflowing step counts as no better.
fn lowers(after: f64, before: f64) -> bool {
    after < before
}

/// The scale t (a power of two) of the round's update `step` that minimises the held-out error
/// of `base + t * step`, starting from t = 1 (measured `at_one`): doubles while the error falls,
/// else (with `Search::Both`) halves while it falls or stays non-finite (`Search::Down`: only
/// halves), within 2^LR_SEARCH_MIN_EXPONENT ..
/// 2^LR_SEARCH_MAX_EXPONENT. Leaves the weights at the best point; returns t and that point's
/// measurement. The update is zero on pruned weights, so every point keeps the masks.
fn search_scale(block: &dyn Block, weights: &[Tensor], base: &[Tensor], step: &[Tensor], holdout: &[usize], at_one: Measured, search: Search) -> Result<(f64, Measured)> {
    let record = at_one.1.is_some();
    let mut best = (0i32, at_one);
    let directions: &[i32] = match search {
        Search::Both => &[1, -1],
        Search::Down => &[-1],
        _ => &[1],
    };
    for &direction in directions {
        let mut exponent = best.0 + direction;
        while (LR_SEARCH_MIN_EXPONENT..=LR_SEARCH_MAX_EXPONENT).contains(&exponent) {
            set_along(weights, base, step, 2f64.powi(exponent))?;
            let point = holdout_pass(block, weights, holdout, record)?;
            if direction < 0 && !point.0.is_finite() && !best.1 .0.is_finite() {
                exponent += direction; // still overflowing: halve on, a smaller step may be finite
                continue;
            }
            // Otherwise NaN (an overflowing step) ends the search like a worse error.
            if !lowers(point.0, best.1 .0) {
                break;
            }
            best = (exponent, point);
            exponent += direction;
        }
        if best.0 != 0 {
            break; // doubling helped: no need to try smaller steps
        }
    }
    set_along(weights, base, step, 2f64.powi(best.0))?;
    Ok((2f64.powi(best.0), best.1))
}

/// The RO rounds of one block: their split of the sequences, and the learning rate, which the
/// first round's step search sets (`lr_search`, when it runs). With `record_inputs`, every held-out
/// pass also records the weights' input norms, so that a round hands back the norms on the
/// held-out sequences at the weights it leaves (no separate pass).
pub struct RoRun<'a> {
    settings: &'a RoSettings,
    split: RoSplit,
    lr: f64,
    record_inputs: bool,
    /// The last round's keep-masks and the held-out measurement at the weights it left: the
    /// next round's starting point when its masks are the same, since the weights then are too.
    last: Option<(Vec<Tensor>, Measured)>,
    records: Vec<RoundRecord>,
    /// Set when a round ends the block's rounds early (`RoSettings::min_improvement`).
    stop: Option<RoStop>,
}

/// Whether two lists of keep-masks are equal, mask by mask.
fn same_masks(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.size() == y.size() && x.equal(y))
}

/// A second handle on the same norm tensors.
fn shared_norms(norms: &Option<InputNorms>) -> Option<InputNorms> {
    norms.as_ref().map(|norms| norms.iter().map(|n| n.as_ref().map(Tensor::shallow_clone)).collect())
}

impl<'a> RoRun<'a> {
    pub fn new(settings: &'a RoSettings, nsamples: usize, record_inputs: bool) -> Result<Self> {
        Ok(Self { split: settings.split(nsamples)?, lr: settings.lr, settings, record_inputs, last: None, records: Vec::new(), stop: None })
    }

    /// Whether the block's rounds have ended: all ran, or one ended them early.
    pub fn done(&self) -> bool {
        self.stop.is_some() || self.records.len() >= self.settings.rounds
    }

    /// How many rounds ran.
    pub fn rounds_run(&self) -> usize {
        self.records.len()
    }

    /// The rounds that ran and why they ended.
    pub fn finish(self) -> (Vec<RoundRecord>, RoStop) {
        (self.records, self.stop.unwrap_or(RoStop::Rounds))
    }

    /// The sequences that guard each round.
    pub fn holdout(&self) -> &[usize] {
        &self.split.holdout
    }

    /// Measures the pruned block before its first round on the held-out sequences only (the guard
    /// needs no other): returns their mean error, which the first round starts from.
    pub fn start(&mut self, block: &dyn Block, weights: &[Tensor], masks: &[Tensor]) -> Result<f64> {
        let measured = holdout_pass(block, weights, &self.split.holdout, self.record_inputs)?;
        let error = measured.0;
        self.last = Some((masks.iter().map(Tensor::shallow_clone).collect(), measured));
        Ok(error)
    }

    /// The next round with the keep-masks `masks` fixed, recorded; with `record_inputs`, returns
    /// the input norms on the held-out sequences at the weights the round leaves. The held-out
    /// measurement before the round is the one `start` or the previous round left when the masks
    /// did not change (the weights then are the same: no second pass over them).
    pub fn round(&mut self, block: &dyn Block, weights: &[Tensor], masks: &[Tensor]) -> Result<Option<InputNorms>> {
        let round = self.records.len();
        let search = match (round, self.settings.lr_search) {
            (0, LrSearch::Full) => Search::Both,
            (0, LrSearch::Backtrack) => Search::Down,
            (r, _) if r > 0 && self.settings.extrapolate => Search::Up,
            _ => Search::None,
        };
        let before = match self.last.take() {
            Some((previous, measured)) if same_masks(&previous, masks) => measured,
            _ => holdout_pass(block, weights, &self.split.holdout, self.record_inputs)?,
        };
        let (record, left) = self.guarded_round(block, weights, masks, round, search, before)?;
        if matches!(search, Search::Both | Search::Down) {
            self.lr = record.lr;
        }
        let norms = shared_norms(&left.1);
        self.last = Some((masks.iter().map(Tensor::shallow_clone).collect(), left));
        self.stop = record.stop(self.settings.min_improvement);
        self.records.push(record);
        Ok(norms)
    }

    /// One pass of masked RMSprop over the training sequences (in an order seeded by the seed
    /// and `round`), guarded by the held-out error: a round that does not lower it, or is
    /// non-finite, is undone. With a `search`, the round's update is first scaled by
    /// [`search_scale`] (`Search::Down`: only when the round did not lower the held-out error;
    /// the record's `lr` says which rate the kept update corresponds to).
    /// `before` is the held-out measurement at the weights as they are. Returns the record and
    /// the measurement at the weights the round leaves.
    fn guarded_round(&self, block: &dyn Block, weights: &[Tensor], masks: &[Tensor], round: usize, search: Search, before: Measured) -> Result<(RoundRecord, Measured)> {
        let holdout = &self.split.holdout;
        let snapshot: Vec<Tensor> = {
            let _guard = tch::no_grad_guard();
            weights.iter().map(|w| w.f_detach().map(|d| d.copy())).collect::<std::result::Result<_, _>>()?
        };
        let mut order = self.split.train.clone();
        let mut rng = SplitMix64::new(self.settings.seed.wrapping_add(1 + round as u64));
        let perm = rng.permutation(order.len());
        order = perm.iter().map(|&p| order[p]).collect();

        let mut opt = MaskedRmsprop::new(weights, masks, self.lr)?;
        let tracking = GradTracking::enable(weights);
        // Summed on the device and read once per round: no host synchronisation per step.
        let mut loss_sum = DeviceSum::default();
        let mut steps = 0;
        for step in order.chunks(self.settings.batch) {
            let grads = step_gradients(block, weights, step, &mut loss_sum)?;
            opt.step(weights, &grads)?;
            steps += 1;
        }
        opt.finish(weights)?;
        let loss_sum = loss_sum.all_reduced(block)?;
        drop(tracking);

        let mut after = holdout_pass(block, weights, holdout, self.record_inputs)?;
        let mut scale = 1.0;
        // Backtracking searches only when the round at the current rate did not help.
        let searching = match search {
            Search::None => false,
            Search::Down => !lowers(after.0, before.0),
            _ => true,
        };
        if searching {
            // An overflowing round starts the search from an infinite error, so halving can find
            // a finite step.
            if !after.0.is_finite() {
                after.0 = f64::INFINITY;
            }
            let step: Vec<Tensor> = {
                let _guard = tch::no_grad_guard();
                let pairs = weights.iter().zip(&snapshot);
                pairs.map(|(w, s)| w.f_to_kind(Kind::Float)?.f_sub(&s.f_to_kind(Kind::Float)?)).collect::<std::result::Result<_, _>>()?
            };
            (scale, after) = search_scale(block, weights, &snapshot, &step, holdout, after, search)?;
        }
        let rolled_back = !after.0.is_finite() || after.0 > before.0;
        if rolled_back {
            let _guard = tch::no_grad_guard();
            for (w, s) in weights.iter().zip(&snapshot) {
                w.shallow_clone().f_copy_(s)?;
            }
        }
        let record = RoundRecord {
            loss: loss_sum / order.len().max(1) as f64,
            lr: self.lr * scale,
            holdout_before: before.0,
            holdout_after: after.0,
            rolled_back,
            steps,
        };
        Ok((record, if rolled_back { before } else { after }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let s = RoSettings { rounds: 1, samples: 4, holdout: 3, lr: 1e-3, lr_search: LrSearch::Off, seed: 3, batch: 1, min_improvement: 0.0, extrapolate: false };
        let a = s.split(10).unwrap();
        assert_eq!(a, s.split(10).unwrap());
        assert_eq!(a.train.len(), 4);
        assert_eq!(a.holdout.len(), 3);
        assert!(a.holdout.iter().all(|h| !a.train.contains(h)));
        let all_train = s.split(4).unwrap();
        assert_eq!(all_train.holdout, all_train.train[..3], "no sequence left: 3 of the training ones");
        let one_left = s.split(5).unwrap();
        let left = (0..5).find(|i| !one_left.train.contains(i)).unwrap();
        assert_eq!(one_left.holdout, [&[left][..], &one_left.train[..2]].concat(), "the one left, then 2 training ones");
        let unguarded = RoSettings { holdout: 0, ..s.clone() }.split(10).unwrap();
        assert_eq!(unguarded.holdout, unguarded.train, "0 guards on the training sequences");
        assert!(s.split(3).is_err());
    }

    #[test]
    fn a_round_stops_the_block_below_the_minimum_improvement_or_when_rolled_back() {
        let record = |before: f64, after: f64, rolled_back: bool| RoundRecord { loss: 0.0, lr: 1e-4, holdout_before: before, holdout_after: after, rolled_back, steps: 4 };
        assert_eq!(record(1.0, 0.5, false).stop(0.0), None);
        assert_eq!(record(1.0, 2.0, true).stop(0.0), None, "0 runs every round");
        assert_eq!(record(1.0, 0.5, false).stop(0.4), None);
        assert_eq!(record(1.0, 0.7, false).stop(0.4), Some(RoStop::Converged));
        assert_eq!(record(2.0, 1.2, false).stop(0.4), None, "relative to the error before the round");
        assert_eq!(record(1.0, 2.0, true).stop(0.01), Some(RoStop::RolledBack));
        let mut s = RoSettings { rounds: 1, samples: 4, holdout: 3, lr: 1e-3, lr_search: LrSearch::Off, seed: 3, batch: 1, min_improvement: 1.0, extrapolate: false };
        assert!(s.split(10).is_err());
        s.min_improvement = f64::NAN;
        assert!(s.split(10).is_err());
    }

    /// The textbook RMSprop update in f64 scalars, pruned weights pinned at zero.
    fn reference_rmsprop(w: &mut [f64], v: &mut [f64], g: &[f64], keep: &[bool], lr: f64) {
        for j in 0..w.len() {
            let gj = if keep[j] { g[j] } else { 0.0 };
            v[j] = RMSPROP_ALPHA * v[j] + (1.0 - RMSPROP_ALPHA) * gj * gj;
            w[j] = if keep[j] { w[j] - lr * gj / (v[j].sqrt() + RMSPROP_EPS) } else { 0.0 };
        }
    }

    /// Uniform draws of one weight's shape, centred on 0.
    struct Draws {
        rng: SplitMix64,
        shape: [i64; 2],
    }

    impl Draws {
        fn next(&mut self, scale: f32) -> Tensor {
            let v: Vec<f32> = (0..self.shape[0] * self.shape[1]).map(|_| (self.rng.unit() as f32 - 0.5) * scale).collect();
            Tensor::from_slice(&v).view(self.shape)
        }

        /// A random keep-mask and a masked weight of `kind` (|w| < 0.02), stepped by two
        /// optimizers at `lr`.
        fn both_paths(&mut self, kind: Kind, lr: f64) -> BothPaths {
            let mask = self.next(1.0).gt(0.0);
            let start = (self.next(0.04) * mask.to_kind(Kind::Float)).to_kind(kind);
            let (fused, tensor_ops) = (start.copy(), start.tr().contiguous().tr());
            assert!(!tensor_ops.is_contiguous());
            let a = MaskedRmsprop::new(&[fused.shallow_clone()], &[mask.shallow_clone()], lr).unwrap();
            let b = MaskedRmsprop::new(&[tensor_ops.shallow_clone()], &[mask.shallow_clone()], lr).unwrap();
            BothPaths { mask, start, fused, tensor_ops, a, b }
        }
    }

    /// One weight twice: `fused` contiguous (the fused step's layout, optimizer `a`) and
    /// `tensor_ops` transposed in memory (the tensor-op step's, optimizer `b`), from `start`.
    struct BothPaths {
        mask: Tensor,
        start: Tensor,
        fused: Tensor,
        tensor_ops: Tensor,
        a: MaskedRmsprop,
        b: MaskedRmsprop,
    }

    impl BothPaths {
        /// One step of both with the same gradient, each on the path it is meant to take.
        fn step(&mut self, g: &Tensor) {
            self.a.step(&[self.fused.shallow_clone()], &[g.shallow_clone()]).unwrap();
            self.b.step(&[self.tensor_ops.shallow_clone()], &[g.shallow_clone()]).unwrap();
            assert!(self.a.scratch[0].is_none() && self.b.scratch[0].is_some(), "each weight took the path it was meant to");
        }
    }

    #[test]
    fn the_fused_cpu_step_agrees_with_the_tensor_op_step() {
        // A non-contiguous weight takes the tensor-op step (the one CUDA runs), a contiguous one
        // the fused step: same values, same gradients, the same weights to float32 rounding after
        // every step (ATen's vectorised root and addcmul's fused multiply-add round some last bits
        // differently), including where pruned entries are fed non-finite gradients.
        let mut draws = Draws { rng: SplitMix64::new(5), shape: [67, 1000] };
        let mut both = draws.both_paths(Kind::Float, 3e-4);
        let (mask, fused, tensor_ops) = (both.mask.shallow_clone(), both.fused.shallow_clone(), both.tensor_ops.shallow_clone());
        let pruned = Vec::<bool>::try_from(mask.logical_not().view([-1])).unwrap().iter().position(|&p| p).unwrap();
        // Weights of about 0.02 have an ulp of 1.9e-9: a few of them.
        let close = |x: &Tensor, y: &Tensor| x.allclose(y, 1e-6, 1e-8, true);
        for step in 0..5 {
            // Gradients spanning the magnitudes RO sees, the last ones too small for the floor.
            let g = draws.next(10f32.powi(-2 - 4 * step)).view([-1]);
            if step == 2 {
                let _ = g.get(pruned as i64).fill_(f64::INFINITY);
            }
            both.step(&g.view(draws.shape));
            assert!(close(&fused, &tensor_ops), "step {step}: the fused step's weights differ");
            assert!(both.a.square_avg[0].allclose(&both.b.square_avg[0], 1e-6, 0.0, true), "step {step}: the square averages differ");
        }
        assert!(fused.view([-1]).get(pruned as i64).isnan().int64_value(&[]) == 1, "the pruned entry's infinite gradient made it NaN until finish");
        both.a.finish(&[fused.shallow_clone()]).unwrap();
        both.b.finish(&[tensor_ops.shallow_clone()]).unwrap();
        assert!(close(&fused, &tensor_ops) && fused.isfinite().all().int64_value(&[]) == 1);
        assert!(fused.masked_select(&mask.logical_not()).abs().max().double_value(&[]) == 0.0, "a pruned weight came back");
    }

    #[test]
    fn a_bfloat16_weight_steps_its_float32_master_copy_on_either_path() {
        // A bfloat16 weight keeps a float32 master copy. With a float32 gradient (the mean over a
        // batch or over processes) a contiguous weight's master takes the fused step, a
        // transposed one's the tensor-op step; the masters agree to float32 rounding and each
        // weight is its master rounded to bfloat16, so steps below bfloat16's ulp still count.
        let mut draws = Draws { rng: SplitMix64::new(7), shape: [33, 500] };
        let mut both = draws.both_paths(Kind::BFloat16, 1e-6);
        for step in 0..4 {
            both.step(&draws.next(1e-3));
            let (ma, mb) = (both.a.master[0].as_ref().unwrap(), both.b.master[0].as_ref().unwrap());
            assert!(ma.allclose(mb, 1e-6, 1e-9, false), "step {step}: the master copies differ");
            assert!(both.fused.equal(&ma.to_kind(Kind::BFloat16)) && both.tensor_ops.equal(&mb.to_kind(Kind::BFloat16)), "step {step}: a weight is not its master rounded");
        }
        let BothPaths { mask, start, fused, a, .. } = both;
        // About 1e-5 per step against an ulp of 1.2e-4 at 0.02: the weights barely move, the
        // masters do, at (almost) every kept entry, and never at a pruned one.
        let moved = a.master[0].as_ref().unwrap().ne_tensor(&start.to_kind(Kind::Float));
        let kept = mask.sum(Kind::Int64).int64_value(&[]);
        assert!(moved.logical_and(&mask.logical_not()).any().int64_value(&[]) == 0, "a pruned master entry moved");
        assert!(moved.sum(Kind::Int64).int64_value(&[]) * 100 >= kept * 99, "the kept masters moved");
        assert!(fused.ne_tensor(&start).sum(Kind::Int64).int64_value(&[]) < kept / 2, "most steps are below bfloat16's ulp");
    }

    #[test]
    fn masked_rmsprop_matches_the_textbook_update_and_never_revives_a_weight() {
        let mut rng = SplitMix64::new(11);
        let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.unit() - 0.5).collect() };
        let (rows, cols, lr) = (3i64, 4i64, 1e-2);
        let n = (rows * cols) as usize;
        let keep: Vec<bool> = (0..n).map(|j| j % 3 != 0).collect();
        let mut expected: Vec<f64> = draw(n).iter().zip(&keep).map(|(x, k)| if *k { *x } else { 0.0 }).collect();
        let weight = Tensor::from_slice(&expected).to_kind(Kind::Float).view([rows, cols]);
        let mask = Tensor::from_slice(&keep).view([rows, cols]);
        let mut opt = MaskedRmsprop::new(&[weight.shallow_clone()], &[mask], lr).unwrap();
        let mut v = vec![0.0; n];
        for step in 0..4 {
            let mut g = draw(n);
            if step == 1 {
                // An overflow where weights are pruned must not reach the kept ones.
                g[0] = f64::INFINITY;
                g[3] = f64::NAN;
            }
            let gt = Tensor::from_slice(&g).to_kind(Kind::Float).view([rows, cols]);
            opt.step(&[weight.shallow_clone()], &[gt]).unwrap();
            let g32: Vec<f64> = g.iter().map(|x| *x as f32 as f64).collect();
            reference_rmsprop(&mut expected, &mut v, &g32, &keep, lr);
        }
        opt.finish(&[weight.shallow_clone()]).unwrap();
        let got: Vec<f64> = Vec::<f64>::try_from(weight.detach().to_kind(Kind::Double).view([-1])).unwrap();
        for j in 0..n {
            assert!((got[j] - expected[j]).abs() <= 1e-6 * expected[j].abs().max(1e-3), "weight {j}: {} vs {}", got[j], expected[j]);
            if !keep[j] {
                assert_eq!(got[j], 0.0, "pruned weight {j} came back");
            }
        }
    }
}
