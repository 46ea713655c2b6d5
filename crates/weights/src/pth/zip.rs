//! The zip container `torch.save` writes by default since PyTorch 1.6 (`_use_new_zipfile_serialization`):
//! `<prefix>/data.pkl`, `<prefix>/byteorder`, `<prefix>/data/<key>` (one record per storage, stored
//! uncompressed and 64-byte aligned), `<prefix>/version`. The prefix is the archive name torch chose
//! (the file stem, or `archive`), so it is found, not assumed.
//! Reference: `torch/serialization.py` (`_save`, `_load`), `caffe2/serialize/inline_container.cc`.

use std::fs::File;
use std::io::{BufReader, Read};

use ::zip::{CompressionMethod, ZipArchive};

/// Deflate cannot expand data by more than about 1032:1; a compressed record that claims more is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1032;

pub(super) struct Archive {
    zip: ZipArchive<BufReader<File>>,
    /// `archive/` (with the slash), or empty for a flat archive.
    prefix: String,
    file_len: u64,
    pub big_endian: bool,
}

impl Archive {
    pub fn open(file: File, file_len: u64) -> Result<Self, String> {
        let zip = ZipArchive::new(BufReader::new(file))
            .map_err(|e| format!("not a valid zip archive: {e}"))?;
        let names: Vec<String> = zip
            .file_names()
            .filter_map(Result::ok)
            .map(|n| n.into_owned())
            .collect();
        // `<prefix>/data.pkl` with a one-level prefix; a flat `data.pkl` is accepted too.
        let pkl = names
            .iter()
            .filter(|n| n.ends_with("data.pkl"))
            .filter_map(|n| {
                let prefix = &n[..n.len() - "data.pkl".len()];
                let depth = prefix.matches('/').count();
                (prefix.is_empty() || (depth == 1 && prefix.ends_with('/')))
                    .then(|| prefix.to_string())
            })
            .min_by_key(String::len);
        let Some(prefix) = pkl else {
            let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            return Err(format!(
                "zip archive without a `<name>/data.pkl` record, so not a torch.save checkpoint (records: {})",
                shown.join(", ")
            ));
        };
        if names.iter().any(|n| {
            *n == format!("{prefix}constants.pkl") || n.starts_with(&format!("{prefix}code/"))
        }) {
            return Err(
                "a TorchScript archive (torch.jit.save), not a torch.save checkpoint".into(),
            );
        }
        let mut archive = Self {
            zip,
            prefix,
            file_len,
            big_endian: false,
        };
        let record = format!("{}byteorder", archive.prefix);
        if archive.zip.index_for_name(&record).is_some() {
            let order = archive.read("byteorder", 16)?;
            archive.big_endian = match &order[..] {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(format!(
                        "unknown byteorder record `{}`",
                        String::from_utf8_lossy(other)
                    ));
                }
            };
        }
        Ok(archive)
    }

    /// Reads the record `<prefix><name>`, at most `limit` bytes; errors when the record holds fewer than
    /// `min(limit, its size)` bytes. Nothing larger than the data actually present is allocated.
    pub fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>, String> {
        let full = format!("{}{name}", self.prefix);
        let file_len = self.file_len;
        let mut f = self
            .zip
            .by_name(&full)
            .map_err(|e| format!("record `{full}`: {e}"))?;
        let declared = f.size();
        let bound = match f.compression() {
            CompressionMethod::Stored => file_len,
            _ => file_len.saturating_mul(MAX_DEFLATE_RATIO),
        };
        if declared > bound {
            return Err(format!(
                "record `{full}` claims {declared} bytes in a {file_len}-byte file"
            ));
        }
        let want = declared.min(limit);
        let mut buf = Vec::with_capacity(want.min(file_len) as usize);
        (&mut f)
            .take(want)
            .read_to_end(&mut buf)
            .map_err(|e| format!("record `{full}`: {e}"))?;
        if (buf.len() as u64) < want {
            return Err(format!(
                "record `{full}` is truncated: {} of {want} bytes",
                buf.len()
            ));
        }
        Ok(buf)
    }

    /// The size of record `<prefix><name>`, if present.
    pub fn size_of(&mut self, name: &str) -> Option<u64> {
        let full = format!("{}{name}", self.prefix);
        self.zip.by_name(&full).ok().map(|f| f.size())
    }
}
