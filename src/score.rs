//! Pruning scores. All are float32 [out, in] on the weight's device; a higher score is kept.

use crate::error::Result;
use crate::tensor_check::{require_float, require_rank, require_same_device, require_shape, weight_dims};
use tch::{Kind, Tensor};

/// |W|: the magnitude baseline.
pub fn magnitude_score(weight: &Tensor) -> Result<Tensor> {
    weight_dims(weight, "weight")?;
    Ok(weight.f_to_kind(Kind::Float)?.f_abs()?)
}

fn check_act_norm(weight: &Tensor, act_norm: &Tensor, cols: i64) -> Result<()> {
    require_rank(act_norm, "act_norm", 1)?;
    require_float(act_norm, "act_norm")?;
    require_shape(act_norm, "act_norm", &[cols], "one entry per input feature of weight")?;
    require_same_device(act_norm, "act_norm", weight, "weight")
}

/// Wanda: |W_ij| * ||X_j||.
pub fn wanda_score(weight: &Tensor, act_norm: &Tensor) -> Result<Tensor> {
    let (_, cols) = weight_dims(weight, "weight")?;
    check_act_norm(weight, act_norm, cols)?;
    let norm = act_norm.f_to_kind(Kind::Float)?.f_unsqueeze(0)?;
    Ok(magnitude_score(weight)?.f_mul(&norm)?)
}

/// RGS: (alpha * G_ij + ||X_j||) * |W_ij|.
pub fn rgs_score(weight: &Tensor, grad_rms: &Tensor, act_norm: &Tensor, alpha: f64) -> Result<Tensor> {
    let (rows, cols) = weight_dims(weight, "weight")?;
    check_act_norm(weight, act_norm, cols)?;
    require_float(grad_rms, "grad_rms")?;
    require_shape(grad_rms, "grad_rms", &[rows, cols], "the shape of weight")?;
    require_same_device(grad_rms, "grad_rms", weight, "weight")?;
    let norm = act_norm.f_to_kind(Kind::Float)?.f_unsqueeze(0)?;
    let region = grad_rms.f_to_kind(Kind::Float)?.f_mul_scalar(alpha)?.f_add(&norm)?;
    Ok(region.f_mul(&magnitude_score(weight)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgs_reduces_to_wanda_at_alpha_zero() {
        let w = Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu));
        let g = Tensor::rand([4, 8], (Kind::Float, tch::Device::Cpu));
        let a = Tensor::rand([8], (Kind::Float, tch::Device::Cpu));
        let diff = rgs_score(&w, &g, &a, 0.0).unwrap() - wanda_score(&w, &a).unwrap();
        assert_eq!(f64::try_from(diff.abs().max()).unwrap(), 0.0);
    }
}
