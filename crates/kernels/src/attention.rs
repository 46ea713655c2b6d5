//! Fused multi-head attention `softmax(scale q k^T + bias) v` per (batch, head), in query tiles x key
//! tiles with an online softmax (FlashAttention-2, Dao 2023, Algorithm 1), so the score matrix is
//! never materialised beyond one L2-sized tile. With AVX-512 the tile products run on the register
//! tiles of [`crate::gemm_f32`]: the keys of a tile are packed as panels, queries and values are read
//! in place (a fused `[B, N, 3, H, d]` projection is used without any copy); elsewhere on the `gemm`
//! crate, reading all three in place through strides. The output is written in `[B, N, H, d]` order
//! (heads merged).
//
// Reference: https://github.com/Dao-AILab/flash-attention/blob/v2.6.3/README.md (FlashAttention-2,
// arXiv:2307.08691, Algorithm 1: per key tile, m_new = max(m, rowmax S), P = exp(S - m_new),
// l = e^{m - m_new} l + rowsum P, O = e^{m - m_new} O + P V; finally O / l).

use rayon::prelude::*;

use crate::dispatch::multiversion;
use crate::panel::NR;
use crate::softmax::{exp_sub_sum, scale_bias_max, scale_row};
use crate::OutPtr;
use crate::Precision;

/// Largest key tile: beyond it the online softmax takes over (1024 keys x 128 queries = 512 KiB of
/// scores, with the key and value tiles inside a 1 MiB L2).
const MAX_KEY_TILE: usize = 1024;
/// Largest query tile.
const MAX_QUERY_TILE: usize = 128;

/// Sizes of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    /// Queries per (batch, head).
    pub queries: usize,
    /// Keys (= values) per (batch, head).
    pub keys: usize,
    pub head_dim: usize,
}

/// Where element `(b, h, i, c)` of a `[batch, heads, rows, cols]` operand lives in its slice:
/// `offset + b * batch + h * head + i * row + c * col`. Broadcast dimensions have stride 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub offset: usize,
    pub batch: usize,
    pub head: usize,
    pub row: usize,
    pub col: usize,
}

/// A read-only operand: its data and how to index it.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub strides: Strides,
}

/// An operand whose strides would read outside its slice, or a bias whose keys are not contiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attention operand layout: {}", self.0)
    }
}

impl std::error::Error for LayoutError {}

impl Operand<'_> {
    /// The largest index read for `rows x cols` per (batch, head), checked against the slice.
    fn check(&self, name: &str, d: &Dims, rows: usize, cols: usize) -> Result<(), LayoutError> {
        let s = &self.strides;
        let last = s.offset
            + (d.batch - 1) * s.batch
            + (d.heads - 1) * s.head
            + (rows - 1) * s.row
            + (cols - 1) * s.col;
        if last >= self.data.len() {
            return Err(LayoutError(format!(
                "{name} reads index {last} of {} values ({d:?}, {s:?})",
                self.data.len()
            )));
        }
        Ok(())
    }

    fn at(&self, b: usize, h: usize, i: usize) -> *const f32 {
        let s = &self.strides;
        self.data[s.offset + b * s.batch + h * s.head + i * s.row..].as_ptr()
    }
}

/// `softmax(scale q k^T + bias) v` for `q` [B, H, N, d], `k` and `v` [B, H, M, d] and an optional
/// additive `bias` [B, H, N, M] (any dimension may broadcast with stride 0; keys contiguous), into a
/// new `[B, N, H, d]` buffer. A query whose keys are all -inf gets a zero row. In bf16 and int8
/// `precision` the two products round their operands to bf16 where the CPU multiplies bf16 natively
/// and fast ([`crate::cpu::Features::bf16_dot`]), as PyTorch's bf16 autocast does (int8 models have
/// no weights to quantise here, and bf16 rounds finer than the uint8 activations of their linear
/// layers); the softmax stays f32.
pub fn attention(
    d: Dims,
    q: Operand,
    k: Operand,
    v: Operand,
    bias: Option<Operand>,
    scale: f32,
    precision: Precision,
) -> Result<Vec<f32>, LayoutError> {
    let out_len = d.batch * d.queries * d.heads * d.head_dim;
    if out_len == 0 {
        return Ok(Vec::new());
    }
    if d.keys == 0 {
        // Softmax over no keys: nothing to attend to.
        return Ok(vec![0.0; out_len]);
    }
    q.check("q", &d, d.queries, d.head_dim)?;
    k.check("k", &d, d.keys, d.head_dim)?;
    v.check("v", &d, d.keys, d.head_dim)?;
    if let Some(b) = &bias {
        if b.strides.col != 1 {
            return Err(LayoutError("the bias must be contiguous along keys".into()));
        }
        b.check("bias", &d, d.queries, d.keys)?;
    }
    let mut out = Vec::with_capacity(out_len);
    let q_tiles = d.queries.div_ceil(MAX_QUERY_TILE);
    let q_tile = d.queries.div_ceil(q_tiles);
    let k_tiles = d.keys.div_ceil(MAX_KEY_TILE);
    let k_tile = d.keys.div_ceil(k_tiles);
    let ptr = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast());
    let tiles = Tiles {
        d,
        q,
        k,
        v,
        bias,
        scale,
        q_tile,
        k_tile,
        products: Products::choose(&d, [&q, &k, &v], precision),
    };
    (0..d.batch * d.heads * q_tiles)
        .into_par_iter()
        .for_each_init(
            || Scratch::new(&tiles),
            |scratch, t| {
                let (bh, qt) = (t / q_tiles, t % q_tiles);
                // SAFETY: the output rows of (bh, qt) belong to this task only; strides checked.
                unsafe { query_tile(&tiles, bh / d.heads, bh % d.heads, qt, scratch, ptr.at(0)) }
            },
        );
    // SAFETY: the tasks wrote every output row of every (batch, head): the first key tile of each
    // query tile writes its rows (the later ones accumulate).
    unsafe { out.set_len(out_len) };
    Ok(out)
}

struct Tiles<'a> {
    d: Dims,
    q: Operand<'a>,
    k: Operand<'a>,
    v: Operand<'a>,
    bias: Option<Operand<'a>>,
    scale: f32,
    q_tile: usize,
    k_tile: usize,
    products: Products,
}

/// What the two products of a tile run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Products {
    /// The `gemm` crate, reading q, k and v through their strides.
    GemmCrate,
    /// [`crate::gemm_f32`]'s AVX-512 register tiles: the keys packed as panels (16 x 16 blocks
    /// transposed in registers), queries and values read in place.
    F32,
    /// [`crate::gemm_bf16`]'s `vdpbf16ps` register tiles: queries and probabilities rounded to bf16
    /// pairs, keys and values packed as bf16 panels.
    Bf16,
}

impl Products {
    /// The register tiles need queries, keys and values contiguous along the head dimension, a
    /// whole number of 16-lane vectors.
    fn choose(d: &Dims, qkv: [&Operand; 3], precision: Precision) -> Self {
        let f = crate::cpu::features();
        if !(cfg!(target_arch = "x86_64")
            && f.avx512f
            && qkv.iter().all(|o| o.strides.col == 1)
            && d.head_dim.is_multiple_of(16))
        {
            Self::GemmCrate
        } else if precision != Precision::F32 && f.bf16_dot {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// One task's buffers.
struct Scratch {
    /// The scores of a tile [q_tile, k_tile], the running maxima and sums [q_tile] each, then the
    /// keys packed as f32 panels.
    f32s: Vec<f32>,
    /// bf16 pairs: the queries [q_tile, d / 2], the probabilities [q_tile, k_tile / 2], then the
    /// keys packed as bf16 panels for the scores, or the values for the mix.
    pairs: Vec<u32>,
    /// f32 products: a key tile's values [k_tile, d], contiguous (read in place, one value row is
    /// a whole token apart: 9 KiB in a ViT-B's fused projection, so every step of the product
    /// touched another page), and the (batch, head, first key) they are of, so the next query tile
    /// of the head (rayon runs a head's query tiles in turn with one scratch) reuses them.
    /// ViT-B/16 @448: forward 4-6 % faster.
    values: Vec<f32>,
    values_of: Option<(usize, usize, usize)>,
    /// The (batch, head, first key) of the keys packed in `f32s` (AVX-512 products), reused by the
    /// head's next query tiles as the values are (ViT-B/16 @224: a head's two query tiles packed
    /// them twice, 4 % of the attention's time).
    keys_of: Option<(usize, usize, usize)>,
}

impl Scratch {
    fn new(t: &Tiles) -> Self {
        let (hd, qt, kt) = (t.d.head_dim, t.q_tile, t.k_tile);
        let keys = kt.next_multiple_of(NR) * hd;
        let packed_keys = if t.products == Products::GemmCrate {
            0
        } else {
            keys
        };
        let f32s = qt * kt + 2 * qt + packed_keys;
        let pairs = if t.products == Products::Bf16 {
            let panels = (keys / 2).max(hd.next_multiple_of(NR) * kt.div_ceil(2));
            qt * hd / 2 + qt * kt.div_ceil(2) + panels
        } else {
            0
        };
        let values = if t.products == Products::F32 {
            kt * hd
        } else {
            0
        };
        Self {
            f32s: vec![0.0; f32s],
            pairs: vec![0; pairs],
            values: vec![0.0; values],
            values_of: None,
            keys_of: None,
        }
    }
}

/// `dst[m x n] (+)= lhs[m x k] rhs[k x n]` with explicit (row, col) strides.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// One (batch, head, query tile): all key tiles with the online softmax.
///
/// # Safety
/// Operand strides checked by [`attention`]; `out` is the `[B, N, H, d]` output.
unsafe fn query_tile(
    t: &Tiles,
    b: usize,
    h: usize,
    qt: usize,
    scratch: &mut Scratch,
    out: *mut f32,
) {
    let d = &t.d;
    let i0 = qt * t.q_tile;
    let rows = t.q_tile.min(d.queries - i0);
    let out_rs = d.heads * d.head_dim;
    let o = out.add(((b * d.queries + i0) * d.heads + h) * d.head_dim);
    let (s, rest) = scratch.f32s.split_at_mut(t.q_tile * t.k_tile);
    let (m_run, rest) = rest.split_at_mut(t.q_tile);
    let (l_run, packed) = rest.split_at_mut(t.q_tile);
    let bf16 = t.products == Products::Bf16;
    let (q_pairs, rest) =
        scratch
            .pairs
            .split_at_mut(if bf16 { t.q_tile * d.head_dim / 2 } else { 0 });
    let (p_pairs, panels) = rest.split_at_mut(if bf16 {
        t.q_tile * t.k_tile.div_ceil(2)
    } else {
        0
    });
    let mut j0 = 0;
    while j0 < d.keys {
        let cols = t.k_tile.min(d.keys - j0);
        let first = j0 == 0;
        let at = At {
            b,
            h,
            i0,
            j0,
            cols,
            first,
        };
        scores(
            t,
            at,
            rows,
            s,
            (packed, &mut scratch.keys_of),
            q_pairs,
            panels,
        );
        softmax_tile(t, at, &mut s[..rows * cols], m_run, l_run, o);
        let values = (&mut scratch.values[..], &mut scratch.values_of);
        mix_values(t, at, rows, s, o, values, p_pairs, panels);
        j0 += cols;
    }
    finish_rows(o, out_rs, d.head_dim, &l_run[..rows]);
}

/// Where a register tile of a product goes: `c`, rows `ldc` apart, added to what is there when
/// `accumulate`.
#[cfg(target_arch = "x86_64")]
fn store(c: *mut f32, ldc: usize, accumulate: bool) -> crate::panel::Store {
    crate::panel::Store {
        c,
        ldc,
        bias: std::ptr::null(),
        residual: if accumulate { c } else { std::ptr::null() },
        act: crate::conv::Act::None,
        cold: false,
    }
}

/// `S = Q Kᵀ` for `rows` queries from `at.i0` and the tile's keys, into `s` (rows `at.cols` apart);
/// `packed` is scratch for the keys packed as panels, `q_pairs` and `panels` for the bf16 operands.
///
/// # Safety
/// As [`query_tile`].
unsafe fn scores(
    t: &Tiles,
    at: At,
    rows: usize,
    s: &mut [f32],
    (packed, keys_of): (&mut [f32], &mut Option<(usize, usize, usize)>),
    q_pairs: &mut [u32],
    panels: &mut [u32],
) {
    let (hd, cols) = (t.d.head_dim, at.cols);
    let q = t.q.at(at.b, at.h, at.i0);
    #[cfg(target_arch = "x86_64")]
    if t.products != Products::GemmCrate {
        use crate::gemm_bf16::{register_tile, to_pairs, x86::interleave_rows};
        use crate::{gemm_f32::x86::strided, panel::MR};
        // Per panel of NR keys, per dimension, the keys' values side by side (zero past the last):
        // blocks of 16 keys x 16 dimensions transposed in registers.
        let kp = &mut packed[..cols.next_multiple_of(NR) * hd];
        let tile = Some((at.b, at.h, at.j0));
        if *keys_of != tile {
            for j0 in (0..cols.next_multiple_of(NR)).step_by(16) {
                let keys = cols.saturating_sub(j0).min(16);
                let rows: [*const f32; 16] = std::array::from_fn(|i| {
                    if i < keys {
                        t.k.at(at.b, at.h, at.j0 + j0 + i)
                    } else {
                        std::ptr::null()
                    }
                });
                let panel = &mut kp[j0 / NR * hd * NR..][..hd * NR];
                for p0 in (0..hd).step_by(16) {
                    x86::transpose_block(&rows, p0, &mut panel[p0 * NR + j0 % NR..], NR);
                }
            }
            *keys_of = tile;
        }
        let (q_rs, hp) = (t.q.strides.row, hd / 2);
        let bf16 = t.products == Products::Bf16;
        if bf16 {
            for r in 0..rows {
                let row = std::slice::from_raw_parts(q.add(r * q_rs), hd);
                to_pairs(row, &mut q_pairs[r * hp..][..hp], true);
            }
            // Each panel's dimensions 2p and 2p + 1 interleaved: [d / 2, NR] pairs.
            for (f, b) in kp
                .chunks_exact(hd * NR)
                .zip(panels.chunks_exact_mut(hp * NR))
            {
                for p in 0..hp {
                    let (lo, hi) = (f[2 * p * NR..].as_ptr(), f[(2 * p + 1) * NR..].as_ptr());
                    interleave_rows(lo, hi, NR, b[p * NR..].as_mut_ptr());
                }
            }
        }
        for pi in 0..cols.div_ceil(NR) {
            for r0 in (0..rows).step_by(MR) {
                let out = store(s.as_mut_ptr().add(r0 * cols + pi * NR), cols, false);
                let (mr, pc) = (MR.min(rows - r0), NR.min(cols - pi * NR));
                if bf16 {
                    let panel = panels[pi * hp * NR..].as_ptr().cast::<u16>();
                    let panel = std::slice::from_raw_parts(panel, hp * NR * 2);
                    let a = &q_pairs[r0 * hp..(r0 + mr) * hp];
                    register_tile(true, a, hp, panel, mr, pc, out);
                } else {
                    let panel = kp[pi * hd * NR..].as_ptr();
                    strided(q.add(r0 * q_rs), q_rs, hd, panel, NR, mr, pc, out);
                }
            }
        }
        return;
    }
    let _ = (packed, keys_of, q_pairs, panels);
    // K^T is [d x cols] with (row, col) strides (col, row) of K.
    tile_gemm(
        (rows, cols, hd),
        s.as_mut_ptr(),
        (cols, 1),
        false,
        q,
        (t.q.strides.row, t.q.strides.col),
        t.k.at(at.b, at.h, at.j0),
        (t.k.strides.col, t.k.strides.row),
    );
}

/// `O (+)= P V` for `rows` queries: `s` holds the tile's probabilities, `o` the output rows;
/// `values` is scratch for the tile's values packed [cols, d] (f32 products; the others read them in
/// place), with the tile it holds, `p_pairs` and `panels` for the bf16 operands.
///
/// # Safety
/// As [`query_tile`].
#[allow(clippy::too_many_arguments)]
unsafe fn mix_values(
    t: &Tiles,
    at: At,
    rows: usize,
    s: &[f32],
    o: *mut f32,
    (values, values_of): (&mut [f32], &mut Option<(usize, usize, usize)>),
    p_pairs: &mut [u32],
    panels: &mut [u32],
) {
    let (hd, cols) = (t.d.head_dim, at.cols);
    let out_rs = t.d.heads * hd;
    let v = t.v.at(at.b, at.h, at.j0);
    let tile = Some((at.b, at.h, at.j0));
    if t.products == Products::F32 && *values_of != tile {
        for (r, dst) in values.chunks_exact_mut(hd).take(cols).enumerate() {
            dst.copy_from_slice(std::slice::from_raw_parts(v.add(r * t.v.strides.row), hd));
        }
        *values_of = tile;
    }
    #[cfg(target_arch = "x86_64")]
    if t.products != Products::GemmCrate {
        use crate::gemm_bf16::{register_tile, to_pairs, x86::interleave_rows};
        use crate::{gemm_f32::x86::strided, panel::MR};
        let (cp, v_rs) = (cols.div_ceil(2), t.v.strides.row);
        let bf16 = t.products == Products::Bf16;
        if bf16 {
            for r in 0..rows {
                to_pairs(&s[r * cols..][..cols], &mut p_pairs[r * cp..][..cp], true);
            }
        }
        for c0 in (0..hd).step_by(NR) {
            let n = NR.min(hd - c0);
            // bf16: per panel of NR dimensions, keys 2p and 2p + 1 interleaved ([cols / 2, NR]
            // pairs); f32: `values` (per key, the head's dimensions).
            let at_panel = (c0 / NR * cp * NR).min(panels.len());
            let vb = &mut panels[at_panel..];
            if bf16 {
                for p in 0..cp {
                    let hi = if 2 * p + 1 < cols {
                        v.add((2 * p + 1) * v_rs + c0)
                    } else {
                        std::ptr::null()
                    };
                    interleave_rows(v.add(2 * p * v_rs + c0), hi, n, vb[p * NR..].as_mut_ptr());
                }
            }
            for r0 in (0..rows).step_by(MR) {
                let out = store(o.add(r0 * out_rs + c0), out_rs, !at.first);
                let mr = MR.min(rows - r0);
                if bf16 {
                    let panel = std::slice::from_raw_parts(vb.as_ptr().cast::<u16>(), cp * NR * 2);
                    let a = &p_pairs[r0 * cp..(r0 + mr) * cp];
                    register_tile(true, a, cp, panel, mr, n, out);
                } else {
                    let p = s.as_ptr().add(r0 * cols);
                    strided(p, cols, cols, values[c0..].as_ptr(), hd, mr, n, out);
                }
            }
        }
        return;
    }
    let _ = (p_pairs, panels);
    tile_gemm(
        (rows, hd, cols),
        o,
        (out_rs, 1),
        !at.first,
        s.as_ptr(),
        (cols, 1),
        v,
        (t.v.strides.row, t.v.strides.col),
    );
}

/// Which tile of scores [`softmax_tile`] works on.
#[derive(Clone, Copy)]
struct At {
    b: usize,
    h: usize,
    /// First query and first key of the tile.
    i0: usize,
    j0: usize,
    /// Keys in the tile.
    cols: usize,
    /// Whether this is the first key tile (nothing accumulated yet).
    first: bool,
}

multiversion! {
    /// Scores of one tile -> probabilities relative to the running maxima; rescales the output rows
    /// already accumulated (`o`, `[B, N, H, d]` rows) when a maximum grows.
    fn softmax_tile<L>(
        t: &Tiles,
        at: At,
        s: &mut [f32],
        m_run: &mut [f32],
        l_run: &mut [f32],
        o: *mut f32,
    ) {
        let At { b, h, i0, j0, cols, first } = at;
        let out_rs = t.d.heads * t.d.head_dim;
        for (r, row) in s.chunks_exact_mut(cols).enumerate() {
            let bias = t.bias.as_ref().map(|bo| {
                let p = bo.at(b, h, i0 + r);
                // SAFETY: checked by `attention`: cols keys from j0 are inside the bias slice.
                unsafe { std::slice::from_raw_parts(p.add(j0), cols) }
            });
            let mx = scale_bias_max::<L>(row, t.scale, bias);
            if first {
                m_run[r] = mx;
                l_run[r] = exp_sub_sum::<L>(row, mx);
            } else {
                let m_new = m_run[r].max(mx);
                let sum = exp_sub_sum::<L>(row, m_new);
                if m_new > m_run[r] {
                    let corr = if m_run[r] == f32::NEG_INFINITY { 0.0 } else { (m_run[r] - m_new).exp() };
                    l_run[r] *= corr;
                    // SAFETY: the output row r of this tile, head_dim values.
                    let orow = unsafe { std::slice::from_raw_parts_mut(o.add(r * out_rs), t.d.head_dim) };
                    scale_row::<L>(orow, corr);
                }
                m_run[r] = m_new;
                l_run[r] += sum;
            }
        }
    }
}

multiversion! {
    /// O /= l per row (zero rows where every key was masked).
    fn finish_rows<L>(o: *mut f32, out_rs: usize, hd: usize, l: &[f32]) {
        for (r, &l) in l.iter().enumerate() {
            // SAFETY: the output row r of this tile, hd values.
            let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * out_rs), hd) };
            scale_row::<L>(row, if l > 0.0 { 1.0 / l } else { 0.0 });
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Writes the transpose of a 16 x 16 block: row `c` of `dst` (rows `ld` apart) gets value
    /// `p0 + c` of the 16 source rows (a null row reads as zeros).
    ///
    /// # Safety
    /// AVX-512F is present; every non-null row holds `p0 + 16` values; `dst` holds 15 `ld` + 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_block(
        rows: &[*const f32; 16],
        p0: usize,
        dst: &mut [f32],
        ld: usize,
    ) {
        assert!(dst.len() >= 15 * ld + 16);
        // SAFETY: the rows hold the 16 values read (caller).
        let r: [__m512; 16] = std::array::from_fn(|i| {
            if rows[i].is_null() {
                _mm512_setzero_ps()
            } else {
                unsafe { _mm512_loadu_ps(rows[i].add(p0)) }
            }
        });
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        // Pairs of rows interleaved, then quadruples: u[4g + c] holds values c, c + 4, c + 8, c + 12
        // of rows 4g..4g + 4 (one 128-bit lane each).
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (a, b) = (pd(t[4 * g + c / 2]), pd(t[4 * g + c / 2 + 2]));
            ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // v[8h + c] holds values c and c + 8 of rows 8h..8h + 8; then the output rows.
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let (h, c) = (i / 8, i % 8);
            let (a, b) = (u[8 * h + c % 4], u[8 * h + 4 + c % 4]);
            if c < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        });
        for c in 0..16 {
            let (a, b) = (v[c % 8], v[8 + c % 8]);
            let row = if c < 8 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            };
            // SAFETY: c * ld + 16 <= dst.len() (asserted).
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(c * ld), row) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::tests::uniform;

    /// Absolute tolerance against the f64 reference (outputs are averages of values in [-1, 1]).
    const ATOL: f64 = 2e-5;
    /// The same in bf16 products (8 significant bits): q and k rounded by up to 2^-9 each put the
    /// scores off by ~2e-3 here (0.2 x sqrt(d) products of values up to 1), which moves each
    /// probability by that fraction; rounded probabilities and values add 2^-9 of each term. The
    /// outputs (|y| <= 1) came out within 6e-4; the bound leaves a factor of 5.
    const ATOL_BF16: f64 = 3e-3;

    fn contiguous(rows: usize, hd: usize, heads: usize) -> Strides {
        Strides {
            offset: 0,
            batch: heads * rows * hd,
            head: rows * hd,
            row: hd,
            col: 1,
        }
    }

    fn get(o: &Operand, b: usize, h: usize, i: usize, c: usize) -> f64 {
        let s = &o.strides;
        o.data[s.offset + b * s.batch + h * s.head + i * s.row + c * s.col] as f64
    }

    /// Naive f64 attention, output [B, N, H, d].
    fn naive(
        d: Dims,
        q: Operand,
        k: Operand,
        v: Operand,
        bias: Option<Operand>,
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; d.batch * d.queries * d.heads * d.head_dim];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.queries {
                    let s: Vec<f64> = (0..d.keys)
                        .map(|j| {
                            let dot: f64 = (0..d.head_dim)
                                .map(|c| get(&q, b, h, i, c) * get(&k, b, h, j, c))
                                .sum();
                            dot * scale + bias.as_ref().map_or(0.0, |bo| get(bo, b, h, i, j))
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if mx == f64::NEG_INFINITY {
                        continue;
                    }
                    let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let sum: f64 = p.iter().sum();
                    for c in 0..d.head_dim {
                        let y: f64 =
                            (0..d.keys).map(|j| p[j] * get(&v, b, h, j, c)).sum::<f64>() / sum;
                        out[((b * d.queries + i) * d.heads + h) * d.head_dim + c] = y;
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_within(got, want, ATOL, what);
    }

    fn assert_within(got: &[f32], want: &[f64], atol: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= atol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    /// Separate contiguous q/k/v with odd sizes, several query tiles and several key tiles (online
    /// softmax), with and without a per-query bias holding -inf entries and a fully masked query;
    /// several query tiles per head over one key tile (whose packed values the next query tile of
    /// the head reuses).
    #[test]
    fn matches_naive_contiguous() {
        for (batch, heads, n, m, hd) in [
            (1usize, 1usize, 1usize, 1usize, 1usize),
            (2, 3, 37, 29, 8),
            (1, 2, 130, 2100, 16),
            (2, 2, 300, 200, 64),
        ] {
            let d = Dims {
                batch,
                heads,
                queries: n,
                keys: m,
                head_dim: hd,
            };
            let qd = uniform(1, batch * heads * n * hd, -1.0, 1.0);
            let kd = uniform(2, batch * heads * m * hd, -1.0, 1.0);
            let vd = uniform(3, batch * heads * m * hd, -1.0, 1.0);
            let q = Operand {
                data: &qd,
                strides: contiguous(n, hd, heads),
            };
            let k = Operand {
                data: &kd,
                strides: contiguous(m, hd, heads),
            };
            let v = Operand {
                data: &vd,
                strides: contiguous(m, hd, heads),
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let got = attention(d, q, k, v, None, scale, Precision::F32).unwrap();
            assert_close(&got, &naive(d, q, k, v, None, scale as f64), "no bias");

            // Bias [1, 1, N, M] broadcast over batch and heads: -inf on some keys, and on every key
            // of the last query, which must give a zero row.
            let mut bd = uniform(4, n * m, -2.0, 2.0);
            for (i, x) in bd.iter_mut().enumerate() {
                if i % 7 == 3 || i >= (n - 1) * m {
                    *x = f32::NEG_INFINITY;
                }
            }
            let bias = Operand {
                data: &bd,
                strides: Strides {
                    offset: 0,
                    batch: 0,
                    head: 0,
                    row: m,
                    col: 1,
                },
            };
            let got = attention(d, q, k, v, Some(bias), scale, Precision::F32).unwrap();
            let want = naive(d, q, k, v, Some(bias), scale as f64);
            assert_close(&got, &want, "bias");
            let last = &got[((batch - 1) * n + n - 1) * heads * hd..];
            assert!(last.iter().all(|&x| x == 0.0), "fully masked query");
        }
    }

    /// q, k, v read in place from a fused [B, N, 3, H, d] projection, with a [B, 1, 1, M] key
    /// padding bias (broadcast over heads and queries); head sizes off the 16-lane vectors (the
    /// `gemm` crate), of one panel and past one panel (the register tiles where AVX-512 is present).
    #[test]
    fn matches_naive_fused_qkv_layout() {
        for hd in [24, 64, 80] {
            for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
                fused_qkv_layout(hd, precision);
            }
        }
    }

    fn fused_qkv_layout(hd: usize, precision: Precision) {
        let (batch, heads, n) = (2usize, 4usize, 197usize);
        let d = Dims {
            batch,
            heads,
            queries: n,
            keys: n,
            head_dim: hd,
        };
        let data = uniform(5, batch * n * 3 * heads * hd, -1.0, 1.0);
        let part = |p: usize| Operand {
            data: &data,
            strides: Strides {
                offset: p * heads * hd,
                batch: n * 3 * heads * hd,
                head: hd,
                row: 3 * heads * hd,
                col: 1,
            },
        };
        let bd: Vec<f32> = (0..batch * n)
            .map(|i| {
                if i % n >= n - 5 && i >= n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Operand {
            data: &bd,
            strides: Strides {
                offset: 0,
                batch: n,
                head: 0,
                row: 0,
                col: 1,
            },
        };
        let run = |p| attention(d, part(0), part(1), part(2), Some(bias), 0.2, p).unwrap();
        let got = run(precision);
        let want = naive(d, part(0), part(1), part(2), Some(bias), 0.2);
        let what = format!("fused, head size {hd}, {precision}");
        let atol = match precision {
            Precision::F32 => ATOL,
            Precision::Bf16 | Precision::Int8 => ATOL_BF16,
        };
        assert_within(&got, &want, atol, &what);
        if precision != Precision::F32 && hd.is_multiple_of(16) && crate::cpu::features().bf16_dot {
            assert_ne!(got, run(Precision::F32), "{what}: the bf16 products ran");
        }
    }

    #[test]
    fn rejects_out_of_bounds_strides() {
        let data = vec![0.0f32; 10];
        let d = Dims {
            batch: 1,
            heads: 1,
            queries: 3,
            keys: 3,
            head_dim: 4,
        };
        let op = Operand {
            data: &data,
            strides: contiguous(3, 4, 1),
        };
        let err = attention(d, op, op, op, None, 1.0, Precision::F32).unwrap_err();
        assert!(err.to_string().contains("q reads index 11 of 10"), "{err}");
    }
}
