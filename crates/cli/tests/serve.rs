//! `visenc serve` as a process: it prints its address, answers, and on SIGTERM finishes the requests
//! in flight before it exits 0 (the process helper `Serve` is in common/).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use visenc_server::client::Client;

#[test]
fn sigterm_finishes_the_requests_in_flight_then_exits_0() {
    let model = fixture("clip_hf_gelu");
    let mut s = Serve::start(&["--model", &model, "--max-wait-ms", "1500"]);
    let r = s
        .client()
        .post_json("/v1/embeddings", &json!({"input": "a cat", "model": model}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let addr = s.addr;
    let in_flight = std::thread::spawn(move || {
        Client::new(addr, Duration::from_secs(60))
            .post_json("/v1/embeddings", &json!({"input": ["a", "b", "c"]}))
            .unwrap()
    });
    let mut c = s.client();
    let queued = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        c.get("/metrics")
            .unwrap()
            .text()
            .contains("visenc_queue_depth 3")
    });
    assert!(queued, "the request never reached the queue");
    drop(c);
    s.signal("-TERM");
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["data"].as_array().unwrap().len(), 3);
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    std::io::Read::read_to_string(s.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("stopped after finishing"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn serve_refuses_a_missing_model_and_a_busy_port() {
    visenc(&["serve", "--model", "/nonexistent/model", "--port", "0"]).expect_code(2);
    let model = fixture("clip_hf_gelu");
    let s = Serve::start(&["--model", &model]);
    let port = s.addr.port().to_string();
    let r = visenc(&["serve", "--model", &model, "--port", &port]);
    r.expect_code(2);
    assert!(r.stderr.contains(&port), "{}", r.stderr);
}

/// Whether `cmd --version` runs.
fn runs(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The web page in headless Chromium (playwright-core): a text query and an image upload each
/// give one tile per indexed photo, with a score and a thumbnail that loaded. Under CI (`CI` set)
/// missing tools fail the test; elsewhere it says what is missing and passes without running.
#[test]
fn web_page_searches_by_text_and_by_upload_in_headless_chromium() {
    let web = root().join("crates/cli/tests/web");
    let chromium = std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !runs("node") {
        missing.push("node (apt-get install nodejs npm)".to_string());
    }
    if !runs(&chromium) {
        missing.push(format!("{chromium} (apt-get install chromium)"));
    }
    if !web.join("node_modules/playwright-core").is_dir() {
        missing.push(format!(
            "playwright-core (npm ci --prefix {})",
            web.display()
        ));
    }
    if !missing.is_empty() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !ci,
            "CI must run the web test; missing: {}",
            missing.join(", ")
        );
        eprintln!("web test not run here; missing: {}", missing.join(", "));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for p in ["chelsea.png", "coffee.png", "rocket.jpg"] {
        std::fs::copy(photo(p), photos.join(p)).unwrap();
    }
    let db = dir.path().join("index.db");
    let model = fixture("clip_hf_gelu");
    let db_s = db.display().to_string();
    build_index(&db_s, &model, &photos);
    let s = Serve::start(&["--model", &model, "--db", &db_s]);
    let shot = dir.path().join("page.png");
    let out = Command::new("node")
        .arg(web.join("e2e.mjs"))
        .args([
            &format!("http://{}/", s.addr),
            "a photo of a cat",
            &photos
                .canonicalize()
                .unwrap()
                .join("coffee.png")
                .display()
                .to_string(),
            "3",
            &shot.display().to_string(),
        ])
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for kind in ["text", "image"] {
        let tiles = seen[kind].as_array().unwrap();
        assert_eq!(tiles.len(), 3, "{kind}: {seen}");
        assert!(tiles.iter().all(|t| t["loaded"] == true), "{kind}: {seen}");
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 0);
}

/// A persistent index of every file in `dir` (absolute paths), through visenc-index's API.
fn build_index(db: &str, model: &str, dir: &std::path::Path) {
    use visenc_index::{content_hash, embed_images, embedding_dim, model_id, Entry, Index};
    let enc = visenc::Encoder::load(model, &Default::default()).unwrap();
    let index = Index::create(db).unwrap();
    index
        .bind_model(&model_id(model), embedding_dim(&enc))
        .unwrap();
    let mut entries = Vec::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path().canonicalize().unwrap();
        let px = enc.load_image(&p).unwrap();
        entries.push(Entry {
            path: p.display().to_string(),
            hash: content_hash(&p).unwrap(),
            size: std::fs::metadata(&p).unwrap().len(),
            embedding: embed_images(&enc, &[px]).unwrap().remove(0),
        });
    }
    index.commit(&entries, &[]).unwrap();
}

#[test]
fn serve_db_searches_the_persistent_index_and_serves_only_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for p in ["chelsea.png", "coffee.png"] {
        std::fs::copy(photo(p), photos.join(p)).unwrap();
    }
    std::fs::write(dir.path().join("secret.txt"), "not for the web").unwrap();
    let db = dir.path().join("index.db").display().to_string();
    let model = fixture("clip_hf_gelu");
    build_index(&db, &model, &photos);
    // Another model than the index's is refused at start.
    let r = visenc(&[
        "serve",
        "--model",
        &fixture("clip_hf_quickgelu"),
        "--db",
        &db,
        "--port",
        "0",
    ]);
    r.expect_code(2);
    assert!(r.stderr.contains("holds"), "{}", r.stderr);

    let s = Serve::start(&["--model", &model, "--db", &db]);
    let mut c = s.client();
    let r = c
        .post_json("/search", &json!({"text": "a cat", "k": 5}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let results = r.json().unwrap()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 2);
    for hit in &results {
        let t = c.get(hit["thumbnail"].as_str().unwrap()).unwrap();
        assert_eq!(t.status, 200);
        assert_eq!(
            t.body,
            std::fs::read(hit["path"].as_str().unwrap()).unwrap()
        );
    }
    let secret = dir.path().canonicalize().unwrap().join("secret.txt");
    let inside = photos.canonicalize().unwrap();
    for path in [
        secret.display().to_string(),
        format!("{}/../secret.txt", inside.display()),
        "/etc/passwd".to_string(),
        "photos/chelsea.png".to_string(),
    ] {
        let r = c.get(&format!("/thumbnail?path={path}")).unwrap();
        assert_eq!(r.status, 404, "{path}");
    }
}
