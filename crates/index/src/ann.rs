//! Approximate nearest neighbours: an HNSW graph (`usearch`, whose distance kernels are SIMD and
//! dispatched at run time) over int8-quantised copies of the vectors (a quarter of the memory), whose
//! candidates are re-ranked exactly with the f32 vectors. Small indexes are scanned exhaustively.

use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use sha2::Digest;
use usearch::{IndexOptions, MetricKind, ScalarKind};

use crate::Hit;

/// Below this many vectors an exhaustive scan is used: it is exact and, at 512 dimensions, about as
/// fast as the graph search (measured in `bench/index.md`).
pub const ANN_MIN_ROWS: usize = 20_000;
/// Candidates the graph search keeps (HNSW's `ef_search`); all of them are re-ranked exactly.
const EF_SEARCH: usize = 256;
/// Candidates kept while inserting (`ef_construction`).
const EF_CONSTRUCTION: usize = 128;
/// Neighbours per node (HNSW's `M`; twice as many on the bottom layer).
const CONNECTIVITY: usize = 32;
/// Searches that may run at once (usearch keeps one context per concurrent search); more fall back
/// to the exhaustive scan, exact but slower.
const SEARCH_THREADS: usize = 64;
/// Neighbours examined per image when looking for near-duplicates.
const DUP_NEIGHBORS: usize = 32;
/// Bumped when the cache file's layout changes.
const CACHE_FORMAT: u32 = 2;
/// The cache file starts with this, then the format, the fingerprint and usearch's own bytes.
const CACHE_MAGIC: &[u8; 8] = b"visencG\0";

/// A vector quantised to int8 with one scale (`v ~ scale * q`, the largest component at +-127);
/// the graph measures cosine distance, which the scale does not change.
fn quantise(v: &[f32]) -> Vec<i8> {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { 127.0 / max } else { 0.0 };
    v.iter().map(|x| (x * scale).round() as i8).collect()
}

/// Every vector of an index in memory, with the graph over them when there are enough.
pub struct Ann {
    paths: Vec<String>,
    vectors: Vec<f32>,
    dim: usize,
    graph: Option<usearch::Index>,
}

/// `a . b`, vectorised with the widest extension the CPU has.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[inline(always)]
    fn lanes(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..16 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(a: &[f32], b: &[f32]) -> f32 {
            lanes(a, b)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(a: &[f32], b: &[f32]) -> f32 {
            lanes(a, b)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { avx512(a, b) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { avx2(a, b) };
        }
    }
    lanes(a, b)
}

/// Identifies a set of vectors (paths, order and values), so a cached graph is only used for the
/// vectors it was built from.
fn fingerprint(paths: &[String], vectors: &[f32], dim: usize) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update((dim as u64).to_le_bytes());
    for p in paths {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in vectors.chunks(1 << 14) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        h.update(&buf);
    }
    h.finalize().into()
}

fn options(dim: usize) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: MetricKind::Cos,
        quantization: ScalarKind::I8,
        connectivity: CONNECTIVITY,
        expansion_add: EF_CONSTRUCTION,
        expansion_search: EF_SEARCH,
        multi: false,
    }
}

/// An empty graph for `n` vectors of width `dim`, ready for concurrent inserts and searches.
fn new_graph(n: usize, dim: usize) -> Option<usearch::Index> {
    let g = usearch::Index::new(&options(dim)).ok()?;
    let threads = SEARCH_THREADS.max(rayon::current_num_threads());
    g.reserve_capacity_and_threads(n, threads).ok()?;
    Some(g)
}

impl Ann {
    /// Unit-length `vectors`, row-major, `dim` wide, one row per path, searched exhaustively (no
    /// graph, whatever their number: the exact reference for benchmarks and tests).
    pub fn exhaustive(paths: Vec<String>, vectors: Vec<f32>, dim: usize) -> Self {
        Self {
            paths,
            vectors,
            dim,
            graph: None,
        }
    }

    /// Like [`Ann::exhaustive`], with the graph when there are at least [`ANN_MIN_ROWS`] vectors.
    /// Inserts run in parallel.
    pub fn build(paths: Vec<String>, vectors: Vec<f32>, dim: usize) -> Self {
        let mut ann = Self::exhaustive(paths, vectors, dim);
        if ann.paths.len() >= ANN_MIN_ROWS && dim > 0 {
            ann.graph = ann.new_graph();
        }
        ann
    }

    /// Like [`Ann::build`], with the graph whatever the number of vectors (for benchmarks that
    /// compare the graph with the exhaustive scan).
    pub fn build_graph(paths: Vec<String>, vectors: Vec<f32>, dim: usize) -> Self {
        let mut ann = Self::exhaustive(paths, vectors, dim);
        if dim > 0 {
            ann.graph = ann.new_graph();
        }
        ann
    }

    /// The graph over every row, inserted in parallel; `None` if usearch refuses.
    fn new_graph(&self) -> Option<usearch::Index> {
        new_graph(self.len(), self.dim).filter(|g| {
            self.vectors
                .par_chunks(self.dim)
                .enumerate()
                .all(|(i, v)| g.add(i as u64, &quantise(v)).is_ok())
        })
    }

    /// Like [`Ann::build`], reusing the graph cached in `cache` when it was built from these very
    /// vectors, and caching a newly built one there. The cache is best effort: a missing, stale or
    /// unwritable cache only costs a rebuild.
    pub(crate) fn load_or_build(
        paths: Vec<String>,
        vectors: Vec<f32>,
        dim: usize,
        cache: Option<&Path>,
    ) -> Self {
        let Some(cache) = cache.filter(|_| paths.len() >= ANN_MIN_ROWS && dim > 0) else {
            return Self::build(paths, vectors, dim);
        };
        let fp = fingerprint(&paths, &vectors, dim);
        let header = [&CACHE_MAGIC[..], &CACHE_FORMAT.to_le_bytes(), &fp].concat();
        let cached = std::fs::read(cache)
            .ok()
            .filter(|bytes| bytes.starts_with(&header))
            .and_then(|bytes| {
                let g = usearch::Index::new(&options(dim)).ok()?;
                g.load_from_buffer(&bytes[header.len()..]).ok()?;
                let threads = SEARCH_THREADS.max(rayon::current_num_threads());
                g.reserve_capacity_and_threads(paths.len(), threads).ok()?;
                (g.size() == paths.len() && g.dimensions() == dim).then_some(g)
            });
        if let Some(g) = cached {
            return Self {
                paths,
                vectors,
                dim,
                graph: Some(g),
            };
        }
        let ann = Self::build(paths, vectors, dim);
        if let Some(g) = &ann.graph {
            let mut bytes = vec![0u8; g.serialized_length()];
            if g.save_to_buffer(&mut bytes).is_ok() {
                let tmp = cache.with_extension("hnsw.tmp");
                let written = std::fs::File::create(&tmp)
                    .and_then(|mut f| f.write_all(&header).and_then(|_| f.write_all(&bytes)))
                    .is_ok();
                if written {
                    let _ = std::fs::rename(&tmp, cache);
                } else {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
        ann
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Whether searches go through the graph (else they are exhaustive).
    pub fn has_graph(&self) -> bool {
        self.graph.is_some()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// The `k` best of `scored` (score, row), best first; ties go to the earlier row.
    fn top(mut scored: Vec<(f32, usize)>, k: usize) -> Vec<(f32, usize)> {
        let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if scored.len() > k && k > 0 {
            scored.select_nth_unstable_by(k - 1, by_score);
        }
        scored.truncate(k);
        scored.sort_by(by_score);
        scored
    }

    fn hits(&self, ranked: Vec<(f32, usize)>) -> Vec<Hit> {
        ranked
            .into_iter()
            .map(|(score, i)| Hit {
                path: self.paths[i].clone(),
                score,
            })
            .collect()
    }

    fn ranked_exact(&self, query: &[f32], k: usize) -> Vec<(f32, usize)> {
        Self::top(
            self.vectors
                .chunks(self.dim.max(1))
                .enumerate()
                .map(|(i, row)| (dot(query, row), i))
                .collect(),
            k,
        )
    }

    /// The graph's candidates for `query` (at least `k`), `None` when there is no graph or it
    /// failed (then the caller scans).
    fn candidates(&self, query: &[f32], count: usize) -> Option<Vec<usize>> {
        let g = self.graph.as_ref()?;
        let m = g.search(&quantise(query), count).ok()?;
        Some(m.keys.iter().map(|&key| key as usize).collect())
    }

    fn ranked(&self, query: &[f32], k: usize, ef: usize) -> Vec<(f32, usize)> {
        match self.candidates(query, ef.max(k)) {
            Some(c) => Self::top(
                c.into_iter()
                    .map(|i| (dot(query, self.row(i)), i))
                    .collect(),
                k,
            ),
            None => self.ranked_exact(query, k),
        }
    }

    /// The `k` nearest rows to the unit-length `query` by exhaustive search.
    pub fn exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        self.hits(self.ranked_exact(query, k))
    }

    /// The `k` nearest rows to the unit-length `query`: graph candidates (at least `k`) re-ranked
    /// exactly, or an exhaustive scan without a graph.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        self.search_ef(query, k, EF_SEARCH)
    }

    /// Like [`Ann::search`], keeping `ef` graph candidates (HNSW's `ef_search`) instead of the
    /// default; more candidates, higher recall, slower queries (`bench/index.md`).
    pub fn search_ef(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        self.hits(self.ranked(query, k, ef))
    }

    /// See [`crate::Index::near_duplicates`].
    pub fn near_duplicates(&self, threshold: f32) -> Vec<Vec<String>> {
        let k = DUP_NEIGHBORS.min(self.len());
        let pairs: Vec<(usize, usize)> = (0..self.len())
            .into_par_iter()
            .flat_map_iter(|i| {
                self.ranked(self.row(i), k, EF_SEARCH)
                    .into_iter()
                    .filter(|&(score, j)| score >= threshold && j != i)
                    .map(|(_, j)| (i, j))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut parent: Vec<usize> = (0..self.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for (a, b) in pairs {
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            if ra != rb {
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
        for i in 0..self.len() {
            let r = root(&mut parent, i);
            groups.entry(r).or_default().push(self.paths[i].clone());
        }
        let mut out: Vec<Vec<String>> = groups
            .into_values()
            .filter(|g| g.len() > 1)
            .map(|mut g| {
                g.sort();
                g
            })
            .collect();
        out.sort();
        out
    }
}

/// `n` reproducible random unit vectors (i.i.d. Gaussian, normalised), row-major, for tests and
/// benchmarks: xorshift64* and Box-Muller, so the same seed gives the same vectors everywhere.
pub fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut uniform = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                let (u, w) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * w).cos()) as f32
            })
            .collect();
        out.extend(crate::normalize(&v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_vectors_keep_the_cosine() {
        let a = crate::normalize(&[0.3, -1.0, 0.25, 0.8]);
        let b = crate::normalize(&[0.1, -0.7, 0.9, 0.05]);
        let (qa, qb) = (quantise(&a), quantise(&b));
        assert_eq!(qa.iter().map(|x| x.abs()).max(), Some(127));
        let f = |q: &[i8]| q.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (fa, fb) = (f(&qa), f(&qb));
        let cos = dot(&fa, &fb) / (dot(&fa, &fa) * dot(&fb, &fb)).sqrt();
        assert!((cos - dot(&a, &b)).abs() < 0.01, "{cos} vs {}", dot(&a, &b));
        assert!(quantise(&[0.0; 3]).iter().all(|&x| x == 0));
    }

    #[test]
    fn dot_equals_the_plain_sum_at_odd_lengths() {
        for n in [0, 1, 15, 16, 17, 100, 512] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "{n}");
        }
    }
}
