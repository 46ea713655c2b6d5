//! Kernel micro-benchmarks, as visenc calls them (GEMM, convolution, attention), against the
//! measured FMA peak, and per-op breakdowns of one ViT-B/16 block and of ResNet-50's convolutions.

use std::io::Write;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::peak::{bf16_peak, peak_report};
use super::{randn, BenchArgs, Plan, Stats};
use visenc::models::kernels::conv::winograd::WinogradTile;
use visenc::models::linear::Linear;

/// visenc's linear layer in `precision` (weights packed once, as at load), the layer every visenc
/// model uses.
fn layer(w: &Tensor, b: Option<&Tensor>, precision: visenc::Precision) -> Result<Linear> {
    Ok(Linear::with_precision(w.clone(), b.cloned(), precision)?)
}

/// `candle_nn::ops::softmax_last_dim`, reached through visenc's own API (CLIP scoring calls it).
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(visenc::Scoring::Softmax { logit_scale: 0.0 }.probabilities(x)?)
}

/// visenc's CPU convolution as the CNN trunks run it (`visenc_kernels::conv`): an NHWC batch of
/// `cin` x `hw` x `hw` maps, the weight packed once as at load (dense 3x3 stride 1: Winograd;
/// other dense ones: im2col blocks + the packed f32 GEMM; depthwise when `groups == cin`: the NHWC
/// depthwise kernel), the bias fused. Returns the call to time (it hands back the output's first
/// value, so nothing is optimised away).
fn nhwc_conv(
    (cin, cout, k, stride, groups): (usize, usize, usize, usize, usize),
    hw: usize,
    seed: u64,
) -> Result<impl FnMut() -> Result<Tensor>> {
    use visenc::models::kernels::conv::nhwc::{dense, depthwise, DepthwiseWeight};
    use visenc::models::kernels::conv::winograd::{winograd, WinogradWeight};
    use visenc::models::kernels::conv::{ConvShape, Epilogue, Pad};
    use visenc::models::kernels::gemm::PackedWeight;
    let dw = groups > 1;
    anyhow::ensure!(
        !dw || (groups == cin && cin == cout),
        "groups other than depthwise"
    );
    let s = ConvShape {
        batch: 8,
        cin,
        h: hw,
        w: hw,
        cout,
        kh: k,
        kw: k,
        stride,
        pad: Pad::same(k / 2),
        depthwise: dw,
    };
    let (oh, ow) = s.out_hw();
    let x = randn(seed, 8 * hw * hw * cin);
    let w = randn(seed + 1, cout * (cin / groups) * k * k);
    let bias = randn(seed + 2, cout);
    // Random weights: their layout (dense [cout, kh, kw, cin], Winograd [cout, cin, 3, 3]) does
    // not matter for timing.
    enum Weight {
        Dense(PackedWeight),
        Winograd(WinogradWeight),
        Depthwise(DepthwiseWeight),
    }
    let f32 = visenc::Precision::F32;
    let weight = if dw {
        Weight::Depthwise(DepthwiseWeight::pack(&w, cin, k * k))
    } else if let Some(tile) = WinogradTile::for_conv(k, stride, cin, cout, f32) {
        Weight::Winograd(WinogradWeight::pack(&w, cout, cin, tile, f32))
    } else {
        Weight::Dense(PackedWeight::pack(&w, cout, k * k * cin, f32))
    };
    let mut out = vec![0f32; 8 * oh * ow * cout];
    Ok(move || {
        let e = Epilogue {
            bias: Some(&bias),
            ..Epilogue::default()
        };
        match &weight {
            Weight::Dense(p) => dense(&x, &s, p, e, &mut out),
            Weight::Winograd(p) => winograd(&x, &s, p, e, &mut out),
            Weight::Depthwise(d) => depthwise(&x, d, &s, e, &mut out),
        }
        Ok(Tensor::from_slice(&out[..1], 1, &Device::Cpu)?)
    })
}

fn randt(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(randn(seed, n), shape, &Device::Cpu)?)
}

struct KernelResult {
    name: String,
    shape: String,
    gflop: f64,
    stats: Stats,
}

impl KernelResult {
    fn json(&self, peak: f64) -> Value {
        let gflops = self.gflop / self.stats.median();
        json!({
            "name": self.name, "shape": self.shape, "gflop": self.gflop,
            "median_ms": self.stats.median() * 1e3, "min_ms": self.stats.min() * 1e3,
            "max_ms": self.stats.max() * 1e3, "n": self.stats.times.len(),
            "gflops": gflops, "gflops_best": self.gflop / self.stats.min(),
            "fraction_of_peak": if peak > 0.0 { gflops / peak } else { 0.0 },
        })
    }
}

pub(super) fn kernels(a: &BenchArgs) -> Result<Value> {
    let threads = rayon::current_num_threads();
    let seconds = if a.seconds > 0.0 {
        a.seconds.min(3.0)
    } else {
        1.0
    };
    let fma = peak_report(threads, 1.0);
    let peak = fma["fma_peak"]["gflops"].as_f64().unwrap_or(0.0);
    let bf16 = bf16_peak(threads, 1.0);
    let plan = Plan {
        warmup: a.warmup.max(1),
        iters: a.iters,
        seconds,
        min_iters: a.min_iters.max(3),
    };
    let mut ks: Vec<KernelResult> = Vec::new();
    let mut bench = |name: &str,
                     shape: String,
                     gflop: f64,
                     f: &mut dyn FnMut() -> Result<Tensor>|
     -> Result<()> {
        let stats = plan.time(|| {
            std::hint::black_box(f()?);
            Ok(())
        })?;
        ks.push(KernelResult {
            name: name.into(),
            shape,
            gflop,
            stats,
        });
        Ok(())
    };

    // GEMM 1024^3 (contiguous x contiguous).
    let (m, k, n) = (1024, 1024, 1024);
    let x = randt(&[m, k], 1)?;
    let y = randt(&[k, n], 2)?;
    let g = 2.0 * (m * k * n) as f64 / 1e9;
    bench("gemm f32", format!("{m}x{k}x{n}"), g, &mut || {
        Ok(x.matmul(&y)?)
    })?;
    let (xb, yb) = (x.to_dtype(DType::BF16)?, y.to_dtype(DType::BF16)?);
    bench("gemm bf16", format!("{m}x{k}x{n}"), g, &mut || {
        Ok(xb.matmul(&yb)?)
    })?;

    // ViT-B/16 GEMMs at batch 8 and 1 (M = 8 x 197 and 197 tokens), through visenc's linear layers in
    // each precision (weights packed once, as at load; activations converted / quantised per call),
    // and at batch 8 through candle's `nn::Linear` (the `gemm` crate, which packs the weights per
    // call) for comparison. Only f32 compares with the f32 FMA peak; bf16 with `bf16_dot_peak_gflops`.
    let (b, t) = (8usize, 197usize);
    let vit_gemms = [
        ("vit linear qkv (fused)", 768usize, 2304usize),
        ("vit linear q/k/v/out", 768, 768),
        ("vit linear fc1", 768, 3072),
        ("vit linear fc2", 3072, 768),
    ];
    for (label, kk, nn) in vit_gemms {
        let x = randt(&[b, t, kk], 3)?;
        let w = randt(&[nn, kk], 4)?;
        let bias = randt(&[nn], 5)?;
        let g = 2.0 * (b * t * kk * nn) as f64 / 1e9;
        let candle = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
        bench(
            &format!("{label} f32 (candle)"),
            format!("{}x{kk}x{nn} (b{b} x {t} tokens)", b * t),
            g,
            &mut || Ok(candle_nn::Module::forward(&candle, &x)?),
        )?;
        for precision in visenc::Precision::ALL {
            let l = layer(&w, Some(&bias), precision)?;
            for rows in [b, 1] {
                let x = x.narrow(0, 0, rows)?;
                bench(
                    &format!("{label} {precision} (visenc)"),
                    format!("{}x{kk}x{nn} (b{rows} x {t} tokens)", rows * t),
                    g * rows as f64 / b as f64,
                    &mut || Ok(l.forward(&x)?),
                )?;
            }
        }
    }

    // Convolutions through visenc's channels-last kernels (what the CNN trunks run on the CPU), and
    // once each through candle's im2col + GEMM and its grouped conv2d (one convolution per group)
    // for comparison.
    let conv_cases: [(&str, usize, usize, usize, usize, usize, bool); 6] = [
        // name, channels in, out, kernel, groups, spatial, through candle's conv2d
        ("conv3x3 64->64", 64, 64, 3, 1, 56, false),
        ("conv3x3 64->64 via candle conv2d", 64, 64, 3, 1, 56, true),
        ("conv1x1 256->64", 256, 64, 1, 1, 56, false),
        ("depthwise 3x3, 144 ch", 144, 144, 3, 144, 56, false),
        ("depthwise 7x7, 96 ch", 96, 96, 7, 96, 56, false),
        (
            "depthwise 3x3, 144 ch via candle grouped conv2d",
            144,
            144,
            3,
            144,
            56,
            true,
        ),
    ];
    for (name, cin, cout, kk, groups, hw, candle) in conv_cases {
        let g = 2.0 * (8 * cout * hw * hw * (cin / groups) * kk * kk) as f64 / 1e9;
        let mut shape = format!("b8 {cin}x{hw}x{hw}, k{kk}, groups {groups}");
        let f32 = visenc::Precision::F32;
        let dense = groups == 1 && !candle;
        if let Some(tile) = WinogradTile::for_conv(kk, 1, cin, cout, f32).filter(|_| dense) {
            // GFLOP/s of the direct convolution's products, as the peers' rows count them.
            shape += &format!(", Winograd F({0}x{0}, 3x3)", tile.m());
        }
        if candle {
            let x = randt(&[8, cin, hw, hw], 5)?;
            let w = randt(&[cout, cin / groups, kk, kk], 6)?;
            bench(name, shape, g, &mut || {
                Ok(x.conv2d(&w, kk / 2, 1, 1, groups)?)
            })?;
        } else {
            bench(
                name,
                shape,
                g,
                &mut nhwc_conv((cin, cout, kk, 1, groups), hw, 5)?,
            )?;
        }
    }

    // Attention core: softmax(Q K^T / sqrt(64)) V, 12 heads, 197 tokens, batch 8 (nn::Attention).
    let (h, hd) = (12usize, 64usize);
    let q = randt(&[b, h, t, hd], 7)?;
    let kt = randt(&[b, h, t, hd], 8)?;
    let v = randt(&[b, h, t, hd], 9)?;
    let g = 4.0 * (b * h * t * t * hd) as f64 / 1e9;
    bench(
        "attention",
        format!("b{b}, {h} heads, {t} tokens, head dim {hd}"),
        g,
        &mut || {
            let att = (&q * (hd as f64).powf(-0.5))?.matmul(&kt.t()?)?;
            Ok(softmax_last_dim(&att)?.matmul(&v)?)
        },
    )?;

    // The same attention, and the ViT block's LayerNorm and quick-GELU, through visenc's own kernels
    // (`visenc_models::ops`, what nn::Block runs on CPU f32): fused attention reads q, k, v in place.
    bench(
        "attention fused (visenc)",
        format!("b{b}, {h} heads, {t} tokens, head dim {hd}"),
        g,
        &mut || {
            let y =
                visenc::models::ops::attention(&q, &kt, &v, None, 0.125, visenc::Precision::F32)?;
            y.context("the fused attention kernel did not apply")
        },
    )?;
    let xs = randt(&[b, t, 768], 10)?;
    let (g1, b1) = (randt(&[768], 12)?, randt(&[768], 13)?);
    bench(
        "layer_norm (visenc)",
        format!("{}x768", b * t),
        0.0,
        &mut || {
            let y = visenc::models::ops::layer_norm(&xs, &g1, &b1, 1e-5)?;
            y.context("the LayerNorm kernel did not apply")
        },
    )?;
    let hid = randt(&[b, t, 3072], 14)?;
    bench(
        "quick_gelu (visenc)",
        format!("{}x3072", b * t),
        0.0,
        &mut || {
            let y = visenc::models::nn::Activation::QuickGelu.forward(&hid)?;
            Ok(y)
        },
    )?;

    let kernels_json: Vec<Value> = ks.iter().map(|k| k.json(peak)).collect();
    let vit = vit_block_breakdown(&plan)?;
    let resnet = resnet50_conv_breakdown(&plan)?;
    Ok(json!({
        "threads": threads,
        "fma_peak": fma["fma_peak"],
        "bf16_dot_peak_gflops": bf16,
        "kernels": kernels_json,
        "vit_b16_block_b8": vit,
        "resnet50_convs_b8": resnet,
    }))
}

/// Times each op of one ViT-B/16 encoder block (CLIP: quick-GELU) at batch 8 exactly as
/// `nn::Block` runs it; x12 estimates the trunk.
fn vit_block_breakdown(plan: &Plan) -> Result<Value> {
    let (b, t, d, h, mlp) = (8usize, 197usize, 768usize, 12usize, 3072usize);
    let hd = d / h;
    let x = randt(&[b, t, d], 11)?;
    let g1 = ((randt(&[d], 12)? * 0.1)? + 1.0)?;
    let b1 = randt(&[d], 13)?;
    let wqkv = (randt(&[3 * d, d], 14)? * 0.03)?;
    let bqkv = randt(&[3 * d], 15)?;
    let wo = (randt(&[d, d], 20)? * 0.03)?;
    let bo = randt(&[d], 21)?;
    let w1 = (randt(&[mlp, d], 16)? * 0.03)?;
    let bb1 = randt(&[mlp], 17)?;
    let w2 = (randt(&[d, mlp], 18)? * 0.02)?;
    let bb2 = randt(&[d], 19)?;
    let f32 = visenc::Precision::F32;
    let (lqkv, lo, l1, l2) = (
        layer(&wqkv, Some(&bqkv), f32)?,
        layer(&wo, Some(&bo), f32)?,
        layer(&w1, Some(&bb1), f32)?,
        layer(&w2, Some(&bb2), f32)?,
    );
    // As nn::Attention: q, k and v are [B, H, N, d] views of the fused projection's output.
    let qkv = lqkv.forward(&x)?;
    let part = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .reshape((b, t, 3, h, hd))?
            .narrow(2, i, 1)?
            .squeeze(2)?
            .transpose(1, 2)?)
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let hid = l1.forward(&x)?;
    let lin_g = |k: usize, n: usize| 2.0 * (b * t * k * n) as f64 / 1e9;
    let att_g = 4.0 * (b * h * t * t * hd) as f64 / 1e9;
    let gelu = Some(visenc::models::nn::Activation::QuickGelu);

    // (name, times per block, GFLOP per call, op): what nn::Block runs on the CPU in f32, each
    // epilogue (bias, activation, residual) fused into its GEMM as there.
    type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
    let ops: Vec<(&str, usize, f64, Op)> = vec![
        (
            "layer_norm",
            2,
            0.0,
            Box::new(|| {
                let y = visenc::models::ops::layer_norm(&x, &g1, &b1, 1e-5)?;
                y.context("the LayerNorm kernel did not apply")
            }),
        ),
        (
            "linear qkv 768->2304 (+bias)",
            1,
            lin_g(d, 3 * d),
            Box::new(|| Ok(lqkv.forward(&x)?)),
        ),
        (
            "attention (fused kernel, q/k/v read in place)",
            1,
            att_g,
            Box::new(|| {
                let y = visenc::models::ops::attention(
                    &q,
                    &k,
                    &v,
                    None,
                    0.125,
                    visenc::Precision::F32,
                )?;
                Ok(y.context("the fused attention kernel did not apply")?
                    .reshape((b, t, d))?)
            }),
        ),
        (
            "linear out 768->768 (+bias +residual)",
            1,
            lin_g(d, d),
            Box::new(|| Ok(lo.forward_with(&x, Some(&x), None)?)),
        ),
        (
            "linear fc1 768->3072 (+bias, quick_gelu)",
            1,
            lin_g(d, mlp),
            Box::new(|| Ok(l1.forward_with(&x, None, gelu)?)),
        ),
        (
            "linear fc2 3072->768 (+bias +residual)",
            1,
            lin_g(mlp, d),
            Box::new(|| Ok(l2.forward_with(&hid, Some(&x), None)?)),
        ),
    ];
    let mut rows = Vec::new();
    let mut block_s = 0.0;
    for (name, count, gflop, op) in &ops {
        let stats = plan.time(|| {
            std::hint::black_box(op()?);
            Ok(())
        })?;
        let med = stats.median();
        block_s += med * *count as f64;
        rows.push(
            json!({"op": name, "per_block": count, "median_ms": med * 1e3,
                         "gflops": if *gflop > 0.0 { gflop / med } else { 0.0 }}),
        );
    }
    Ok(json!({
        "note": "ops of one CLIP ViT-B/16 block at batch 8 (197 tokens) as nn::Block runs them on \
                 the CPU in f32 (fused qkv projection, fused attention kernel, epilogues in the \
                 GEMMs), timed one at a time; per_block counts how often a block runs each",
        "ops": rows,
        "block_ms": block_s * 1e3,
        "trunk_estimate_ms": block_s * 12.0 * 1e3,
    }))
}

/// Times every convolution shape of ResNet-50 (timm `resnet50`, 224x224, batch 8) once each through
/// visenc's kernels, with the bias (folded BatchNorm) fused; x count gives the convolution share of a
/// forward.
fn resnet50_conv_breakdown(plan: &Plan) -> Result<Value> {
    // (cin, cout, k, stride, input size, count)
    let mut convs: Vec<(usize, usize, usize, usize, usize, usize)> = vec![(3, 64, 7, 2, 224, 1)];
    let mut cin = 64;
    let mut size = 56;
    for (i, (w, n)) in [(64usize, 3usize), (128, 4), (256, 6), (512, 3)]
        .into_iter()
        .enumerate()
    {
        let s = if i == 0 { 1 } else { 2 };
        let out = 4 * w;
        // First block: conv1 at the input size, strided 3x3, conv3, strided downsample.
        convs.push((cin, w, 1, 1, size, 1));
        convs.push((w, w, 3, s, size, 1));
        let size2 = size / s;
        convs.push((w, out, 1, 1, size2, n));
        convs.push((cin, out, 1, s, size, 1));
        // Other blocks.
        convs.push((out, w, 1, 1, size2, n - 1));
        convs.push((w, w, 3, 1, size2, n - 1));
        cin = out;
        size = size2;
    }
    let plan = Plan {
        warmup: 1,
        iters: Some(plan.min_iters.max(3)),
        ..*plan
    };
    let mut rows = Vec::new();
    let mut total = 0.0;
    let mut total_gflop = 0.0;
    for (cin, cout, k, s, hw, count) in convs {
        let mut conv = nhwc_conv((cin, cout, k, s, 1), hw, 21)?;
        let stats = plan.time(|| {
            std::hint::black_box(conv()?);
            Ok(())
        })?;
        let ho = (hw + 2 * (k / 2) - k) / s + 1;
        let g = 2.0 * (8 * cout * ho * ho * cin * k * k) as f64 / 1e9;
        let med = stats.median();
        total += med * count as f64;
        total_gflop += g * count as f64;
        rows.push(
            json!({"conv": format!("{cin}->{cout} k{k} s{s} @{hw}"), "count": count,
                         "median_ms": med * 1e3, "gflops": g / med}),
        );
    }
    Ok(json!({
        "note": "every convolution of timm resnet50 at 224x224, batch 8, through visenc's channels-last kernels (as the model runs them: 3x3 stride 1 by Winograd, GFLOP counted as the direct convolution's) with the folded-BN bias fused, timed alone",
        "convs": rows,
        "total_ms": total * 1e3,
        "total_gflop": total_gflop,
        "gflops": total_gflop / total,
    }))
}

pub(super) fn print_kernels(out: &mut impl Write, r: &Value) -> Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    writeln!(
        out,
        "threads {}; FMA peak ({}) {:.0} GFLOP/s; bf16 dot peak {}",
        r["threads"],
        r["fma_peak"]["isa"].as_str().unwrap_or(""),
        f(&r["fma_peak"]["gflops"]),
        r["bf16_dot_peak_gflops"]
            .as_f64()
            .map_or("n/a".into(), |v| format!("{v:.0} GFLOP/s"))
    )?;
    writeln!(
        out,
        "{:<28} {:<40} {:>10} {:>10} {:>8}",
        "kernel", "shape", "ms", "GFLOP/s", "of peak"
    )?;
    for k in r["kernels"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "{:<28} {:<40} {:>10.2} {:>10.1} {:>7.1}%",
            k["name"].as_str().unwrap_or(""),
            k["shape"].as_str().unwrap_or(""),
            f(&k["median_ms"]),
            f(&k["gflops"]),
            100.0 * f(&k["fraction_of_peak"])
        )?;
    }
    let v = &r["vit_b16_block_b8"];
    writeln!(
        out,
        "\nViT-B/16 block at batch 8 (sum {:.1} ms, x12 = {:.0} ms):",
        f(&v["block_ms"]),
        f(&v["trunk_estimate_ms"])
    )?;
    for o in v["ops"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<52} x{} {:>9.2} ms {:>8.1} GFLOP/s",
            o["op"].as_str().unwrap_or(""),
            o["per_block"],
            f(&o["median_ms"]),
            f(&o["gflops"])
        )?;
    }
    let c = &r["resnet50_convs_b8"];
    writeln!(
        out,
        "\nResNet-50 convolutions at batch 8: {:.0} ms for {:.1} GFLOP ({:.1} GFLOP/s)",
        f(&c["total_ms"]),
        f(&c["total_gflop"]),
        f(&c["gflops"])
    )?;
    for o in c["convs"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<28} x{} {:>9.2} ms {:>8.1} GFLOP/s",
            o["conv"].as_str().unwrap_or(""),
            o["count"],
            f(&o["median_ms"]),
            f(&o["gflops"])
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    #[test]
    fn layer_norm_matches_definition() {
        let x = randt(&[2, 5, 8], 1).unwrap();
        let g = randt(&[8], 2).unwrap();
        let b = randt(&[8], 3).unwrap();
        // The kernel the ViT block breakdown times.
        let y = visenc::models::ops::layer_norm(&x, &g, &b, 1e-5)
            .unwrap()
            .expect("the LayerNorm kernel applies to CPU f32");
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let r = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&g)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff: f32 = (y - r)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
