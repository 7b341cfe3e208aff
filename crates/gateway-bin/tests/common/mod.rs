//! Helpers shared by the integration tests that run the `gateway` binary: free ports, processes
//! killed on drop, a real `redis-server`, simulated regions, policy files and `gateway serve`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use simulator::{DeploymentConfig, RegionConfig, RunningRegion};

/// The `gateway` binary under test.
pub(crate) const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed (and reaped) on drop.
pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    pub(crate) fn spawn(command: &mut Command) -> Self {
        Proc(command.spawn().unwrap())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM to the process.
pub(crate) fn sigterm(proc: &Proc) {
    let status = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the process to exit.
pub(crate) fn wait_exit(proc: &mut Proc, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = proc.0.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` on a free loopback port, killed on drop.
pub(crate) struct Redis {
    port: u16,
    proc: Option<Proc>,
}

impl Redis {
    pub(crate) fn start() -> Self {
        let port = free_port();
        let mut redis = Redis { port, proc: None };
        redis.restart();
        redis
    }

    /// Starts the server again on the same port (after `kill`), and waits until it accepts.
    pub(crate) fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed: run ./scripts/test, which installs it");
        self.proc = Some(Proc(child));
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start");
    }

    pub(crate) fn kill(&mut self) {
        self.proc = None;
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A region `name` serving the chat deployment `m` with `tpm` tokens a minute, behind `api_key`.
pub(crate) fn chat_region(name: &str, api_key: &str, tpm: u64) -> RegionConfig {
    RegionConfig::new(name, api_key).deployment(DeploymentConfig::chat("m", tpm))
}

/// Runs a simulated region on a loopback port.
pub(crate) async fn spawn_region(config: RegionConfig) -> RunningRegion {
    simulator::spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Policy TOML with the deployment `gpt-4o` on the given regions, named r0, r1.. with priority in
/// order, each mapping it to `m` with the key in `BACKEND_KEY`.
pub(crate) fn regions_policy(regions: &[&RunningRegion]) -> String {
    let mut text = String::from("[[deployments]]\nname = \"gpt-4o\"\n\n");
    for (i, r) in regions.iter().enumerate() {
        text.push_str(&format!(
            "[[backends]]\nname = \"r{i}\"\nregion = \"Region {i}\"\nendpoint = \"{}\"\npriority = {}\napi_key = \"env:BACKEND_KEY\"\ndeployments = {{ gpt-4o = \"m\" }}\n\n",
            r.url(),
            i + 1
        ));
    }
    text
}

/// A new empty directory under the system's temporary directory.
pub(crate) fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-test-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `policy.toml` in a new temporary directory.
pub(crate) fn write_policy(text: &str) -> PathBuf {
    let file = temp_dir().join("policy.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// `gateway serve --listen 127.0.0.1:{port} --policy {policy}` with `RUST_LOG=warn`, `envs`, and
/// its output discarded (callers may redirect it).
pub(crate) fn serve_command(policy: &Path, port: u16, envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(GATEWAY);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
        ])
        .arg(policy)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Whether `url` accepts a request within about five seconds.
pub(crate) async fn answers(url: &str) -> bool {
    for _ in 0..200 {
        if reqwest::get(url).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Spawns a gateway that listens on `port` and waits until it answers; returns it and its base URL.
pub(crate) async fn spawn_gateway(command: &mut Command, port: u16) -> (Proc, String) {
    let proc = Proc::spawn(command);
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        answers(&format!("{base}/healthz")).await,
        "gateway did not start"
    );
    (proc, base)
}

/// Starts `gateway serve` with `policy` and `envs` on a free port and waits until it is ready.
pub(crate) async fn gateway_process(policy: &Path, envs: &[(&str, &str)]) -> (Proc, String) {
    let port = free_port();
    spawn_gateway(&mut serve_command(policy, port, envs), port).await
}

/// The chat completions URL of the deployment `gpt-4o` behind the gateway at `base`.
pub(crate) fn chat_url(base: &str) -> String {
    format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
}

/// `gateway demo --listen 127.0.0.1:{port}`, its stdout piped and its stderr discarded.
pub(crate) fn demo_command(port: u16) -> Command {
    let mut command = Command::new(GATEWAY);
    command
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// Reads the demo's banner, up to its "Press Ctrl-C" line (at most 200 lines). Returns the banner
/// and the rest of its stdout, which the caller keeps open.
pub(crate) fn demo_banner(demo: &mut Proc) -> (String, BufReader<ChildStdout>) {
    let mut out = BufReader::new(demo.0.stdout.take().unwrap());
    let mut banner = String::new();
    for _ in 0..200 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 || line.contains("Press Ctrl-C") {
            break;
        }
        banner.push_str(&line);
    }
    (banner, out)
}
