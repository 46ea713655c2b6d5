//! The service under bad input and load: corrupt, tiny and giant images, malformed JSON, unknown
//! models, empty lists, hostile strings, oversized bodies, too many clients (429), and that
//! batched answers equal single ones and shutdown finishes the work in flight.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use visenc_server::load::{self, LoadConfig};

fn image_request(images: Vec<String>) -> serde_json::Value {
    json!({"input": images, "modality": "image"})
}

#[test]
fn a_bad_image_is_a_400_naming_its_index_while_good_requests_succeed() {
    let s = start(config(), encoder(None), None);
    let good = data_url(&photo("chelsea.png"));
    let png = photo("coffee.png");
    let corrupt = [
        ("truncated", data_url(&png[..png.len() / 3])),
        ("not an image", data_url(b"hello, I am not an image at all")),
        ("empty", String::new()),
        ("bad base64", "data:image/png;base64,***".to_string()),
        ("a URL", "https://example.com/cat.jpg".to_string()),
        (
            "a data URL without base64",
            "data:image/png,abc".to_string(),
        ),
    ];
    std::thread::scope(|scope| {
        // Good requests run alongside the bad ones and must all succeed.
        let goods: Vec<_> = (0..4)
            .map(|_| {
                let good = good.clone();
                let s = &s;
                scope.spawn(move || {
                    client(s)
                        .post_json("/v1/embeddings", &image_request(vec![good]))
                        .unwrap()
                        .status
                })
            })
            .collect();
        let mut c = client(&s);
        for (what, bad) in &corrupt {
            let r = c
                .post_json(
                    "/v1/embeddings",
                    &image_request(vec![good.clone(), bad.clone()]),
                )
                .unwrap();
            assert_eq!(r.status, 400, "{what}: {}", r.text());
            let e = r.json().unwrap();
            let msg = e["error"]["message"].as_str().unwrap();
            assert!(msg.starts_with("input[1]"), "{what}: {msg}");
            assert_eq!(e["error"]["type"], "invalid_request_error");
        }
        for g in goods {
            assert_eq!(g.join().unwrap(), 200);
        }
    });
    assert_eq!(client(&s).get("/health").unwrap().status, 200);
}

#[test]
fn tiny_images_work_and_giant_ones_are_413() {
    // A 1x1 image is upscaled like the reference processor does; a 2000x1500 one is over the
    // configured pixel limit and refused before it is decoded.
    let s = start(config(), encoder(Some(1_000_000)), None);
    let mut c = client(&s);
    let r = c
        .post_json("/v1/embeddings", &image_request(vec![data_url(&png(1, 1))]))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c
        .post_json(
            "/v1/embeddings",
            &image_request(vec![data_url(&png(2000, 1500))]),
        )
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let msg = r.json().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("input[0]") && msg.contains("3000000 pixels"),
        "{msg}"
    );
}

#[test]
fn bodies_over_the_limit_are_413_in_each_api_shape() {
    let mut cfg = config();
    cfg.max_body_bytes = 64 << 10;
    let s = start(cfg, encoder(None), None);
    let mut c = client(&s);
    let big = "x".repeat(100 << 10);
    let r = c
        .post_json("/v1/embeddings", &json!({"input": big}))
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json().unwrap()["error"]["message"].is_string());
    let r = c.post_json("/embed", &json!({"inputs": big})).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.json().unwrap()["error"].is_string(), "TEI shape");
}

#[test]
fn malformed_requests_get_json_errors_in_each_api_shape() {
    let s = start(config(), encoder(None), None);
    let mut c = client(&s);
    let raw = |c: &mut visenc_server::client::Client, path: &str, body: &str| {
        c.request("POST", path, Some("application/json"), body.as_bytes())
            .unwrap()
    };
    for body in [
        "{",
        "not json",
        "{\"input\": 5}",
        "{\"input\": [1, 2]}",
        "[]",
        "{\"inputs\": \"x\"}",
    ] {
        let r = raw(&mut c, "/v1/embeddings", body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.json().unwrap()["error"]["message"].is_string(), "{body}");
    }
    for body in ["{", "{\"inputs\": {}}", "{\"input\": \"x\"}"] {
        let r = raw(&mut c, "/embed", body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        assert_eq!(r.json().unwrap()["error_type"], "validation", "{body}");
    }
    // Wrong content type, bad enum values, wrong method.
    let r = c
        .request(
            "POST",
            "/v1/embeddings",
            Some("text/plain"),
            b"{\"input\": \"x\"}",
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "x", "encoding_format": "int8"}),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "x", "modality": "audio"}),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(c.get("/v1/embeddings").unwrap().status, 405);
}

#[test]
fn unknown_models_and_empty_lists_are_refused_clearly() {
    let s = start(config(), encoder(None), None);
    let mut c = client(&s);
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": "x", "model": "text-embedding-3-small"}),
        )
        .unwrap();
    assert_eq!(r.status, 404);
    let e = r.json().unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["param"], "model");
    for (path, body) in [
        ("/v1/embeddings", json!({"input": []})),
        ("/classify", json!({"input": [], "labels": ["cat"]})),
        (
            "/classify",
            json!({"input": data_url(&png(4, 4)), "labels": []}),
        ),
        (
            "/classify",
            json!({"input": data_url(&png(4, 4)), "labels": ["", " "]}),
        ),
    ] {
        let r = c.post_json(path, &body).unwrap();
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
    }
    let r = c.post_json("/embed", &json!({"inputs": []})).unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json().unwrap()["error_type"], "empty");
}

#[test]
fn hostile_strings_are_just_text() {
    let s = start(config(), encoder(None), None);
    let mut c = client(&s);
    let hostile = [
        "<script>alert(1)</script>",
        "'; DROP TABLE images; --",
        "../../../../etc/passwd",
        "\u{0}\u{1}\u{7f}",
        "\u{202e}gnp.exe",
        "%00%ZZ%",
        &"🐈".repeat(300),
        "",
    ];
    let r = c
        .post_json("/v1/embeddings", &json!({"input": hostile}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().unwrap()["data"].as_array().unwrap().len(),
        hostile.len()
    );
    for q in [
        "/health?x=%3Cscript%3E",
        "/metrics?%00=1&&&",
        "/?q=%ZZ%",
        "/health?q=%",
    ] {
        assert_eq!(c.get(q).unwrap().status, 200, "{q}");
    }
    // Characters no request target may hold are refused by the HTTP parser, not passed on.
    let r = c.get("/health?x=<script>\"").unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(client(&s).get("/health").unwrap().status, 200);
    let r = c
        .post_json(
            "/v1/embeddings?model=../../x&input=%00",
            &json!({"input": "a"}),
        )
        .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn too_many_concurrent_requests_get_429_in_each_api_shape() {
    let mut cfg = config();
    cfg.max_concurrent = 1;
    cfg.max_wait = Duration::from_millis(1500);
    cfg.max_batch = 64;
    let s = start(cfg, encoder(None), None);
    std::thread::scope(|scope| {
        // This one holds the only slot while its batch waits to fill.
        let busy = scope.spawn(|| {
            client(&s)
                .post_json("/v1/embeddings", &json!({"input": "a"}))
                .unwrap()
                .status
        });
        let mut c = client(&s);
        let holding = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            c.get("/metrics")
                .unwrap()
                .text()
                .contains("visenc_queue_depth 1")
        });
        assert!(holding, "the first request never reached the queue");
        let r = c
            .post_json("/v1/embeddings", &json!({"input": "b"}))
            .unwrap();
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json().unwrap()["error"]["code"], "overloaded");
        let r = c.post_json("/embed", &json!({"inputs": "b"})).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.json().unwrap()["error_type"], "overloaded");
        // /health is never refused.
        assert_eq!(c.get("/health").unwrap().status, 200);
        assert_eq!(busy.join().unwrap(), 200);
    });
}

#[test]
fn batched_answers_equal_single_ones() {
    let mut cfg = config();
    cfg.max_wait = Duration::from_millis(400);
    cfg.max_batch = 16;
    let s = start(cfg, encoder(None), None);
    let texts: Vec<String> = (0..6)
        .map(|i| format!("photo number {i} of a cat"))
        .collect();
    let images = [png(40, 30), photo("coffee.png"), photo("rocket.jpg")];
    let requests: Vec<(String, serde_json::Value)> = texts
        .iter()
        .map(|t| ("/v1/embeddings".to_string(), json!({"input": t})))
        .chain(images.iter().map(|i| {
            (
                "/v1/embeddings".to_string(),
                image_request(vec![data_url(i)]),
            )
        }))
        .collect();
    let embedding = |r: visenc_server::client::Response| {
        assert_eq!(r.status, 200, "{}", r.text());
        floats(&r.json().unwrap()["data"][0]["embedding"])
    };
    // One at a time: every forward pass has one item.
    let mut c = client(&s);
    let single: Vec<Vec<f32>> = requests
        .iter()
        .map(|(p, b)| embedding(c.post_json(p, b).unwrap()))
        .collect();
    assert_eq!(s_largest_batch(&mut c), 1);
    // All at once: they share forward passes.
    let batched: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(p, b)| scope.spawn(|| embedding(client(&s).post_json(p, b).unwrap())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(s_largest_batch(&mut c) > 1, "the requests were batched");
    for (i, (a, b)) in single.iter().zip(&batched).enumerate() {
        assert!(max_abs_diff(a, b) < 1e-5, "request {i}");
    }
}

fn s_largest_batch(c: &mut visenc_server::client::Client) -> usize {
    c.get("/metrics")
        .unwrap()
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("visenc_batch_size_max ")?.parse().ok())
        .unwrap()
}

#[test]
fn shutdown_finishes_the_requests_in_flight() {
    let mut cfg = config();
    cfg.max_wait = Duration::from_millis(800);
    cfg.max_batch = 64;
    let s = start(cfg, encoder(None), None);
    let addr = s.addr;
    let in_flight = std::thread::spawn(move || {
        visenc_server::client::Client::new(addr, Duration::from_secs(30))
            .post_json("/v1/embeddings", &json!({"input": ["a", "b"]}))
            .unwrap()
    });
    // Once the request is in the queue, stop while it waits for its batch to fill.
    let mut c = client(&s);
    let queued = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        c.get("/metrics")
            .unwrap()
            .text()
            .contains("visenc_queue_depth 2")
    });
    assert!(queued, "the request never reached the queue");
    drop(c);
    s.stop().unwrap();
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["data"].as_array().unwrap().len(), 2);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer listening"
    );
}

#[test]
fn light_load_64_clients_no_5xx_health_green_batched_equals_single() {
    let s = start(config(), encoder(None), None);
    let report = load::run(&LoadConfig {
        addr: s.addr,
        clients: 64,
        duration: Duration::from_secs(3),
        image: photo("grace_hopper.jpg"),
        tolerance: 1e-5,
    })
    .unwrap();
    assert!(report.passed(), "{report}");
    assert!(report.health_checks > 0, "{report}");
    assert_eq!(
        report.by_status.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "{report}"
    );
}
