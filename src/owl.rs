//! OWL, outlier-weighted layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity
//! (OWL)", ICML 2024, arXiv 2310.05175): blocks whose Wanda scores hold more outliers keep more
//! weights. Here the per-block sparsities are then turned into whole numbers of weights per row
//! whose total is exactly the uniform one, so the model's mean sparsity is the one asked for.

use crate::error::{Error, Result};
use crate::score::wanda_score;
use tch::{Kind, Tensor};

/// OWL's layer-wise outlier distribution entry of one block: the fraction of its Wanda scores
/// |W_ij| ||X_j|| (all its weights together) above `m` times their mean (OWL's
/// `check_outlier_mean`, as a fraction instead of a percentage). `weights[k]` is [out, in] and
/// `norms[k]` its input's ||X_j|| [in].
pub fn outlier_ratio(weights: &[Tensor], norms: &[Tensor], m: f64) -> Result<f64> {
    if weights.is_empty() || weights.len() != norms.len() {
        return Err(Error::InvalidArgument {
            arg: "weights",
            reason: format!("need one activation norm per weight and at least one weight, got {} weights and {} norms", weights.len(), norms.len()),
        });
    }
    let _guard = tch::no_grad_guard();
    let scores = weights.iter().zip(norms).map(|(w, n)| wanda_score(w, n)).collect::<Result<Vec<_>>>()?;
    let (mut sum, mut count) = (0.0, 0i64);
    for s in &scores {
        sum += f64::try_from(s.f_sum(Kind::Double)?)?;
        count += s.numel() as i64;
    }
    let threshold = m * sum / count as f64;
    let mut outliers = 0i64;
    for s in &scores {
        outliers += i64::try_from(s.f_to_kind(Kind::Double)?.f_gt(threshold)?.f_sum(Kind::Int64)?)?;
    }
    Ok(outliers as f64 / count as f64)
}

/// OWL's per-block sparsity for mean sparsity `sparsity`: the outlier ratios are scaled to
/// [0, 2 lambda] (min to max) and centred, and block l gets `sparsity - (scaled_l - mean)`, so
/// the sparsities span 2 lambda (max minus min), average `sparsity`, and each lies within
/// 2 lambda (n - 1) / n of it for n blocks. Equal ratios (or one block) give every block `sparsity`.
pub fn layer_sparsities(ratios: &[f64], sparsity: f64, lambda: f64) -> Result<Vec<f64>> {
    if ratios.iter().any(|r| !r.is_finite()) {
        return Err(Error::NonFinite { arg: "outlier ratios", what: "NaN or infinity" });
    }
    let (min, max) = ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    if ratios.is_empty() || max <= min {
        return Ok(vec![sparsity; ratios.len()]);
    }
    let scaled: Vec<f64> = ratios.iter().map(|r| (r - min) / (max - min) * 2.0 * lambda).collect();
    let mean = scaled.iter().sum::<f64>() / scaled.len() as f64;
    Ok(scaled.iter().map(|s| sparsity - (s - mean)).collect())
}

/// Weights pruned per row for matrices of one shape with `in_features` inputs, whose ideal
/// sparsities are `sparsities`, such that the counts sum to exactly `total`: the ideal counts
/// in_features x s_i are scaled to sum to `total`, floored, and the remaining units go to the
/// largest fractional parts (the lower index first at equal parts: Hamilton's largest-remainder
/// rule). No count exceeds `in_features`.
pub fn allocate_pruned_per_row(sparsities: &[f64], in_features: i64, total: i64) -> Result<Vec<i64>> {
    let capacity = in_features * sparsities.len() as i64;
    if !(0..=capacity).contains(&total) || sparsities.iter().any(|s| !(0.0..=1.0).contains(s)) {
        return Err(Error::InvalidArgument {
            arg: "sparsities",
            reason: format!("need sparsities in [0, 1] and a total in [0, {capacity}], got {sparsities:?} and {total}"),
        });
    }
    let ideal: Vec<f64> = sparsities.iter().map(|s| s * in_features as f64).collect();
    let sum: f64 = ideal.iter().sum();
    let scale = if sum > 0.0 { total as f64 / sum } else { 0.0 };
    let mut counts: Vec<i64> = ideal.iter().map(|x| ((x * scale).floor() as i64).min(in_features)).collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    let fraction = |i: usize| ideal[i] * scale - (ideal[i] * scale).floor();
    order.sort_by(|&a, &b| fraction(b).total_cmp(&fraction(a)).then(a.cmp(&b)));
    let mut missing = total - counts.iter().sum::<i64>();
    // Usually one pass; more only when scaling up met the in_features cap.
    while missing > 0 {
        for &i in &order {
            if missing > 0 && counts[i] < in_features {
                counts[i] += 1;
                missing -= 1;
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparsities_follow_owl_and_average_the_target() {
        let s = layer_sparsities(&[0.01, 0.03, 0.02, 0.05], 0.6, 0.08).unwrap();
        // scaled: 0, 0.08, 0.04, 0.16; mean 0.07.
        let expected = [0.67, 0.59, 0.63, 0.51];
        for (got, want) in s.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{s:?}");
        }
        assert!((s.iter().sum::<f64>() / 4.0 - 0.6).abs() < 1e-12);
        assert_eq!(layer_sparsities(&[0.2, 0.2], 0.5, 0.08).unwrap(), vec![0.5, 0.5]);
    }

    #[test]
    fn allocation_is_exact_and_close_to_the_ideal() {
        let s = [0.47, 0.53, 0.5049, 0.4951, 0.5]; // mean 0.5
        for in_features in [7, 64, 576, 1536] {
            let total = 5 * crate::mask::pruned_per_row(in_features, 0.5);
            let counts = allocate_pruned_per_row(&s, in_features, total).unwrap();
            assert_eq!(counts.iter().sum::<i64>(), total);
            for (c, x) in counts.iter().zip(s) {
                assert!((*c as f64 - x * in_features as f64).abs() <= 1.0 + 1e-9, "{in_features}: {counts:?}");
            }
        }
        assert_eq!(allocate_pruned_per_row(&[0.9, 0.9], 4, 8).unwrap(), vec![4, 4]);
        assert!(allocate_pruned_per_row(&[0.5], 4, 5).is_err());
    }

    #[test]
    fn outlier_ratio_counts_scores_above_m_times_the_mean() {
        // Scores 1, 1, 1, 9 (mean 3): with m = 2 one of four is an outlier.
        let w = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 9.0]).view([1, 4]);
        let n = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
        assert_eq!(outlier_ratio(&[w.shallow_clone()], &[n.shallow_clone()], 2.0).unwrap(), 0.25);
        assert_eq!(outlier_ratio(&[w], &[n], 4.0).unwrap(), 0.0);
    }
}
