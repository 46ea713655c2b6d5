//! Labelled image sets for supervised training: a directory with one sub-directory per class, or a CSV of
//! `path,label` rows; and a seeded, stratified train/validation split.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{data_err, Result, TrainError};

/// Image files with a class index each; `classes` sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledImages {
    pub paths: Vec<PathBuf>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
}

/// Extensions visenc decodes (lower case).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl LabelledImages {
    /// A directory of class folders (image files directly inside each), or a `.csv` file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_dir(path)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            Self::from_csv(path)
        } else {
            Err(io_err(
                path,
                "not a directory of class folders or a .csv of path,label rows",
            ))
        }
    }

    /// One class per sub-directory (hidden ones skipped), named after it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut rows = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        for class_dir in entries {
            let class_dir = class_dir.map_err(|e| io_err(dir, e))?.path();
            let name = class_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !class_dir.is_dir() || name.starts_with('.') {
                continue;
            }
            let files = std::fs::read_dir(&class_dir).map_err(|e| io_err(&class_dir, e))?;
            for f in files {
                let f = f.map_err(|e| io_err(&class_dir, e))?.path();
                let is_image = f
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
                if f.is_file() && is_image {
                    rows.push((f, name.to_string()));
                }
            }
        }
        if rows.is_empty() {
            return Err(io_err(
                dir,
                "no images in class sub-directories (expected DIR/<class>/<image>)",
            ));
        }
        Ok(Self::from_rows(rows))
    }

    /// `path,label` rows (a first row `path,label` is a header); relative paths are relative to the CSV's
    /// directory. A label may contain commas (everything after the first comma).
    pub fn from_csv(csv: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(csv).map_err(|e| io_err(csv, e))?;
        let base = csv.parent().unwrap_or(Path::new("."));
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (i == 0 && line.eq_ignore_ascii_case("path,label")) {
                continue;
            }
            let (p, label) = line
                .split_once(',')
                .map(|(p, l)| (p.trim(), l.trim()))
                .filter(|(p, l)| !p.is_empty() && !l.is_empty())
                .ok_or_else(|| {
                    io_err(
                        csv,
                        format!("line {}: expected `path,label`, got {line:?}", i + 1),
                    )
                })?;
            rows.push((base.join(p), label.to_string()));
        }
        if rows.is_empty() {
            return Err(io_err(csv, "no path,label rows"));
        }
        Ok(Self::from_rows(rows))
    }

    fn from_rows(mut rows: Vec<(PathBuf, String)>) -> Self {
        rows.sort();
        let classes: Vec<String> = rows
            .iter()
            .map(|(_, c)| c.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let labels = rows
            .iter()
            .map(|(_, c)| classes.binary_search(c).unwrap_or_default() as u32)
            .collect();
        let paths = rows.into_iter().map(|(p, _)| p).collect();
        Self {
            paths,
            labels,
            classes,
        }
    }
}

/// Indices of the training and validation examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// A seeded split that keeps each class's share: round(`val_fraction` * n_c) examples of every class with
/// n_c >= 2 go to validation (at least one when `val_fraction` > 0), the rest to training. Needs at least
/// two classes and a non-empty validation set when `val_fraction` > 0.
pub fn stratified_split(labels: &[u32], val_fraction: f64, seed: u64) -> Result<Split> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(data_err(format!(
            "the validation fraction must be in [0, 1), got {val_fraction}"
        )));
    }
    let n_classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut rng = SplitMix64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut idx in by_class.into_iter().filter(|c| !c.is_empty()) {
        rng.shuffle(&mut idx);
        let k = if idx.len() < 2 || val_fraction == 0.0 {
            0
        } else {
            ((val_fraction * idx.len() as f64).round() as usize).clamp(1, idx.len() - 1)
        };
        val.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    if val_fraction > 0.0 && val.is_empty() {
        return Err(data_err(
            "no class has two examples, so nothing is left for validation",
        ));
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok(Split { train, val })
}

/// A small seeded generator (SplitMix64, Steele et al. 2014) for reproducible shuffles.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_seeded_and_disjoint() {
        let labels: Vec<u32> = (0..30).map(|i| (i % 3) as u32).chain([3]).collect();
        let s = stratified_split(&labels, 0.2, 1).unwrap();
        assert_eq!(s, stratified_split(&labels, 0.2, 1).unwrap());
        assert_ne!(s, stratified_split(&labels, 0.2, 2).unwrap());
        for c in 0..3 {
            assert_eq!(
                s.val.iter().filter(|&&i| labels[i] == c).count(),
                2,
                "class {c}"
            );
        }
        // The single example of class 3 trains.
        assert!(s.train.contains(&30));
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..31).collect::<Vec<_>>());
    }

    #[test]
    fn csv_rows_resolve_against_the_csv_directory() {
        let dir = std::env::temp_dir().join(format!("visenc-train-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("set.csv");
        std::fs::write(&csv, "path,label\nb.png,dog\na.png,cat\n/abs/c.png, cat \n").unwrap();
        let d = LabelledImages::open(&csv).unwrap();
        assert_eq!(d.classes, ["cat", "dog"]);
        assert_eq!(
            d.paths,
            [
                PathBuf::from("/abs/c.png"),
                dir.join("a.png"),
                dir.join("b.png")
            ]
        );
        assert_eq!(d.labels, [0, 0, 1]);
        std::fs::write(&csv, "a.png\n").unwrap();
        let err = LabelledImages::open(&csv).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("path,label"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
