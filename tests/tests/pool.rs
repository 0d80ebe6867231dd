//! The warm pool on the jail backend: misses raise the pool's target up to
//! --pool-max and the pool refills to it; a memory budget stops the refill
//! while the target stays where demand put it.

use std::time::{Duration, Instant};

use sandboxd_tests::{Daemon, DaemonOptions};

const READY: &str = "sandboxd_pool_ready{template=\"default\"}";
const TARGET: &str = "sandboxd_pool_target{template=\"default\"}";

/// Waits until the metric `sample` reads `value`.
async fn wait_for_metric(daemon: &Daemon, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = daemon.metric(sample);
        if now == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{sample} is {now:?}, expected {value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pool_options(min: usize, extra: &[&str]) -> DaemonOptions {
    DaemonOptions { pool_size: min, metrics: true, extra_args: extra.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn misses_grow_the_pool_up_to_its_maximum() {
    let daemon = Daemon::start(pool_options(1, &["--pool-max", "3"])).await;
    wait_for_metric(&daemon, READY, 1.0).await;
    let api = daemon.clients(None).await;
    // At once, so that the one ready guest serves one and the rest miss.
    let creates: Vec<_> = (0..4)
        .map(|_| {
            let mut api = sandboxd_tests::Clients::new_from(&api);
            tokio::spawn(async move { api.create(None).await })
        })
        .collect();
    for create in creates {
        create.await.expect("a Create");
    }
    assert!(daemon.metric("sandboxd_pool_misses_total").unwrap_or(0.0) >= 2.0, "the pool ran dry at least twice");
    wait_for_metric(&daemon, TARGET, 3.0).await;
    wait_for_metric(&daemon, READY, 3.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_budget_caps_the_pool() {
    // Every jail's agent alone uses more than half a MiB: one fits, a second would not.
    let daemon = Daemon::start(pool_options(3, &["--pool-memory-budget-mib", "1"])).await;
    wait_for_metric(&daemon, READY, 1.0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(daemon.metric(READY), Some(1.0), "the budget keeps the pool at one guest");
    assert_eq!(daemon.metric(TARGET), Some(3.0), "while the target stays at --pool-size");
    let used = daemon.metric("sandboxd_pool_memory_bytes{template=\"default\"}").unwrap();
    assert!(used > 512.0 * 1024.0, "the pooled jail's cgroup counts its memory: {used}");
    let mut api = daemon.clients(None).await;
    let id = api.create(None).await;
    assert!(api.exec(&id, &["true"]).await.is_ok(), "a pooled guest still serves");
}
