//! Expanding the command line's files and directories into a list of image paths.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Extensions picked up when walking a directory (explicitly named files are always tried).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image_name(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Files as given, directories walked recursively (sorted, images by extension). A path that does
/// not exist is kept, so it is reported as a failed item rather than stopping the run.
pub fn collect(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if args.is_empty() {
        bail!("no input files or directories given");
    }
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            walk(a, &mut out)?;
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// One part of a job split across machines: `--shard i/N` keeps the files whose path hashes to `i`
/// modulo `N` (FNV-1a of the path's bytes as listed, so every machine given the same input
/// arguments picks the same disjoint part, and a file added later does not move the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!(
                "{s:?}: expected i/N with 0 <= i < N (e.g. 0/4 ... 3/4)"
            )),
        }
    }
}

impl Shard {
    pub fn contains(&self, path: &Path) -> bool {
        let h = path
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
            });
        h % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_directories_for_images_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for f in ["b.JPG", "a.png", "notes.txt", "sub/c.webp"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let got = collect(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.png", "b.JPG", "sub/c.webp"]);
    }

    #[test]
    fn shards_are_disjoint_and_cover_every_file() {
        let paths: Vec<PathBuf> = (0..1000)
            .map(|i| PathBuf::from(format!("d/img {i}.jpg")))
            .collect();
        let n = 7;
        let mut seen = vec![0; paths.len()];
        for i in 0..n {
            let s: Shard = format!("{i}/{n}").parse().unwrap();
            let part: Vec<usize> = (0..paths.len())
                .filter(|&k| s.contains(&paths[k]))
                .collect();
            assert!(
                part.len() > 1000 / n / 2,
                "shard {i} holds only {}",
                part.len()
            );
            for k in part {
                seen[k] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        for bad in ["3/3", "1", "a/2", "-1/2", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
