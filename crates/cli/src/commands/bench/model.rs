//! The whole-model benchmark: `Encoder::encode_pixels` on random pixels, latency and peak RSS.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde_json::{json, Value};
use visenc::{EncodeOptions, Pixels};

use super::{parse_size, proc_status_mib, randn, BenchArgs, Plan};
use crate::{batch, output, ModelArgs};

pub(super) fn model(a: &BenchArgs) -> Result<Value> {
    let spec = a.model.clone().context("--model is required")?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let rss_start = proc_status_mib("VmRSS");
    let t = Instant::now();
    let enc = batch::load_encoder(&ModelArgs {
        model: spec.clone(),
        allow_mismatch: a.allow_mismatch,
        max_pixels: visenc::image::Limits::default().max_pixels,
        precision: a.precision,
    })?;
    let load_s = t.elapsed().as_secs_f64();
    let (rss_loaded, load_peak) = (proc_status_mib("VmRSS"), proc_status_mib("VmHWM"));
    let info = enc.info().clone();
    let (h, w) = match &a.size {
        Some(s) => parse_size(s)?,
        None if info.image_size != (0, 0) => info.image_size,
        None => bail!("{spec}: the model has no fixed input size; give --size HxW"),
    };
    let opts = EncodeOptions::default();

    let mut check = Value::Null;
    if let (Some(inp), Some(outp)) = (&a.check_input, &a.check_output) {
        let (shape, data) = read_npy_f32(inp)?;
        let [b, c, ch, cw] = shape[..] else {
            bail!(
                "{}: expected a [B, 3, H, W] array, got {shape:?}",
                inp.display()
            );
        };
        if c != 3 {
            bail!("{}: expected 3 channels, got {c}", inp.display());
        }
        let px: Vec<Pixels> = data
            .chunks(c * ch * cw)
            .map(|d| Pixels {
                data: d.to_vec(),
                height: ch,
                width: cw,
            })
            .collect();
        let f = enc.encode_pixels(&px, &opts)?;
        let e = f.embedding().to_dtype(DType::F32)?;
        let dims = e.dims().to_vec();
        let v: Vec<f32> = e.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        output::write_npy(outp, output::Elem::F32, &dims, &bytes)?;
        check = json!({"input": inp, "output": outp, "batch": b, "embedding_shape": dims,
                       "projected": f.projected.is_some()});
    }

    let px: Vec<Pixels> = (0..a.batch)
        .map(|i| Pixels {
            data: randn(a.seed.wrapping_add(i as u64), 3 * h * w),
            height: h,
            width: w,
        })
        .collect();
    let plan = Plan {
        warmup: a.warmup,
        iters: a.iters,
        seconds: a.seconds,
        min_iters: a.min_iters,
    };
    let stats = plan.time(|| {
        let f = enc.encode_pixels(&px, &opts)?;
        // candle's CPU backend is synchronous; touching the output keeps the work honest.
        std::hint::black_box(f.embedding().dims());
        Ok(())
    })?;
    let med = stats.median();
    Ok(json!({
        "model": spec,
        "architecture": info.architecture,
        "family": info.family,
        "parameters": info.parameters,
        "precision": a.precision.name(),
        "batch": a.batch,
        "size": [h, w],
        "threads": rayon::current_num_threads(),
        "warmup": a.warmup,
        "latency_s": stats.json(),
        "img_per_s": a.batch as f64 / med,
        "img_per_s_range": [a.batch as f64 / stats.max(), a.batch as f64 / stats.min()],
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "rss_start_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        "load_peak_rss_mib": load_peak,
        // File-backed pages (the program's own code, mostly): in RSS, but neither weights nor
        // activations.
        "rss_file_mib": proc_status_mib("RssFile"),
        "load_s": load_s,
        "check": check,
    }))
}

pub(super) fn print_model(out: &mut impl Write, r: &Value) -> Result<()> {
    let l = &r["latency_s"];
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) * 1e3;
    writeln!(
        out,
        "model          {} ({}, family {})",
        r["model"].as_str().unwrap_or(""),
        r["architecture"].as_str().unwrap_or(""),
        r["family"].as_str().unwrap_or("")
    )?;
    let p = r["parameters"].as_u64().unwrap_or(0);
    writeln!(out, "parameters     {p} ({:.1} M)", p as f64 / 1e6)?;
    writeln!(
        out,
        "input          {} x 3 x {} x {} (f32), {} threads",
        r["batch"], r["size"][0], r["size"][1], r["threads"]
    )?;
    writeln!(
        out,
        "throughput     {:.2} img/s (range {:.2}..{:.2})",
        r["img_per_s"].as_f64().unwrap_or(0.0),
        r["img_per_s_range"][0].as_f64().unwrap_or(0.0),
        r["img_per_s_range"][1].as_f64().unwrap_or(0.0)
    )?;
    writeln!(out, "latency/batch  median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms ({} runs after {} warm-up)",
        ms(&l["median"]), ms(&l["p90"]), ms(&l["min"]), ms(&l["max"]), l["n"], r["warmup"])?;
    writeln!(
        out,
        "peak RSS       {:.0} MiB (load: peak {:.0} MiB, after {:.0} MiB, {:.2} s; start {:.0} MiB; file-backed {:.0} MiB)",
        r["peak_rss_mib"].as_f64().unwrap_or(0.0),
        r["load_peak_rss_mib"].as_f64().unwrap_or(0.0),
        r["rss_after_load_mib"].as_f64().unwrap_or(0.0),
        r["load_s"].as_f64().unwrap_or(0.0),
        r["rss_start_mib"].as_f64().unwrap_or(0.0),
        r["rss_file_mib"].as_f64().unwrap_or(0.0)
    )?;
    Ok(())
}

/// Reads a little-endian float32, C-order `.npy` file.
fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .read_to_end(&mut buf)?;
    let bad = |m: &str| anyhow::anyhow!("{}: not a float32 .npy file ({m})", path.display());
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        return Err(bad("no magic"));
    }
    let (hlen, start) = match buf[6] {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
            12,
        ),
        _ => return Err(bad("version")),
    };
    let header = std::str::from_utf8(buf.get(start..start + hlen).ok_or_else(|| bad("header"))?)?;
    if !header.contains("'descr': '<f4'") {
        return Err(bad("descr is not '<f4'"));
    }
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let shape_s = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split_once('(')?.1.split_once(')'))
        .ok_or_else(|| bad("shape"))?
        .0;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("shape")))
        .collect::<Result<_>>()?;
    let body = &buf[start + hlen..];
    let n: usize = shape.iter().product();
    if body.len() != 4 * n {
        return Err(bad("size"));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        output::write_npy(&p, output::Elem::F32, &[2, 3, 2, 2], &bytes).unwrap();
        let (shape, data) = read_npy_f32(&p).unwrap();
        assert_eq!(shape, vec![2, 3, 2, 2]);
        assert_eq!(data, v);
    }
}
