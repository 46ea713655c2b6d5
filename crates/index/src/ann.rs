//! Approximate nearest neighbours: an HNSW graph (`instant-distance`) over int8-quantised copies of
//! the vectors (a quarter of the memory, cheap integer dot products), whose candidates are re-ranked
//! exactly with the f32 vectors. Small indexes are searched exhaustively.

use std::io::{BufReader, BufWriter};
use std::path::Path;

use instant_distance::{Builder, HnswMap, Point, Search};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::Hit;

/// Below this many vectors an exhaustive search is as fast as the graph and always exact.
pub const ANN_MIN_ROWS: usize = 4096;
/// Candidates the graph returns per query (HNSW's `ef_search`); they are re-ranked exactly.
const EF_SEARCH: usize = 160;
const EF_CONSTRUCTION: usize = 100;
/// The graph's random levels come from this seed, so a rebuild gives the same graph.
const SEED: u64 = 0x5ee_d15c;
/// Neighbours examined per image when looking for near-duplicates.
const DUP_NEIGHBORS: usize = 32;
/// Bumped when the cache file's layout changes.
const CACHE_FORMAT: u32 = 1;

/// A vector quantised to int8 with one scale: `v ≈ scale * q`.
#[derive(Clone, Serialize, Deserialize)]
struct Q8 {
    q: Vec<i8>,
    scale: f32,
}

impl Q8 {
    fn new(v: &[f32]) -> Self {
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        Self {
            q: v.iter().map(|x| (x / scale).round() as i8).collect(),
            scale,
        }
    }
}

impl Point for Q8 {
    /// Cosine distance of the (unit-length) vectors the quantised points approximate.
    fn distance(&self, other: &Self) -> f32 {
        let dot: i32 = self
            .q
            .iter()
            .zip(&other.q)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        1.0 - dot as f32 * self.scale * other.scale
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    fingerprint: String,
    graph: HnswMap<Q8, u32>,
}

/// Every vector of an index in memory, with the graph over them when there are enough.
pub struct Ann {
    paths: Vec<String>,
    vectors: Vec<f32>,
    dim: usize,
    graph: Option<HnswMap<Q8, u32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Identifies a set of vectors (paths, order and values), so a cached graph is only used for the
/// vectors it was built from.
fn fingerprint(paths: &[String], vectors: &[f32], dim: usize) -> String {
    let mut h = sha2::Sha256::new();
    h.update((dim as u64).to_le_bytes());
    for p in paths {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    for v in vectors {
        h.update(v.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Ann {
    /// Builds the graph (when there are at least [`ANN_MIN_ROWS`] vectors) over unit-length
    /// `vectors`, row-major, `dim` wide, one row per path.
    pub fn build(paths: Vec<String>, vectors: Vec<f32>, dim: usize) -> Self {
        let mut ann = Self {
            paths,
            vectors,
            dim,
            graph: None,
        };
        if ann.paths.len() >= ANN_MIN_ROWS && dim > 0 {
            let points: Vec<Q8> = ann.vectors.par_chunks(dim).map(Q8::new).collect();
            let ids = (0..points.len() as u32).collect();
            ann.graph = Some(
                Builder::default()
                    .ef_construction(EF_CONSTRUCTION)
                    .ef_search(EF_SEARCH)
                    .seed(SEED)
                    .build(points, ids),
            );
        }
        ann
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
        let Some(cache) = cache.filter(|_| paths.len() >= ANN_MIN_ROWS) else {
            return Self::build(paths, vectors, dim);
        };
        let fp = fingerprint(&paths, &vectors, dim);
        let cached = std::fs::File::open(cache)
            .ok()
            .and_then(|f| bincode::deserialize_from::<_, CacheFile>(BufReader::new(f)).ok())
            .filter(|c| c.format == CACHE_FORMAT && c.fingerprint == fp);
        if let Some(c) = cached {
            return Self {
                paths,
                vectors,
                dim,
                graph: Some(c.graph),
            };
        }
        let mut ann = Self::build(paths, vectors, dim);
        if let Some(graph) = ann.graph.take() {
            let file = CacheFile {
                format: CACHE_FORMAT,
                fingerprint: fp,
                graph,
            };
            let tmp = cache.with_extension("hnsw.tmp");
            let written = std::fs::File::create(&tmp)
                .ok()
                .is_some_and(|f| bincode::serialize_into(BufWriter::new(f), &file).is_ok());
            if written {
                let _ = std::fs::rename(&tmp, cache);
            } else {
                let _ = std::fs::remove_file(&tmp);
            }
            ann.graph = Some(file.graph);
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
            (0..self.len())
                .map(|i| (dot(query, self.row(i)), i))
                .collect(),
            k,
        )
    }

    fn ranked(&self, query: &[f32], k: usize) -> Vec<(f32, usize)> {
        match &self.graph {
            Some(g) if k <= EF_SEARCH => {
                let mut s = Search::default();
                let scored = g
                    .search(&Q8::new(query), &mut s)
                    .map(|item| {
                        let i = *item.value as usize;
                        (dot(query, self.row(i)), i)
                    })
                    .collect();
                Self::top(scored, k)
            }
            _ => self.ranked_exact(query, k),
        }
    }

    /// The `k` nearest rows to the unit-length `query` by exhaustive search.
    pub fn exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        self.hits(self.ranked_exact(query, k))
    }

    /// The `k` nearest rows to the unit-length `query`: graph candidates re-ranked exactly (or an
    /// exhaustive search without a graph, or when `k` exceeds the candidates the graph returns).
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        self.hits(self.ranked(query, k))
    }

    /// See [`crate::Index::near_duplicates`].
    pub fn near_duplicates(&self, threshold: f32) -> Vec<Vec<String>> {
        let k = DUP_NEIGHBORS.min(self.len());
        let pairs: Vec<(usize, usize)> = (0..self.len())
            .into_par_iter()
            .flat_map_iter(|i| {
                self.ranked(self.row(i), k)
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
    fn quantised_distance_approximates_cosine() {
        let a = crate::normalize(&[0.3, -1.0, 0.25, 0.8]);
        let b = crate::normalize(&[0.1, -0.7, 0.9, 0.05]);
        let exact = 1.0 - dot(&a, &b);
        let q = Q8::new(&a).distance(&Q8::new(&b));
        assert!((q - exact).abs() < 0.02, "{q} vs {exact}");
        assert!(Q8::new(&a).distance(&Q8::new(&a)).abs() < 0.02);
    }
}
