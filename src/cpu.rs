//! Element-wise loops over contiguous CPU tensors' own memory. A step bound by memory traffic (RO's
//! RMSprop update, the regional gradients' sum of squares: a few flops per element of tensors far
//! larger than the caches) reads and writes each element once in one Rust loop, where a chain of
//! tensor ops makes one pass over memory per op; the CPU mask selection writes its keep-mask in
//! place. Every caller keeps its tensor-op path for other devices, dtypes and layouts.

use tch::{Kind, Tensor};

/// A Rust element type and the tensor dtype that stores it.
///
/// # Safety
/// `KIND` stores each element in exactly `T`'s size and representation.
pub unsafe trait Element: Copy {
    const KIND: Kind;
}

// SAFETY: torch's float32, float64 and bool are IEEE binary32, binary64 and one byte.
unsafe impl Element for f32 {
    const KIND: Kind = Kind::Float;
}

unsafe impl Element for f64 {
    const KIND: Kind = Kind::Double;
}

unsafe impl Element for bool {
    const KIND: Kind = Kind::Bool;
}

/// The elements of `t`, or None unless it is a contiguous CPU tensor of `T`'s dtype, aligned for `T`.
///
/// # Safety
/// Every element must be a valid `T` (a bool tensor's bytes 0 or 1: not one from `torch.empty`
/// or a reinterpreted byte tensor), and nothing may write the tensor's storage while the slice
/// lives.
pub unsafe fn elements<T: Element>(t: &Tensor) -> Option<&[T]> {
    // SAFETY: the caller's guarantee; the slice handed back is shared.
    unsafe { elements_mut::<T>(t) }.map(|s| &*s)
}

/// The elements of `t` to write, or None unless it is a contiguous CPU tensor of `T`'s dtype,
/// aligned for `T`.
///
/// # Safety
/// Every element must be a valid `T` (see `elements`). The slice aliases the tensor's storage for
/// as long as it lives: nothing else may write that storage meanwhile (no tensor op, no other
/// slice), and a storage must not be borrowed mutably twice.
// A tch Tensor is a shared handle on its storage (in-place ops take &self too): writing through
// one is the storage's mutability, which the caller vouches for, not the handle's.
#[allow(clippy::mut_from_ref)]
pub unsafe fn elements_mut<T: Element>(t: &Tensor) -> Option<&mut [T]> {
    // Sparse tensors have no strided memory (tch panics on their layout queries).
    if t.is_sparse() || t.device() != tch::Device::Cpu || t.kind() != T::KIND || !t.is_contiguous() {
        return None;
    }
    let len = t.numel();
    if len == 0 {
        return Some(&mut []);
    }
    let data = t.data_ptr() as *mut T;
    // A tensor over a foreign buffer (torch.frombuffer with an offset, say) may be misaligned.
    if !data.is_aligned() {
        return None;
    }
    // SAFETY: a contiguous CPU tensor of `len` elements of T starts at data_ptr, aligned; the
    // caller guarantees valid elements and exclusive access.
    Some(unsafe { std::slice::from_raw_parts_mut(data, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_contiguous_aligned_cpu_tensors_of_the_dtype_give_a_slice() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        // SAFETY: nothing writes these tensors while the slices live.
        unsafe {
            assert_eq!(elements::<f32>(&t), Some(&[1.0f32, 2.0, 3.0, 4.0][..]));
            assert!(elements::<f64>(&t).is_none(), "another dtype");
            assert!(elements::<f32>(&t.tr()).is_none(), "not contiguous");
            assert_eq!(elements::<f32>(&t.narrow(0, 1, 1)), Some(&[3.0f32, 4.0][..]), "a storage offset counts");
        }
        // Four floats one byte into a buffer, as torch.frombuffer(..., offset=1) makes them.
        let bytes = [0u8; 4 * 4 + 8];
        let base = bytes.as_ptr().wrapping_add(bytes.as_ptr().align_offset(4) + 1);
        // SAFETY: 16 initialised bytes from `base` inside `bytes`, which outlives the tensor.
        let misaligned = unsafe { Tensor::from_blob(base, &[4], &[], Kind::Float, tch::Device::Cpu) };
        // SAFETY: as above.
        assert!(unsafe { elements::<f32>(&misaligned) }.is_none(), "misaligned");
    }
}
