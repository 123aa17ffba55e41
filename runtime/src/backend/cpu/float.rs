//! The element types CPU kernels are written over: f32 for work, f64 for gradient checks.

/// A float the CPU kernels compute in. Implemented for `f32` and `f64`.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + 'static
{
    /// Converts from f64 (exact for f64, rounded for f32).
    fn of(v: f64) -> Self;
    /// Widens to f64.
    fn f64(self) -> f64;
}

impl Float for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}
