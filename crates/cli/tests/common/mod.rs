//! Shared helpers of the CLI tests: running the real binary, fixture and photo paths, reading `.npy`
//! files, and writing small PNGs byte by byte (so a test can make exactly the file it needs).
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use visenc_server::client::Client;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(name: &str) -> String {
    root()
        .join("fixtures/models")
        .join(name)
        .display()
        .to_string()
}

/// A real photo; fails with instructions when the assets have not been fetched.
pub fn photo(name: &str) -> String {
    let p = root().join("assets/photos").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        p.display()
    );
    p.display().to_string()
}

/// What one run of the binary did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Fails with the whole output unless the exit code is `code`; never accepts a panic.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked:\n{}",
            self.stderr
        );
        assert_eq!(
            self.code,
            Some(code),
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

pub fn visenc<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_visenc"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the visenc binary");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// An `.npy` file (little-endian f32, C order) parsed from its bytes.
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read_npy(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: magic", path.display());
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => panic!("{}: npy version {v}.{minor}", path.display()),
    };
    let data_start = start + header_len;
    // NumPy requires the data to start on a 16-byte boundary (it writes 64).
    assert_eq!(
        data_start % 16,
        0,
        "{}: data offset {data_start}",
        path.display()
    );
    let header = std::str::from_utf8(&bytes[start..data_start]).unwrap();
    assert!(
        header.ends_with('\n'),
        "{}: header must end with a newline: {header:?}",
        path.display()
    );
    let field = |key: &str| -> &str {
        let at = header
            .find(&format!("'{key}':"))
            .unwrap_or_else(|| panic!("{}: no {key} in {header}", path.display()));
        header[at + key.len() + 3..].trim_start()
    };
    assert!(
        field("descr").starts_with("'<f4'"),
        "{}: dtype in {header}",
        path.display()
    );
    assert!(
        field("fortran_order").starts_with("False"),
        "{}: order in {header}",
        path.display()
    );
    let shape_text = field("shape");
    let shape_text = &shape_text[1..shape_text.find(')').unwrap()];
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[data_start..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        (bytes.len() - data_start) % 4,
        0,
        "{}: trailing bytes",
        path.display()
    );
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "{}: {shape:?} vs {} values",
        path.display(),
        data.len()
    );
    Npy { shape, data }
}

pub fn f32_vec(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// A PNG signature and an IHDR for an 8-bit RGB image of `width` x `height`.
pub fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, adaptive filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    out
}

/// A complete 8-bit RGB PNG whose pixel (x, y) is `f(x, y)`; zlib with stored (uncompressed) blocks.
pub fn png(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0); // filter: none
        for x in 0..width {
            raw.extend(f(x, y));
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        z.extend((block.len() as u16).to_le_bytes());
        z.extend((!(block.len() as u16)).to_le_bytes());
        z.extend(*block);
    }
    z.extend(adler32(&raw).to_be_bytes());
    let mut out = png_header(width, height);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A PNG whose header claims `width` x `height` but whose data is a few bytes (a decompression bomb's
/// or a lying file's header): only the header may be read before refusing it.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = png_header(width, height);
    chunk(
        &mut out,
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01,
        ],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A `visenc serve` process on a free loopback port; killed if the test ends early.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Serve {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_visenc"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run visenc serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no address printed: {line:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        };
        let addr = addr.parse().unwrap();
        Self { child, addr }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr, Duration::from_secs(60))
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
