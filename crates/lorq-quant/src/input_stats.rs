//! What the calibration-based quantizers (GPTQ, AWQ) need to know about the inputs reaching one
//! linear layer: the Gram matrix `Σ xᵀx` over every calibration token (GPTQ's Hessian is
//! `2/N · Σ xᵀx`; AWQ's output error of a weight change `ΔW` is `tr(ΔW · Σ xᵀx · ΔWᵀ)`) and the mean
//! absolute activation per input channel (AWQ's `x_mean`).

use candle_core::{DType, Device, Tensor};

use crate::QuantError;

/// Accumulated statistics of the inputs `x` `[rows, k]` of one linear layer.
#[derive(Debug, Clone)]
pub struct InputStats {
    k: usize,
    rows: usize,
    /// `Σ xᵀx`, `[k, k]` row-major, accumulated in f64.
    gram: Vec<f64>,
    /// `Σ |x|` per input channel.
    abs_sum: Vec<f64>,
}

impl InputStats {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            rows: 0,
            gram: vec![0.0; k * k],
            abs_sum: vec![0.0; k],
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Calibration rows (tokens) seen.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds the rows of `x` (`[.., k]`, any float dtype; the product is taken in f32).
    pub fn add(&mut self, x: &Tensor) -> Result<(), QuantError> {
        let k = *x.dims().last().unwrap_or(&0);
        if k != self.k {
            return Err(QuantError::Invalid(format!(
                "calibration input has {k} features, the layer takes {}",
                self.k
            )));
        }
        let x = x
            .reshape(((), k))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let rows = x.dim(0)?;
        if rows == 0 {
            return Ok(());
        }
        let g: Vec<f32> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        if g.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::Invalid(
                "calibration activations are not finite (NaN or infinity)".into(),
            ));
        }
        for (a, b) in self.gram.iter_mut().zip(&g) {
            *a += *b as f64;
        }
        let s: Vec<f32> = x.abs()?.sum(0)?.to_vec1()?;
        for (a, b) in self.abs_sum.iter_mut().zip(&s) {
            *a += *b as f64;
        }
        self.rows += rows;
        Ok(())
    }

    /// `Σ xᵀx`, `[k, k]` row-major.
    pub fn gram(&self) -> &[f64] {
        &self.gram
    }

    /// GPTQ's Hessian `H = 2/N · Σ xᵀx` (`N` = rows seen).
    pub fn hessian(&self) -> Vec<f64> {
        let f = 2.0 / self.rows.max(1) as f64;
        self.gram.iter().map(|v| v * f).collect()
    }

    /// Mean `|x|` per input channel.
    pub fn abs_mean(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.abs_sum.iter().map(|v| (v / n) as f32).collect()
    }

    /// `Σ xᵀx` as an f32 tensor `[k, k]`.
    pub fn gram_tensor(&self) -> Result<Tensor, QuantError> {
        let g: Vec<f32> = self.gram.iter().map(|&v| v as f32).collect();
        Ok(Tensor::from_vec(g, (self.k, self.k), &Device::Cpu)?)
    }

    /// `Σ_x ‖(W − Ŵ) x‖²` over the calibration rows, for `[n, k]` row-major weights: the squared
    /// output error of replacing `w` by `w_hat`, from the Gram matrix.
    pub fn output_error(&self, w: &[f32], w_hat: &[f32]) -> Result<f64, QuantError> {
        output_error_with(&self.gram_tensor()?, w, w_hat, self.k)
    }
}

/// [`InputStats::output_error`] with a Gram tensor already built.
pub fn output_error_with(
    gram: &Tensor,
    w: &[f32],
    w_hat: &[f32],
    k: usize,
) -> Result<f64, QuantError> {
    if w.len() != w_hat.len() || k == 0 || !w.len().is_multiple_of(k) {
        return Err(QuantError::Invalid(format!(
            "output error: weights of {} and {} elements do not form rows of {k}",
            w.len(),
            w_hat.len()
        )));
    }
    let n = w.len() / k;
    let d: Vec<f32> = w.iter().zip(w_hat).map(|(a, b)| a - b).collect();
    let d = Tensor::from_vec(d, (n, k), &Device::Cpu)?;
    let e = (d.matmul(gram)? * &d)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(e.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_abs_mean_and_output_error() {
        let x = Tensor::new(&[[1f32, -2.0], [3.0, 0.5]], &Device::Cpu).unwrap();
        let mut s = InputStats::new(2);
        s.add(&x).unwrap();
        assert_eq!(s.gram(), &[10.0, -0.5, -0.5, 4.25]);
        assert_eq!(s.abs_mean(), vec![2.0, 1.25]);
        assert_eq!(s.hessian()[0], 10.0);
        // ΔW = [[1, 0]]: error = Σ x₀² = 10.
        let e = s.output_error(&[1.0, 0.0], &[0.0, 0.0]).unwrap();
        assert!((e - 10.0).abs() < 1e-5);
        let bad = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(s.add(&bad).unwrap_err().to_string().contains("3 features"));
    }
}
