//! Running the real `peakstack serve` binary from tests.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `peakstack serve` on 127.0.0.1:`port` with the data dir and any
/// further flags.
pub fn start(data: &Path, port: u16, flags: &[&str]) -> Child {
    serve_command(data, port, flags).stderr(Stdio::inherit()).spawn().expect("start peakstack serve")
}

/// The command [`start`] runs, for a test that sets more on it.
pub fn serve_command(data: &Path, port: u16, flags: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_peakstack"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data)
        .args(flags)
        .env("PEAKSTACK_LOG", "warn")
        .stdout(Stdio::null());
    command
}

/// Waits (at most 30 s) until `/readyz` answers 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {base} did not become ready");
}

/// Runs `peakstack keys create --scope SCOPE --data DATA` and returns the
/// key it prints.
pub fn create_key(data: &Path, scope: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_peakstack"))
        .args(["keys", "create", "--scope", scope, "--data"])
        .arg(data)
        .output()
        .expect("run peakstack keys create");
    assert!(output.status.success(), "keys create failed: {}", String::from_utf8_lossy(&output.stderr));
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("psk_"), "keys create printed {key:?}");
    key
}

/// A client that sends `key` on every request.
pub fn client(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    reqwest::Client::builder().timeout(Duration::from_secs(10)).default_headers(headers).build().unwrap()
}

/// Waits (bounded) for `child` to exit; kills it and fails past `within`.
#[allow(dead_code)] // not every test binary stops a server this way
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            panic!("serve still runs after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then wait (bounded) for a clean exit.
#[allow(dead_code)] // not every test binary stops a server this way
pub fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "serve exited with {status} after SIGTERM");
}
