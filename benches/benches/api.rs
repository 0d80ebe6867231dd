//! API latency on the jail backend, through the real daemon and a real
//! gRPC client: the round trip of `Exec true` on a warm sandbox (with
//! p50/p99 of a fixed run), and Create from the warm pool (with p50/p99 of
//! a fixed run) against Create with the pool disabled, side by side in one
//! run.
//!
//! Build the binaries first: `cargo build -p sandboxd -p sandbox-agent`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use sandbox_proto::api::DeleteSandboxRequest;
use sandboxd_tests::{Clients, Daemon, DaemonOptions};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime")
}

fn exec_round_trip(c: &mut Criterion) {
    let rt = runtime();
    let daemon = rt.block_on(Daemon::start(DaemonOptions::default()));
    let mut api = rt.block_on(daemon.clients(None));
    let id = rt.block_on(api.create(None));
    print_percentiles(&rt, &mut api, &id, 300);
    c.bench_function("exec_true_round_trip", |b| {
        b.to_async(&rt).iter_custom(|iterations| {
            let mut api = Clients::new_from(&api);
            let id = id.clone();
            async move {
                let started = Instant::now();
                for _ in 0..iterations {
                    api.exec(&id, &["true"]).await.expect("exec true");
                }
                started.elapsed()
            }
        })
    });
    drop(api);
    drop(daemon);
}

/// Percentiles of a fixed number of round trips, which criterion does not print.
fn print_percentiles(rt: &Runtime, api: &mut Clients, id: &str, runs: usize) {
    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            api.exec(id, &["true"]).await.expect("exec true");
            samples.push(started.elapsed());
        }
        samples
    });
    report("exec_true_round_trip", &mut samples);
}

/// Prints the p50 and p99 of `samples`.
fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!("{name} over {} runs: p50 {:?}  p99 {:?}", samples.len(), at(0.5), at(0.99));
}

fn create_pool_vs_cold(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("create");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    for (label, pool_size) in [("warm_pool", 4), ("cold", 0)] {
        let daemon = rt.block_on(Daemon::start(DaemonOptions { pool_size, ..Default::default() }));
        let mut api = rt.block_on(daemon.clients(None));
        if pool_size > 0 {
            print_create_percentiles(&rt, &mut api, 40);
        }
        group.bench_function(label, |b| {
            b.to_async(&rt).iter_custom(|iterations| {
                let mut api = Clients::new_from(&api);
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iterations {
                        if pool_size > 0 {
                            // Let the pool refill, as it would between bursts.
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                        let started = Instant::now();
                        let id = api.create(None).await;
                        spent += started.elapsed();
                        api.sandboxes.delete(DeleteSandboxRequest { id }).await.expect("delete");
                    }
                    spent
                }
            })
        });
        drop(api);
        drop(daemon);
    }
    group.finish();
}

/// Percentiles of Creates from a warm pool, each after a pause that lets
/// the pool refill.
fn print_create_percentiles(rt: &Runtime, api: &mut Clients, runs: usize) {
    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let started = Instant::now();
            let id = api.create(None).await;
            samples.push(started.elapsed());
            api.sandboxes.delete(DeleteSandboxRequest { id }).await.expect("delete");
        }
        samples
    });
    report("create_warm_pool", &mut samples);
}

criterion_group!(benches, exec_round_trip, create_pool_vs_cold);
criterion_main!(benches);
