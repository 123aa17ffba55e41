//! Small dense linear algebra on the host, in f64: what adapter initialisation needs (OLoRA's QR).

/// Reduced QR of a row-major `m × n` matrix by Householder reflections, as LAPACK's `geqrf`
/// computes it (so `R`'s diagonal signs match `torch.linalg.qr`): returns `Q` (`m × k`, orthonormal
/// columns) and `R` (`k × n`, upper triangular), `k = min(m, n)`, with `A = Q·R`.
pub fn qr(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), m * n, "qr: {} values for a {m}×{n} matrix", a.len());
    let k = m.min(n);
    let mut r = a.to_vec();
    let mut vs: Vec<(Vec<f64>, f64)> = Vec::with_capacity(k);
    for j in 0..k {
        // v = x + sign(x₀)‖x‖e₁ reflects column j below the diagonal onto −sign(x₀)‖x‖e₁.
        let norm = (j..m).map(|i| r[i * n + j] * r[i * n + j]).sum::<f64>().sqrt();
        let mut v: Vec<f64> = (j..m).map(|i| r[i * n + j]).collect();
        let x0 = v[0];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vn2: f64 = v.iter().map(|x| x * x).sum();
        let tau = if vn2 == 0.0 { 0.0 } else { 2.0 / vn2 };
        for c in j..n {
            let dot: f64 = (j..m).map(|i| v[i - j] * r[i * n + c]).sum();
            for i in j..m {
                r[i * n + c] -= tau * v[i - j] * dot;
            }
        }
        vs.push((v, tau));
    }
    // Q = H₀ H₁ … H_{k−1} applied to the first k columns of the identity.
    let mut q = vec![0.0; m * k];
    for i in 0..k {
        q[i * k + i] = 1.0;
    }
    for j in (0..k).rev() {
        let (v, tau) = &vs[j];
        for c in 0..k {
            let dot: f64 = (j..m).map(|i| v[i - j] * q[i * k + c]).sum();
            for i in j..m {
                q[i * k + c] -= tau * v[i - j] * dot;
            }
        }
    }
    let mut rr = vec![0.0; k * n];
    for i in 0..k {
        for c in i..n {
            rr[i * n + c] = r[i * n + c];
        }
    }
    (q, rr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_reconstructs_with_orthonormal_q_and_lapack_signs() {
        for (m, n) in [(5, 3), (3, 5), (4, 4)] {
            let a: Vec<f64> = crate::autograd::gradcheck::test_values(m * n, 7);
            let (q, r) = qr(&a, m, n);
            let k = m.min(n);
            for i in 0..m {
                for c in 0..n {
                    let v: f64 = (0..k).map(|t| q[i * k + t] * r[t * n + c]).sum();
                    assert!((v - a[i * n + c]).abs() < 1e-12, "A ≠ QR at ({i},{c})");
                }
            }
            for x in 0..k {
                for y in 0..k {
                    let d: f64 = (0..m).map(|i| q[i * k + x] * q[i * k + y]).sum();
                    assert!((d - if x == y { 1.0 } else { 0.0 }).abs() < 1e-12);
                }
                for y in 0..x.min(n) {
                    assert_eq!(r[x * n + y], 0.0);
                }
            }
            // LAPACK's convention: R[0,0] = −sign(a₀₀)‖a[:,0]‖.
            let c0 = (0..m).map(|i| a[i * n] * a[i * n]).sum::<f64>().sqrt();
            assert!((r[0] + a[0].signum() * c0).abs() < 1e-12);
        }
    }
}
