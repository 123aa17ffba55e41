//! Dense matrix multiply on CPU through the `gemm` crate (blocked, SIMD, optional rayon threads).
//!
//! C[m,n] = beta·C + Σ_k op(A)[m,k]·op(B)[k,n], all row-major with explicit leading dimensions;
//! a transpose is only a swap of strides, never a copy.

use super::float::Float;

/// Operand description: a row-major matrix with leading dimension `ld`, optionally transposed.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub trans: bool,
}

/// Above this many multiply-adds a GEMM is split over rayon threads.
const PARALLEL_MIN_FLOPS: usize = 1 << 21;

/// `c[m,n] = (if accumulate { c } else { 0 }) + op(a)[m,k] · op(b)[k,n]`.
///
/// `a` is `[m,k]` (or `[k,m]` when `a.trans`), `b` is `[k,n]` (or `[n,k]` when `b.trans`),
/// `c` is `[m,n]` with leading dimension `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].iter_mut().for_each(|v| *v = T::zero());
            }
        }
        return;
    }
    check_operands(m, n, k, &a, &b);
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: dst too short");
    // SAFETY: `c` covers every element written (asserted above).
    unsafe { gemm_raw(m, n, k, a, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// Bounds: the last element each operand touches must be in range (gemm takes raw pointers).
/// Needs m, n, k > 0.
fn check_operands<T>(m: usize, n: usize, k: usize, a: &Mat<'_, T>, b: &Mat<'_, T>) {
    let (a_rows, a_cols) = if a.trans { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if b.trans { (n, k) } else { (k, n) };
    assert!(a.data.len() >= (a_rows - 1) * a.ld + a_cols, "gemm: lhs too short");
    assert!(b.data.len() >= (b_rows - 1) * b.ld + b_cols, "gemm: rhs too short");
}

/// The GEMM behind [`matmul`], writing through a raw destination pointer.
///
/// # Safety
/// `c` must be valid for writes of rows `0..m` × columns `0..n` with leading dimension `ldc`, and for
/// reads of them when `accumulate`; the operands must cover their extents (checked by the callers).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Float>(m: usize, n: usize, k: usize, a: Mat<'_, T>, b: Mat<'_, T>, c: *mut T, ldc: usize, accumulate: bool) {
    let (a_rs, a_cs) = if a.trans { (1, a.ld as isize) } else { (a.ld as isize, 1) };
    let (b_rs, b_cs) = if b.trans { (1, b.ld as isize) } else { (b.ld as isize, 1) };
    let par = if m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the callers' checks bound every index gemm reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// `op(a)[m,k] · op(b)[k,n]` into a new `[m,n]` vector, without zero-filling it first (GEMM
/// overwrites every element; zero-filling large outputs cost a page-clearing pass per step).
pub fn matmul_new<T: Float>(m: usize, n: usize, k: usize, a: Mat<'_, T>, b: Mat<'_, T>) -> Vec<T> {
    if k == 0 || m == 0 || n == 0 {
        return vec![T::zero(); m * n];
    }
    check_operands(m, n, k, &a, &b);
    let mut c: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the capacity covers m·n elements; with accumulate = false gemm never reads the
    // destination and writes all m·n elements, so the vector is initialised before set_len.
    unsafe {
        gemm_raw(m, n, k, a, b, c.as_mut_ptr(), n, false);
        c.set_len(m * n);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: bool, b: &[f64], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += av * bv;
                }
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let lda = if ta { m } else { k };
                let ldb = if tb { k } else { n };
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, Mat { data: &a, ld: lda, trans: ta }, Mat { data: &b, ld: ldb, trans: tb }, &mut c, n, false);
                let want = naive(m, n, k, &a, ta, &b, tb);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "ta={ta} tb={tb}: {x} vs {y}");
                }
                let mut c2 = want.clone();
                matmul(m, n, k, Mat { data: &a, ld: lda, trans: ta }, Mat { data: &b, ld: ldb, trans: tb }, &mut c2, n, true);
                for (x, y) in c2.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 1e-12);
                }
            }
        }
    }
}
