//! Argument checks shared by every kernel, so that each failure reads the same way.

use crate::error::{Error, Result};
use tch::{Kind, Tensor};

pub fn require_rank(t: &Tensor, arg: &'static str, expected: usize) -> Result<()> {
    if t.dim() != expected {
        return Err(Error::Rank { arg, expected, got: t.size() });
    }
    Ok(())
}

pub fn require_float(t: &Tensor, arg: &'static str) -> Result<()> {
    match t.f_kind()? {
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double => Ok(()),
        other => Err(Error::Dtype {
            arg,
            got: format!("{other:?}"),
            expected: "a floating dtype (float32, float16 or bfloat16)",
        }),
    }
}

pub fn require_bool(t: &Tensor, arg: &'static str) -> Result<()> {
    match t.f_kind()? {
        Kind::Bool => Ok(()),
        other => Err(Error::Dtype { arg, got: format!("{other:?}"), expected: "bool (True = keep)" }),
    }
}

pub fn require_same_device(
    t: &Tensor,
    arg: &'static str,
    reference: &Tensor,
    other: &'static str,
) -> Result<()> {
    if t.device() != reference.device() {
        return Err(Error::Device {
            arg,
            got: format!("{:?}", t.device()),
            other,
            expected: format!("{:?}", reference.device()),
        });
    }
    Ok(())
}

pub fn require_shape(t: &Tensor, arg: &'static str, expected: &[i64], what: &str) -> Result<()> {
    if t.size() != expected {
        return Err(Error::Shape { arg, got: t.size(), expected: format!("{expected:?} ({what})") });
    }
    Ok(())
}

pub fn require_finite(t: &Tensor, arg: &'static str) -> Result<()> {
    if !bool::try_from(t.f_isfinite()?.f_all()?)? {
        return Err(Error::NonFinite { arg, what: "NaN or infinity" });
    }
    Ok(())
}

/// A 2-D float weight and its row/column counts.
pub fn weight_dims(w: &Tensor, arg: &'static str) -> Result<(i64, i64)> {
    require_rank(w, arg, 2)?;
    require_float(w, arg)?;
    let s = w.size();
    Ok((s[0], s[1]))
}
