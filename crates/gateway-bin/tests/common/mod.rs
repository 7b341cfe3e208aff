//! Helpers shared by the integration tests that run the `gateway` binary: free ports, processes
//! killed on drop, a real `redis-server`, policy files and `gateway serve`. Simulated regions, the
//! policy tables for them and bounded waits come from `gateway-e2e`, which the in-process
//! end-to-end tests use as well.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

use gateway_e2e::{backend_env, eventually, eventually_blocking, ranked_backends};
use simulator::RunningRegion;

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

/// Waits (bounded by `limit`) for the process to exit; a process that does not is killed on drop.
pub(crate) fn wait_exit(proc: &mut Proc, limit: Duration) -> ExitStatus {
    eventually_blocking("the process exiting", limit, || proc.0.try_wait().unwrap())
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
        eventually_blocking("redis-server accepting", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    pub(crate) fn kill(&mut self) {
        self.proc = None;
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many clients are subscribed to `channel` (`PUBSUB NUMSUB`).
    pub(crate) fn subscribers(&self, channel: &str) -> u64 {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            conn,
            "*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${}\r\n{channel}\r\n",
            channel.len()
        )
        .unwrap();
        // The reply is `[channel, count]`: `*2`, the channel as a bulk string, then `:count`.
        let mut reply = String::new();
        let mut buf = [0; 256];
        loop {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "redis closed the connection: {reply:?}");
            reply.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(count) = reply
                .rsplit_once("\r\n:")
                .and_then(|(_, rest)| rest.strip_suffix("\r\n"))
            {
                return count.parse().unwrap();
            }
        }
    }
}

/// A policy file and the environment its backend keys resolve from.
pub(crate) struct PolicyFile {
    pub(crate) path: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

/// A policy file with the deployment `gpt-4o` on `regions`, named r0, r1.. with priority in order
/// (`gateway_e2e::ranked_backends`), followed by `extra` TOML.
pub(crate) fn policy_file(regions: &[&RunningRegion], extra: &str) -> PolicyFile {
    PolicyFile {
        path: write_policy(&(ranked_backends(regions) + extra)),
        env: backend_env(regions),
    }
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

/// `gateway serve --listen 127.0.0.1:{port} --policy {policy}` with `RUST_LOG=warn`, the policy's
/// environment and `envs`, and its output discarded (callers may redirect it).
pub(crate) fn serve_command<I, K, V>(policy: &PolicyFile, port: u16, envs: I) -> Command
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut command = Command::new(GATEWAY);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
        ])
        .arg(&policy.path)
        .env("RUST_LOG", "warn")
        .envs(policy.env.iter().map(|(k, v)| (k, v)))
        .envs(envs)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Waits (bounded) until `url` accepts a request.
pub(crate) async fn wait_until_answers(url: &str) {
    eventually(&format!("{url} answering"), || async {
        reqwest::get(url).await.ok().map(drop)
    })
    .await;
}

/// Spawns a gateway that listens on `port` and waits until it answers; returns it and its base URL.
pub(crate) async fn spawn_gateway(command: &mut Command, port: u16) -> (Proc, String) {
    let proc = Proc::spawn(command);
    let base = format!("http://127.0.0.1:{port}");
    wait_until_answers(&format!("{base}/healthz")).await;
    (proc, base)
}

/// Starts `gateway serve` with `policy` and `envs` on a free port and waits until it is ready.
pub(crate) async fn gateway_process(policy: &PolicyFile, envs: &[(&str, &str)]) -> (Proc, String) {
    let port = free_port();
    spawn_gateway(&mut serve_command(policy, port, envs.iter().copied()), port).await
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
