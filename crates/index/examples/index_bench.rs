//! Query latency and build time of the search paths on random unit vectors: the exhaustive scan,
//! the embedded index's graph (`visenc_index::Ann`: usearch HNSW over int8, candidates re-ranked
//! exactly) and, when `VISENC_TEST_POSTGRES` names a server (`scripts/start-postgres.sh`), PostgreSQL
//! with pgvector's HNSW index in a scratch database, filled through the same `Index` API as
//! `visenc index --db postgres://...`. Prints one Markdown table row per path and size; recall@10 is
//! against the exhaustive scan.
//!
//! ```sh
//! export VISENC_TEST_POSTGRES="$(./scripts/start-postgres.sh)"   # optional
//! cargo run --release -p visenc-index --example index_bench -- 512 100000 1000000 [--latent 32]
//! ```
//! Arguments: the dimension, then one or more index sizes. Vectors are i.i.d. Gaussian directions
//! (the hardest case for a graph), or with `--latent R` a random linear image of R-dimensional
//! Gaussian vectors plus noise (intrinsic dimension about R, like real embeddings). Queries come
//! from the same distribution and run one at a time on one thread. Options:
//! - `--ef A,B,...`: time the graph at each of these `ef_search` values (default: the index's own);
//! - `--no-graph`: leave out the graph (e.g. to time only pgvector);
//! - `--pg-max N`: fill pgvector only for sizes up to N.

use std::time::Instant;

use rayon::prelude::*;

use visenc_index::{random_unit_vectors, Ann, Entry, Hit, Index};

#[path = "../tests/common/scratch_pg.rs"]
mod scratch_pg;

const QUERIES: usize = 500;
const K: usize = 10;
/// Rows per committed batch when filling PostgreSQL (each of these commits takes the bulk path,
/// which rebuilds pgvector's HNSW index, while the table holds under ten batches).
const PG_BATCH: usize = 50_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times `search` on every query: (p50 ms, p99 ms, the results).
fn time_queries(
    queries: &[f32],
    dim: usize,
    mut search: impl FnMut(&[f32]) -> Vec<Hit>,
) -> (f64, f64, Vec<Vec<Hit>>) {
    let (mut ms, mut results) = (vec![], vec![]);
    for q in queries.chunks(dim) {
        let t = Instant::now();
        results.push(search(q));
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99), results)
}

fn recall(got: &[Vec<Hit>], exact: &[Vec<Hit>]) -> f64 {
    let found: usize = got
        .iter()
        .zip(exact)
        .map(|(g, e)| {
            g.iter()
                .filter(|h| e.iter().any(|x| x.path == h.path))
                .count()
        })
        .sum();
    found as f64 / (exact.len() * K) as f64
}

fn row(path: &str, n: usize, dim: usize, build: f64, (p50, p99): (f64, f64), recall: f64) {
    println!("| {path} | {n} | {dim} | {build:.1} | {p50:.3} | {p99:.3} | {recall:.4} |");
}

fn postgres(url: &str, vectors: &[f32], dim: usize) -> (Index, f64) {
    let idx = Index::create(url).unwrap();
    idx.bind_model("bench", dim).unwrap();
    let t = Instant::now();
    let rows: Vec<&[f32]> = vectors.chunks(dim).collect();
    for (b, chunk) in rows.chunks(PG_BATCH).enumerate() {
        let entries: Vec<Entry> = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| Entry {
                path: (b * PG_BATCH + i).to_string(),
                hash: String::new(),
                size: 0,
                embedding: v.to_vec(),
            })
            .collect();
        idx.commit(&entries, &[]).unwrap();
    }
    (idx, t.elapsed().as_secs_f64())
}

/// `n` unit vectors of width `dim` near an `r`-dimensional subspace: `normalize(P z + 0.3 e)` with a
/// fixed random `P` (dim x r, unit rows), `z` unit in R^r and `e` a random unit vector in R^dim.
fn latent_unit_vectors(n: usize, dim: usize, r: usize, seed: u64) -> Vec<f32> {
    let p = random_unit_vectors(dim, r, 7);
    let z = random_unit_vectors(n, r, seed);
    let e = random_unit_vectors(n, dim, seed + 1000);
    let mut out = vec![0f32; n * dim];
    out.par_chunks_mut(dim)
        .zip(z.par_chunks(r).zip(e.par_chunks(dim)))
        .for_each(|(v, (z, e))| {
            for (j, x) in v.iter_mut().enumerate() {
                let pz: f32 = p[j * r..(j + 1) * r]
                    .iter()
                    .zip(z)
                    .map(|(a, b)| a * b)
                    .sum();
                *x = pz + 0.3 * e[j];
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
        });
    out
}

const USAGE: &str =
    "arguments: DIM N [N ...] [--latent R] [--ef A,B,...] [--no-graph] [--pg-max N]";

/// Removes `--name VALUE` from `args`, returning the value.
fn take_option(args: &mut Vec<String>, name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    let value = args.get(i + 1).cloned().expect(USAGE);
    args.drain(i..i + 2);
    Some(value)
}

fn main() {
    let pg = std::env::var_os("VISENC_TEST_POSTGRES").is_some();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let latent: Option<usize> = take_option(&mut args, "--latent").map(|r| r.parse().expect(USAGE));
    let efs: Option<Vec<usize>> = take_option(&mut args, "--ef")
        .map(|l| l.split(',').map(|e| e.parse().expect(USAGE)).collect());
    let pg_max: usize =
        take_option(&mut args, "--pg-max").map_or(usize::MAX, |n| n.parse().expect(USAGE));
    let graph = match args.iter().position(|a| a == "--no-graph") {
        Some(i) => {
            args.remove(i);
            false
        }
        None => true,
    };
    let nums: Vec<usize> = args.iter().map(|a| a.parse().expect(USAGE)).collect();
    let (&dim, sizes) = nums.split_first().expect(USAGE);
    println!("| search | vectors | dim | build s | p50 ms | p99 ms | recall@{K} |");
    println!("|---|---|---|---|---|---|---|");
    for &n in sizes {
        let (vectors, queries) = match latent {
            Some(r) => (
                latent_unit_vectors(n, dim, r, 1),
                latent_unit_vectors(QUERIES, dim, r, 2),
            ),
            None => (
                random_unit_vectors(n, dim, 1),
                random_unit_vectors(QUERIES, dim, 2),
            ),
        };
        let paths = (0..n).map(|i| i.to_string()).collect();
        let pg_vectors = (pg && n <= pg_max).then(|| vectors.clone());
        let t = Instant::now();
        let ann = if graph {
            Ann::build_graph(paths, vectors, dim)
        } else {
            Ann::exhaustive(paths, vectors, dim)
        };
        let build = t.elapsed().as_secs_f64();
        let (p50, p99, exact) = time_queries(&queries, dim, |q| ann.exact(q, K));
        row("exhaustive scan (f32)", n, dim, 0.0, (p50, p99), 1.0);
        if graph {
            match &efs {
                None => {
                    let (p50, p99, got) = time_queries(&queries, dim, |q| ann.search(q, K));
                    let r = recall(&got, &exact);
                    row(
                        "usearch HNSW (int8) + re-rank",
                        n,
                        dim,
                        build,
                        (p50, p99),
                        r,
                    );
                }
                Some(efs) => {
                    for &ef in efs {
                        let (p50, p99, got) =
                            time_queries(&queries, dim, |q| ann.search_ef(q, K, ef));
                        let path = format!("usearch HNSW (int8) + re-rank, ef {ef}");
                        row(&path, n, dim, build, (p50, p99), recall(&got, &exact));
                    }
                }
            }
        }
        drop(ann);
        if let Some(v) = pg_vectors {
            let db = scratch_pg::ScratchDb::create(&format!("visenc_bench_{dim}_{n}")).unwrap();
            let (idx, build) = postgres(&db.url, &v, dim);
            drop(v);
            let (p50, p99, got) = time_queries(&queries, dim, |q| idx.search(q, K).unwrap());
            row(
                "pgvector HNSW (f32)",
                n,
                dim,
                build,
                (p50, p99),
                recall(&got, &exact),
            );
        }
    }
}
