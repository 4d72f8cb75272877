//! Cost of recording one statement: what sqlx 0.8 spends building its statement event once
//! it is enabled (the summary and the copy of the text, as in its `logger.rs`), plus
//! [`convoy_store::query_stats::layer`]'s work; against the same event disabled (no layer
//! admits it: what a process without the layer pays) and enabled but received by a layer
//! that does nothing (sqlx's part alone). All behind an `info` log filter on a log layer
//! that writes nowhere, as a service runs; without a metrics recorder, and with the
//! Prometheus recorder a service installs with `--metrics-listen` (its histograms included).

use std::hint::black_box;
use std::time::{Duration, Instant};

use convoy_store::QueryStats;
use criterion::{Criterion, criterion_group, criterion_main};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

const SQL: &str = "SELECT id, team_id, title, intent, status, content, created_at, updated_at, \
                   version FROM conversations WHERE team_id = $1 AND id = $2";

/// What `sqlx_core::logger::QueryLogger::finish` does for a statement that is not slow.
fn as_sqlx_does(sql: &str, start: Instant) {
    if tracing::enabled!(target: "sqlx::query", tracing::Level::TRACE) {
        let mut summary = sql
            .split_whitespace()
            .take(4)
            .collect::<Vec<&str>>()
            .join(" ");
        let statement = if summary != sql {
            summary.push_str(" …");
            format!("\n\n{sql}\n")
        } else {
            String::new()
        };
        let elapsed = start.elapsed();
        tracing::trace!(
            target: "sqlx::query",
            summary,
            db.statement = statement,
            rows_affected = 0u64,
            rows_returned = 1u64,
            ?elapsed,
            elapsed_secs = elapsed.as_secs_f64(),
        );
    }
}

fn recording(c: &mut Criterion) {
    let logs = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(LevelFilter::INFO)
    };
    let start = Instant::now() - Duration::from_millis(1);

    let without = tracing_subscriber::registry().with(logs());
    tracing::subscriber::with_default(without, || {
        c.bench_function("statement_event/no_layer", |b| {
            b.iter(|| as_sqlx_does(black_box(SQL), start))
        });
    });

    // sqlx's part alone: the event enabled and built, received by a layer that does nothing.
    struct Nothing;
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Nothing {}
    let enabled = tracing_subscriber::registry().with(logs()).with(
        Nothing.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("sqlx::query", tracing::Level::TRACE),
        ),
    );
    tracing::subscriber::with_default(enabled, || {
        c.bench_function("statement_event/enabled_no_work", |b| {
            b.iter(|| as_sqlx_does(black_box(SQL), start))
        });
    });

    let stats = QueryStats::global();
    let with = tracing_subscriber::registry()
        .with(logs())
        .with(convoy_store::query_stats::layer(stats));
    tracing::subscriber::with_default(with, || {
        let span = tracing::info_span!(
            "postgresql",
            db.namespace = "shard-0",
            convoy.node = "primary"
        );
        let _entered = span.enter();
        c.bench_function("statement_event/query_stats_layer", |b| {
            b.iter(|| as_sqlx_does(black_box(SQL), start))
        });
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&prometheus, || {
            c.bench_function("statement_event/query_stats_layer_prometheus", |b| {
                b.iter(|| as_sqlx_does(black_box(SQL), start))
            });
        });
    });
}

criterion_group!(benches, recording);
criterion_main!(benches);
