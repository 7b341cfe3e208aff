//! The allocator of the real `gateway` binary: the default build runs jemalloc with its background
//! thread, which returns the memory a burst of streams took to the OS once it has decayed, even
//! when no request comes (issue 11, "returned to near idle after the load"; the figures are in
//! docs/benchmarks.md, "Memory"). glibc's malloc keeps that memory, and has no such thread.
#![cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use gateway_e2e::{CLIENT_KEY, eventually_blocking, region_with};

/// The names of the process's threads (`/proc/PID/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_jemalloc_with_its_background_purging_thread() {
    let sim = region_with("Region A", &[("m", 100_000_000)], |c| c).await;
    let policy = common::policy_file(
        &[&sim],
        "[[consumers]]\nname = \"app\"\nkeys = [\"env:CLIENT_KEY\"]\n",
    );
    let (gateway, _base) = common::gateway_process(&policy, &[("CLIENT_KEY", CLIENT_KEY)]).await;
    let pid = gateway.0.id();
    // jemalloc starts the thread as it initialises, before `main`; the wait is bounded anyway.
    eventually_blocking(
        "jemalloc's background thread in the gateway",
        gateway_e2e::PATIENCE,
        || {
            thread_names(pid)
                .iter()
                .any(|name| name == "jemalloc_bg_thd")
                .then_some(())
        },
    );
}
