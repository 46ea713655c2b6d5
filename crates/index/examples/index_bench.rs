//! Query latency of the embedded index's search (HNSW over int8 + exact re-ranking) against an
//! exhaustive search, on random unit vectors. Prints one Markdown table row per size.
//!
//! ```sh
//! cargo run --release -p visenc-index --example index_bench -- 128 100000 1000000
//! ```
//! Arguments: the dimension, then one or more index sizes. Queries run one at a time on one thread.

use std::time::Instant;

use visenc_index::{random_unit_vectors, Ann};

const QUERIES: usize = 1000;
const K: usize = 10;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments: DIM N [N ...]"))
        .collect();
    let (dim, sizes) = args.split_first().expect("arguments: DIM N [N ...]");
    let dim = *dim;
    println!("| vectors | dim | graph build s | search p50 ms | search p99 ms | exhaustive p50 ms | recall@{K} |");
    println!("|---|---|---|---|---|---|---|");
    for &n in sizes {
        let vectors = random_unit_vectors(n, dim, 1);
        let queries = random_unit_vectors(QUERIES, dim, 2);
        let paths = (0..n).map(|i| i.to_string()).collect();
        let t = Instant::now();
        let ann = Ann::build(paths, vectors, dim);
        let build = t.elapsed().as_secs_f64();
        let (mut fast, mut slow, mut found) = (vec![], vec![], 0);
        for q in queries.chunks(dim) {
            let t = Instant::now();
            let approx = ann.search(q, K);
            fast.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let exact = ann.exact(q, K);
            slow.push(t.elapsed().as_secs_f64() * 1e3);
            found += approx.iter().filter(|h| exact.contains(h)).count();
        }
        fast.sort_by(f64::total_cmp);
        slow.sort_by(f64::total_cmp);
        println!(
            "| {n} | {dim} | {build:.1} | {:.3} | {:.3} | {:.2} | {:.4} |",
            percentile(&fast, 0.5),
            percentile(&fast, 0.99),
            percentile(&slow, 0.5),
            found as f64 / (QUERIES * K) as f64
        );
    }
}
