//! The low-precision form of a [`crate::conv::Conv`]: under [`Precision::Bf16`] a dense CPU
//! convolution runs on `visenc_kernels::conv::lowp` with its weight rounded to bf16 once, on first use
//! (after any BatchNorm has been folded in at load). Under [`Precision::Int8`] (and f32) this
//! channels-first path stays f32; int8 convolutions run on the channels-last path
//! (`crate::nhwc::NhwcConv`, which every CNN trunk with f32 CPU weights takes).

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use visenc_kernels::conv::lowp::PackedConvBf16;
use visenc_kernels::Precision;

use crate::error::Result;

/// The packed weight of one convolution, made once.
#[derive(Debug, Clone, Default)]
pub(crate) struct LowpConv {
    precision: Precision,
    packed: OnceLock<Option<Arc<PackedConvBf16>>>,
}

impl LowpConv {
    pub(crate) fn new(precision: Precision) -> Self {
        Self {
            precision,
            packed: OnceLock::new(),
        }
    }

    pub(crate) fn precision(&self) -> Precision {
        self.precision
    }

    /// The bf16 weight for a dense (`groups == 1`) f32 CPU convolution loaded for bf16; `None` when
    /// the convolution runs in f32.
    pub(crate) fn packed(&self, weight: &Tensor, groups: usize) -> Result<Option<&PackedConvBf16>> {
        let eligible = self.precision == Precision::Bf16
            && groups == 1
            && matches!(weight.device(), Device::Cpu)
            && weight.dtype() == DType::F32;
        if !eligible {
            return Ok(None);
        }
        if self.packed.get().is_none() {
            let (cout, cin, kh, kw) = weight.dims4()?;
            let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let _ = self.packed.set(Some(Arc::new(PackedConvBf16::pack(
                &w,
                cout,
                cin * kh * kw,
            ))));
        }
        Ok(self.packed.get().and_then(|p| p.as_deref()))
    }
}
