//! Shared helpers of the service tests: the tiny CLIP fixture (vision + text tower), real photos,
//! a server on a free loopback port, and an exact in-memory index standing in for `--db`.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use visenc::{EncodeOptions, Encoder, LoadOptions};
use visenc_server::client::Client;
use visenc_server::{AppState, Config, Hit, Running, SearchIndex};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny CLIP checkpoint with both towers (random weights, real architecture and tokenizer).
pub fn model() -> String {
    root()
        .join("fixtures/models/clip_hf_gelu")
        .display()
        .to_string()
}

pub fn encoder(max_pixels: Option<u64>) -> Encoder {
    let mut opts = LoadOptions::default();
    if let Some(m) = max_pixels {
        opts.limits.max_pixels = m;
    }
    Encoder::load(&model(), &opts).expect("load the fixture model")
}

/// A real photo; fails with instructions when the assets have not been fetched.
pub fn photo_path(name: &str) -> PathBuf {
    let p = root().join("assets/photos").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        p.display()
    );
    p
}

pub fn photo(name: &str) -> Vec<u8> {
    std::fs::read(photo_path(name)).unwrap()
}

pub fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A PNG of `w` x `h` made by the `image` crate.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn config() -> Config {
    Config::new(model())
}

pub fn start(config: Config, enc: Encoder, index: Option<Arc<dyn SearchIndex>>) -> Running {
    let state = AppState::new(config, enc, index).expect("start the model thread");
    visenc_server::spawn("127.0.0.1:0".parse().unwrap(), state).expect("start the server")
}

pub fn client(s: &Running) -> Client {
    Client::new(s.addr, Duration::from_secs(60))
}

pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The library's own embedding of a photo file (what the service must return, normalised).
pub fn library_image_embedding(enc: &Encoder, path: &Path) -> Vec<f32> {
    let px = enc.load_image(path).unwrap();
    let f = enc.encode_pixels(&[px], &EncodeOptions::default()).unwrap();
    unit(
        &f.embedding()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    )
}

pub fn library_text_embedding(enc: &Encoder, text: &str) -> Vec<f32> {
    let f = enc.encode_texts(&[text]).unwrap();
    unit(&f.projected.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

/// Exact cosine search over a few files, standing in for the persistent index.
pub struct ExactIndex {
    pub rows: Vec<(PathBuf, Vec<f32>)>,
}

impl ExactIndex {
    pub fn of(enc: &Encoder, paths: &[PathBuf]) -> Self {
        Self {
            rows: paths
                .iter()
                .map(|p| (p.clone(), library_image_embedding(enc, p)))
                .collect(),
        }
    }
}

impl SearchIndex for ExactIndex {
    fn dimensions(&self) -> usize {
        self.rows[0].1.len()
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, String> {
        let mut hits: Vec<Hit> = self
            .rows
            .iter()
            .map(|(p, v)| Hit {
                path: p.display().to_string(),
                score: v.iter().zip(query).map(|(a, b)| a * b).sum(),
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
        Ok(hits)
    }

    fn contains(&self, path: &str) -> bool {
        self.rows.iter().any(|(p, _)| p.to_str() == Some(path))
    }
}
