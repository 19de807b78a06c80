//! Bad input at the web UI, through a real proxy and agent: malformed and oversized API
//! bodies, a session cookie of another cluster, a WebSocket flood of resizes, a 100 MB paste
//! and an oversized frame. Each gets a clear error or a bound; the proxy keeps serving and its
//! memory does not grow with what was sent.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Fleet;
use futures_util::{SinkExt as _, StreamExt as _};
use gatehouse_web::client::{WebClient, request};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Read terminal output until `want` shows up (or fail after `secs`).
async fn expect_output(ws: &mut Ws, want: &str, secs: u64) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} within {secs} s; saw: {seen}"));
        match msg {
            Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => seen.push_str(t.as_str()),
            Some(Ok(_)) => {}
            other => panic!("terminal ended ({other:?}) before {want:?}; saw: {seen}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_at_the_web_ui_gets_an_error_or_a_bound() {
    let f = Fleet::start("badweb", &[("n1", "env=dev", vec![])]);
    let other = Fleet::start("otherweb", &[]);
    let add = |f: &Fleet, name: &str| -> String {
        let out = f
            .gctl(&[
                "users", "add", name, "--roles", "access", "--logins", &f.login,
            ])
            .ok();
        out.stdout.lines().last().unwrap().trim().to_string()
    };
    let pw = add(&f, "bob");
    let other_pw = add(&other, "bob");
    let home = tempfile::tempdir().unwrap();
    f.user(home.path(), "watcher", "access", &f.login, &[]);
    f.wait_for_nodes(home.path(), 1);
    let addr: SocketAddr = f.proxy_addr.parse().unwrap();
    let other_addr: SocketAddr = other.proxy_addr.parse().unwrap();
    let json = [("Content-Type", "application/json")];

    // Malformed, oversized and non-JSON login bodies: 400, 413, 403, each saying why.
    let (s, _, body) = request(addr, "POST", "/v1/webapi/login", &json, b"{\"user\": ")
        .await
        .unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("malformed login body"), "{body}");
    let (s, _, body) = request(
        addr,
        "POST",
        "/v1/webapi/login",
        &json,
        br#"{"user":"bob","password":"x","admin":true}"#,
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "unknown field: {body}");
    let huge = vec![b'a'; 200 * 1024];
    let (s, _, _) = request(addr, "POST", "/v1/webapi/login", &json, &huge)
        .await
        .unwrap();
    assert_eq!(s, 413);
    let (s, _, body) = request(
        addr,
        "POST",
        "/v1/webapi/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"user=bob&password=x",
    )
    .await
    .unwrap();
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("JSON"), "{body}");
    let (s, _, body) = request(addr, "GET", "/v1/webapi/no-such-thing", &[], b"")
        .await
        .unwrap();
    assert_eq!(s, 404, "{body}");

    // A session cookie of another cluster is refused, saying so; so is garbage.
    let foreign = WebClient::login(other_addr, "bob", &other_pw, "")
        .await
        .unwrap();
    let (s, _, body) = request(
        addr,
        "GET",
        "/v1/webapi/nodes",
        &[("Cookie", &foreign.cookie)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("not one of this cluster"), "{body}");
    let (s, _, _) = request(
        addr,
        "GET",
        "/v1/webapi/nodes",
        &[("Cookie", "__Host-gatehouse_session=garbage;;;=; x")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(s, 401);

    let me = WebClient::login(addr, "bob", &pw, "").await.unwrap();
    let proxy_pid = f.proxy.child.id();
    let rss_before = rss_kib(proxy_pid);

    // A flood of resizes: the shell ends up with the last size; the proxy keeps answering.
    let mut term = me.terminal("n1", &f.login, 80, 24).await.unwrap();
    term.send(Message::Text("stty size; echo ready-1\n".into()))
        .await
        .ok();
    // (Text frames are control messages: that one is ignored. Input goes in binary frames.)
    term.send(Message::Binary(b"echo ready-1\n".to_vec().into()))
        .await
        .unwrap();
    expect_output(&mut term, "ready-1", 20).await;
    let t0 = Instant::now();
    for i in 0..20_000u32 {
        let (c, r) = if i == 19_999 {
            (100, 40)
        } else {
            (20 + i % 200, 10 + i % 50)
        };
        let m = format!(r#"{{"type":"resize","cols":{c},"rows":{r}}}"#);
        term.send(Message::Text(m.into())).await.unwrap();
    }
    let flood = t0.elapsed();
    let r = me.call("GET", "/v1/webapi/session", b"").await.unwrap();
    assert_eq!(r.status, 200, "the proxy answers during the flood");
    tokio::time::sleep(Duration::from_millis(300)).await;
    term.send(Message::Binary(b"stty size\n".to_vec().into()))
        .await
        .unwrap();
    expect_output(&mut term, "40 100", 20).await;
    println!("20,000 resizes sent in {flood:?}; the shell saw the last: 40 rows x 100 cols");

    // A 100 MB paste into `cat`: it all arrives, at the pace the node takes it.
    let marker = format!("pasted-{}", std::process::id());
    let cmd = format!("stty -echo; cat > /dev/null; stty echo; echo {marker}\n");
    term.send(Message::Binary(cmd.into_bytes().into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut line = vec![b'x'; 1023];
    line.push(b'\n');
    let frame: Vec<u8> = line.repeat(1024); // 1 MiB
    let t0 = Instant::now();
    let mut peak = 0;
    for i in 0..100 {
        term.send(Message::Binary(frame.clone().into()))
            .await
            .unwrap();
        if i % 10 == 0 {
            peak = peak.max(rss_kib(proxy_pid));
        }
    }
    term.send(Message::Binary(b"\x04".to_vec().into()))
        .await
        .unwrap();
    expect_output(&mut term, &marker, 300).await;
    let took = t0.elapsed();
    let rss_after = rss_kib(proxy_pid);
    peak = peak.max(rss_after);
    println!(
        "100 MiB pasted in {took:?}; proxy RSS {} MiB before, peak {} MiB, {} MiB after",
        rss_before / 1024,
        peak / 1024,
        rss_after / 1024
    );
    assert!(
        peak < rss_before + 64 * 1024,
        "the proxy's memory grew with the paste: {rss_before} KiB before, peak {peak} KiB"
    );

    // A frame over the 1 MiB limit closes that terminal, not the proxy.
    let mut big = me.terminal("n1", &f.login, 80, 24).await.unwrap();
    big.send(Message::Binary(b"echo ready-2\n".to_vec().into()))
        .await
        .unwrap();
    expect_output(&mut big, "ready-2", 20).await;
    let _ = big
        .send(Message::Binary(vec![b'y'; 2 * 1024 * 1024].into()))
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match big.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "an oversized frame did not close its terminal"
    );
    // The first terminal still works.
    term.send(Message::Binary(b"echo still-here\n".to_vec().into()))
        .await
        .unwrap();
    expect_output(&mut term, "still-here", 20).await;
    let r = me.call("GET", "/v1/webapi/nodes", b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!f.proxy.log().contains("panicked"), "{}", f.proxy.log());
    // The web terminals' sessions are credited to the browser's address (127.0.0.1 here), not
    // to the proxy's own (127.0.0.2), which opens them on its port.
    let starts = f.events("session.start");
    let bobs: Vec<&serde_json::Value> = starts.iter().filter(|e| e["actor"] == "bob").collect();
    assert!(!bobs.is_empty(), "{starts:?}");
    for e in bobs {
        let source = e["source_addr"].as_str().unwrap_or_default();
        assert!(source.starts_with("127.0.0.1"), "{e}");
    }
}
