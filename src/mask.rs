//! Mask selection (True = keep) and in-place application.
//!
//! Every output row competes on its own (SPEC step 4). Ties are broken by column index: at
//! equal score the lower column counts as the smaller, so unstructured selection prunes the
//! lower index first and N:M keeps the higher index first. Both CPU (rayon, partial selection)
//! and the device path (stable sort) follow this same total order, so they agree exactly.

use crate::error::{Error, Result};
use crate::tensor_check::{require_bool, require_float, require_rank, require_same_device, require_shape};
use rayon::prelude::*;
use std::cmp::Ordering;
use tch::{Device, Kind, Tensor};

/// How many weights each row keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// Drop [`pruned_per_row`] of every row: floor(in_features * s), read as a decimal.
    Unstructured(f64),
    /// Keep n of every m consecutive inputs of a row.
    NM { n: i64, m: i64 },
    /// Drop exactly this many weights of every row (per-layer sparsity, e.g. OWL's allocation).
    PrunedPerRow(i64),
}

impl Pattern {
    pub fn unstructured(sparsity: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&sparsity) {
            return Err(Error::InvalidSparsity(sparsity));
        }
        Ok(Pattern::Unstructured(sparsity))
    }

    pub fn nm(n: i64, m: i64) -> Result<Self> {
        let bad = |reason: &str| Err(Error::InvalidPattern { n, m, reason: reason.into() });
        if n < 1 {
            return bad("n must be at least 1");
        }
        if n >= m {
            return bad("n must be smaller than m (2:4 keeps 2 of every 4)");
        }
        Ok(Pattern::NM { n, m })
    }

    /// Fails when a layer with `in_features` inputs cannot carry this pattern.
    pub fn check_fits(&self, in_features: i64) -> Result<()> {
        match *self {
            Pattern::NM { n, m } if in_features % m != 0 => Err(Error::InvalidPattern {
                n,
                m,
                reason: format!("in_features {in_features} is not divisible by m={m}; choose an m that divides it"),
            }),
            Pattern::PrunedPerRow(k) if !(0..=in_features).contains(&k) => Err(Error::InvalidArgument {
                arg: "pruned_per_row",
                reason: format!("must be in [0, {in_features}] (the layer's in_features), got {k}"),
            }),
            _ => Ok(()),
        }
    }

    /// Weights pruned in one row of `in_features`.
    pub fn pruned_per_row(&self, in_features: i64) -> i64 {
        match *self {
            Pattern::Unstructured(s) => pruned_per_row(in_features, s),
            Pattern::NM { n, m } => in_features / m * (m - n),
            Pattern::PrunedPerRow(k) => k,
        }
    }

    /// Of the weights a row of `in_features` loses, how many fall in its first `prefix`
    /// columns when they are spread evenly (SparseGPT drops them block by block of columns).
    /// N:M has no even spread and is chosen group by group instead.
    pub fn pruned_in_prefix(&self, prefix: i64, in_features: i64) -> i64 {
        match *self {
            Pattern::Unstructured(s) => pruned_per_row(prefix, s),
            Pattern::PrunedPerRow(k) => prefix * k / in_features.max(1),
            Pattern::NM { n, m } => prefix / m * (m - n),
        }
    }
}

/// How many of `in_features` weights a row loses at unstructured `sparsity`: floor(in_features
/// x sparsity), computed as a person computes it from the decimal they wrote. The sparsity is read
/// as its shortest round-trip decimal ("0.58", as Python's `repr` and Rust's `Display` write it,
/// not the binary 0.57999999999999996) and the product is exact integer arithmetic, so 100 x 0.58
/// prunes 58 where f64 multiplication gives 57.999... and floors to 57. `sparsity` is in [0, 1).
pub fn pruned_per_row(in_features: i64, sparsity: f64) -> i64 {
    if in_features <= 0 || sparsity <= 0.0 {
        return 0;
    }
    // Display never uses an exponent; a value in (0, 1) prints as "0.<digits>".
    let text = format!("{sparsity}");
    let digits = text.split_once('.').map_or("", |(_, frac)| frac);
    // At most 17 significant digits, so the numerator fits a u64 once leading zeros are dropped.
    let numerator: u128 = digits.trim_start_matches('0').parse().unwrap_or(0);
    let product = in_features as u128 * numerator; // < 2^63 * 10^17 < 2^120
    match 10u128.checked_pow(digits.len() as u32) {
        Some(denominator) => (product / denominator) as i64,
        None => 0, // 10^39 and up exceed the product
    }
}

/// Checks `scores` and returns (rows, cols).
fn check_scores(scores: &Tensor) -> Result<(i64, i64)> {
    require_rank(scores, "scores", 2)?;
    require_float(scores, "scores")?;
    let s = scores.size();
    Ok((s[0], s[1]))
}

/// Row-major float32 copy of the scores with -0.0 folded into 0.0; errors on NaN or infinity
/// (an infinite activation norm makes a whole column +inf, and every row would keep it).
fn cpu_scores(scores: &Tensor) -> Result<Vec<f32>> {
    let flat = scores.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
    let mut v = Vec::<f32>::try_from(&flat)?;
    let mut finite = true;
    for x in v.iter_mut() {
        finite &= x.is_finite();
        *x += 0.0;
    }
    if !finite {
        return Err(Error::NonFinite { arg: "scores", what: "NaN or infinity" });
    }
    Ok(v)
}

#[inline]
fn rank(row: &[f32], a: u32, b: u32) -> Ordering {
    row[a as usize].total_cmp(&row[b as usize]).then(a.cmp(&b))
}

/// Keep-mask of a row-major score buffer: each row drops its `k` lowest entries.
#[cfg(test)]
fn unstructured_rows(scores: &[f32], cols: usize, k: usize) -> Vec<bool> {
    let mut keep = vec![true; scores.len()];
    unstructured_into(scores, cols, k, &mut keep);
    keep
}

fn unstructured_into(scores: &[f32], cols: usize, k: usize, keep: &mut [bool]) {
    keep.fill(true);
    if k == 0 || cols == 0 {
        return;
    }
    keep.par_chunks_mut(cols).zip(scores.par_chunks(cols)).for_each_init(
        || Vec::<u32>::with_capacity(cols),
        |order, (keep_row, row)| {
            order.clear();
            order.extend(0..cols as u32);
            if k < cols {
                order.select_nth_unstable_by(k - 1, |&a, &b| rank(row, a, b));
            }
            for &i in &order[..k] {
                keep_row[i as usize] = false;
            }
        },
    );
}

/// Keep-mask of a row-major score buffer: each group of `m` keeps its `n` highest entries.
#[cfg(test)]
fn nm_rows(scores: &[f32], n: usize, m: usize) -> Vec<bool> {
    let mut keep = vec![false; scores.len()];
    nm_into(scores, n, m, &mut keep);
    keep
}

/// Groups up to this size are ranked by counting instead of sorting.
const SMALL_GROUP: usize = 16;

/// Rows of this many groups go to one rayon task: enough work to amortise scheduling.
const GROUPS_PER_TASK: usize = 1024;

fn nm_into(scores: &[f32], n: usize, m: usize, keep: &mut [bool]) {
    let chunk = m * GROUPS_PER_TASK;
    keep.par_chunks_mut(chunk).zip(scores.par_chunks(chunk)).for_each_init(
        || Vec::<u32>::with_capacity(m),
        |order, (keep_chunk, score_chunk)| {
            for (keep_group, group) in keep_chunk.chunks_mut(m).zip(score_chunk.chunks(m)) {
                if m <= SMALL_GROUP {
                    // Keep i when fewer than n entries outrank it: m^2 comparisons, no sort.
                    for (i, keep) in keep_group.iter_mut().enumerate() {
                        let outranked = (0..m as u32).filter(|&j| rank(group, j, i as u32) == Ordering::Greater).count();
                        *keep = outranked < n;
                    }
                    continue;
                }
                order.clear();
                order.extend(0..m as u32);
                order.sort_unstable_by(|&a, &b| rank(group, b, a)); // highest first
                keep_group.fill(false);
                for &i in &order[..n] {
                    keep_group[i as usize] = true;
                }
            }
        },
    );
}

/// Runs `fill` on a CPU bool tensor's own memory: no intermediate Vec, no copy.
fn cpu_mask(rows: i64, cols: i64, fill: impl FnOnce(&mut [bool])) -> Result<Tensor> {
    // Zeroed, not empty: a slice of bool must hold valid bools before `fill` writes them.
    let mask = Tensor::f_zeros([rows, cols], (Kind::Bool, Device::Cpu))?;
    // SAFETY: a fresh zeroed tensor (every byte a valid bool) owned here; nothing else reads or
    // writes it while `fill` runs.
    let keep = unsafe { crate::cpu::elements_mut::<bool>(&mask) }.expect("a fresh CPU bool tensor is contiguous");
    fill(keep);
    Ok(mask)
}

/// Stable ascending sort along the last dim: ties keep column order, the same total order as `rank`.
fn ascending_order(scores: &Tensor) -> Result<Tensor> {
    crate::tensor_check::require_finite(scores, "scores")?;
    Ok(scores.f_to_kind(Kind::Float)?.f_add_scalar(0.0)?.f_sort_stable(true, -1, false)?.1)
}

/// Unstructured keep-mask: every row drops exactly floor(cols * sparsity) of its lowest scores.
pub fn unstructured_mask(scores: &Tensor, sparsity: f64) -> Result<Tensor> {
    let pattern = Pattern::unstructured(sparsity)?;
    let (_, cols) = check_scores(scores)?;
    lowest_k_mask(scores, pattern.pruned_per_row(cols))
}

/// Keep-mask in which every row drops its `k` lowest scores (0 <= k <= cols).
pub fn lowest_k_mask(scores: &Tensor, k: i64) -> Result<Tensor> {
    let (rows, cols) = check_scores(scores)?;
    if !(0..=cols).contains(&k) {
        return Err(Error::InvalidArgument { arg: "k", reason: format!("must be in [0, {cols}], got {k}") });
    }
    if scores.device() != Device::Cpu {
        return unstructured_by_sort(scores, k);
    }
    let values = cpu_scores(scores)?;
    cpu_mask(rows, cols, |keep| unstructured_into(&values, cols as usize, k as usize, keep))
}

/// N:M keep-mask: every group of m consecutive inputs of a row keeps its n highest scores.
pub fn nm_mask(scores: &Tensor, n: i64, m: i64) -> Result<Tensor> {
    let pattern = Pattern::nm(n, m)?;
    let (rows, cols) = check_scores(scores)?;
    pattern.check_fits(cols)?;
    if scores.device() != Device::Cpu {
        return nm_by_sort(scores, n, m);
    }
    let values = cpu_scores(scores)?;
    cpu_mask(rows, cols, |keep| nm_into(&values, n as usize, m as usize, keep))
}

// The device path (CUDA): a stable sort on the tensor's own device, in the same total order as
// `rank`, so that CPU and device masks agree bit for bit (the tests run it on CPU to check).

fn unstructured_by_sort(scores: &Tensor, k: i64) -> Result<Tensor> {
    let order = ascending_order(scores)?;
    let mut keep = Tensor::f_ones(scores.size(), (Kind::Bool, scores.device()))?;
    let _ = keep.f_scatter_value_(1, &order.f_narrow(1, 0, k)?, 0)?;
    Ok(keep)
}

fn nm_by_sort(scores: &Tensor, n: i64, m: i64) -> Result<Tensor> {
    let (rows, cols) = (scores.size()[0], scores.size()[1]);
    let order = ascending_order(&scores.f_reshape([rows, cols / m, m])?)?;
    let mut keep = Tensor::f_zeros([rows, cols / m, m], (Kind::Bool, scores.device()))?;
    let _ = keep.f_scatter_value_(2, &order.f_narrow(2, m - n, n)?, 1)?;
    Ok(keep.f_view([rows, cols])?)
}

/// Keep-mask for `pattern`.
pub fn select(scores: &Tensor, pattern: Pattern) -> Result<Tensor> {
    match pattern {
        Pattern::Unstructured(s) => unstructured_mask(scores, s),
        Pattern::NM { n, m } => nm_mask(scores, n, m),
        Pattern::PrunedPerRow(k) => lowest_k_mask(scores, k),
    }
}

/// Zeroes `weight` where `mask` is False, in place (same storage), outside autograd.
pub fn apply_mask_(weight: &Tensor, mask: &Tensor) -> Result<()> {
    require_rank(weight, "weight", 2)?;
    require_float(weight, "weight")?;
    require_bool(mask, "mask")?;
    require_shape(mask, "mask", &weight.size(), "the shape of weight")?;
    require_same_device(mask, "mask", weight, "weight")?;
    let _guard = tch::no_grad_guard();
    let _ = weight.shallow_clone().f_masked_fill_(&mask.f_logical_not()?, 0.0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstructured_drops_lowest_and_breaks_ties_by_lower_index() {
        let s = [3.0f32, 1.0, 1.0, 2.0];
        assert_eq!(unstructured_rows(&s, 4, 2), vec![true, false, false, true]);
        let ties = [1.0f32; 4];
        assert_eq!(unstructured_rows(&ties, 4, 1), vec![false, true, true, true]);
    }

    #[test]
    fn nm_keeps_highest_and_breaks_ties_by_higher_index() {
        let s = [0.5f32, 0.9, 0.1, 0.7, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(nm_rows(&s, 2, 4), vec![false, true, false, true, false, false, true, true]);
    }

    #[test]
    fn each_row_drops_exactly_k() {
        let cols = 37;
        let s: Vec<f32> = (0..cols * 5).map(|i| ((i * 7919) % 101) as f32).collect();
        let keep = unstructured_rows(&s, cols, 18);
        for row in keep.chunks(cols) {
            assert_eq!(row.iter().filter(|&&k| !k).count(), 18);
        }
    }

    /// Scores with many ties, both signed zeros, and a spread of magnitudes.
    fn tied_scores(rows: i64, cols: i64, seed: u64) -> Tensor {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| match rng.below(6) {
                0 => 0.0,
                1 => -0.0,
                2 => 1.0,
                _ => rng.below(1000) as f32 / 7.0,
            })
            .collect();
        Tensor::from_slice(&values).view([rows, cols])
    }

    #[test]
    fn the_device_path_agrees_with_the_cpu_path_bit_for_bit() {
        for seed in 0..5 {
            let scores = tied_scores(9, 48, seed);
            for k in [0, 1, 17, 24, 47] {
                let sparsity = k as f64 / 48.0;
                let cpu = unstructured_mask(&scores, sparsity).unwrap();
                let k = Pattern::unstructured(sparsity).unwrap().pruned_per_row(48);
                assert!(cpu.equal(&unstructured_by_sort(&scores, k).unwrap()), "unstructured k={k} seed={seed}");
            }
            for (n, m) in [(1, 4), (2, 4), (3, 4), (4, 8), (2, 16)] {
                let cpu = nm_mask(&scores, n, m).unwrap();
                assert!(cpu.equal(&nm_by_sort(&scores, n, m).unwrap()), "{n}:{m} seed={seed}");
            }
        }
    }

    #[test]
    fn pattern_validation() {
        assert!(matches!(Pattern::unstructured(1.0), Err(Error::InvalidSparsity(_))));
        assert!(matches!(Pattern::nm(4, 4), Err(Error::InvalidPattern { .. })));
        assert!(matches!(Pattern::nm(0, 4), Err(Error::InvalidPattern { .. })));
        assert!(Pattern::nm(2, 4).unwrap().check_fits(6).is_err());
        assert_eq!(Pattern::nm(2, 4).unwrap().pruned_per_row(8), 4);
    }

    #[test]
    fn pruned_per_row_reads_the_sparsity_as_its_decimal() {
        // f64: 100 * 0.58 = 57.99999999999999, 100 * 0.29 = 28.999999999999996.
        assert_eq!(pruned_per_row(100, 0.58), 58);
        assert_eq!(pruned_per_row(100, 0.29), 29);
        assert_eq!(pruned_per_row(100, 0.57), 57);
        assert_eq!(pruned_per_row(4096, 0.0), 0);
        assert_eq!(pruned_per_row(3, 0.5), 1);
        assert_eq!(pruned_per_row(1 << 40, 1e-30), 0);
        assert_eq!(pruned_per_row(10, 0.999_999_999_999_999_9), 9);
        // Every ratio p/q written with up to four decimals, on widths from 1 to 20000: exact
        // integer arithmetic on the digits is the reference.
        for scale in [100u64, 1000, 10000] {
            for p in (0..scale).step_by(7) {
                let sparsity: f64 = format!("0.{p:0width$}", width = scale.ilog10() as usize).parse().unwrap();
                for cols in [1u64, 7, 64, 100, 576, 1536, 4096, 11008, 14336, 19999] {
                    assert_eq!(pruned_per_row(cols as i64, sparsity) as u64, cols * p / scale, "{cols} x {sparsity}");
                }
            }
        }
    }

    #[test]
    fn infinite_or_nan_scores_are_refused_on_both_paths() {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let scores = Tensor::from_slice(&[1.0f32, bad, 2.0, 3.0]).view([1, 4]);
            assert!(matches!(unstructured_mask(&scores, 0.5), Err(Error::NonFinite { .. })));
            assert!(matches!(nm_mask(&scores, 2, 4), Err(Error::NonFinite { .. })));
            assert!(matches!(unstructured_by_sort(&scores, 2), Err(Error::NonFinite { .. })));
            assert!(matches!(nm_by_sort(&scores, 2, 4), Err(Error::NonFinite { .. })));
        }
    }

    #[test]
    fn apply_mask_keeps_storage() {
        let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        let ptr = w.data_ptr();
        let m = Tensor::from_slice(&[true, false, false, true]).view([2, 2]);
        apply_mask_(&w, &m).unwrap();
        assert_eq!(w.data_ptr(), ptr);
        assert_eq!(f64::try_from(w.sum(Kind::Float)).unwrap(), 2.0);
    }
}
