//! What the channels-last (NHWC) CPU trunks share (ConvNeXt, ResNet): a map as rows of C values
//! per pixel, and borrowing the f32 data of the model's CPU tensors.

use std::ops::Deref;

use candle_core::{Device, Layout, Storage, Tensor};

use crate::conv::cpu_f32;
use crate::error::Result;

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

/// An NHWC map: `data` holds [batch, h, w, c].
pub(crate) struct Map {
    pub data: Vec<f32>,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Map {
    /// An NCHW f32 CPU tensor's values, transposed to NHWC.
    pub(crate) fn from_nchw(pixels: &Tensor) -> Result<Self> {
        let (batch, c, h, w) = pixels.dims4()?;
        let nhwc = pixels.permute((0, 2, 3, 1))?.contiguous()?;
        let data = view(&nhwc).data()?.to_vec();
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
