//! Log damage with a real `peakstack serve`: acknowledged transfers, killed
//! with SIGKILL, then the newest log segment damaged on disk.
//! - One flipped byte in the middle (a batch followed by later, durable
//!   ones) is corruption: serve refuses to start, naming the file and the
//!   offset, instead of cutting every acknowledged batch after it.
//! - A last frame cut in the middle is a torn write: serve starts, with
//!   every transfer before it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{client, create_key, free_port, serve_command, start, terminate, wait_exit, wait_ready};
use serde_json::json;

const TRANSFERS: usize = 300;
const FLAGS: &[&str] = &["--executors", "1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_stops_the_start_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = client(&create_key(dir.path(), "admin"));
    let mut server = start(dir.path(), port, FLAGS);
    wait_ready(&client, &base).await;
    for id in ["alice", "bob"] {
        let answer = client.post(format!("{base}/v1/accounts")).json(&json!({"id": id, "currency": "USD"})).send();
        assert_eq!(answer.await.unwrap().status(), 201);
    }
    // One at a time: each transfer is a batch, a frame of its own.
    for n in 0..TRANSFERS {
        let body = json!({"id": format!("t-{n}"), "debit_account_id": "alice", "credit_account_id": "bob", "amount": 1, "currency": "USD"});
        let answer = client.post(format!("{base}/v1/transfers")).json(&body).send().await.unwrap();
        assert_eq!(answer.status(), 201, "t-{n}");
    }
    server.kill().expect("SIGKILL");
    server.wait().unwrap();

    let segment = newest_segment(&dir.path().join("executor-000"));
    let whole = std::fs::read(&segment).unwrap();
    let frames = frame_starts(&whole);
    assert!(frames.len() > TRANSFERS, "{} frames for {TRANSFERS} transfers", frames.len());

    // A flipped byte inside a frame in the middle of the segment.
    let damaged = frames[frames.len() / 2];
    let mut bytes = whole.clone();
    bytes[damaged + 20] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let (status, stderr) = run_to_exit(serve_command(dir.path(), port, FLAGS));
    assert!(!status.success(), "serve started on a corrupt log:\n{stderr}");
    let named = format!("log corrupt at {} offset {damaged}", segment.display());
    assert!(stderr.contains(&named), "{named:?} not in stderr:\n{stderr}");
    assert!(stderr.contains("backup"), "no way forward in:\n{stderr}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "the corrupt log was changed");

    // The same log undamaged but its last frame torn in the middle.
    let last = *frames.last().unwrap();
    std::fs::write(&segment, &whole[..last + (whole.len() - last) / 2]).unwrap();
    let server = start(dir.path(), port, FLAGS);
    wait_ready(&client, &base).await;
    for n in 0..TRANSFERS {
        let status = client.get(format!("{base}/v1/transfers/t-{n}")).send().await.unwrap().status();
        // The torn frame held the last transfer (one frame each).
        let expected = if n + 1 == TRANSFERS { 404 } else { 200 };
        assert_eq!(status, expected, "t-{n}");
    }
    terminate(server);
}

fn newest_segment(executor_dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(executor_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments.pop().expect("a log segment")
}

/// Where each frame starts: `[length: u32 LE][crc: u32][payload]`, up to
/// the end of the file or the zeros after the frames.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        starts.push(at);
        at += 8 + len;
    }
    assert_eq!(at, bytes.len(), "frames up to the end of a plain segment");
    starts
}

/// Runs the command (bounded) to its exit: its status and stderr.
fn run_to_exit(mut command: Command) -> (std::process::ExitStatus, String) {
    let mut child = command.stderr(Stdio::piped()).spawn().expect("start peakstack serve");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    (status, reader.join().unwrap())
}
