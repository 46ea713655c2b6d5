//! LayerNorm over the rows of a matrix: mean, then the variance of the centred values (two passes,
//! as PyTorch computes it), then `(x - mean) / sqrt(var + eps) * gamma + beta`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::dispatch::multiversion;
use crate::math::Lanes;

/// `x.len() / dim` rows per parallel task at most this many elements.
const CHUNK: usize = 32 * 1024;

#[inline(always)]
fn sum<L: Lanes>(row: &[f32], f: impl Fn(L) -> L, tail: impl Fn(f32) -> f32) -> f32 {
    let mut acc = L::splat(0.0);
    let mut c = row.chunks_exact(L::N);
    for v in &mut c {
        // SAFETY: the chunk holds exactly N values.
        acc = acc.add(f(unsafe { L::load(v.as_ptr()) }));
    }
    acc.reduce_sum() + c.remainder().iter().map(|&x| tail(x)).sum::<f32>()
}

multiversion! {
    fn norm_rows<L>(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let dim = gamma.len();
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mean = sum::<L>(row, |v| v, |v| v) / dim as f32;
            let (ml, m) = (L::splat(mean), mean);
            let var = sum::<L>(row, |v| v.sub(ml).mul(v.sub(ml)), |v| (v - m) * (v - m)) / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            let rl = L::splat(rstd);
            let mut i = 0;
            while i + L::N <= dim {
                // SAFETY: i + N <= dim, the length of row, o, gamma and beta.
                unsafe {
                    let v = L::load(row.as_ptr().add(i)).sub(ml).mul(rl);
                    let y = v.mul_add(L::load(gamma.as_ptr().add(i)), L::load(beta.as_ptr().add(i)));
                    y.store(o.as_mut_ptr().add(i).cast());
                }
                i += L::N;
            }
            for j in i..dim {
                o[j].write((row[j] - m) * rstd * gamma[j] + beta[j]);
            }
        }
    }
}

/// LayerNorm of each row of `x` (rows of `gamma.len()` values) into `out`.
///
/// # Panics
/// If `gamma` is empty, `beta` differs in length from `gamma`, or `x` and `out` are not both a
/// whole number of rows of that length (callers check shapes first).
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    layer_norm_uninit(x, gamma, beta, eps, crate::panel::as_uninit(out));
}

/// [`layer_norm`] into memory not yet initialised (a `Vec`'s spare capacity): every value of `out`
/// is written, so a new output is not zero-filled first.
pub fn layer_norm_uninit(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) {
    let dim = gamma.len();
    assert!(
        dim > 0 && beta.len() == dim && x.len() == out.len() && x.len().is_multiple_of(dim),
        "layer_norm: x {} / out {} values, gamma {}, beta {}",
        x.len(),
        out.len(),
        dim,
        beta.len()
    );
    let rows = (CHUNK / dim).max(1) * dim;
    x.par_chunks(rows)
        .zip(out.par_chunks_mut(rows))
        .for_each(|(x, o)| norm_rows(x, gamma, beta, eps, o));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::tests::uniform;

    /// Tolerance against the f64 reference, relative to the output scale.
    const TOL: f64 = 2e-5;

    #[test]
    fn layer_norm_matches_f64() {
        // Widths: 1 (output = beta), a tail, 768, and enough rows for several tasks.
        for (rows, dim) in [(3usize, 1usize), (5, 37), (2, 768), (300, 768)] {
            // An offset mean, as residual streams have.
            let x: Vec<f32> = uniform(1, rows * dim, -3.0, 5.0);
            let g = uniform(2, dim, 0.5, 1.5);
            let b = uniform(3, dim, -1.0, 1.0);
            let mut out = vec![0.0; rows * dim];
            layer_norm(&x, &g, &b, 1e-5, &mut out);
            for r in 0..rows {
                let row: Vec<f64> = x[r * dim..(r + 1) * dim]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let mean = row.iter().sum::<f64>() / dim as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
                for j in 0..dim {
                    let want = (row[j] - mean) / (var + 1e-5).sqrt() * g[j] as f64 + b[j] as f64;
                    let got = out[r * dim + j] as f64;
                    assert!(
                        (got - want).abs() <= TOL * (1.0 + want.abs()),
                        "row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
