//! The dense linear algebra GPTQ needs, in f64: Cholesky factorization and the upper Cholesky
//! factor of a symmetric positive definite matrix's inverse (`torch.linalg.cholesky`,
//! `cholesky_inverse`, `cholesky(upper=True)` in the reference implementation).

use rayon::prelude::*;

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..4 {
            acc[t] += x[t] * y[t];
        }
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Lower Cholesky factor `L` (`L·Lᵀ = A`) of the symmetric `a` `[k, k]` (row-major; only the lower
/// triangle is read), in place; the upper triangle is zeroed. `Err(i)` names the first pivot that
/// is not positive (the matrix is not positive definite).
pub(crate) fn cholesky_lower(a: &mut [f64], k: usize) -> Result<(), usize> {
    for i in 0..k {
        let (done, rest) = a.split_at_mut(i * k);
        let row_i = &mut rest[..k];
        for j in 0..i {
            let row_j = &done[j * k..j * k + j + 1];
            let s = dot(&row_i[..j], &row_j[..j]);
            row_i[j] = (row_i[j] - s) / row_j[j];
        }
        let d = row_i[i] - dot(&row_i[..i], &row_i[..i]);
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return Err(i);
        }
        row_i[i] = d.sqrt();
        row_i[i + 1..].fill(0.0);
    }
    Ok(())
}

/// The upper Cholesky factor `U` of `A⁻¹` (`Uᵀ·U = A⁻¹`) for symmetric positive definite `a`
/// `[k, k]`. `Err(i)` as [`cholesky_lower`] (for `A`, or for `A⁻¹` when rounding breaks it).
pub(crate) fn inverse_cholesky_upper(a: &[f64], k: usize) -> Result<Vec<f64>, usize> {
    let mut l = a.to_vec();
    cholesky_lower(&mut l, k)?;
    // Columns of C = L⁻¹ (lower triangular), stored as the rows of Cᵀ: ct[j][i] = C[i][j], i ≥ j.
    let mut ct = vec![0f64; k * k];
    ct.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(j, col)| {
            col[j] = 1.0 / l[j * k + j];
            for i in j + 1..k {
                let row = &l[i * k..i * k + i];
                col[i] = -dot(&row[j..i], &col[j..i]) / l[i * k + i];
            }
        });
    // A⁻¹ = Cᵀ·C: A⁻¹[a][b] = Σ_{m ≥ max(a,b)} C[m][a]·C[m][b]; the lower triangle is enough.
    let mut inv = vec![0f64; k * k];
    inv.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(a_, row)| {
            let ca = &ct[a_ * k..(a_ + 1) * k];
            for b in 0..=a_ {
                row[b] = dot(&ca[a_..], &ct[b * k + a_..(b + 1) * k]);
            }
        });
    cholesky_lower(&mut inv, k)?;
    // U = Lᵀ.
    let mut u = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            u[j * k + i] = inv[i * k + j];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], k: usize) -> Vec<f64> {
        let mut c = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                c[i * k + j] = (0..k).map(|m| a[i * k + m] * b[m * k + j]).sum();
            }
        }
        c
    }

    #[test]
    fn upper_factor_of_inverse() {
        let k = 7;
        // A = BᵀB + I, symmetric positive definite.
        let b: Vec<f64> = (0..k * k)
            .map(|i| ((i * 31 % 17) as f64 - 8.0) / 5.0)
            .collect();
        let mut bt = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                bt[j * k + i] = b[i * k + j];
            }
        }
        let mut a = matmul(&bt, &b, k);
        for i in 0..k {
            a[i * k + i] += 1.0;
        }
        let u = inverse_cholesky_upper(&a, k).unwrap();
        let mut ut = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                ut[j * k + i] = u[i * k + j];
                if j < i {
                    assert_eq!(u[i * k + j], 0.0, "U is upper triangular");
                }
            }
        }
        // A · (Uᵀ U) = I.
        let id = matmul(&a, &matmul(&ut, &u, k), k);
        for i in 0..k {
            for j in 0..k {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (id[i * k + j] - want).abs() < 1e-9,
                    "{i} {j} {}",
                    id[i * k + j]
                );
            }
        }
        // Not positive definite.
        let mut bad = vec![0.0; 4];
        bad[0] = 1.0;
        bad[3] = -1.0;
        assert_eq!(cholesky_lower(&mut bad, 2), Err(1));
    }
}
