//! The image pipeline shared by every command: decode and preprocess a batch on the thread pool
//! while the previous batch runs through the model; a bad image fails alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use visenc::{EncodeOptions, Encoder, ImageFeatures, LoadOptions, Pixels};

use crate::{ModelArgs, RunArgs};

pub fn load_encoder(m: &ModelArgs) -> Result<Encoder> {
    let mut opts = LoadOptions::default();
    if m.allow_mismatch {
        opts.policy = visenc::weights::LoadPolicy::AllowMismatch;
    }
    opts.limits.max_pixels = m.max_pixels;
    opts.precision = m.precision;
    let enc =
        Encoder::load(&m.model, &opts).with_context(|| format!("loading model {}", m.model))?;
    if !enc.load_report().is_clean() {
        eprintln!(
            "visenc: warning: {} loaded with mismatches:{}",
            m.model,
            enc.load_report()
        );
    }
    Ok(enc)
}

/// The features of one image (a batch of one, sliced from its batch).
pub fn row(f: &ImageFeatures, i: usize) -> Result<ImageFeatures> {
    let take = |t: &Tensor| t.narrow(0, i, 1);
    let opt = |t: &Option<Tensor>| t.as_ref().map(take).transpose();
    Ok(ImageFeatures {
        pooled: take(&f.pooled)?,
        projected: opt(&f.projected)?,
        logits: opt(&f.logits)?,
        prefix_tokens: opt(&f.prefix_tokens)?,
        patch_tokens: opt(&f.patch_tokens)?,
        grid: f.grid,
        hidden_states: f
            .hidden_states
            .iter()
            .map(|(k, t)| Ok((*k, take(t)?)))
            .collect::<Result<_>>()?,
        feature_maps: f
            .feature_maps
            .iter()
            .map(|m| {
                Ok(visenc::FeatureMap {
                    reduction: m.reduction,
                    map: take(&m.map)?,
                })
            })
            .collect::<Result<_>>()?,
        latents: f
            .latents
            .as_ref()
            .map(|l| -> Result<visenc::Latents> {
                Ok(visenc::Latents {
                    mean: take(&l.mean)?,
                    logvar: opt(&l.logvar)?,
                    scaling_factor: l.scaling_factor,
                    shift_factor: l.shift_factor,
                    codes: opt(&l.codes)?,
                    quantized: opt(&l.quantized)?,
                })
            })
            .transpose()?,
    })
}

fn preprocess(enc: &Encoder, paths: &[PathBuf]) -> Vec<Result<Pixels, String>> {
    paths
        .par_iter()
        .map(|p| enc.load_image(p).map_err(|e| e.to_string()))
        .collect()
}

/// Encodes one preprocessed batch; images of equal size go through the model together.
/// Errors come back as messages that name the file.
fn encode(
    enc: &Encoder,
    paths: &[PathBuf],
    pixels: Vec<Result<Pixels, String>>,
    opts: &EncodeOptions,
) -> Vec<Result<ImageFeatures, String>> {
    let mut out: Vec<Option<Result<ImageFeatures, String>>> = pixels.iter().map(|_| None).collect();
    let mut pending: Vec<(usize, Pixels)> = Vec::new();
    for (i, p) in pixels.into_iter().enumerate() {
        match p {
            Ok(p) => pending.push((i, p)),
            Err(e) => out[i] = Some(Err(e)),
        }
    }
    while let Some((_, first)) = pending.first() {
        let size = (first.height, first.width);
        let (group, rest): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(_, p)| (p.height, p.width) == size);
        pending = rest;
        let (idx, px): (Vec<usize>, Vec<Pixels>) = group.into_iter().unzip();
        match enc.encode_pixels(&px, opts) {
            Ok(f) => {
                for (k, &i) in idx.iter().enumerate() {
                    out[i] = Some(row(&f, k).map_err(|e| e.to_string()));
                }
            }
            Err(e) => {
                for &i in &idx {
                    out[i] = Some(Err(format!("{}: model: {e}", paths[i].display())));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not processed".into())))
        .collect()
}

pub fn progress(n: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Runs every image through the model, calling `sink` once per image in input order. Returns how
/// many images failed; their errors are printed to stderr with the file name.
pub fn run_images(
    enc: &Encoder,
    paths: &[PathBuf],
    run: &RunArgs,
    opts: &EncodeOptions,
    mut sink: impl FnMut(&Path, &ImageFeatures) -> Result<()>,
) -> Result<usize> {
    let bar = progress(paths.len(), run.quiet);
    let chunks: Vec<&[PathBuf]> = paths.chunks(run.batch.max(1)).collect();
    let mut failed = 0;
    let mut ready = chunks.first().map(|c| preprocess(enc, c));
    for (k, chunk) in chunks.iter().enumerate() {
        let pixels = ready.take().unwrap_or_default();
        // Decode the next batch while this one runs through the model.
        let (encoded, next) = rayon::join(
            || encode(enc, chunk, pixels, opts),
            || chunks.get(k + 1).map(|c| preprocess(enc, c)),
        );
        ready = next;
        for (path, r) in chunk.iter().zip(encoded) {
            match r {
                Ok(f) => sink(path, &f)?,
                Err(e) => {
                    failed += 1;
                    bar.suspend(|| eprintln!("visenc: {e}"));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(failed)
}

/// A [1, D] tensor as a Vec.
pub fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}
