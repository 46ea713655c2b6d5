//! Resampling of position-embedding grids, numerically as PyTorch's `F.interpolate` does it, so a ViT
//! runs at any resolution exactly like its reference.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Which `F.interpolate` call the reference makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PosInterp {
    /// `mode="bicubic", align_corners=False` with an output size (HF CLIP, SigLIP, ViT).
    Bicubic,
    /// `mode="bicubic", antialias=True` (timm `resample_abs_pos_embed`).
    BicubicAntialias,
}

/// Keys' cubic convolution kernel with parameter `a` (PyTorch: a=-0.75; antialias and PIL: a=-0.5).
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// For each output index, (first input index, weights) — input indices already clamped by
/// repeating weights at the borders as PyTorch's `upsample_bicubic2d` does.
type Taps = Vec<Vec<(usize, f64)>>;

// Reference: https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/UpSample.h#L450
// (area_pixel_compute_source_index with cubic=true; get_cubic_upsample_coefficients, A=-0.75)
fn taps_bicubic(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let real = scale * (o as f64 + 0.5) - 0.5;
            let base = real.floor();
            let t = real - base;
            let w = [
                cubic(t + 1.0, -0.75),
                cubic(t, -0.75),
                cubic(1.0 - t, -0.75),
                cubic(2.0 - t, -0.75),
            ];
            (0..4)
                .map(|k| {
                    let idx = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                    (idx, w[k])
                })
                .collect()
        })
        .collect()
}

// Reference: https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/cpu/UpSampleKernel.cpp#L1500
// (HelperInterpCubic::aa_filter with a=-0.5 and _compute_indices_weights_aa, the PIL algorithm)
fn taps_antialias(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|j| cubic((j as f64 - center + 0.5) * invscale, -0.5))
                .collect();
            let total: f64 = w.iter().sum();
            (xmin..xmax)
                .zip(w)
                .map(|(j, w)| (j, if total != 0.0 { w / total } else { 0.0 }))
                .collect()
        })
        .collect()
}

/// Resamples `grid` [C, H, W] (row-major in `data`) to [C, out_h, out_w].
fn resample(
    data: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    mode: PosInterp,
) -> Vec<f32> {
    let (th, tw) = match mode {
        PosInterp::Bicubic => (taps_bicubic(h, out_h), taps_bicubic(w, out_w)),
        PosInterp::BicubicAntialias => (taps_antialias(h, out_h), taps_antialias(w, out_w)),
    };
    let mut out = vec![0f32; c * out_h * out_w];
    for ch in 0..c {
        let src = &data[ch * h * w..(ch + 1) * h * w];
        for (oy, ty) in th.iter().enumerate() {
            for (ox, tx) in tw.iter().enumerate() {
                let mut acc = 0f64;
                for &(iy, wy) in ty {
                    let mut row = 0f64;
                    for &(ix, wx) in tx {
                        row += wx * src[iy * w + ix] as f64;
                    }
                    acc += wy * row;
                }
                out[(ch * out_h + oy) * out_w + ox] = acc as f32;
            }
        }
    }
    out
}

/// Resamples patch position embeddings `pos` [N, D] laid out as a `grid` (h, w) to `new_grid`.
/// Returns [new_h * new_w, D]. Identity when the grids are equal.
pub fn resample_pos_embed(
    pos: &Tensor,
    grid: (usize, usize),
    new_grid: (usize, usize),
    mode: PosInterp,
) -> Result<Tensor> {
    if grid == new_grid {
        return Ok(pos.clone());
    }
    let (n, d) = pos.dims2()?;
    debug_assert_eq!(n, grid.0 * grid.1);
    let dtype = pos.dtype();
    // [N, D] -> [D, H, W]
    let data: Vec<f32> = pos
        .to_dtype(candle_core::DType::F32)?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1()?;
    let out = resample(&data, d, grid.0, grid.1, new_grid.0, new_grid.1, mode);
    let t = Tensor::from_vec(out, (d, new_grid.0 * new_grid.1), &Device::Cpu)?;
    Ok(t.t()?
        .contiguous()?
        .to_device(pos.device())?
        .to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_bicubic_is_identity() {
        let data: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32).sin()).collect();
        let out = resample(&data, 2, 3, 4, 3, 4, PosInterp::Bicubic);
        for (a, b) in data.iter().zip(&out) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn antialias_weights_sum_to_one() {
        for (i, o) in [(7, 3), (3, 7), (16, 5), (5, 16)] {
            for taps in taps_antialias(i, o) {
                let s: f64 = taps.iter().map(|t| t.1).sum();
                assert!((s - 1.0).abs() < 1e-12, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn constant_grid_stays_constant() {
        let data = vec![2.5f32; 5 * 5];
        for mode in [PosInterp::Bicubic, PosInterp::BicubicAntialias] {
            for v in resample(&data, 1, 5, 5, 8, 3, mode) {
                assert!((v - 2.5).abs() < 1e-5, "{mode:?}: {v}");
            }
        }
    }
}
