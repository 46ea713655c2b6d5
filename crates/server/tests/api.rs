//! Every route of the service against the library it wraps: OpenAI / infinity embeddings (float and
//! base64, texts and images, `dimensions`, usage), TEI `/embed`, `/classify`, `/search` with
//! thumbnails, `/health`, `/metrics`, `/openapi.json` and the page.

mod common;

use std::sync::Arc;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use visenc_server::SearchIndex;

#[test]
fn openai_text_embeddings_equal_the_library_unit_length_with_token_usage() {
    let enc = encoder(None);
    let texts = ["a photo of a cat", "an espresso"];
    let want: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| library_text_embedding(&enc, t))
        .collect();
    let tokens: usize = enc
        .count_tokens(&texts)
        .unwrap()
        .iter()
        .map(|c| c.tokens)
        .sum();
    let s = start(config(), enc, None);
    let r = client(&s)
        .post_json("/v1/embeddings", &json!({"input": texts, "model": model()}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], model());
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    assert_eq!(v["usage"]["total_tokens"], tokens);
    assert!(tokens > 4, "special tokens and words are counted: {tokens}");
    for (i, w) in want.iter().enumerate() {
        let d = &v["data"][i];
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let got = floats(&d["embedding"]);
        assert!(max_abs_diff(&got, w) < 1e-5, "text {i}");
    }
}

#[test]
fn base64_encoding_is_the_little_endian_f32_of_the_float_answer() {
    let s = start(config(), encoder(None), None);
    let mut c = client(&s);
    let float = c
        .post_json("/v1/embeddings", &json!({"input": "a dog"}))
        .unwrap()
        .json()
        .unwrap();
    let b64 = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "a dog", "encoding_format": "base64"}),
        )
        .unwrap()
        .json()
        .unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(
            b64["data"][0]["embedding"]
                .as_str()
                .expect("a base64 string"),
        )
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, floats(&float["data"][0]["embedding"]));
}

#[test]
fn images_as_data_urls_or_bare_base64_equal_the_library_on_both_routes() {
    let enc = encoder(None);
    let want_cat = library_image_embedding(&enc, &photo_path("chelsea.png"));
    let want_coffee = library_image_embedding(&enc, &photo_path("coffee.png"));
    let s = start(config(), enc, None);
    let mut c = client(&s);
    let bare = base64::engine::general_purpose::STANDARD.encode(photo("coffee.png"));
    for route in ["/v1/embeddings", "/embeddings"] {
        let r = c
            .post_json(
                route,
                &json!({"input": [data_url(&photo("chelsea.png")), bare], "modality": "image"}),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{route}: {}", r.text());
        let v = r.json().unwrap();
        assert!(max_abs_diff(&floats(&v["data"][0]["embedding"]), &want_cat) < 1e-5);
        assert!(max_abs_diff(&floats(&v["data"][1]["embedding"]), &want_coffee) < 1e-5);
        // infinity's count: len("an image is worth a repeated ") + len("token") * height, with
        // the heights read from the PNG headers here (chelsea 300 rows, coffee 400).
        let height = |name: &str| image::image_dimensions(photo_path(name)).unwrap().1 as u64;
        let want = (29 + 5 * height("chelsea.png")) + (29 + 5 * height("coffee.png"));
        assert_eq!(v["usage"]["prompt_tokens"], want);
        assert_eq!(v["usage"]["total_tokens"], want);
    }
}

#[test]
fn dimensions_keep_the_first_values_renormalised() {
    let enc = encoder(None);
    let full = library_text_embedding(&enc, "a cat");
    let s = start(config(), enc, None);
    let mut c = client(&s);
    let v = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "a cat", "dimensions": 8}),
        )
        .unwrap()
        .json()
        .unwrap();
    assert!(max_abs_diff(&floats(&v["data"][0]["embedding"]), &unit(&full[..8])) < 1e-5);
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "a cat", "dimensions": 10000}),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json().unwrap()["error"]["param"], "dimensions");
}

#[test]
fn tei_embed_normalises_by_default_and_refuses_over_long_text_unless_truncate() {
    let enc = encoder(None);
    let raw = enc.encode_texts(&["a cat"]).unwrap().projected;
    let raw: Vec<f32> = raw.flatten_all().unwrap().to_vec1().unwrap();
    let s = start(config(), enc, None);
    let mut c = client(&s);
    let r = c.post_json("/embed", &json!({"inputs": "a cat"})).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-compute-time").is_some() && r.header("x-total-time").is_some());
    let v = r.json().unwrap();
    assert!(max_abs_diff(&floats(&v[0]), &unit(&raw)) < 1e-5);
    let v = c
        .post_json("/embed", &json!({"inputs": ["a cat"], "normalize": false}))
        .unwrap()
        .json()
        .unwrap();
    assert!(max_abs_diff(&floats(&v[0]), &raw) < 1e-5);

    let long = "cat ".repeat(500);
    let r = c
        .post_json("/embed", &json!({"inputs": ["a cat", long]}))
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    let e = r.json().unwrap();
    assert_eq!(e["error_type"], "validation");
    assert!(e["error"].as_str().unwrap().contains("inputs[1]"), "{e}");
    let r = c
        .post_json("/embed", &json!({"inputs": long, "truncate": true}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn over_long_text_is_cut_to_the_context_as_the_reference_tokenizer_does() {
    let enc = encoder(None);
    let context = enc.info().text_context_length.unwrap();
    let s = start(config(), enc, None);
    let mut c = client(&s);
    let mut embed = |text: String| {
        let v = c
            .post_json("/v1/embeddings", &json!({"input": text}))
            .unwrap()
            .json()
            .unwrap();
        (
            floats(&v["data"][0]["embedding"]),
            v["usage"]["prompt_tokens"].clone(),
        )
    };
    // Both are longer than the context: only their common beginning is seen, so they are equal.
    let (a, a_tokens) = embed("a photo of a cat. ".repeat(100));
    let (b, b_tokens) = embed("a photo of a cat. ".repeat(100) + "and a dog");
    let (short, _) = embed("a photo of a cat.".into());
    assert_eq!(a_tokens, context);
    assert_eq!(b_tokens, context);
    assert!(max_abs_diff(&a, &b) < 1e-6);
    assert!(
        max_abs_diff(&a, &short) > 1e-3,
        "the long text is not the short one"
    );
}

#[test]
fn classify_gives_the_library_zero_shot_probabilities_best_first() {
    let enc = encoder(None);
    let labels = ["cat", "dog", "coffee"];
    let emb = {
        let px = enc.load_image(&photo_path("chelsea.png")).unwrap();
        enc.encode_pixels(&[px], &Default::default())
            .unwrap()
            .embedding()
            .clone()
    };
    let want = enc.zero_shot(&emb, &labels, "a photo of a {}.").unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let s = start(config(), enc, None);
    let r = client(&s)
        .post_json(
            "/classify",
            &json!({"input": data_url(&photo("chelsea.png")), "labels": labels}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let got = &r.json().unwrap()["data"][0]["labels"];
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 3);
    let scores: Vec<f32> = got
        .iter()
        .map(|l| l["score"].as_f64().unwrap() as f32)
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    for l in got {
        let i = labels.iter().position(|x| *x == l["label"]).unwrap();
        assert!((l["score"].as_f64().unwrap() as f32 - want[i]).abs() < 1e-5);
    }
    assert!(
        (scores.iter().sum::<f32>() - 1.0).abs() < 1e-5,
        "CLIP: a softmax over labels"
    );
}

#[test]
fn search_finds_indexed_photos_and_thumbnails_serve_only_indexed_files() {
    let enc = encoder(None);
    let paths: Vec<_> = ["chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|p| photo_path(p))
        .collect();
    let index = Arc::new(ExactIndex::of(&enc, &paths));
    let s = start(config(), enc, Some(index.clone() as Arc<dyn SearchIndex>));
    let mut c = client(&s);
    // An image query finds itself first, with cosine 1.
    let r = c
        .post_json(
            "/search",
            &json!({"image": data_url(&photo("coffee.png")), "k": 2}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["path"], paths[1].display().to_string());
    assert!((results[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    // A text query ranks all three like the index does.
    let r = c.post_json("/search", &json!({"text": "a cat"})).unwrap();
    let v = r.json().unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 3);
    // Every thumbnail URL serves the indexed file itself.
    let thumb = v["results"][0]["thumbnail"].as_str().unwrap().to_string();
    let path = v["results"][0]["path"].as_str().unwrap().to_string();
    let t = c.get(&thumb).unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(t.body, std::fs::read(&path).unwrap());
    assert!(t.header("content-type").unwrap().starts_with("image/"));
    // Anything else is not found, however it is spelled.
    let cargo = root().join("Cargo.toml").display().to_string();
    let hostile = [
        format!("/thumbnail?path={cargo}"),
        "/thumbnail?path=/etc/passwd".to_string(),
        format!(
            "/thumbnail?path={}/../../../../etc/passwd",
            paths[0].parent().unwrap().display()
        ),
        format!("/thumbnail?path={}%00.png", paths[0].display()),
        format!(
            "/thumbnail?path={}/./chelsea.png",
            paths[0].parent().unwrap().display()
        ),
        "/thumbnail?path=".to_string(),
        "/thumbnail".to_string(),
        "/thumbnail?path=%ZZ".to_string(),
    ];
    for h in &hostile {
        let r = c.get(h).unwrap();
        assert!(r.status == 404 || r.status == 400, "{h}: {}", r.status);
        assert!(r.json().unwrap()["error"]["message"].is_string(), "{h}");
    }
    // Bad searches.
    for (body, status) in [
        (json!({"text": "a", "image": "AAAA"}), 400),
        (json!({}), 400),
        (json!({"text": "a", "k": 0}), 400),
        (json!({"text": "a", "k": 100000}), 400),
        (json!({"text": "a", "k": -1}), 400),
        (json!({"image": "data:image/png;base64,AAAA"}), 400),
    ] {
        let r = c.post_json("/search", &body).unwrap();
        assert_eq!(r.status, status, "{body}: {}", r.text());
    }
}

#[test]
fn search_without_an_index_is_a_clear_404() {
    let s = start(config(), encoder(None), None);
    let r = client(&s)
        .post_json("/search", &json!({"text": "a cat"}))
        .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--db"));
}

#[test]
fn health_metrics_openapi_and_page() {
    let s = start(config(), encoder(None), None);
    let mut c = client(&s);
    let h = c.get("/health").unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.json().unwrap()["status"], "ok");
    c.post_json("/v1/embeddings", &json!({"input": "x"}))
        .unwrap();
    c.post_json("/embed", &json!({"inputs": []})).unwrap();
    let m = c.get("/metrics").unwrap();
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = m.text();
    for want in [
        "visenc_requests_total{route=\"/v1/embeddings\",status=\"200\"} 1",
        "visenc_requests_total{route=\"/embed\",status=\"400\"} 1",
        "visenc_requests_total{route=\"/health\",status=\"200\"} 1",
        "visenc_request_duration_seconds_count{route=\"/v1/embeddings\"} 1",
        "visenc_batch_size_count 1",
        "visenc_queue_depth 0",
        "# TYPE visenc_batch_size histogram",
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
    let doc = c.get("/openapi.json").unwrap().json().unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/v1/embeddings", "post"),
        ("/embeddings", "post"),
        ("/embed", "post"),
        ("/classify", "post"),
        ("/search", "post"),
        ("/thumbnail", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} not documented"
        );
        // ...and served: anything but the router's 404 / 405.
        let r = if method == "get" {
            c.get(path).unwrap()
        } else {
            c.post_json(path, &json!({})).unwrap()
        };
        assert!(
            r.status != 404 || path == "/thumbnail" || path == "/search",
            "{path}"
        );
        assert_ne!(r.status, 405, "{path}");
    }
    let page = c.get("/").unwrap();
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("id=\"query\"") && page.text().contains("type=\"file\""));
    let r = c.get("/no/such/route").unwrap();
    assert_eq!(r.status, 404);
    let _: Value = r.json().unwrap();
}
