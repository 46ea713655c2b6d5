//! What the channels-last (NHWC) CPU trunks share (ConvNeXt, ResNet): a map as rows of C values
//! per pixel, borrowing the f32 data of the model's CPU tensors, and convolutions prepared at load
//! (dense ones as an NHWC im2col in blocks of rows + one GEMM on packed weights, depthwise ones
//! vectorised across channels) with the bias, a residual and the activation fused.

use std::ops::Deref;

use candle_core::{Device, Layout, Storage, Tensor};
use visenc_kernels::conv::nhwc::{
    dense, depthwise, depthwise_and_mean, nchw_to_nhwc, DepthwiseWeight,
};
use visenc_kernels::conv::winograd::{winograd, WinogradTile, WinogradWeight};
use visenc_kernels::conv::{Act, ConvShape, Epilogue, Pad};
use visenc_kernels::gemm::PackedWeight;
use visenc_kernels::pool::mean_pixels;
use visenc_kernels::Precision;

use crate::conv::{cpu_f32, is_cpu_f32, Conv, Padding};
use crate::error::{ModelError, Result};

/// A read lock on a CPU tensor's storage, to borrow its f32 data.
pub(crate) struct View<'a, G>(G, &'a Layout);

pub(crate) fn view(t: &Tensor) -> View<'_, impl Deref<Target = Storage> + '_> {
    let (s, l) = t.storage_and_layout();
    View(s, l)
}

impl<G: Deref<Target = Storage>> View<'_, G> {
    pub(crate) fn data(&self) -> Result<&[f32]> {
        cpu_f32(&self.0, self.1)
    }
}

/// A CNN trunk's convolutions in the one form its forward pass uses: candle's channels-first ones
/// (other devices and dtypes) or the channels-last CPU path's prepared ones, made from those while
/// dropping each as it is converted, so the weights are held once.
pub(crate) enum Form<C, W> {
    Candle(C),
    ChannelsLast(W),
}

impl<C, W> Form<C, W> {
    /// The channels-last form where `prepare` makes one (it gives the channels-first form back where
    /// the path does not apply), else the form as it is.
    pub(crate) fn channels_last(
        self,
        prepare: impl FnOnce(C) -> Result<std::result::Result<W, C>>,
    ) -> Result<Self> {
        Ok(match self {
            Self::Candle(c) => match prepare(c)? {
                Ok(w) => Self::ChannelsLast(w),
                Err(c) => Self::Candle(c),
            },
            w => w,
        })
    }
}

/// An NHWC map: `data` holds [batch, h, w, c].
pub(crate) struct Map {
    pub data: Buffer,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Map {
    /// An NCHW f32 CPU tensor's values, transposed to NHWC in one pass into a buffer from `s`.
    pub(crate) fn from_nchw(pixels: &Tensor, s: &mut Scratch) -> Result<Self> {
        let (batch, c, h, w) = pixels.dims4()?;
        let pixels = pixels.contiguous()?;
        let v = view(&pixels);
        let mut data = s.take(batch * c * h * w);
        nchw_to_nhwc(v.data()?, batch, c, h * w, &mut data);
        Ok(Self {
            data,
            batch,
            h,
            w,
            c,
        })
    }

    /// The number of pixels (rows) over all images.
    pub(crate) fn rows(&self) -> usize {
        self.batch * self.h * self.w
    }

    /// Each image's mean pixel, [batch, c] (global average pooling straight from the rows).
    ///
    /// # Panics
    /// On a map without pixels.
    pub(crate) fn pixel_means(&self) -> Result<Tensor> {
        let mut means = vec![0f32; self.batch * self.c];
        mean_pixels(&self.data, self.h * self.w, self.c, &mut means);
        Ok(Tensor::from_vec(means, (self.batch, self.c), &Device::Cpu)?)
    }

    /// The map as an NCHW tensor (a strided view, copied only if a caller needs it contiguous).
    pub(crate) fn to_nchw(&self) -> Result<Tensor> {
        let t = Tensor::from_slice(
            &self.data,
            (self.batch, self.h, self.w, self.c),
            &Device::Cpu,
        )?;
        Ok(t.permute((0, 3, 1, 2))?)
    }
}

/// Runs the leading `stages` for which `split(stage, map)` holds (`map` one image's input to the
/// stage) image by image with `run`, so that a large batch's maps stay in the cache from one
/// convolution to the next; returns the batch's map after them and how many stages ran. A batch of
/// one, or a first stage `split` refuses, runs nothing.
pub(crate) fn per_image<S>(
    stages: &[S],
    x: Map,
    s: &mut Scratch,
    split: impl Fn(&S, &Map) -> bool,
    run: impl Fn(&S, Map, &mut Scratch) -> Result<Map>,
) -> Result<(Map, usize)> {
    let batch = x.batch;
    let one = x.h * x.w * x.c;
    let image = |data| Map {
        data,
        batch: 1,
        h: x.h,
        w: x.w,
        c: x.c,
    };
    if batch < 2
        || one == 0
        || stages
            .first()
            .is_none_or(|st| !split(st, &image(Buffer::default())))
    {
        return Ok((x, 0));
    }
    let mut outs = Vec::with_capacity(batch);
    let mut ran = 0;
    for pixels in x.data.chunks_exact(one) {
        let mut data = s.take(one);
        data.copy_from_slice(pixels);
        let mut m = image(data);
        ran = 0;
        while let Some(stage) = stages.get(ran).filter(|st| split(st, &m)) {
            m = run(stage, m, s)?;
            ran += 1;
        }
        outs.push(m);
    }
    s.give(x.data);
    let (h, w, c) = (outs[0].h, outs[0].w, outs[0].c);
    let mut data = s.take(batch * h * w * c);
    for (dst, m) in data.chunks_exact_mut(h * w * c).zip(outs) {
        dst.copy_from_slice(&m.data);
        s.give(m.data);
    }
    Ok((
        Map {
            data,
            batch,
            h,
            w,
            c,
        },
        ran,
    ))
}

/// How an [`NhwcConv`] pads its input.
#[derive(Debug, Clone, Copy)]
enum ConvPad {
    Fixed(Pad),
    /// TensorFlow "SAME", from each input's size.
    TfSame,
}

/// A prepared weight: dense ones packed from [cout, kh, kw, cin] (the order [`im2col`] gathers
/// in) for [`dense`], depthwise ones tap-major for [`depthwise`].
#[derive(Debug)]
enum Kernel {
    Dense(PackedWeight),
    Winograd(WinogradWeight),
    Depthwise(DepthwiseWeight),
}

/// One convolution prepared for an NHWC trunk, its weight and bias (the folded BatchNorm's) in
/// the one place they are read from.
#[derive(Debug)]
pub(crate) struct NhwcConv {
    kernel: Kernel,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: ConvPad,
}

impl NhwcConv {
    /// Prepares `c` (after zero padding `extra` on top of its own, transformers' `ZeroPad2d`), its
    /// dense products in `precision`. `None` for what the path does not run: groups other than
    /// depthwise, non-square kernels, TF "SAME" padding with extra padding, weights not f32 on the
    /// CPU.
    pub(crate) fn prepare(c: &Conv, extra: Pad, precision: Precision) -> Result<Option<Self>> {
        let Some(pad) = Self::padding(c, extra)? else {
            return Ok(None);
        };
        let (stride, groups) = (c.stride(), c.groups());
        let (cout, per_group, kh, kw) = c.weight().dims4()?;
        let depthwise = groups > 1 && per_group == 1 && cout == groups;
        // The weight as loaded ([cout, cin, kh, kw]; contiguous() copies only a strided one).
        let loaded = c.weight().contiguous()?;
        let loaded = view(&loaded);
        let kernel = if depthwise {
            Kernel::Depthwise(DepthwiseWeight::pack(loaded.data()?, cout, kh * kw))
        } else if let Some(tile) = WinogradTile::for_conv(kh, stride, per_group, cout, precision) {
            let w = loaded.data()?;
            Kernel::Winograd(WinogradWeight::pack(w, cout, per_group, tile, precision))
        } else {
            // [cout, kh, kw, cin], the order im2col gathers in (no copy for a 1x1 convolution).
            let w = c.weight().permute((0, 2, 3, 1))?.contiguous()?;
            let w = view(&w);
            Kernel::Dense(PackedWeight::pack(
                w.data()?,
                cout,
                kh * kw * per_group,
                precision,
            ))
        };
        let bias = match c.bias_tensor() {
            Some(b) => b.to_vec1()?,
            None => vec![0.0; cout],
        };
        Ok(Some(Self {
            kernel,
            bias,
            cin: per_group * groups,
            cout,
            k: kh,
            stride,
            pad,
        }))
    }

    /// Whether [`Self::prepare`] takes `c` (checked before any convolution of a trunk is prepared, so
    /// a trunk can drop each channels-first convolution as soon as it is converted).
    pub(crate) fn applies(c: &Conv, extra: Pad) -> Result<bool> {
        Ok(Self::padding(c, extra)?.is_some())
    }

    /// The padding the NHWC kernels apply for `c` with `extra`, or `None` where the path does not
    /// run `c` (see [`Self::prepare`]).
    fn padding(c: &Conv, extra: Pad) -> Result<Option<ConvPad>> {
        let (groups, (cout, per_group, kh, kw)) = (c.groups(), c.weight().dims4()?);
        let depthwise = groups > 1 && per_group == 1 && cout == groups;
        if (groups != 1 && !depthwise) || kh != kw || !is_cpu_f32(c.weight()) {
            return Ok(None);
        }
        Ok(match c.padding() {
            Padding::Symmetric(p) => Some(ConvPad::Fixed(Pad {
                top: p + extra.top,
                bottom: p + extra.bottom,
                left: p + extra.left,
                right: p + extra.right,
            })),
            Padding::TfSame if extra == Pad::default() => Some(ConvPad::TfSame),
            Padding::TfSame => None,
        })
    }

    /// Output channels.
    pub(crate) fn out_channels(&self) -> usize {
        self.cout
    }

    /// `act(conv(x) + bias + residual)` (the residual NHWC of the output's shape), into a buffer
    /// from `s`.
    pub(crate) fn forward(
        &self,
        x: &Map,
        residual: Option<&[f32]>,
        act: Act,
        s: &mut Scratch,
    ) -> Result<Map> {
        self.run(x, residual, act, s, None)
    }

    /// [`NhwcConv::forward`] without a residual, and `means` [batch, c] = each image's mean output
    /// pixel (a depthwise convolution sums them as it stores its output).
    pub(crate) fn forward_and_mean(
        &self,
        x: &Map,
        act: Act,
        s: &mut Scratch,
        means: &mut [f32],
    ) -> Result<Map> {
        self.run(x, None, act, s, Some(means))
    }

    fn run(
        &self,
        x: &Map,
        residual: Option<&[f32]>,
        act: Act,
        s: &mut Scratch,
        means: Option<&mut [f32]>,
    ) -> Result<Map> {
        if x.c != self.cin {
            return Err(ModelError::Input(format!(
                "a convolution over {} input channels got a map with {}",
                self.cin, x.c
            )));
        }
        let k = self.k;
        let shape = ConvShape {
            batch: x.batch,
            cin: x.c,
            h: x.h,
            w: x.w,
            cout: self.cout,
            kh: k,
            kw: k,
            stride: self.stride,
            pad: match self.pad {
                ConvPad::Fixed(p) => p,
                ConvPad::TfSame => Pad::tf_same(x.h, x.w, k, k, self.stride),
            },
            depthwise: matches!(self.kernel, Kernel::Depthwise(_)),
        };
        let (oh, ow) = shape.out_hw();
        if oh == 0 || ow == 0 {
            return Err(ModelError::Input(format!(
                "a {}x{} map is smaller than the {k}x{k} convolution over it",
                x.h, x.w
            )));
        }
        let (m, n) = (x.batch * oh * ow, self.cout);
        let mut out = s.take(m * n);
        let e = Epilogue {
            bias: Some(&self.bias),
            residual,
            act,
        };
        // The means the kernel did not sum as it stored its output.
        let means = match (&self.kernel, means) {
            (Kernel::Depthwise(w), Some(means)) => {
                depthwise_and_mean(&x.data, w, &shape, e, &mut out, means);
                None
            }
            (Kernel::Depthwise(w), None) => {
                depthwise(&x.data, w, &shape, e, &mut out);
                None
            }
            (Kernel::Dense(w), means) => {
                dense(&x.data, &shape, w, e, &mut out);
                means
            }
            (Kernel::Winograd(w), means) => {
                winograd(&x.data, &shape, w, e, &mut out);
                means
            }
        };
        if let Some(m) = means {
            mean_pixels(&out, oh * ow, n, m);
        }
        Ok(Map {
            data: out,
            batch: x.batch,
            h: oh,
            w: ow,
            c: n,
        })
    }
}

/// An f32 buffer whose allocation stays initialised past its length: shortening it keeps the values
/// and growing it again within what was ever initialised needs no zeroing, so buffers move between
/// maps of different sizes without touching memory.
#[derive(Default)]
pub(crate) struct Buffer {
    /// Every value ever initialised; the buffer is the first `len`.
    all: Vec<f32>,
    len: usize,
}

impl Buffer {
    /// `len` values, zero where the allocation never held any (contents otherwise unspecified).
    pub(crate) fn resize(&mut self, len: usize) {
        if self.all.capacity() < len {
            // A new allocation rather than a reallocation that would copy values nobody needs.
            self.all = vec![0.0; len];
        } else if self.all.len() < len {
            self.all.resize(len, 0.0);
        }
        self.len = len;
    }

    /// Values this buffer holds without growing.
    fn room(&self) -> usize {
        self.all.len()
    }
}

impl From<Vec<f32>> for Buffer {
    fn from(all: Vec<f32>) -> Self {
        let len = all.len();
        Self { all, len }
    }
}

impl std::ops::Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.all[..self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.all[..self.len]
    }
}

/// Buffers under this many values (256 KiB) are small: a small request takes only a small buffer
/// and a large one only a large buffer, so a map nobody gives back never holds a large buffer
/// hostage.
const SMALL: usize = 1 << 16;

/// Buffers the process keeps between forward passes (so a steady stream of batches allocates,
/// page-faults and zeroes nothing): at most this many large ones and this many small ones.
const KEEP: usize = 12;

/// The kept buffers: one pool for the process, not one per thread, since a forward pass runs on
/// whichever rayon worker picks it up.
static FREE: std::sync::Mutex<Vec<Buffer>> = std::sync::Mutex::new(Vec::new());

fn kept() -> std::sync::MutexGuard<'static, Vec<Buffer>> {
    // A panic elsewhere cannot leave the list half-changed (its changes are single calls).
    FREE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Buffers reused across a forward pass (maps no longer needed), and by the next forward pass. It
/// takes the kept buffers when made (a concurrent forward pass starts with none) and keeps the
/// roomiest of each size class when dropped.
pub(crate) struct Scratch {
    free: Vec<Buffer>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            free: std::mem::take(&mut *kept()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut kept = kept();
        kept.append(&mut self.free);
        kept.sort_by_key(|b| std::cmp::Reverse(b.room()));
        let large = kept.partition_point(|b| b.room() >= SMALL);
        let small = kept.split_off(large);
        kept.truncate(KEEP);
        kept.extend(small.into_iter().take(KEEP));
    }
}

impl Scratch {
    /// A buffer of `len` values (contents unspecified): the free one of `len`'s size class with the
    /// least room that holds `len`, else (large) the roomiest large one grown to `len`, else a new
    /// one.
    pub(crate) fn take(&mut self, len: usize) -> Buffer {
        let class = |b: &Buffer| (b.room() < SMALL) == (len < SMALL);
        let free = &self.free;
        let fit = (0..free.len())
            .filter(|&i| class(&free[i]) && free[i].room() >= len)
            .min_by_key(|&i| free[i].room())
            .or_else(|| {
                (0..free.len())
                    .filter(|&i| len >= SMALL && class(&free[i]))
                    .max_by_key(|&i| free[i].room())
            });
        let mut b = fit.map(|i| self.free.swap_remove(i)).unwrap_or_default();
        b.resize(len);
        b
    }

    /// Returns a buffer for later [`Scratch::take`]s.
    pub(crate) fn give(&mut self, b: Buffer) {
        if b.room() > 0 {
            self.free.push(b);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{DType, Device, Tensor};
    use visenc_weights::Weights;

    use super::{Scratch, SMALL};
    use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures};

    /// The family fixture `name` (`fixtures/families/<name>`): its f32 CPU weights, its
    /// `config.json` and the architecture named there.
    pub(crate) fn family_fixture(name: &str) -> (Weights, serde_json::Value, String) {
        let dir = format!(
            "{}/../../fixtures/families/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let tensors =
            candle_core::safetensors::load(format!("{dir}/model.safetensors"), &Device::Cpu)
                .unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/config.json")).unwrap())
                .unwrap();
        let arch = cfg["architecture"].as_str().unwrap_or_default().to_string();
        (
            Weights::new(tensors, &dir, DType::F32, &Device::Cpu),
            cfg,
            arch,
        )
    }

    /// Buffers come back for requests of their size class only: a small map never takes a large
    /// buffer, a large one reuses the large buffer given back, and each keeps its values' room.
    #[test]
    fn scratch_reuses_buffers_within_their_size_class() {
        // Not `default()`: without the process's kept buffers, which other tests change.
        let mut s = Scratch { free: Vec::new() };
        let large = s.take(SMALL * 2);
        let at = large.as_ptr();
        s.give(large);
        let small = s.take(100);
        assert!(small.room() < SMALL, "a small request took a large buffer");
        assert_eq!(small.len(), 100);
        let small_at = small.as_ptr();
        s.give(small);
        assert_eq!(s.take(SMALL * 2).as_ptr(), at, "large buffer not reused");
        assert_eq!(s.take(50).as_ptr(), small_at, "small buffer not reused");
    }

    /// Max |a - b| over max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims(), "shape");
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max((a - b).unwrap()) / max(b.clone()).max(1e-12)
    }

    /// A model on the channels-last path (`fast`) and the same on candle's NCHW one (`slow`) agree
    /// on random pixels of every `(batch, height, width)` in `sizes` (`what` names the model):
    /// pooled, logits and the `maps` feature maps, within f32 summation-order differences.
    pub(crate) fn assert_paths_agree(
        fast: &dyn ImageEncoder,
        slow: &dyn ImageEncoder,
        sizes: &[(usize, usize, usize)],
        maps: usize,
        what: &str,
    ) {
        let opts = EncodeOptions {
            features: true,
            ..Default::default()
        };
        for &(b, h, w) in sizes {
            let px = Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu).unwrap();
            let (f, s) = (fast.encode(&px, &opts), slow.encode(&px, &opts));
            let at = format!("{what} {b}x3x{h}x{w}");
            assert_eq!(f.as_ref().unwrap().feature_maps.len(), maps, "{at}: maps");
            assert_features_agree(&f.unwrap(), &s.unwrap(), &at);
        }
    }

    /// Two runs of one input agree (`at` names it): pooled, logits and every feature map.
    fn assert_features_agree(fast: &ImageFeatures, slow: &ImageFeatures, at: &str) {
        assert!(rel(&fast.pooled, &slow.pooled) < 1e-4, "{at}: pooled");
        match (&fast.logits, &slow.logits) {
            (Some(f), Some(s)) => assert!(rel(f, s) < 1e-4, "{at}: logits"),
            (None, None) => {}
            _ => panic!("{at}: logits on one path only"),
        }
        assert_eq!(
            fast.feature_maps.len(),
            slow.feature_maps.len(),
            "{at}: maps"
        );
        for (i, (f, s)) in fast.feature_maps.iter().zip(&slow.feature_maps).enumerate() {
            assert_eq!(f.reduction, s.reduction, "{at}: map {i} reduction");
            assert!(rel(&f.map, &s.map) < 1e-4, "{at}: map {i}");
        }
    }
}
