//! Winograd convolutions F(m x m, 3 x 3) on NHWC maps, for the 3x3 stride-1 dense convolutions of
//! ResNet's blocks: each m x m tile of output pixels is `Y = Aᵀ [U ⊙ V] A` with `U = G g Gᵀ` (the
//! filter, transformed once at load) and `V = Bᵀ d Bᵀ` (the (m + 2)² input tile around it), so
//! the 9 products per output pixel and channel pair become (m + 2)² / m² (F(4x4, 3x3): 36 per 16
//! pixels, 2.25 each; F(2x2, 3x3): 16 per 4 pixels, 4 each). The products are (m + 2)² independent
//! GEMMs over all tiles, `M_ξ [tiles, cout] = V_ξ [tiles, cin] · U_ξᵀ`, on the packed-weight GEMM
//! ([`crate::gemm`]); the input and output transforms are additions and a few multiplications by
//! small constants, vectorised across channels, and the output transform applies the epilogue.
// Reference: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016),
// https://arxiv.org/abs/1509.09308 — section 4.1 (F(2x2, 3x3)) and 4.2 (F(4x4, 3x3): the matrices
// below, interpolation points 0, ±1, ±2 and ∞).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{ConvShape, Epilogue};
use crate::dispatch::multiversion;
use crate::gemm::{gemm, PackedWeight};
use crate::math::Lanes;
use crate::panel::{serially, with_scratch, MR};
use crate::OutPtr;
use crate::Precision;

/// The most channels (in or out) a convolution runs by Winograd's algorithm with. Wider 3x3
/// layers sit deep in a network, on small maps (ResNet-50's last stage: 512 channels, 7x7 at 224
/// pixels, so 16 tiles per image and 16 rows per image in each of the 16 GEMMs), where F(2x2)
/// saved ~2 % of a batch-8 ResNet-50 forward at most (within this machine's noise in alternating
/// runs) and nothing at batch 1, while its transformed filters, 16/9 of the largest weights, held
/// 14 MiB more (ResNet-50's packed weights 1.29x its f32 weights with them, 1.15x without).
pub const MAX_CHANNELS: usize = 256;

/// The output tile of a Winograd convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2x2, 3x3): 4x4 input tiles, 16 GEMMs; exact to within f32 rounding like a direct sum.
    F2,
    /// F(4x4, 3x3): 6x6 input tiles, 36 GEMMs; fewer products, a few ulps more rounding.
    F4,
}

impl WinogradTile {
    /// The tile a dense `k x k` convolution at `stride` from `cin` to `cout` channels runs on, if
    /// any: 3x3 stride-1 ones up to [`MAX_CHANNELS`] in f32 and bf16 (int8 keeps im2col: its
    /// per-row activation scales would quantise the transformed tiles, whose range the transforms
    /// widen).
    /// - f32: F(4x4, 3x3) up to 128 channels; F(2x2, 3x3) above, where F(4x4)'s transformed filter
    ///   (36/9 of the weight, to F(2x2)'s 16/9) costs more memory than its products save time:
    ///   ResNet-50's stages 3-4 hold 31 MB of f32 3x3 weights, 55 MB transformed for F(2x2), 123 MB
    ///   for F(4x4), for ~1 % of the forward.
    /// - bf16: F(2x2, 3x3) only. F(4x4)'s transforms multiply by up to 5 and 8 before values
    ///   cancel, so the bf16 rounding of the transformed input comes out ~10x larger: 5e-2 of the
    ///   output scale, against 5e-3 for F(2x2) and 2e-3 for a direct bf16 convolution (whose
    ///   output PyTorch's autocast then rounds to bf16, another 2e-3).
    pub fn for_conv(
        k: usize,
        stride: usize,
        cin: usize,
        cout: usize,
        precision: Precision,
    ) -> Option<Self> {
        let channels = cin.max(cout);
        let dense_3x3 = k == 3 && stride == 1 && cin > 0 && cout > 0;
        if !dense_3x3 || channels > MAX_CHANNELS || precision == Precision::Int8 {
            None
        } else if channels <= 128 && precision == Precision::F32 {
            Some(Self::F4)
        } else {
            Some(Self::F2)
        }
    }

    /// Output pixels per tile side.
    pub fn m(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Input pixels per tile side, `m + 2`.
    fn alpha(self) -> usize {
        self.m() + 2
    }

    /// Row `i` of G ([alpha, 3]).
    fn g(self, i: usize) -> [f64; 3] {
        match self {
            Self::F2 => G2[i],
            Self::F4 => G4[i],
        }
    }
}

const BT2: [[f32; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// A 3x3 convolution's filter transformed for one [`WinogradTile`]: per position ξ of the
/// (m + 2)² tile, `U_ξ` [cout, cin] packed for [`crate::gemm`] in the model's precision.
#[derive(Debug, Clone)]
pub struct WinogradWeight {
    tile: WinogradTile,
    cin: usize,
    cout: usize,
    u: Vec<PackedWeight>,
}

impl WinogradWeight {
    /// Transforms `weight` [cout, cin, 3, 3] (PyTorch's order, so a model's weight is read as
    /// loaded, with no reordered copy) in f64 and packs each `U_ξ` for products in `precision`.
    pub fn pack(
        weight: &[f32],
        cout: usize,
        cin: usize,
        tile: WinogradTile,
        precision: Precision,
    ) -> Self {
        assert_eq!(
            weight.len(),
            cout * 9 * cin,
            "winograd weight: not {cout} x {cin} x 3 x 3"
        );
        let a = tile.alpha();
        // One U_ξ at a time per thread, packed as soon as it is made (no copy of all of them).
        let u = (0..a * a)
            .into_par_iter()
            .map(|xi| {
                let (gi, gj) = (tile.g(xi / a), tile.g(xi % a));
                let mut u = vec![0f32; cout * cin];
                for (o, row) in u.chunks_exact_mut(cin.max(1)).enumerate() {
                    for (c, v) in row.iter_mut().enumerate() {
                        let mut s = 0.0;
                        for (ky, wy) in gi.iter().enumerate() {
                            for (kx, wx) in gj.iter().enumerate() {
                                s += wy * weight[((o * cin + c) * 3 + ky) * 3 + kx] as f64 * wx;
                            }
                        }
                        *v = s as f32;
                    }
                }
                PackedWeight::pack(&u, cout, cin, precision)
            })
            .collect();
        Self { tile, cin, cout, u }
    }

    /// The output tile it was transformed for.
    pub fn tile(&self) -> WinogradTile {
        self.tile
    }
}

/// Transformed input and product values per task (f32, 512 KiB: half the L2 of one core, so a
/// chunk's GEMMs read what its input transform just wrote, and its output transform what they
/// wrote).
const CHUNK_VALUES: usize = 1 << 17;
/// Transformed weights (values, all ξ) from which a chunk's GEMMs read them from L3 rather than L2
/// (twice the 2 MiB L2): the chunk then grows to [`STREAMED_CHUNK_VALUES`], so each weight read serves
/// 4x the rows. On the Xeon of BENCHMARKS.md's session 13 ResNet-50's 256-channel 3x3 convolutions
/// (4 MiB of transformed weights) ran ~10 % faster so; its 128-channel ones (2.3 MiB) no faster.
const STREAMED_WEIGHTS: usize = 1 << 20;
/// Transformed input and product values per task where the weights stream from L3 (2 MiB).
const STREAMED_CHUNK_VALUES: usize = 1 << 19;
/// The fewest tiles per task (two register tiles of rows per GEMM), even past the budget.
const MIN_CHUNK: usize = 12;

thread_local! {
    static CHUNK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out = act(conv3x3(x) + bias + residual)` on NHWC maps by Winograd's algorithm: `x` [batch, h,
/// w, cin], `out` and the residual [batch, oh, ow, cout], `s` a dense 3x3 stride-1 shape (any
/// padding), `w` transformed for it ([`WinogradWeight::pack`]). Parallel over chunks of tiles:
/// each task input-transforms its chunk, runs the (m + 2)² GEMMs over it on its own thread and
/// output-transforms the products with the epilogue, all in a per-thread buffer that stays in L2.
///
/// # Panics
/// When `s` is not a dense 3x3 stride-1 shape of `w`'s channels (at least one in and out) or a
/// slice does not match it.
pub fn winograd(x: &[f32], s: &ConvShape, w: &WinogradWeight, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    assert!(
        !s.depthwise && s.kh == 3 && s.kw == 3 && s.stride == 1 && oh > 0 && ow > 0,
        "winograd: {s:?}"
    );
    assert!(s.cin > 0 && s.cout > 0, "winograd: no channels in {s:?}");
    assert!(
        s.cin == w.cin && s.cout == w.cout,
        "winograd: weight for {} -> {} channels, shape {s:?}",
        w.cin,
        w.cout
    );
    assert_eq!(
        x.len(),
        s.batch * s.h * s.w * s.cin,
        "winograd: input length"
    );
    assert_eq!(
        out.len(),
        s.batch * oh * ow * s.cout,
        "winograd: output length"
    );
    assert!(
        e.bias.is_none_or(|b| b.len() == s.cout),
        "winograd: bias length"
    );
    assert!(
        e.residual.is_none_or(|r| r.len() == out.len()),
        "winograd: residual length"
    );
    let (m, a) = (w.tile.m(), w.tile.alpha());
    let tiles = Tiles {
        s: *s,
        kind: w.tile,
        th: oh.div_ceil(m),
        tw: ow.div_ceil(m),
    };
    let total = s.batch * tiles.th * tiles.tw;
    let per_tile = a * a * (s.cin + s.cout);
    let budget = if a * a * s.cin * s.cout >= STREAMED_WEIGHTS {
        STREAMED_CHUNK_VALUES
    } else {
        CHUNK_VALUES
    };
    // Whole register tiles of rows in each GEMM (14 tiles would make a 2-row tile: ~3 % slower).
    let chunk = (budget / per_tile)
        .max(MIN_CHUNK)
        .next_multiple_of(MR)
        .min(total.div_ceil(crate::cpu::threads()))
        .max(1);
    let dst = OutPtr(out.as_mut_ptr());
    crate::cpu::tasks(total.div_ceil(chunk)).for_each(|i| {
        let t0 = i * chunk;
        let n = chunk.min(total - t0);
        let chunk = Chunk { first: t0, n };
        with_scratch(&CHUNK, n * per_tile, |buf| {
            let (v, mm) = buf.split_at_mut(a * a * n * s.cin);
            let vp = OutPtr(v.as_mut_ptr());
            for t in 0..n {
                // Tile t writes only its own rows of each V_ξ, inside `v`.
                input_tile(x, &tiles, chunk, t, vp);
            }
            serially(|| {
                for ((mm, v), u) in mm
                    .chunks_exact_mut(n * s.cout)
                    .zip(v.chunks_exact(n * s.cin))
                    .zip(&w.u)
                {
                    gemm(v, n, u, Epilogue::default(), mm);
                }
            });
            for t in 0..n {
                // Tile t writes only its own output pixels.
                output_tile(mm, &tiles, chunk, t, e, dst);
            }
        });
    });
}

/// How the output is cut into tiles: `th` x `tw` tiles of `m` x `m` pixels per image.
struct Tiles {
    s: ConvShape,
    kind: WinogradTile,
    th: usize,
    tw: usize,
}

impl Tiles {
    /// Image, first output row and column of tile `t`.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let (m, per_image) = (self.kind.m(), self.th * self.tw);
        let (b, r) = (t / per_image, t % per_image);
        (b, r / self.tw * m, r % self.tw * m)
    }
}

/// The tiles one task transforms together: `first..first + n`; in its buffers, tile
/// `first + slot` is row `slot` of each `V_ξ` ([n, cin]) and `M_ξ` ([n, cout]).
#[derive(Clone, Copy)]
struct Chunk {
    first: usize,
    n: usize,
}

multiversion! {
    /// Writes `V_ξ[slot] = (Bᵀ d B)_ξ` for tile `t` (its input window `d` zero outside the map)
    /// into `v`, `n` rows of `cin` per ξ. Private: `v` must hold `(m + 2)² x n x cin` values and
    /// nothing else may write row `slot` of any `V_ξ` meanwhile.
    fn input_tile<L>(x: &[f32], tiles: &Tiles, chunk: Chunk, slot: usize, v: OutPtr) {
        // SAFETY: the caller's contract above.
        unsafe {
            match tiles.kind {
                WinogradTile::F2 => input_channels::<L, 4>(x, tiles, &BT2, chunk, slot, v),
                WinogradTile::F4 => input_channels::<L, 6>(x, tiles, &BT4, chunk, slot, v),
            }
        }
    }
}

multiversion! {
    /// Writes tile `t`'s output pixels from `M_ξ[slot]` (`mm`: `n` rows of `cout` per ξ) with the
    /// epilogue. Private: `out` must be the whole output and nothing else may write tile `t`'s
    /// pixels meanwhile.
    fn output_tile<L>(mm: &[f32], tiles: &Tiles, chunk: Chunk, slot: usize, e: Epilogue, out: OutPtr) {
        // SAFETY: the caller's contract above.
        unsafe {
            match tiles.kind {
                WinogradTile::F2 => output_channels::<L, 4, 2>(mm, tiles, &AT2, chunk, slot, e, out),
                WinogradTile::F4 => output_channels::<L, 6, 4>(mm, tiles, &AT4, chunk, slot, e, out),
            }
        }
    }
}

/// `L::N` values of `v` from `at`.
#[inline(always)]
fn load<L: Lanes>(v: &[f32], at: usize) -> L {
    assert!(at + L::N <= v.len());
    // SAFETY: checked above.
    unsafe { L::load(v.as_ptr().add(at)) }
}

/// `acc + c x` for a constant `c` (folded at compile time: 0, ±1 and others).
#[inline(always)]
fn axpy<L: Lanes>(acc: L, c: f32, x: L) -> L {
    if c == 0.0 {
        acc
    } else if c == 1.0 {
        acc.add(x)
    } else if c == -1.0 {
        acc.sub(x)
    } else {
        x.mul_add(L::splat(c), acc)
    }
}

/// `R = T X Tᵀ` for a constant `T` [P, A] and `X` [A, A] vectors of lanes.
#[inline(always)]
fn sandwich<L: Lanes, const A: usize, const P: usize>(
    t: &[[f32; A]; P],
    x: &[[L; A]; A],
) -> [[L; P]; P] {
    // T X, then (T X) Tᵀ.
    let mut tx = [[L::splat(0.0); A]; P];
    for (i, row) in tx.iter_mut().enumerate() {
        for (b, v) in row.iter_mut().enumerate() {
            for (a, xa) in x.iter().enumerate() {
                *v = axpy(*v, t[i][a], xa[b]);
            }
        }
    }
    let mut r = [[L::splat(0.0); P]; P];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            for (b, &y) in tx[i].iter().enumerate() {
                *v = axpy(*v, t[j][b], y);
            }
        }
    }
    r
}

/// [`input_tile`] on `L` lanes of channels at a time, the tail one channel at a time.
#[inline(always)]
unsafe fn input_channels<L: Lanes, const A: usize>(
    x: &[f32],
    tiles: &Tiles,
    bt: &[[f32; A]; A],
    chunk: Chunk,
    slot: usize,
    v: OutPtr,
) {
    let c = tiles.s.cin;
    let full = c / L::N * L::N;
    for ch in (0..full).step_by(L::N) {
        // SAFETY: forwarded; `ch + L::N <= c`.
        unsafe { input_group::<L, A>(x, tiles, bt, chunk, slot, v, ch) }
    }
    for ch in full..c {
        // SAFETY: as above.
        unsafe { input_group::<f32, A>(x, tiles, bt, chunk, slot, v, ch) }
    }
}

/// [`input_tile`] for the `L::N` channels from `ch`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn input_group<L: Lanes, const A: usize>(
    x: &[f32],
    tiles: &Tiles,
    bt: &[[f32; A]; A],
    chunk: Chunk,
    slot: usize,
    v: OutPtr,
    ch: usize,
) {
    let s = &tiles.s;
    let c = s.cin;
    let (b, oy, ox) = tiles.origin(chunk.first + slot);
    let n = chunk.n;
    // Window row i reads input row oy + i - pad.top (columns likewise), zero outside the map.
    let inside = |o: usize, pad: usize, size: usize| {
        pad.saturating_sub(o)..(size + pad).saturating_sub(o).min(A)
    };
    let mut d = [[L::splat(0.0); A]; A];
    for i in inside(oy, s.pad.top, s.h) {
        let row = (b * s.h + oy + i - s.pad.top) * s.w;
        for j in inside(ox, s.pad.left, s.w) {
            // SAFETY: the pixel is inside the map and `ch + L::N <= c`.
            d[i][j] = unsafe { L::load(x.as_ptr().add((row + ox + j - s.pad.left) * c + ch)) };
        }
    }
    for (i, row) in sandwich(bt, &d).iter().enumerate() {
        for (j, val) in row.iter().enumerate() {
            // SAFETY: inside `v` (caller); row `slot` of V_ξ is this tile's.
            unsafe { val.store(v.at(((i * A + j) * n + slot) * c + ch)) };
        }
    }
}

/// [`output_tile`] on `L` lanes of channels at a time, the tail one channel at a time.
#[inline(always)]
unsafe fn output_channels<L: Lanes, const A: usize, const M: usize>(
    mm: &[f32],
    tiles: &Tiles,
    at: &[[f32; A]; M],
    chunk: Chunk,
    slot: usize,
    e: Epilogue,
    out: OutPtr,
) {
    let c = tiles.s.cout;
    let full = c / L::N * L::N;
    for ch in (0..full).step_by(L::N) {
        // SAFETY: forwarded; `ch + L::N <= c`.
        unsafe { output_group::<L, A, M>(mm, tiles, at, chunk, slot, e, out, ch) }
    }
    for ch in full..c {
        // SAFETY: as above.
        unsafe { output_group::<f32, A, M>(mm, tiles, at, chunk, slot, e, out, ch) }
    }
}

/// [`output_tile`] for the `L::N` channels from `ch`: `Aᵀ M A`, then the bias, residual and
/// activation, stored where the tile is inside the output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_group<L: Lanes, const A: usize, const M: usize>(
    mm: &[f32],
    tiles: &Tiles,
    at: &[[f32; A]; M],
    chunk: Chunk,
    slot: usize,
    e: Epilogue,
    out: OutPtr,
    ch: usize,
) {
    let s = &tiles.s;
    let (oh, ow) = s.out_hw();
    let c = s.cout;
    let (b, oy, ox) = tiles.origin(chunk.first + slot);
    let n = chunk.n;
    let mut m = [[L::splat(0.0); A]; A];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = load(mm, ((i * A + j) * n + slot) * c + ch);
        }
    }
    let y = sandwich(at, &m);
    let bias = match e.bias {
        Some(bias) => load(bias, ch),
        None => L::splat(0.0),
    };
    for (i, row) in y.iter().enumerate().take(oh - oy) {
        for (j, &v) in row.iter().enumerate().take(ow - ox) {
            let p = ((b * oh + oy + i) * ow + ox + j) * c + ch;
            let mut v = v.add(bias);
            if let Some(r) = e.residual {
                v = v.add(load(r, p));
            }
            // SAFETY: the pixel is inside the output and this tile's.
            unsafe { e.act.lanes::<L>(v).store(out.at(p)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_close, naive_conv, rand_vec, to_nhwc, CONV_REL_TOL};
    use super::super::{Act, Pad};
    use super::*;

    /// F(4x4, 3x3) rounds more than a direct sum: its transforms multiply by up to 8 (output) and
    /// 5 (input) before values cancel, so errors reach a few times 2^-24 x those factors x the
    /// largest partial sums. Measured up to 1e-5 of the output scale on these shapes (F(2x2):
    /// 4e-7).
    const F4_REL_TOL: f32 = 3e-5;
    /// F(2x2, 3x3) in bf16 products (both operands rounded to 8 significant bits): about the 2^-8
    /// rounding of each product, against the largest output (measured up to 5e-3).
    const BF16_REL_TOL: f32 = 1e-2;

    #[test]
    fn winograd_matches_naive_conv() {
        // (batch, cin, h, w, cout, padding): ResNet's padded 3x3 on maps that are and are not
        // multiples of the tiles, channels below, at and past 16 with tails, no and asymmetric
        // padding, maps smaller than a tile, enough tiles for several blocks.
        let cases = [
            (2, 16, 8, 8, 16, Pad::same(1)),
            (1, 37, 13, 11, 21, Pad::same(1)),
            (3, 5, 7, 9, 3, Pad::default()),
            (1, 33, 3, 3, 40, Pad::same(1)),
            (
                2,
                8,
                10,
                6,
                17,
                Pad {
                    top: 0,
                    bottom: 1,
                    left: 2,
                    right: 0,
                },
            ),
            (3, 64, 58, 30, 48, Pad::same(1)),
            // Padding wider than the window on one side (rows of the output read only zeros).
            (
                1,
                3,
                2,
                3,
                5,
                Pad {
                    top: 0,
                    bottom: 4,
                    left: 3,
                    right: 1,
                },
            ),
        ];
        for (i, (b, cin, h, w, cout, pad)) in cases.into_iter().enumerate() {
            let s = ConvShape {
                batch: b,
                cin,
                h,
                w,
                cout,
                kh: 3,
                kw: 3,
                stride: 1,
                pad,
                depthwise: false,
            };
            let (oh, ow) = s.out_hw();
            let x = rand_vec(b * cin * h * w, 40 + i as u64);
            let wt = rand_vec(cout * cin * 9, 41 + i as u64);
            let bias = rand_vec(cout, 42 + i as u64);
            let residual = rand_vec(b * cout * oh * ow, 43 + i as u64);
            let e = Epilogue {
                bias: (i % 3 != 1).then_some(&bias[..]),
                residual: (i % 2 == 0).then_some(&residual[..]),
                act: [Act::Relu, Act::None, Act::Silu, Act::Gelu][i % 4],
            };
            let reference = to_nhwc(&naive_conv(&x, &wt, &s, e), b, cout, oh * ow);
            let res = to_nhwc(&residual, b, cout, oh * ow);
            let e = Epilogue {
                residual: e.residual.map(|_| &res[..]),
                ..e
            };
            let xn = to_nhwc(&x, b, cin, h * w);
            for (tile, precision, tol) in [
                (WinogradTile::F2, Precision::F32, CONV_REL_TOL),
                (WinogradTile::F4, Precision::F32, F4_REL_TOL),
                (WinogradTile::F2, Precision::Bf16, BF16_REL_TOL),
            ] {
                let packed = WinogradWeight::pack(&wt, cout, cin, tile, precision);
                assert_eq!(packed.tile(), tile);
                let mut out = vec![f32::NAN; b * oh * ow * cout];
                winograd(&xn, &s, &packed, e, &mut out);
                let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = out
                    .iter()
                    .zip(&reference)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("{tile:?} {precision} case {i}: rel {:.2e}", err / scale);
                let what = format!("{tile:?} {precision}, case {i}: {s:?}");
                assert_close(&out, &reference, tol, &what);
            }
        }
    }
}
