//! `moco push` against a local stand-in for the Hugging Face Hub: an HTTP server in this test
//! that speaks the three calls hf-hub makes for an upload (`POST /api/repos/create`,
//! `POST /api/models/OWNER/NAME/preupload/REV`, `POST /api/models/OWNER/NAME/commit/REV` with
//! the NDJSON commit of inline base64 files) and applies a commit only when its whole body
//! has arrived, as the Hub does. It can drop the connection in the middle of a commit's
//! upload. What is checked: the exported folder arrives byte for byte in one commit; a
//! dropped upload is retried into exactly one commit; an upload dropped every time is a clear
//! error and leaves the repository without any commit; a refused token uploads nothing.
//!
//! Not covered: the Hub answers `lfs` for `*.safetensors` and hf-hub then uploads through Xet
//! (a content-addressed store this stand-in does not emulate); here every file is `regular`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use moco_tests::{moco, run_ok, TINY_RUN};

/// What the stand-in Hub holds and has seen.
#[derive(Default)]
struct HubState {
    /// Repositories created, by `OWNER/NAME`.
    repos: Vec<String>,
    /// The commits applied, by repository: each the files it added, path to bytes.
    commits: BTreeMap<String, Vec<BTreeMap<String, Vec<u8>>>>,
    /// Commit requests received (whole or not).
    commit_attempts: usize,
    /// How many commit uploads to cut off halfway before accepting one.
    drop_commits: usize,
    /// Refuse every call with 401 (a bad token).
    refuse_token: bool,
    /// The `Authorization` headers seen.
    auth: Vec<String>,
    /// The paths the preupload calls asked about.
    preupload_paths: Vec<String>,
}

/// A request's line and headers as read off the socket (header names in lower case).
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

/// The stand-in Hub on a free port of 127.0.0.1; its state is shared with the test.
struct LocalHub {
    url: String,
    state: Arc<Mutex<HubState>>,
}

impl LocalHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { url, state }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap()
    }
}

/// Answers the requests of one connection (keep-alive) until the client closes it.
fn serve(stream: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let Some(req) = read_head(&mut reader) else {
            return;
        };
        let len: usize = req
            .headers
            .get("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let is_commit = req.method == "POST" && req.path.contains("/commit/");
        if is_commit {
            let mut s = state.lock().unwrap();
            s.commit_attempts += 1;
            if s.drop_commits > 0 {
                s.drop_commits -= 1;
                drop(s);
                // Half the upload arrives, then the connection is gone (reset, unread data).
                let mut half = vec![0u8; len / 2];
                let _ = reader.read_exact(&mut half);
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, reply) = answer(&req, &body, state);
        let text = reply.to_string();
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// The request line and headers, or `None` at the end of the connection.
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

/// The Hub's answer to a whole request: status line and JSON body.
fn answer(
    req: &Request,
    body: &[u8],
    state: &Mutex<HubState>,
) -> (&'static str, serde_json::Value) {
    let mut s = state.lock().unwrap();
    s.auth.push(
        req.headers
            .get("authorization")
            .cloned()
            .unwrap_or_default(),
    );
    if s.refuse_token {
        return (
            "401 Unauthorized",
            serde_json::json!({"error": "Invalid credentials in Authorization header"}),
        );
    }
    let json = || serde_json::from_slice::<serde_json::Value>(body).unwrap();
    let path = req.path.split('?').next().unwrap();
    if req.method == "POST" && path == "/api/repos/create" {
        let b = json();
        let id = format!(
            "{}/{}",
            b["organization"].as_str().unwrap(),
            b["name"].as_str().unwrap()
        );
        if s.repos.contains(&id) {
            return ("409 Conflict", serde_json::json!({"error": "exists"}));
        }
        s.repos.push(id.clone());
        return ("200 OK", serde_json::json!({"url": format!("local/{id}")}));
    }
    let Some(rest) = path.strip_prefix("/api/models/") else {
        return ("404 Not Found", serde_json::json!({"error": path}));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (id, call) = (format!("{}/{}", parts[0], parts[1]), parts[2]);
    if !s.repos.contains(&id) {
        return (
            "404 Not Found",
            serde_json::json!({"error": "Repository not found"}),
        );
    }
    match call {
        "preupload" => {
            let files = json()["files"].as_array().unwrap().clone();
            let modes: Vec<serde_json::Value> = files
                .iter()
                .map(|f| {
                    let p = f["path"].as_str().unwrap().to_string();
                    s.preupload_paths.push(p.clone());
                    serde_json::json!({"path": p, "uploadMode": "regular"})
                })
                .collect();
            ("200 OK", serde_json::json!({"files": modes}))
        }
        "commit" => {
            let mut files = BTreeMap::new();
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let op: serde_json::Value = serde_json::from_slice(line).unwrap();
                if op["key"] == "file" {
                    assert_eq!(op["value"]["encoding"], "base64");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(op["value"]["content"].as_str().unwrap())
                        .unwrap();
                    files.insert(op["value"]["path"].as_str().unwrap().to_string(), bytes);
                }
            }
            let commits = s.commits.entry(id.clone()).or_default();
            commits.push(files);
            let n = commits.len();
            (
                "200 OK",
                serde_json::json!({"commitUrl": format!("local/{id}/commit/{n}"), "commitOid": format!("{n:040}")}),
            )
        }
        _ => ("404 Not Found", serde_json::json!({"error": path})),
    }
}

/// `moco push DIR --repo REPO` against `hub`, with a token and nothing from the real machine's
/// Hugging Face settings or proxies.
fn push(hub: &LocalHub, dir: &Path, repo: &str, home: &Path) -> std::process::Output {
    let mut cmd = moco();
    for v in [
        "HF_HUB_OFFLINE",
        "HF_TOKEN_PATH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "hf_test_token")
        .env("HF_HOME", home)
        .env("NO_PROXY", "127.0.0.1")
        .args(["push", dir.to_str().unwrap(), "--repo", repo])
        .output()
        .unwrap()
}

/// Every file of `dir`, name to bytes.
fn folder_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn push_commits_the_export_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (run, export, home) = (
        dir.path().join("run"),
        dir.path().join("export"),
        dir.path().join("hf-home"),
    );
    run_ok(
        moco()
            .args(["pretrain", "--epochs", "1", "--max-steps", "2"])
            .args(TINY_RUN)
            .args(["--out", run.to_str().unwrap()]),
    );
    run_ok(moco().args([
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]));
    let files = folder_files(&export);
    assert!(files.contains_key("model.safetensors") && files.contains_key("README.md"));
    let hub = LocalHub::start();

    // The whole folder, byte for byte, in one commit, with the token.
    let o = push(&hub, &export, "me/tiny", &home);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("local/me/tiny/commit/1"), "{out}");
    {
        let s = hub.state();
        assert_eq!(s.repos, ["me/tiny"]);
        assert_eq!(s.commits["me/tiny"].len(), 1);
        assert!(
            s.commits["me/tiny"][0] == files,
            "the commit differs from the folder"
        );
        let mut asked = s.preupload_paths.clone();
        asked.sort();
        assert_eq!(asked, files.keys().cloned().collect::<Vec<_>>());
        assert!(
            s.auth.iter().all(|a| a == "Bearer hf_test_token"),
            "{:?}",
            s.auth
        );
    }

    // The connection dropped in the middle of the upload: retried, one more commit only.
    hub.state().drop_commits = 1;
    let o = push(&hub, &export, "me/tiny", &home);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    {
        let s = hub.state();
        assert_eq!(s.commit_attempts, 3, "one whole, one cut, one retried");
        assert_eq!(s.commits["me/tiny"].len(), 2);
        assert!(s.commits["me/tiny"][1] == files);
    }

    // Dropped at every attempt: an error naming the repository; no commit at all.
    hub.state().drop_commits = usize::MAX;
    let o = push(&hub, &export, "me/other", &home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("--repo me/other")
            && err.contains("upload failed")
            && err.contains("no commit"),
        "{err}"
    );
    assert!(!hub.state().commits.contains_key("me/other"));

    // A refused token: a clear error before any upload.
    {
        let mut s = hub.state();
        s.drop_commits = 0;
        s.refuse_token = true;
    }
    let attempts = hub.state().commit_attempts;
    let o = push(&hub, &export, "me/third", &home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--repo me/third") && err.contains("nothing was uploaded"),
        "{err}"
    );
    assert_eq!(hub.state().commit_attempts, attempts);
    assert!(!hub.state().commits.contains_key("me/third"));
}
