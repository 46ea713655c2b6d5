//! A small pickle virtual machine that understands what `torch.save` writes, and nothing more.
//!
//! It never executes anything: a `GLOBAL` only names a callable, and calling (`REDUCE`, `NEWOBJ`) one of the
//! few known torch/collections callables builds plain values here. Calling any other global yields an opaque
//! [`Value::Object`] that remembers the global's name; the caller decides whether that is an error (it is,
//! when the object sits where a tensor was expected) so checkpoints that carry e.g. an `argparse.Namespace`
//! next to their state dict still load.
//!
//! Safety against corrupt input: every length is checked against the bytes left before anything is
//! allocated, the memo is a map (a `LONG_BINPUT 4e9` does not allocate), values are reference counted so
//! `BINGET` never copies, and dropping a deeply nested value is iterative (no stack overflow).
//!
//! Opcode reference: CPython `Lib/pickle.py` / `Lib/pickletools.py`. Callables: `torch/_utils.py`
//! (`_rebuild_tensor_v2`, `_rebuild_tensor_v3`, `_rebuild_parameter`), `torch/_tensor.py`
//! (`_rebuild_from_type_v2`), persistent ids: `torch/serialization.py` (`_save`, `_legacy_save`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The element types torch storages can hold, with their torch names and sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TorchDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    /// Known to torch but not loadable here (complex, quantized, float8_e5m2, unsigned 16-64 bit); the
    /// element size still matters to walk a legacy file past such a storage.
    Other {
        name: &'static str,
        size: usize,
    },
}

impl TorchDtype {
    pub(crate) fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool | Self::F8E4M3 => 1,
            Self::Other { size, .. } => size,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
            Self::F8E4M3 => "float8_e4m3fn",
            Self::Other { name, .. } => name,
        }
    }

    /// `torch.FloatStorage` style storage classes (`torch/storage.py::_dtype_to_storage_type_map`) and
    /// `torch.UntypedStorage` (bytes).
    fn from_storage_class(name: &str) -> Option<Self> {
        let other = |name, size| Some(Self::Other { name, size });
        match name {
            "DoubleStorage" => Some(Self::F64),
            "FloatStorage" => Some(Self::F32),
            "HalfStorage" => Some(Self::F16),
            "BFloat16Storage" => Some(Self::BF16),
            "LongStorage" => Some(Self::I64),
            "IntStorage" => Some(Self::I32),
            "ShortStorage" => Some(Self::I16),
            "CharStorage" => Some(Self::I8),
            "ByteStorage" | "UntypedStorage" => Some(Self::U8),
            "BoolStorage" => Some(Self::Bool),
            "ComplexFloatStorage" => other("complex64", 8),
            "ComplexDoubleStorage" => other("complex128", 16),
            "QInt8Storage" => other("qint8", 1),
            "QUInt8Storage" => other("quint8", 1),
            "QInt32Storage" => other("qint32", 4),
            "QUInt4x2Storage" => other("quint4x2", 1),
            "QUInt2x4Storage" => other("quint2x4", 1),
            _ => None,
        }
    }

    /// `torch.float32` style dtype globals (what `_rebuild_tensor_v3` receives for new dtypes).
    fn from_dtype_name(name: &str) -> Option<Self> {
        let other = |name, size| Some(Self::Other { name, size });
        match name {
            "float64" | "double" => Some(Self::F64),
            "float32" | "float" => Some(Self::F32),
            "float16" | "half" => Some(Self::F16),
            "bfloat16" => Some(Self::BF16),
            "int64" | "long" => Some(Self::I64),
            "int32" | "int" => Some(Self::I32),
            "int16" | "short" => Some(Self::I16),
            "int8" => Some(Self::I8),
            "uint8" => Some(Self::U8),
            "bool" => Some(Self::Bool),
            "float8_e4m3fn" => Some(Self::F8E4M3),
            "float8_e5m2" => other("float8_e5m2", 1),
            "float8_e4m3fnuz" => other("float8_e4m3fnuz", 1),
            "float8_e5m2fnuz" => other("float8_e5m2fnuz", 1),
            "uint16" => other("uint16", 2),
            "uint32" => other("uint32", 4),
            "uint64" => other("uint64", 8),
            "complex64" | "cfloat" => other("complex64", 8),
            "complex128" | "cdouble" => other("complex128", 16),
            "complex32" | "chalf" => other("complex32", 4),
            _ => None,
        }
    }
}

/// Every storage key a pickle named, with the (dtype, element count) it was first named with; the legacy
/// format needs them to walk its storage records.
pub(crate) type StorageTable = HashMap<Rc<str>, (TorchDtype, u64)>;

/// A storage named by a persistent id: `('storage', storage_type, key, location, numel[, view])`.
#[derive(Debug, Clone)]
pub(crate) struct StorageRef {
    pub key: Rc<str>,
    /// The storage type's dtype (bytes for `UntypedStorage`).
    pub dtype: TorchDtype,
    /// Elements of `dtype` in the whole storage.
    pub numel: u64,
    /// Legacy files only: this storage is a view at this byte offset into storage `key`.
    pub view_offset_bytes: u64,
}

/// A tensor as `_rebuild_tensor_v2/v3` describes it; its bytes are read only if it is used.
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub dtype: TorchDtype,
    /// In elements of `dtype`.
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
    /// The conj/neg bits of `metadata` were set (the stored values are not the tensor's values).
    pub lazy_bits: bool,
}

/// What the machine computes with. Containers are shared (`Rc`) because the memo and `BINGET` alias them.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's complement bytes (the legacy magic number).
    BigInt(Rc<[u8]>),
    /// A float (its value is never needed).
    Float,
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<RefCell<Vec<Value>>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered pairs; a later `SETITEM` with the same key wins when read.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// `module.name` of a global that was only named, not called.
    Global(Rc<str>),
    StorageType(TorchDtype),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
    /// The result of calling (or instantiating) an unknown global; never executed.
    Object(Rc<str>),
}

impl Drop for Value {
    /// Iterative, so that a corrupt file nesting a million lists does not overflow the stack on drop.
    fn drop(&mut self) {
        fn take(v: &mut Value, out: &mut Vec<Value>) {
            match v {
                Value::Tuple(rc) | Value::List(rc) => {
                    if let Some(cell) = Rc::get_mut(rc) {
                        out.append(cell.get_mut());
                    }
                }
                Value::Dict(rc) => {
                    if let Some(cell) = Rc::get_mut(rc) {
                        for (k, v) in cell.get_mut().drain(..) {
                            out.push(k);
                            out.push(v);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut pending = Vec::new();
        take(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            take(&mut v, &mut pending);
        }
    }
}

impl Value {
    pub(crate) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global `{g}`"),
            Value::StorageType(d) => format!("storage type {}", d.name()),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Object(g) => format!("`{g}` object"),
        }
    }

    pub(crate) fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(rc) | Value::List(rc) => Some(rc.borrow().clone()),
            _ => None,
        }
    }

    fn as_u64(&self, what: &str) -> Result<u64, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            Value::Bool(b) => Ok(*b as u64),
            v => Err(format!(
                "{what}: expected a non-negative int, got {}",
                v.kind()
            )),
        }
    }

    pub(crate) fn as_str(&self) -> Option<Rc<str>> {
        match self {
            Value::Str(s) => Some(s.clone()),
            // Python 2 files pickle `str` as bytes.
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(Rc::from),
            _ => None,
        }
    }
}

/// The persistent-id hook: the legacy and the zip format name storages alike, but the legacy format has a
/// sixth element (view metadata).
fn persistent_load(pid: Value, storages: &mut StorageTable) -> Result<Value, String> {
    let items = pid
        .items()
        .ok_or_else(|| format!("persistent id is a {}, not a tuple", pid.kind()))?;
    let typename = items
        .first()
        .and_then(Value::as_str)
        .unwrap_or_else(|| Rc::from(""));
    match &*typename {
        "storage" if items.len() == 5 || items.len() == 6 => {
            let Value::StorageType(dtype) = items[1] else {
                return Err(format!(
                    "persistent id: storage type is a {}",
                    items[1].kind()
                ));
            };
            let key = items[2]
                .as_str()
                .ok_or("persistent id: storage key is not a string")?;
            let numel = items[4].as_u64("persistent id numel")?;
            // torch keeps the first dtype a key was seen with (`deserialized_objects[root_key]`).
            let (root_dtype, _) = *storages.entry(key.clone()).or_insert((dtype, numel));
            let mut storage = StorageRef {
                key,
                dtype: root_dtype,
                numel,
                view_offset_bytes: 0,
            };
            if let Some(view) = items.get(5).filter(|v| !matches!(v, Value::None)) {
                // (view_key, offset, view_size), offset in elements of `dtype` (pre-1.0 files).
                let v = view
                    .items()
                    .filter(|v| v.len() == 3)
                    .ok_or("persistent id: bad view metadata")?;
                let offset = v[1].as_u64("view offset")?;
                storage.view_offset_bytes = offset
                    .checked_mul(dtype.size() as u64)
                    .ok_or("view offset overflows")?;
                storage.numel = v[2].as_u64("view size")?;
                storage.dtype = dtype;
            }
            Ok(Value::Storage(storage))
        }
        // ('module', type, source_file, source): a pickled nn.Module class; the value is the class.
        "module" if items.len() >= 2 => Ok(items[1].clone()),
        _ => Err(format!(
            "unknown persistent id type `{typename}` ({} fields)",
            items.len()
        )),
    }
}

fn storage_arg(v: &Value, what: &str) -> Result<StorageRef, String> {
    match v {
        Value::Storage(s) => Ok(s.clone()),
        v => Err(format!("{what}: storage argument is a {}", v.kind())),
    }
}

fn dims(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    let items = v
        .items()
        .ok_or_else(|| format!("{what}: expected a tuple, got {}", v.kind()))?;
    items.iter().map(|d| d.as_u64(what)).collect()
}

/// `metadata` of `_rebuild_tensor_v2/v3`: a dict of conj/neg flags; any true flag changes the values.
fn has_lazy_bits(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Dict(d)) => d
            .borrow()
            .iter()
            .any(|(_, v)| matches!(v, Value::Bool(true))),
        _ => false,
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
/// `_rebuild_tensor(storage, offset, size, stride)`,
/// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
fn rebuild_tensor(name: &str, args: &[Value]) -> Result<Value, String> {
    let (min, max) = match name {
        "_rebuild_tensor" => (4, 4),
        "_rebuild_tensor_v2" => (4, 7),
        _ => (7, 8),
    };
    if args.len() < min || args.len() > max {
        return Err(format!("{name}: {} arguments", args.len()));
    }
    let storage = storage_arg(&args[0], name)?;
    let (dtype, metadata) = if name == "_rebuild_tensor_v3" {
        match &args[6] {
            Value::StorageType(d) => (*d, args.get(7)),
            v => return Err(format!("{name}: dtype argument is a {}", v.kind())),
        }
    } else {
        (storage.dtype, args.get(6))
    };
    let size = dims(&args[2], name)?;
    let stride = dims(&args[3], name)?;
    if size.len() != stride.len() {
        return Err(format!(
            "{name}: {} sizes but {} strides",
            size.len(),
            stride.len()
        ));
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage,
        dtype,
        offset: args[1].as_u64(name)?,
        size,
        stride,
        lazy_bits: has_lazy_bits(metadata),
    })))
}

/// Calls a global. Only the callables below do anything; every other call gives an opaque object.
fn call(func: &Value, args: Vec<Value>) -> Result<Value, String> {
    let Value::Global(name) = func else {
        // e.g. REDUCE on an already opaque object's method: stays opaque.
        return Ok(Value::Object(Rc::from(format!("call of {}", func.kind()))));
    };
    let short = name.rsplit('.').next().unwrap_or("");
    match &**name {
        "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict" => {
            let dict = Vec::new();
            let dict = Rc::new(RefCell::new(dict));
            // OrderedDict(iterable_of_pairs) from protocol 0/1 writers.
            if let Some(pairs) = args.first().and_then(Value::items) {
                for p in pairs {
                    match p.items().as_deref() {
                        Some([k, v]) => dict.borrow_mut().push((k.clone(), v.clone())),
                        _ => return Err(format!("{name}: argument is not a sequence of pairs")),
                    }
                }
            }
            Ok(Value::Dict(dict))
        }
        "torch._utils._rebuild_tensor"
        | "torch._utils._rebuild_tensor_v2"
        | "torch._utils._rebuild_tensor_v3" => rebuild_tensor(short, &args),
        // (data, requires_grad, backward_hooks[, state]): the parameter is its data.
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => args
            .into_iter()
            .next()
            .ok_or_else(|| format!("{name}: no arguments")),
        // (func, new_type, args, state): a tensor subclass; the subclass and its state are dropped.
        "torch._tensor._rebuild_from_type_v2" | "torch._tensor._rebuild_from_type" => {
            let [f, _, inner, ..] = args.as_slice() else {
                return Err(format!("{name}: {} arguments", args.len()));
            };
            let inner = inner
                .items()
                .ok_or_else(|| format!("{name}: args is a {}", inner.kind()))?;
            // One level only: a chain of these from a corrupt file must not recurse without bound.
            if matches!(f, Value::Global(g) if g.starts_with("torch._tensor._rebuild_from_type")) {
                return Err(format!("{name}: nested {name}"));
            }
            call(f, inner)
        }
        // Protocol 2 pickles `bytes` as `_codecs.encode(str, 'latin1')`.
        "_codecs.encode" => match args.as_slice() {
            [Value::Str(s), enc]
                if enc
                    .as_str()
                    .is_some_and(|e| e.eq_ignore_ascii_case("latin1")) =>
            {
                let bytes: Option<Vec<u8>> =
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                Ok(Value::Bytes(
                    bytes.ok_or("_codecs.encode: not latin-1")?.into(),
                ))
            }
            [Value::Str(s), ..] => Ok(Value::Bytes(s.as_bytes().into())),
            _ => Err("_codecs.encode: bad arguments".into()),
        },
        "torch.Size" | "builtins.tuple" | "__builtin__.tuple" => match args.first() {
            Some(v) if v.items().is_some() => Ok(Value::Tuple(Rc::new(RefCell::new(
                v.items().unwrap_or_default(),
            )))),
            _ => Ok(Value::Tuple(Rc::default())),
        },
        _ => Ok(Value::Object(name.clone())),
    }
}

/// What `GLOBAL module name` stands for.
fn find_class(module: &str, name: &str) -> Value {
    if module == "torch" || module == "torch.storage" {
        if let Some(d) =
            TorchDtype::from_storage_class(name).or_else(|| TorchDtype::from_dtype_name(name))
        {
            return Value::StorageType(d);
        }
    }
    Value::Global(Rc::from(format!("{module}.{name}")))
}

/// Reads bytes with bounds checks; every error names the offset.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: needs {n} bytes at offset {}, {left} left",
                self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A text line without its `\n` (protocol 0 opcodes).
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated: unterminated text line")?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| "text line is not UTF-8".to_string())
    }
}

fn utf8(b: &[u8]) -> Result<Value, String> {
    std::str::from_utf8(b)
        .map(|s| Value::Str(Rc::from(s)))
        .map_err(|_| "string is not valid UTF-8".into())
}

/// Little-endian two's complement of any length (LONG1/LONG4).
fn long(b: &[u8]) -> Value {
    if b.len() > 8 {
        return Value::BigInt(b.into());
    }
    if b.is_empty() {
        return Value::Int(0);
    }
    let mut buf = if b[b.len() - 1] & 0x80 != 0 {
        [0xffu8; 8]
    } else {
        [0u8; 8]
    };
    buf[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(buf))
}

/// Runs one pickle starting at `pos` in `data`; returns the value and the offset just after `STOP`.
/// `storages` collects the dtype of every storage key seen in persistent ids.
pub(crate) fn load(
    data: &[u8],
    pos: usize,
    storages: &mut StorageTable,
) -> Result<(Value, usize), String> {
    let mut c = Cursor { data, pos };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();

    fn pop(stack: &mut Vec<Value>) -> Result<Value, String> {
        stack.pop().ok_or_else(|| "stack underflow".to_string())
    }
    fn top(stack: &mut [Value]) -> Result<&mut Value, String> {
        stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>) -> Result<Vec<Value>, String> {
        let m = marks.pop().ok_or("MARK missing")?;
        if m > stack.len() {
            return Err("MARK below the stack".into());
        }
        Ok(stack.split_off(m))
    }
    fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(RefCell::new(items)))
    }
    fn set_items(target: &Value, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        match target {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            // Items of an opaque dict subclass are not kept.
            Value::Object(_) => Ok(()),
            t => Err(format!("SETITEM on a {}", t.kind())),
        }
    }
    fn append(target: &Value, items: Vec<Value>) -> Result<(), String> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            t => Err(format!("APPEND on a {}", t.kind())),
        }
    }

    loop {
        let at = c.pos;
        let op = c.u8()?;
        match op {
            // PROTO n
            0x80 => {
                let p = c.u8()?;
                if p > 5 {
                    return Err(format!("unsupported pickle protocol {p}"));
                }
            }
            // FRAME len: framing is a hint only.
            0x95 => {
                c.u64()?;
            }
            b'.' => {
                // STOP
                let v = pop(&mut stack)?;
                return Ok((v, c.pos));
            }
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(tuple(Vec::new())),
            b'd' => {
                // DICT (protocol 0): key/value pairs since MARK.
                let items = pop_mark(&mut stack, &mut marks)?;
                let d = Value::Dict(Rc::default());
                set_items(&d, items)?;
                stack.push(d);
            }
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(tuple(items));
            }
            0x85..=0x87 => {
                // TUPLE1..3
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(tuple(items));
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(c.arr()?) as i64)),
            b'K' => stack.push(Value::Int(c.u8()? as i64)),
            b'M' => stack.push(Value::Int(c.u16()? as i64)),
            0x8a => {
                // LONG1
                let n = c.u8()?;
                stack.push(long(c.take(n as u64)?));
            }
            0x8b => {
                // LONG4 (signed length)
                let n = i32::from_le_bytes(c.arr()?);
                let n = u64::try_from(n).map_err(|_| "LONG4 with a negative length")?;
                stack.push(long(c.take(n)?));
            }
            b'I' => {
                // INT (protocol 0): "01"/"00" are True/False.
                let s = c.line()?;
                stack.push(match s {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => s
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::BigInt(Rc::default())),
                });
            }
            b'L' => {
                let s = c.line()?;
                stack.push(
                    s.trim_end_matches('L')
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::BigInt(Rc::default())),
                );
            }
            b'G' => {
                c.u64()?;
                stack.push(Value::Float);
            }
            b'F' => {
                let s = c.line()?;
                s.parse::<f64>().map_err(|_| format!("bad FLOAT `{s}`"))?;
                stack.push(Value::Float);
            }
            0x8c => {
                // SHORT_BINUNICODE
                let n = c.u8()?;
                stack.push(utf8(c.take(n as u64)?)?);
            }
            b'X' => {
                let n = c.u32()?;
                stack.push(utf8(c.take(n as u64)?)?);
            }
            0x8d => {
                let n = c.u64()?;
                stack.push(utf8(c.take(n)?)?);
            }
            b'U' => {
                // SHORT_BINSTRING (Python 2 str): bytes.
                let n = c.u8()?;
                stack.push(Value::Bytes(c.take(n as u64)?.into()));
            }
            b'T' => {
                let n = i32::from_le_bytes(c.arr()?);
                let n = u64::try_from(n).map_err(|_| "BINSTRING with a negative length")?;
                stack.push(Value::Bytes(c.take(n)?.into()));
            }
            b'C' => {
                // SHORT_BINBYTES
                let n = c.u8()?;
                stack.push(Value::Bytes(c.take(n as u64)?.into()));
            }
            b'B' => {
                let n = c.u32()?;
                stack.push(Value::Bytes(c.take(n as u64)?.into()));
            }
            0x8e | 0x96 => {
                // BINBYTES8, BYTEARRAY8
                let n = c.u64()?;
                stack.push(Value::Bytes(c.take(n)?.into()));
            }
            b'V' | b'S' => {
                // UNICODE / STRING (protocol 0): kept raw, only used as names.
                let s = c.line()?;
                let s = s.trim_matches(|ch| ch == '\'' || ch == '"');
                stack.push(Value::Str(Rc::from(s)));
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let module = c.line()?;
                let name = c.line()?;
                stack.push(find_class(module, name));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => stack.push(find_class(&m, &n)),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                // REDUCE
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                let args = args
                    .items()
                    .ok_or_else(|| format!("REDUCE arguments are a {}", args.kind()))?;
                let v = call(&func, args).map_err(|e| format!("at offset {at}: {e}"))?;
                stack.push(v);
            }
            0x81 => {
                // NEWOBJ cls args
                let _args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(new_object(&cls));
            }
            0x92 => {
                // NEWOBJ_EX cls args kwargs
                let _kwargs = pop(&mut stack)?;
                let _args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                stack.push(new_object(&cls));
            }
            b'o' => {
                // OBJ: MARK cls args...
                let items = pop_mark(&mut stack, &mut marks)?;
                let cls = items.first().ok_or("OBJ without a class")?;
                stack.push(new_object(cls));
            }
            b'i' => {
                // INST module name: MARK args...
                let module = c.line()?;
                let name = c.line()?;
                pop_mark(&mut stack, &mut marks)?;
                stack.push(new_object(&find_class(module, name)));
            }
            b'b' => {
                // BUILD: the state is dropped (OrderedDict `_metadata`, module `__dict__`); never a setstate.
                pop(&mut stack)?;
                top(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(
                    persistent_load(pid, storages).map_err(|e| format!("at offset {at}: {e}"))?,
                );
            }
            b'P' => {
                let pid = c.line()?;
                return Err(format!(
                    "text persistent id `{pid}` (tar-format checkpoints are not supported)"
                ));
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                set_items(top(&mut stack)?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                append(top(&mut stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            0x8f => stack.push(Value::List(Rc::default())), // EMPTY_SET: kept as a list
            0x90 => {
                // ADDITEMS
                let items = pop_mark(&mut stack, &mut marks)?;
                append(top(&mut stack)?, items)?;
            }
            0x91 => {
                // FROZENSET
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'q' => {
                let i = c.u8()? as u32;
                memo.insert(i, top(&mut stack)?.clone());
            }
            b'r' => {
                let i = c.u32()?;
                memo.insert(i, top(&mut stack)?.clone());
            }
            b'p' => {
                let i = c.line()?.parse::<u32>().map_err(|_| "bad PUT index")?;
                memo.insert(i, top(&mut stack)?.clone());
            }
            0x94 => {
                // MEMOIZE
                let i = u32::try_from(memo.len()).map_err(|_| "memo overflow")?;
                memo.insert(i, top(&mut stack)?.clone());
            }
            b'h' | b'j' | b'g' => {
                let i = match op {
                    b'h' => c.u8()? as u32,
                    b'j' => c.u32()?,
                    _ => c.line()?.parse::<u32>().map_err(|_| "bad GET index")?,
                };
                let v = memo
                    .get(&i)
                    .ok_or_else(|| format!("memo key {i} missing (offset {at})"))?;
                stack.push(v.clone());
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let v = top(&mut stack)?.clone();
                stack.push(v);
            }
            _ => {
                return Err(format!(
                    "unsupported pickle opcode 0x{op:02x} at offset {at}"
                ))
            }
        }
    }
}

/// `cls.__new__(cls, ...)`: never run; an opaque object named after the class.
fn new_object(cls: &Value) -> Value {
    match cls {
        Value::Global(g) => Value::Object(g.clone()),
        v => Value::Object(Rc::from(v.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value, String> {
        load(bytes, 0, &mut HashMap::new()).map(|(v, _)| v)
    }

    #[test]
    fn deep_nesting_drops_without_overflow() {
        // [[[[...]]]] a million deep via EMPTY_LIST + APPEND pairs built inside out with MARK/LIST.
        let depth = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', depth));
        p.push(b']');
        p.extend(std::iter::repeat_n(b'l', depth));
        p.push(b'.');
        let v = run(&p).unwrap();
        assert!(matches!(v, Value::List(_)));
        drop(v);
    }

    #[test]
    fn unknown_global_is_named_not_run() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.";
        match &run(p).unwrap() {
            Value::Object(g) => assert_eq!(&**g, "os.system"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn huge_lengths_are_errors() {
        for p in [
            &b"\x80\x02X\xff\xff\xff\xff"[..],
            b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x02j\xff\xff\xff\xff.",
        ] {
            assert!(run(p).is_err());
        }
    }
}
