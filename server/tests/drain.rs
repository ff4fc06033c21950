//! `--shutdown-drain-s`: after SIGTERM, `/ready` turns red at once while edits are still
//! admitted, and only then does the listener close (what a load balancer polling `/ready`
//! needs so that a rolling restart fails no request).

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn edit_status(http: &reqwest::Client, url: &str) -> u16 {
    let fields = [("seed", "3".to_string()), ("steps", "2".to_string())];
    http.post(format!("{url}/edit"))
        .multipart(edit_form(png(&scene(32, 24, 1)), "make it blue", &fields))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_red_while_edits_are_still_admitted_for_the_drain_window() {
    let mut server = BinaryServer::spawn(&["--shutdown-drain-s", "3"]);
    let http = client();
    let url = server.url.clone();
    assert_eq!(get(&http, &format!("{url}/ready")).await.status(), 200);
    assert_eq!(edit_status(&http, &url).await, 200);

    server.terminate();
    let signalled = Instant::now();
    // /ready goes red promptly...
    loop {
        let status = get(&http, &format!("{url}/ready")).await.status();
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "/ready still {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while edits are still admitted and answered, and /health stays up.
    assert_eq!(edit_status(&http, &url).await, 200);
    assert_eq!(get(&http, &format!("{url}/health")).await.status(), 200);
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "the checks took longer than the drain window; nothing was shown"
    );
    // Then the process stops by itself, cleanly.
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits after the drain window");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() >= Duration::from_secs(3));
}
