//! The resampler against a naive floating-point reference on random images, and its edge cases.

use visenc_image::{resize, CropRounding, Filter, Preprocess, ResizeMode, RgbImage};

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }

    fn image(&mut self, w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |_, _| {
            image::Rgb([self.next() as u8, self.next() as u8, self.next() as u8])
        })
    }
}

fn kernel(filter: Filter) -> (fn(f64) -> f64, f64) {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI)
        }
    }
    match filter {
        Filter::Box => (|x| if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 }, 0.5),
        Filter::Bilinear => (|x: f64| (1.0 - x.abs()).max(0.0), 1.0),
        Filter::Hamming => (
            |x: f64| {
                let x = x.abs();
                if x >= 1.0 {
                    0.0
                } else {
                    sinc(x) * (0.54 + 0.46 * (x * std::f64::consts::PI).cos())
                }
            },
            1.0,
        ),
        Filter::Bicubic => (
            |x: f64| {
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    a * (((x - 5.0) * x + 8.0) * x - 4.0)
                } else {
                    0.0
                }
            },
            2.0,
        ),
        Filter::Lanczos => (
            |x: f64| {
                if x.abs() < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            },
            3.0,
        ),
        Filter::Nearest => unreachable!("not a convolution"),
    }
}

/// Textbook antialiased resampling along one axis in f64, rounded to u8 after each pass.
fn naive_axis(
    src: &[u8],
    n_in: usize,
    n_out: usize,
    lines: usize,
    stride: (usize, usize),
    filter: Filter,
) -> Vec<u8> {
    let (k, support) = kernel(filter);
    let scale = n_in as f64 / n_out as f64;
    let fs = scale.max(1.0);
    let mut out = vec![0u8; n_out * lines * 3];
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support * fs + 0.5).floor().max(0.0)) as usize;
        let hi = ((center + support * fs + 0.5).floor() as usize).min(n_in);
        let w: Vec<f64> = (lo..hi)
            .map(|i| k((i as f64 - center + 0.5) / fs))
            .collect();
        let total: f64 = w.iter().sum();
        for line in 0..lines {
            for c in 0..3 {
                let v: f64 = (lo..hi)
                    .zip(&w)
                    .map(|(i, wi)| {
                        f64::from(src[(i * stride.0 + line * stride.1) * 3 + c]) * wi / total
                    })
                    .sum();
                out[(o * stride.0 + line * stride.1) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        let _ = (stride, lines);
    }
    out
}

fn naive_resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let mut data = img.as_raw().clone();
    // Pillow 13 runs the vertical pass first when the image loses over twice as many rows as
    // columns.
    let vertical_first = h < ih && ih - h > 2 * (iw as i64 - w as i64).max(0) as usize;
    if vertical_first && w != iw {
        data = naive_axis_cols(&data, ih, h, iw, filter);
        let mut out = vec![0u8; w * h * 3];
        for y in 0..h {
            let row = naive_axis(
                &data[y * iw * 3..(y + 1) * iw * 3],
                iw,
                w,
                1,
                (1, 0),
                filter,
            );
            out[y * w * 3..(y + 1) * w * 3].copy_from_slice(&row);
        }
        return RgbImage::from_raw(w as u32, h as u32, out).unwrap();
    }
    if w != iw {
        // Rows: pixel x of line y at (x + y * w).
        let mut out = vec![0u8; w * ih * 3];
        for y in 0..ih {
            let row = naive_axis(
                &data[y * iw * 3..(y + 1) * iw * 3],
                iw,
                w,
                1,
                (1, 0),
                filter,
            );
            out[y * w * 3..(y + 1) * w * 3].copy_from_slice(&row);
        }
        data = out;
    }
    if h != ih {
        data = naive_axis_cols(&data, ih, h, w, filter);
    }
    RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

fn naive_axis_cols(src: &[u8], n_in: usize, n_out: usize, width: usize, filter: Filter) -> Vec<u8> {
    // Transpose, filter rows, transpose back.
    let mut t = vec![0u8; src.len()];
    for y in 0..n_in {
        for x in 0..width {
            t[(x * n_in + y) * 3..(x * n_in + y) * 3 + 3]
                .copy_from_slice(&src[(y * width + x) * 3..(y * width + x) * 3 + 3]);
        }
    }
    let mut out_t = vec![0u8; width * n_out * 3];
    for x in 0..width {
        let col = naive_axis(
            &t[x * n_in * 3..(x + 1) * n_in * 3],
            n_in,
            n_out,
            1,
            (1, 0),
            filter,
        );
        out_t[x * n_out * 3..(x + 1) * n_out * 3].copy_from_slice(&col);
    }
    let mut out = vec![0u8; width * n_out * 3];
    for y in 0..n_out {
        for x in 0..width {
            out[(y * width + x) * 3..(y * width + x) * 3 + 3]
                .copy_from_slice(&out_t[(x * n_out + y) * 3..(x * n_out + y) * 3 + 3]);
        }
    }
    out
}

/// Fixed point (22 fraction bits) against exact weights. Each pass can land on the other side of
/// an exact `.5` (Pillow's rounded weights sum to slightly less or more than one), so the two
/// passes together may differ by two levels; that happens rarely.
#[test]
fn convolution_filters_match_naive_f64_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut total = 0usize;
    let mut off = 0usize;
    for filter in [
        Filter::Box,
        Filter::Bilinear,
        Filter::Hamming,
        Filter::Bicubic,
        Filter::Lanczos,
    ] {
        for _ in 0..12 {
            let (iw, ih) = (1 + rng.below(60), 1 + rng.below(60));
            let (ow, oh) = (1 + rng.below(90), 1 + rng.below(90));
            let img = rng.image(iw, ih);
            let ours = resize(&img, ow, oh, filter);
            let naive = naive_resize(&img, ow, oh, filter);
            for (a, b) in ours.as_raw().iter().zip(naive.as_raw()) {
                let d = a.abs_diff(*b);
                assert!(d <= 2, "{filter:?} {iw}x{ih} -> {ow}x{oh}: {a} vs {b}");
                total += 1;
                off += usize::from(d > 0);
            }
        }
    }
    let rate = off as f64 / total as f64;
    println!("{off} of {total} values differ ({rate:.2e})");
    assert!(rate < 5e-3);
}

/// `Preprocess::resized` computes only the cropped window of a resize; it must equal cropping
/// the full resize.
#[test]
fn windowed_resize_equals_resize_then_crop() {
    let mut rng = Rng(42);
    for filter in Filter::ALL {
        for _ in 0..10 {
            let (iw, ih) = (1 + rng.below(80), 1 + rng.below(80));
            let img = rng.image(iw, ih);
            let (rw, rh) = (1 + rng.below(120), 1 + rng.below(120));
            let (cw, ch) = (1 + rng.below(rw), 1 + rng.below(rh));
            let pre = Preprocess {
                resize: Some(ResizeMode::Exact {
                    height: rh,
                    width: rw,
                }),
                filter,
                crop: Some((ch, cw)),
                crop_rounding: CropRounding::Floor,
                ..Preprocess::default()
            };
            let full = resize(&img, rw, rh, filter);
            let (x0, y0) = ((rw - cw) / 2, (rh - ch) / 2);
            let expected = image::imageops::crop_imm(&full, x0, y0, cw, ch).to_image();
            assert_eq!(
                pre.resized(&img).unwrap(),
                expected,
                "{filter:?} {iw}x{ih} -> {rw}x{rh} crop {cw}x{ch}"
            );
        }
    }
}

#[test]
fn degenerate_sizes_do_not_panic() {
    let img = Rng(7).image(5, 3);
    for filter in Filter::ALL {
        assert_eq!(
            resize(&img, 5, 3, filter),
            img,
            "{filter:?}: same size is a copy"
        );
        assert_eq!(resize(&img, 0, 3, filter).dimensions(), (0, 3));
        assert_eq!(resize(&img, 4, 0, filter).dimensions(), (4, 0));
        let dot = RgbImage::from_pixel(1, 1, image::Rgb([200, 100, 50]));
        let up = resize(&dot, 7, 4, filter);
        assert!(
            up.pixels().all(|p| p.0 == [200, 100, 50]),
            "{filter:?}: {up:?}"
        );
        let empty = RgbImage::new(0, 0);
        assert_eq!(resize(&empty, 3, 2, filter).dimensions(), (3, 2));
    }
}

/// A rough throughput figure (not an assertion on speed): CLIP-style preprocessing of a
/// 12-megapixel photo.
#[test]
fn large_photo_preprocesses_in_reasonable_time() {
    let img = Rng(3).image(4000, 3000);
    let pre = Preprocess {
        resize: Some(ResizeMode::ShortestEdge(224)),
        filter: Filter::Bicubic,
        crop: Some((224, 224)),
        ..Preprocess::default()
    };
    let start = std::time::Instant::now();
    let out = pre.apply(&img).unwrap();
    println!("4000x3000 -> 3x224x224 in {:?}", start.elapsed());
    assert_eq!(out.len(), 3 * 224 * 224);
}
