//! PyTorch checkpoints (`torch.save` files, usually `.pth`, `.pt` or `pytorch_model.bin`) read without
//! Python and without executing anything.
//!
//! Both container formats are read:
//! * zip (the default since PyTorch 1.6): `<name>/data.pkl` + one `<name>/data/<key>` record per storage
//!   ([`zip`]);
//! * legacy (`_use_new_zipfile_serialization=False`, and every file written before 1.6): five things one
//!   after the other in a single stream: the magic-number pickle, the protocol-version pickle (1001), the
//!   `sys_info` pickle, the main pickle, the pickle of the storage-key list, then for each listed key its
//!   raw little-endian bytes after an 8-byte little-endian element count (`torch/serialization.py`
//!   `_legacy_save` / `_legacy_load`, `torch/csrc/serialization.cpp` `THPStorage_writeFileRaw`).
//!
//! The older tar format (PyTorch < 0.4) is rejected with a clear error.
//!
//! Decisions, documented here because they are made here:
//! * **Nested checkpoints**: when the top-level dict holds no tensor itself but has a dict under
//!   `state_dict`, `model_state_dict`, `model` or `module` (first match, in that order, repeatedly), that
//!   nested dict is returned, with its keys unchanged (no `module.` stripping, no dotted flattening), so the
//!   names are exactly those of `model.state_dict()`. Everything else in the file (epoch, optimizer state,
//!   an `argparse.Namespace`) is ignored and its tensors are never read.
//! * **Non-tensor entries** of the state dict (ints, strings, `None`, nested containers, the `_metadata`
//!   attribute) are skipped. An entry built by an **unknown global** (e.g. a quantized or sparse tensor, a
//!   numpy array, a pickled `nn.Module`) is an error naming that global: it may hold weights that would
//!   otherwise vanish silently. Unknown globals are never called.
//! * **dtypes**: f32, f64, f16, bf16, i64, i32, i16, u8 and float8_e4m3fn keep their type; `bool` becomes
//!   `u8` (0/1) and `int8` becomes `i16` because candle has neither. Complex, quantized, uint16-64 and other
//!   float8 tensors are an error naming the entry.
//! * **Byte order**: legacy files are always little-endian. Zip files whose `byteorder` record says `big`
//!   are byte-swapped element by element while loading (what `torch.load` does).
//! * Non-contiguous tensors (transposes, strided slices, views at an offset into a shared storage) are
//!   copied out to contiguous tensors; shared storages are read once.
//! * Memory: zip storages are read one at a time; a legacy file is read whole into memory.

mod pickle;
mod zip;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::error::WeightsError;
use pickle::{StorageTable, TensorRef, TorchDtype, Value};

/// `torch.serialization.MAGIC_NUMBER`, as the little-endian bytes of its LONG1 pickle.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const LEGACY_PROTOCOL: i64 = 1001;
/// Dict keys under which training checkpoints nest the model's state dict, in order of preference.
const NESTED_KEYS: [&str; 4] = ["state_dict", "model_state_dict", "model", "module"];
/// A tensor may be larger than the file only through zero strides (`expand`); this bounds how much larger,
/// so a corrupt size cannot ask for terabytes.
const MAX_EXPANSION: u64 = 64;

/// Reads every tensor of a `torch.save` checkpoint (zip or legacy format) onto `device`.
///
/// Returns the state dict's tensors by their state-dict names; see the module documentation for nested
/// checkpoints, skipped entries and dtype mapping. A corrupt or truncated file is a
/// [`WeightsError::Read`] naming the file and what was wrong.
pub fn load_pth(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
    let fail = |reason: String| WeightsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| WeightsError::io(path, e))?
        .len();
    let mut head = Vec::new();
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| WeightsError::io(path, e))?;
    let max_out = file_len.max(1 << 24).saturating_mul(MAX_EXPANSION);

    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        let mut archive = zip::Archive::open(file, file_len).map_err(fail)?;
        let pkl = archive.read("data.pkl", u64::MAX).map_err(fail)?;
        let mut table = StorageTable::new();
        let (root, _) =
            pickle::load(&pkl, 0, &mut table).map_err(|e| fail(format!("data.pkl: {e}")))?;
        let selected = select(&root).map_err(fail)?;
        let big_endian = archive.big_endian;
        materialize(
            selected,
            device,
            max_out,
            |key, dtype, numel| {
                let name = format!("data/{key}");
                let nbytes = numel
                    .checked_mul(dtype.size() as u64)
                    .ok_or("storage size overflows")?;
                let have = archive
                    .size_of(&name)
                    .ok_or_else(|| format!("storage record `{name}` is missing"))?;
                if have < nbytes {
                    return Err(format!(
                        "storage record `{name}` holds {have} bytes, the pickle says {nbytes}"
                    ));
                }
                archive.read(&name, nbytes).map(Cow::Owned)
            },
            big_endian,
        )
        .map_err(fail)
    } else if head.len() > 262 && &head[257..262] == b"ustar" {
        Err(fail(
            "a checkpoint in the tar format of the earliest PyTorch releases, which is not \
             supported; re-save it with a current torch.save"
                .into(),
        ))
    } else {
        drop(file);
        let data = std::fs::read(path).map_err(|e| WeightsError::io(path, e))?;
        let (selected, records) = legacy_layout(&data).map_err(fail)?;
        materialize(
            selected,
            device,
            max_out,
            |key, _, _| {
                let (start, len) = records
                    .get(key)
                    .ok_or_else(|| format!("storage `{key}` is not in the storage list"))?;
                Ok(Cow::Borrowed(&data[*start..*start + *len]))
            },
            false,
        )
        .map_err(fail)
    }
}

type Selected = Vec<(String, Rc<TensorRef>)>;
/// Where each storage's bytes lie in a legacy file: (start, length).
type Records = HashMap<Rc<str>, (usize, usize)>;

/// Parses a legacy stream: checks the header pickles, runs the main pickle, and locates every storage's
/// bytes, returned as (start, length) in `data`.
fn legacy_layout(data: &[u8]) -> Result<(Selected, Records), String> {
    if data.first() != Some(&0x80) {
        return Err(
            "neither a zip archive nor a pickle stream, so not a torch.save checkpoint".into(),
        );
    }
    let mut table = StorageTable::new();
    let (magic, pos) =
        pickle::load(data, 0, &mut table).map_err(|e| format!("magic number: {e}"))?;
    if !matches!(&magic, Value::BigInt(b) if **b == LEGACY_MAGIC) {
        return Err("a pickle, but not a torch.save checkpoint (wrong magic number)".into());
    }
    let (version, pos) =
        pickle::load(data, pos, &mut table).map_err(|e| format!("protocol version: {e}"))?;
    if !matches!(version, Value::Int(LEGACY_PROTOCOL)) {
        return Err(format!(
            "unsupported legacy protocol version ({})",
            version.kind()
        ));
    }
    // sys_info: endianness and type sizes of the writer; the storage data is little-endian regardless.
    let (_sys_info, pos) =
        pickle::load(data, pos, &mut table).map_err(|e| format!("sys_info: {e}"))?;
    table.clear();
    let (root, pos) =
        pickle::load(data, pos, &mut table).map_err(|e| format!("main pickle: {e}"))?;
    let (keys, mut pos) =
        pickle::load(data, pos, &mut table).map_err(|e| format!("storage keys: {e}"))?;
    let keys = keys
        .items()
        .ok_or_else(|| format!("storage key list is a {}", keys.kind()))?;
    let mut records = HashMap::with_capacity(keys.len().min(table.len()));
    for key in keys {
        let key = key.as_str().ok_or("storage key is not a string")?;
        let (dtype, numel) = *table
            .get(&key)
            .ok_or_else(|| format!("storage `{key}` is listed but never used"))?;
        let count_bytes = data
            .get(pos..pos + 8)
            .ok_or_else(|| format!("truncated before storage `{key}`"))?;
        let count = u64::from_le_bytes(count_bytes.try_into().unwrap_or_default());
        if count != numel {
            return Err(format!(
                "storage `{key}`: the file holds {count} elements, the pickle says {numel}"
            ));
        }
        let len = count
            .checked_mul(dtype.size() as u64)
            .ok_or("storage size overflows")?;
        let start = pos + 8;
        let left = (data.len() - start) as u64;
        if len > left {
            return Err(format!(
                "truncated in storage `{key}`: needs {len} bytes, {left} left"
            ));
        }
        records.insert(key, (start, len as usize));
        pos = start + len as usize;
    }
    Ok((select(&root)?, records))
}

/// Finds the state dict in the unpickled object (see the module documentation) and lists its tensors.
fn select(root: &Value) -> Result<Selected, String> {
    let mut cur = root.clone();
    let mut path = String::new();
    for _ in 0..NESTED_KEYS.len() * 2 {
        let where_ = if path.is_empty() {
            "the file".to_string()
        } else {
            format!("entry `{path}`")
        };
        let dict = match &cur {
            Value::Dict(d) => d.clone(),
            Value::Object(g) => {
                return Err(format!(
                    "{where_} holds a `{g}` object, not a state dict (an unknown global; nothing is executed: \
                     save `model.state_dict()` instead)"
                ))
            }
            v => return Err(format!("{where_} holds a {}, not a dict of tensors", v.kind())),
        };
        // Later keys win, first-insertion order is kept.
        let mut index: HashMap<Rc<str>, usize> = HashMap::new();
        let mut entries: Vec<(Rc<str>, Value)> = Vec::new();
        for (k, v) in dict.borrow().iter() {
            let Some(k) = k.as_str() else { continue };
            match index.get(&k) {
                Some(&i) => entries[i].1 = v.clone(),
                None => {
                    index.insert(k.clone(), entries.len());
                    entries.push((k, v.clone()));
                }
            }
        }
        let has_tensors = entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
        if !has_tensors {
            let nested = NESTED_KEYS.iter().find_map(|k| {
                index
                    .get(*k)
                    .map(|&i| &entries[i])
                    .filter(|(_, v)| matches!(v, Value::Dict(_) | Value::Object(_)))
            });
            if let Some((k, v)) = nested {
                path = if path.is_empty() {
                    k.to_string()
                } else {
                    format!("{path}.{k}")
                };
                cur = v.clone();
                continue;
            }
        }
        let mut out = Vec::new();
        for (k, v) in entries.iter() {
            match v {
                Value::Tensor(t) => out.push((k.to_string(), t.clone())),
                Value::Object(g) => {
                    return Err(format!(
                        "state-dict entry `{k}` is a `{g}` object, not a tensor (an unknown global; nothing is executed)"
                    ))
                }
                _ => {}
            }
        }
        if out.is_empty() {
            let keys: Vec<&str> = entries.iter().take(10).map(|(k, _)| &**k).collect();
            return Err(format!(
                "{where_} holds no tensors (keys: {})",
                keys.join(", ")
            ));
        }
        return Ok(out);
    }
    Err("state dicts nested too deeply".into())
}

/// Reads the storages the selected tensors use (each once) and builds contiguous candle tensors.
fn materialize<'a>(
    selected: Selected,
    device: &Device,
    max_out: u64,
    mut read_storage: impl FnMut(&str, TorchDtype, u64) -> Result<Cow<'a, [u8]>, String>,
    big_endian: bool,
) -> Result<HashMap<String, Tensor>, String> {
    let mut by_storage: HashMap<Rc<str>, Vec<(String, Rc<TensorRef>)>> = HashMap::new();
    for (name, t) in selected {
        by_storage
            .entry(t.storage.key.clone())
            .or_default()
            .push((name, t));
    }
    let mut out = HashMap::new();
    for (key, tensors) in by_storage {
        // The root storage's dtype and size; every view of it shares them.
        let (dtype, numel) = root_extent(&tensors);
        let bytes = read_storage(&key, dtype, numel)?;
        for (name, t) in tensors {
            let tensor = build(&bytes, &t, big_endian, max_out, device)
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            out.insert(name, tensor);
        }
    }
    Ok(out)
}

/// Bytes a storage must provide: the largest view end among the tensors that use it, at least the root.
fn root_extent(tensors: &[(String, Rc<TensorRef>)]) -> (TorchDtype, u64) {
    let s = &tensors[0].1.storage;
    if tensors
        .iter()
        .all(|(_, t)| t.storage.view_offset_bytes == 0)
    {
        return (s.dtype, s.numel);
    }
    // Legacy view storages: request everything up to the furthest view, counted in bytes.
    let end = tensors
        .iter()
        .map(|(_, t)| {
            t.storage.view_offset_bytes.saturating_add(
                t.storage
                    .numel
                    .saturating_mul(t.storage.dtype.size() as u64),
            )
        })
        .max()
        .unwrap_or(0);
    (TorchDtype::U8, end)
}

fn candle_dtype(d: TorchDtype) -> Option<DType> {
    Some(match d {
        TorchDtype::F64 => DType::F64,
        TorchDtype::F32 => DType::F32,
        TorchDtype::F16 => DType::F16,
        TorchDtype::BF16 => DType::BF16,
        TorchDtype::I64 => DType::I64,
        TorchDtype::I32 => DType::I32,
        TorchDtype::I16 | TorchDtype::I8 => DType::I16,
        TorchDtype::U8 | TorchDtype::Bool => DType::U8,
        TorchDtype::F8E4M3 => DType::F8E4M3,
        TorchDtype::Other { .. } => return None,
    })
}

/// One tensor out of its storage's bytes: bounds-checked, gathered to contiguous order, byte-swapped if
/// the file is big-endian, and converted where candle lacks the dtype.
fn build(
    storage: &[u8],
    t: &TensorRef,
    big_endian: bool,
    max_out: u64,
    device: &Device,
) -> Result<Tensor, String> {
    let dtype = candle_dtype(t.dtype)
        .ok_or_else(|| format!("dtype {} is not supported", t.dtype.name()))?;
    if t.lazy_bits {
        return Err(
            "has its conj/neg bit set (call .resolve_conj()/.resolve_neg() before saving)".into(),
        );
    }
    let shape: Vec<usize> = t
        .size
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| "size overflows")?;
    let mut bytes = gather(storage, t, max_out)?;
    let e = t.dtype.size();
    if big_endian && e > 1 {
        bytes.chunks_exact_mut(e).for_each(<[u8]>::reverse);
    }
    let tensor = match t.dtype {
        TorchDtype::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| u8::from(b != 0)).collect();
            Tensor::from_vec(v, shape, device)
        }
        TorchDtype::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| i16::from(b as i8)).collect();
            Tensor::from_vec(v, shape, device)
        }
        _ => Tensor::from_raw_buffer(&bytes, dtype, &shape, device),
    };
    tensor.map_err(|e| e.to_string())
}

/// Copies a tensor's elements out of its storage in row-major order.
fn gather(storage: &[u8], t: &TensorRef, max_out: u64) -> Result<Vec<u8>, String> {
    let e = t.dtype.size() as u64;
    let n = t
        .size
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let out_len = n
        .checked_mul(e)
        .filter(|&b| b <= max_out)
        .ok_or_else(|| format!("implausible size {:?}", t.size))?;
    let overflow = || "storage offset/stride overflows".to_string();
    let mut last = t.offset;
    for (&d, &s) in t.size.iter().zip(&t.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(overflow)?;
    }
    let base = t.storage.view_offset_bytes;
    let end = last
        .checked_add(1)
        .and_then(|x| x.checked_mul(e))
        .and_then(|x| x.checked_add(base))
        .ok_or_else(overflow)?;
    if end > storage.len() as u64 {
        return Err(format!(
            "reaches byte {end} of storage `{}`, which has {} bytes",
            t.storage.key,
            storage.len()
        ));
    }
    let data = &storage[base as usize..end as usize];
    let (e, offset) = (e as usize, t.offset as usize);
    if is_contiguous(&t.size, &t.stride) {
        return Ok(data[offset * e..offset * e + out_len as usize].to_vec());
    }
    // An odometer over all but the last dimension; the last one is the inner loop.
    let size: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
    let stride: Vec<usize> = t.stride.iter().map(|&s| s as usize).collect();
    let nd = size.len();
    let mut out = Vec::with_capacity(out_len as usize);
    let mut idx = vec![0usize; nd];
    loop {
        let mut pos = offset + (0..nd - 1).map(|i| idx[i] * stride[i]).sum::<usize>();
        for _ in 0..size[nd - 1] {
            out.extend_from_slice(&data[pos * e..pos * e + e]);
            pos += stride[nd - 1];
        }
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Row-major contiguity, ignoring the strides of size-1 dimensions (as torch does).
fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}
