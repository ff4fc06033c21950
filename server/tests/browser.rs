//! The editing page (`GET /`) in a real headless Chromium, driven over W3C WebDriver against the
//! real server with the default model (`model/assets/toy`).
//!
//! Needs `chromedriver` and `chromium` (Debian: `apt-get install chromium chromium-driver`).
//! Without them the test prints why and passes, unless `CI` is set: then it fails.
//! `RL4PIX_CHROMEDRIVER` / `RL4PIX_CHROMIUM` name other binaries. Screenshots go to
//! `target/tmp/browser/`; `RL4PIX_UPDATE_SCREENSHOTS=1` also writes them to `docs/images/`.
//!
//! The WebDriver client is the dozen JSON calls this test needs, over the `reqwest` the tests
//! already build: a WebDriver crate (fantoccini, thirtyfour) would add its own hyper/cookie/url
//! stack to every 2-core build for no extra coverage.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const KEY_ESCAPE: &str = "\u{E00C}";
const KEY_ARROW_LEFT: &str = "\u{E012}";

fn find_binary(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|path| path.is_file())
}

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(binary: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await {
                let body: Value = r.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not get ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn open(driver: &Driver, chromium: Option<PathBuf>, profile: &Path) -> Self {
        // The flags keep Chromium off the network entirely: the test machine may have none, and
        // a blocked background fetch would stall it.
        let mut options = json!({"args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1100,1400",
            format!("--user-data-dir={}", profile.display()),
        ]});
        if let Some(binary) = chromium {
            options["binary"] = json!(binary);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options,
        }}});
        let answer = call(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", driver.url),
            Some(capabilities),
        )
        .await;
        let session = answer["sessionId"].as_str().expect("a session id");
        Self {
            http,
            session: format!("{}/session/{session}", driver.url),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        call(&self.http, reqwest::Method::POST, &url, Some(body)).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/clear"), json!({}))
            .await;
        self.keys(css, text).await;
    }

    async fn keys(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.post(
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// What the page's error box says.
    async fn error_box(&self) -> Value {
        self.js("return document.getElementById('error').textContent;")
            .await
    }

    /// Polls `expression` (a JavaScript expression) until it is truthy; returns its value.
    async fn wait_for(&self, expression: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self.js(&format!("return {expression};")).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            if started.elapsed() > limit {
                panic!(
                    "waited {limit:?} for `{expression}`; the page's error box says {:?}",
                    self.error_box().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let url = format!("{}/screenshot", self.session);
        let shot = call(&self.http, reqwest::Method::GET, &url, None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().expect("base64 PNG"))
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &png).unwrap();
        if std::env::var_os("RL4PIX_UPDATE_SCREENSHOTS").is_some() {
            let docs = common::repo_root().join("docs/images");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(name), &png).unwrap();
        }
    }

    async fn close(self) {
        call(&self.http, reqwest::Method::DELETE, &self.session, None).await;
    }
}

/// A WebDriver command; its `value`, or a panic with the driver's error message.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Value {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("WebDriver answers");
    let status = response.status();
    let body: Value = response.json().await.expect("WebDriver JSON");
    if !status.is_success() {
        panic!(
            "WebDriver {url}: {status} {}: {}",
            body["value"]["error"], body["value"]["message"]
        );
    }
    body["value"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_edits_shows_progress_attention_and_errors_in_chromium() {
    let Some(chromedriver) = find_binary("RL4PIX_CHROMEDRIVER", &["chromedriver"]) else {
        let why = "chromedriver not found (set RL4PIX_CHROMEDRIVER, or apt-get install chromium chromium-driver)";
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and the browser test cannot run: {why}");
        }
        eprintln!("SKIPPED the browser test: {why}");
        return;
    };
    let chromium = find_binary("RL4PIX_CHROMIUM", &["chromium", "chromium-browser"]);

    // The default model, as `cargo run -p rl4pix-server` serves it.
    let mut args = rl4pix_server::Args::for_model(common::repo_root().join("model/assets/toy"));
    args.default_steps = 20;
    let server = common::start(args).await;
    let base = server.url();

    let files = tempfile::tempdir().unwrap();
    // Chromium's file upload wants a canonical path.
    let input = common::repo_root()
        .join("model/assets/toy/grid/7-input.png")
        .canonicalize()
        .unwrap();
    let not_an_image = files.path().join("notes.png");
    std::fs::write(&not_an_image, b"this is text, not a picture").unwrap();

    let driver = Driver::start(&chromedriver).await;
    let browser = Browser::open(&driver, chromium, &files.path().join("profile")).await;
    let long = Duration::from_secs(120);

    // The page loads with the server's settings and nothing from elsewhere.
    browser.goto(&format!("{base}/")).await;
    let line = browser
        .wait_for(
            "document.getElementById('model-line').textContent.includes('model toy') && document.getElementById('model-line').textContent",
            long,
        )
        .await;
    println!("page header: {line}");
    let steps_max = browser
        .js("return document.getElementById('steps').max;")
        .await;
    assert_eq!(
        steps_max,
        json!("100"),
        "the steps field takes its limit from /info"
    );

    // A file that is not an image: the server's 415 message is shown as it is.
    browser.keys("#image", not_an_image.to_str().unwrap()).await;
    browser
        .type_into("#instruction", "colour the square orange")
        .await;
    browser.click("#submit").await;
    let error = browser
        .wait_for(
            "!document.getElementById('error').hidden && document.getElementById('error').textContent",
            long,
        )
        .await;
    let error = error.as_str().unwrap();
    assert!(
        error.starts_with("415: ") && error.contains("not a recognised image"),
        "the page shows the API's message: {error}"
    );
    browser.screenshot("web-error.png").await;

    // A real picture, chosen with the file picker; a fixed seed from the advanced settings.
    browser.keys("#image", input.to_str().unwrap()).await;
    browser.click("#advanced summary").await;
    browser.type_into("#seed", "7").await;
    browser.click("#submit").await;
    browser
        .wait_for(
            "!document.getElementById('result').hidden && document.getElementById('output').complete && document.getElementById('output').naturalWidth",
            long,
        )
        .await;
    let (out_w, out_h) = (
        browser
            .js("return document.getElementById('output').naturalWidth;")
            .await,
        browser
            .js("return document.getElementById('output').naturalHeight;")
            .await,
    );
    assert_eq!(
        (out_w, out_h),
        (json!(128), json!(128)),
        "the result has the input's size"
    );
    let meta = browser
        .js("return document.getElementById('meta').textContent;")
        .await;
    assert!(
        meta.as_str().unwrap().contains("seed 7"),
        "the seed is shown: {meta}"
    );
    assert!(
        meta.as_str().unwrap().contains("ran at 32x32"),
        "the model's working size ran, and the page says so: {meta}"
    );
    assert!(
        browser
            .js("return document.getElementById('error').hidden;")
            .await
            == json!(true),
        "a good edit clears the earlier error"
    );
    let progress = browser
        .js("const p = document.getElementById('progress'); return [p.value, p.max];")
        .await;
    assert_eq!(
        progress[0], progress[1],
        "the bar is full when done: {progress}"
    );
    assert_eq!(
        browser
            .js("return document.getElementById('download').download;")
            .await,
        json!("rl4pix-seed-7.png")
    );

    // The instruction's words as buttons; the whole instruction's map is laid over first.
    let words = browser
        .wait_for(
            "document.querySelectorAll('#words button').length > 1 && [...document.querySelectorAll('#words button')].map(b => b.dataset.word)",
            long,
        )
        .await;
    println!("word buttons: {words}");
    assert!(
        words.as_array().unwrap().contains(&json!("square")),
        "{words}"
    );
    browser
        .wait_for(
            "!document.getElementById('overlay').hidden && document.getElementById('overlay').dataset.word === '' && document.getElementById('overlay').naturalWidth",
            long,
        )
        .await;
    browser.click("#words button[data-word='square']").await;
    browser
        .wait_for(
            "document.getElementById('overlay').dataset.word === 'square' && document.getElementById('overlay').complete && document.querySelector(\"#words button[data-word='square']\").getAttribute('aria-pressed') === 'true'",
            long,
        )
        .await;
    // The opacity slider works from the keyboard.
    browser.keys("#opacity", KEY_ARROW_LEFT).await;
    let opacity = browser
        .js("return document.getElementById('overlay').style.opacity;")
        .await;
    assert_eq!(opacity, json!("0.65"), "one step left of 0.7 on the slider");
    browser.screenshot("web-result.png").await;

    // Drag and drop, and paste, hand the page a file too (synthetic events carry a real File).
    let dropped = browser
        .js(
            "const dt = new DataTransfer();\
             dt.items.add(new File([new Uint8Array([137,80,78,71])], 'dropped.png', {type: 'image/png'}));\
             document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));\
             const text1 = document.getElementById('drop-text').textContent;\
             const pasted = new DataTransfer();\
             pasted.items.add(new File([new Uint8Array([1,2,3])], '', {type: 'image/png'}));\
             document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: pasted, bubbles: true, cancelable: true}));\
             return [text1, document.getElementById('drop-text').textContent];",
        )
        .await;
    assert!(
        dropped[0].as_str().unwrap().starts_with("dropped.png"),
        "{dropped}"
    );
    assert!(
        dropped[1].as_str().unwrap().starts_with("pasted image"),
        "{dropped}"
    );

    // A long job: the bar moves step by step, then Escape cancels it.
    browser.keys("#image", input.to_str().unwrap()).await;
    browser.type_into("#steps", "100").await;
    // At the picture's own size, so that it runs long enough to be watched.
    browser.click("#working_size option[value=input]").await;
    browser.click("#submit").await;
    let mut seen = Vec::new();
    let started = Instant::now();
    while seen.len() < 3 {
        let value = browser
            .js("const p = document.getElementById('progress'); return document.getElementById('status').textContent.startsWith('Step') ? p.value : null;")
            .await;
        if let Some(v) = value.as_f64() {
            if v > 0.0 && seen.last() != Some(&v) {
                seen.push(v);
            }
        }
        if started.elapsed() > long {
            panic!(
                "the progress bar never moved: {seen:?}; error box: {:?}",
                browser.error_box().await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("progress values seen: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress only moves forward: {seen:?}"
    );
    browser.screenshot("web-progress.png").await;
    browser.keys("#instruction", KEY_ESCAPE).await;
    browser
        .wait_for(
            "document.getElementById('status').textContent === 'Cancelled' && !document.getElementById('submit').disabled",
            long,
        )
        .await;
    let last_step = seen.last().copied().unwrap();
    assert!(last_step < 100.0, "cancelled before the end: {seen:?}");
    let info: Value = common::get_json(&common::client(), &format!("{base}/info")).await;
    assert_eq!(
        info["queue_depth"], 0,
        "nothing left queued after the cancel"
    );

    // Readable on a phone: nothing wider than the screen.
    browser
        .post("/window/rect", json!({"width": 390, "height": 1500}))
        .await;
    let overflow = browser
        .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        .await;
    assert_eq!(overflow, json!(0), "no sideways scrolling at phone width");
    browser.screenshot("web-phone.png").await;

    browser.close().await;
    server.shutdown().await.unwrap();
}
