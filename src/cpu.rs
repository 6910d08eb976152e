//! Element-wise loops over contiguous CPU tensors' own memory. A step bound by memory traffic (RO's
//! RMSprop update, the regional gradients' sum of squares: a few flops per element of tensors far
//! larger than the caches) reads and writes each element once in one Rust loop, where a chain of
//! tensor ops makes one pass over memory per op; the CPU mask selection writes its keep-mask in
//! place. Every caller keeps its tensor-op path for other devices, dtypes and layouts.

use tch::{Kind, Tensor};

/// A Rust element type and the tensor dtype that stores it.
pub trait Element: Copy {
    const KIND: Kind;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
}

impl Element for f64 {
    const KIND: Kind = Kind::Double;
}

impl Element for bool {
    const KIND: Kind = Kind::Bool;
}

/// The elements of `t`, or None unless it is a contiguous CPU tensor of `T`'s dtype.
///
/// # Safety
/// Nothing may write the tensor's storage while the slice lives.
pub unsafe fn elements<T: Element>(t: &Tensor) -> Option<&[T]> {
    // SAFETY: the caller's guarantee; the slice handed back is shared.
    unsafe { elements_mut::<T>(t) }.map(|s| &*s)
}

/// The elements of `t` to write, or None unless it is a contiguous CPU tensor of `T`'s dtype.
///
/// # Safety
/// The slice aliases the tensor's storage for as long as it lives: nothing else may write that
/// storage meanwhile (no tensor op, no other slice), and a storage must not be borrowed mutably
/// twice.
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
    // SAFETY: a contiguous CPU tensor of `len` elements of T starts at data_ptr; the caller
    // guarantees exclusive access.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, len) })
}
