//! Softmax over rows, numerically stable (subtract the row maximum), with the vectorised `exp`. The
//! row pieces are shared with the fused attention kernel.

use rayon::prelude::*;

use crate::dispatch::multiversion;
use crate::math::Lanes;

/// `row[j] = row[j] * scale + bias[j]` (bias optional) and returns the row maximum.
#[inline(always)]
pub(crate) fn scale_bias_max<L: Lanes>(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
    let n = row.len();
    let sl = L::splat(scale);
    let mut mx = L::splat(f32::NEG_INFINITY);
    let mut tail = f32::NEG_INFINITY;
    let mut i = 0;
    let p = row.as_mut_ptr();
    // SAFETY: every access is below n, the length of row and (checked) of bias.
    unsafe {
        match bias {
            Some(b) => {
                assert_eq!(b.len(), n);
                while i + L::N <= n {
                    let v = L::load(p.add(i)).mul_add(sl, L::load(b.as_ptr().add(i)));
                    v.store(p.add(i));
                    mx = mx.max(v);
                    i += L::N;
                }
                for (x, &bj) in row[i..].iter_mut().zip(&b[i..]) {
                    *x = *x * scale + bj;
                    tail = tail.max(*x);
                }
            }
            None => {
                while i + L::N <= n {
                    let v = L::load(p.add(i)).mul(sl);
                    v.store(p.add(i));
                    mx = mx.max(v);
                    i += L::N;
                }
                for j in i..n {
                    *p.add(j) *= scale;
                    tail = tail.max(*p.add(j));
                }
            }
        }
    }
    mx.reduce_max().max(tail)
}

/// `row[j] = exp(row[j] - max)` and returns the sum. A `max` of -inf (every value masked) gives zeros.
#[inline(always)]
pub(crate) fn exp_sub_sum<L: Lanes>(row: &mut [f32], max: f32) -> f32 {
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 0.0;
    }
    let ml = L::splat(max);
    let mut acc = L::splat(0.0);
    let mut c = row.chunks_exact_mut(L::N);
    for v in &mut c {
        // SAFETY: the chunk holds exactly N values.
        unsafe {
            let e = L::load(v.as_ptr()).sub(ml).exp();
            e.store(v.as_mut_ptr());
            acc = acc.add(e);
        }
    }
    // The tail through the vector `exp` too, padded with -inf (exp gives 0 there): a row of 197
    // keys has 5 left over, and libm's `expf` took 14 % of the attention's softmax.
    let tail = c.into_remainder();
    if !tail.is_empty() {
        const { assert!(L::N <= 16) };
        let mut pad = [f32::NEG_INFINITY; 16];
        pad[..tail.len()].copy_from_slice(tail);
        // SAFETY: `pad` holds 16 >= N values.
        unsafe {
            let e = L::load(pad.as_ptr()).sub(ml).exp();
            e.store(pad.as_mut_ptr());
            acc = acc.add(e);
        }
        tail.copy_from_slice(&pad[..tail.len()]);
    }
    acc.reduce_sum()
}

/// `row[j] *= s`.
#[inline(always)]
pub(crate) fn scale_row<L: Lanes>(row: &mut [f32], s: f32) {
    let sl = L::splat(s);
    crate::math::map_inplace::<L>(row, |v| v.mul(sl), |v| v * s);
}

multiversion! {
    fn softmax_serial<L>(xs: &mut [f32], len: usize) {
        for row in xs.chunks_exact_mut(len) {
            let max = scale_bias_max::<L>(row, 1.0, None);
            let sum = exp_sub_sum::<L>(row, max);
            if sum > 0.0 {
                scale_row::<L>(row, 1.0 / sum);
            }
        }
    }
}

/// Softmax of each row of `len` values of `xs`, in place. A row that is entirely -inf becomes zeros
/// (PyTorch gives NaN there; zeros are what a fully masked attention row contributes).
///
/// # Panics
/// If `len` is 0 or does not divide `xs.len()`.
pub fn softmax_rows_inplace(xs: &mut [f32], len: usize) {
    assert!(
        len > 0 && xs.len().is_multiple_of(len),
        "softmax: {} values in rows of {len}",
        xs.len()
    );
    let rows = (16 * 1024 / len).max(1) * len;
    xs.par_chunks_mut(rows).for_each(|c| softmax_serial(c, len));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::tests::uniform;

    /// Absolute tolerance on probabilities.
    const ATOL: f64 = 1e-6;

    #[test]
    fn softmax_matches_f64() {
        for (rows, len) in [(4usize, 1usize), (3, 37), (7, 197), (100, 1000)] {
            let mut xs = uniform(len as u64, rows * len, -20.0, 20.0);
            if len > 2 {
                xs[1] = f32::NEG_INFINITY; // a masked entry
            }
            // A fully masked row.
            xs[(rows - 1) * len..].fill(f32::NEG_INFINITY);
            let orig = xs.clone();
            softmax_rows_inplace(&mut xs, len);
            for r in 0..rows {
                let row = &orig[r * len..(r + 1) * len];
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                for j in 0..len {
                    let want = if max == f64::NEG_INFINITY {
                        0.0
                    } else {
                        (row[j] as f64 - max).exp() / sum
                    };
                    let got = xs[r * len + j] as f64;
                    assert!(
                        (got - want).abs() <= ATOL,
                        "row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
