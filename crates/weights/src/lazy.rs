//! safetensors files read one tensor at a time, when a model asks for it.
//!
//! Opening a file parses only its header (names, dtypes, shapes, byte ranges) and checks that every
//! range lies inside the file. Each tensor's bytes are then read with a plain `read` at its offset, so
//! the process holds at most the tensors the model has taken (and keeps): a layer that packs its weight
//! to bf16 or int8 at load frees the f32 copy before the next one is read, and no memory map or
//! whole-file buffer doubles the weights while loading. The format:
//! <https://github.com/huggingface/safetensors/blob/v0.6.2/README.md#format>.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use crate::error::WeightsError;

/// Largest header accepted (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One open safetensors file.
#[derive(Debug)]
pub(crate) struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// Where the tensor data starts (8 + header length).
    data_start: u64,
}

/// A tensor of a [`SafetensorsFile`], not yet read.
#[derive(Debug, Clone)]
pub(crate) struct LazyTensor {
    file: Arc<SafetensorsFile>,
    info: TensorInfo,
    dtype: DType,
}

/// The tensor type of a safetensors dtype (the element types candle holds as they are).
fn dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

fn read_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::Read {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Opens `path` and lists its tensors without reading their data.
pub(crate) fn open(path: &Path) -> Result<HashMap<String, LazyTensor>, WeightsError> {
    let io = |e: std::io::Error| read_err(path, e.to_string());
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| read_err(path, "file too small for a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(read_err(
            path,
            format!("header length {n} does not fit a file of {file_len} bytes"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| read_err(path, format!("invalid safetensors header: {e}")))?;
    let data_len = file_len - 8 - n;
    let file = Arc::new(SafetensorsFile {
        path: path.to_path_buf(),
        file,
        data_start: 8 + n,
    });
    let mut out = HashMap::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| read_err(path, format!("tensor {name}: {e}")))?;
        let dtype = dtype(info.dtype).ok_or_else(|| {
            read_err(
                path,
                format!("tensor {name}: unsupported dtype {:?}", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = elems.and_then(|e| e.checked_mul(info.dtype.bitsize()).map(|b| b.div_ceil(8)));
        if start > end || end as u64 > data_len || bytes != Some(end - start) {
            return Err(read_err(
                path,
                format!(
                    "tensor {name}: bytes {start}..{end} do not hold a {:?} {:?} inside {data_len} bytes of data",
                    info.dtype, info.shape
                ),
            ));
        }
        out.insert(
            name,
            LazyTensor {
                file: file.clone(),
                info,
                dtype,
            },
        );
    }
    Ok(out)
}

impl LazyTensor {
    pub(crate) fn dims(&self) -> &[usize] {
        &self.info.shape
    }

    /// Reads the tensor's bytes and makes it a tensor on `device`, in the file's dtype. f32 tensors
    /// (the common case) are read straight into their final buffer, without a second copy.
    pub(crate) fn load(&self, name: &str, device: &Device) -> Result<Tensor, WeightsError> {
        let f = &self.file;
        let (start, end) = self.info.data_offsets;
        let err = |e: String| read_err(&f.path, format!("tensor {name}: {e}"));
        let read = |buf: &mut [u8]| {
            let mut file = &f.file;
            file.seek(SeekFrom::Start(f.data_start + start as u64))
                .and_then(|_| file.read_exact(buf))
                .map_err(|e| err(e.to_string()))
        };
        if self.dtype == DType::F32 && cfg!(target_endian = "little") {
            let mut v = vec![0f32; (end - start) / 4];
            // SAFETY: the bytes of an f32 buffer; every bit pattern is a valid f32.
            read(unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, end - start)
            })?;
            return Tensor::from_vec(v, self.info.shape.as_slice(), device)
                .map_err(|e| err(e.to_string()));
        }
        let mut bytes = vec![0u8; end - start];
        read(&mut bytes)?;
        Tensor::from_raw_buffer(&bytes, self.dtype, &self.info.shape, device)
            .map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_tensors_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let a: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [7i64, -8].iter().flat_map(|x| x.to_le_bytes()).collect();
        write(
            &p,
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"I64","shape":[2],"data_offsets":[24,40]}}"#,
            &[a, b].concat(),
        );
        let t = open(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t["a"].dims(), &[2, 3]);
        let a = t["a"].load("a", &Device::Cpu).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[1., 2., 3.], [4., 5., 6.]]);
        let b = t["b"].load("b", &Device::Cpu).unwrap();
        assert_eq!(b.to_vec1::<i64>().unwrap(), [7, -8]);
    }

    #[test]
    fn rejects_ranges_outside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        // 6 floats announced, 4 present (a truncated download).
        write(
            &p,
            r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#,
            &[0u8; 16],
        );
        let e = open(&p).unwrap_err().to_string();
        assert!(e.contains("w.safetensors") && e.contains("tensor a"), "{e}");
        // A range that does not match the shape.
        write(
            &p,
            r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
            &[0u8; 24],
        );
        assert!(open(&p).unwrap_err().to_string().contains("tensor a"));
        // A header longer than the file.
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert!(open(&p).unwrap_err().to_string().contains("header length"));
    }
}
