//! `convoyctl bench`: one scenario of `convoy-loadgen` against a running fleet (found in etcd,
//! or at `--addr`), seeded first when its data set is missing, then each requested baseline
//! driven the same way, reported side by side and optionally as JSON.
//!
//! Not here: the load generator itself (`convoy_loadgen`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use convoy_client::{ClientConfig, ConvoyClient, Discovery};
use convoy_discovery::EtcdConfig;
use convoy_discovery::shard_map::ShardMapStore;
use convoy_loadgen::report::cpu_time;
use convoy_loadgen::{DataSet, Mode, Op, Phases, Report, Scenario, Summary};
use convoy_proto::v1 as pb;
use convoy_store::ShardMap;

/// A ceiling to compare with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// A bare tonic server answering from memory, messages of the Get's size.
    Tonic,
    /// A raw Redis GET of a value of that size (needs `--redis-url`).
    Redis,
    /// The scenario's own statements, sent straight to the owning shard's primary.
    Sql,
}

impl Baseline {
    fn name(self) -> &'static str {
        match self {
            Baseline::Tonic => "baseline:tonic",
            Baseline::Redis => "baseline:redis",
            Baseline::Sql => "baseline:sql",
        }
    }
}

/// `convoyctl bench`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// What each request does.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Open loop: requests per second, on a fixed schedule.
    #[arg(long, default_value_t = 200.0, conflicts_with = "clients")]
    pub rate: f64,
    /// Closed loop (saturation) instead: this many clients, each sending its next request
    /// when its last returns.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Open loop: most requests outstanding; one due beyond it counts as not sent.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Seconds of load first, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Each call's deadline, in milliseconds (the SDK's per-call timeout, retries included).
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// HTTP/2 connections per instance (the SDK's default is 2).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Conversations in the data set.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Teams they are spread over.
    #[arg(long, default_value_t = 20)]
    pub teams: usize,
    /// Where the data set's names are kept between runs (created when missing or when it
    /// has another size).
    #[arg(long, default_value = ".convoy/bench-data.json")]
    pub data: PathBuf,
    /// Baselines to drive after the scenario, the same way (repeat, or separate with
    /// commas). Default: tonic, redis (with --redis-url) and sql for `get`; tonic and sql for
    /// `write`, `list-search` and `analytics`; tonic otherwise.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub baseline: Vec<Baseline>,
    /// No baselines.
    #[arg(long, conflicts_with = "baseline")]
    pub no_baseline: bool,
    /// The fleet's Redis, for the redis baseline.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Shard primaries for the sql baseline, instead of the map in etcd.
    #[arg(long = "shard-dsn", value_delimiter = ',')]
    pub shard_dsn: Vec<String>,
    /// The fleet's conversation and analytics instances (`host:port`, repeat) instead of
    /// the ones registered in etcd.
    #[arg(long = "addr", value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fail (exit 1) when a target's errors (failed, not sent or unfinished) exceed this
    /// share of its requests. 1: never (errors are figures, not failures).
    #[arg(long, default_value_t = 1.0)]
    pub max_error_ratio: f64,
    /// Seed of every random draw: the same seed sends the same requests.
    #[arg(long, default_value_t = 1)]
    pub random_seed: u64,
}

impl BenchArgs {
    fn mode(&self) -> Mode {
        match self.clients {
            Some(clients) => Mode::Closed { clients },
            None => Mode::Open {
                rate: self.rate,
                max_in_flight: self.max_in_flight,
            },
        }
    }

    fn phases(&self) -> Phases {
        Phases {
            warmup: Duration::from_secs_f64(self.warmup_secs.max(0.0)),
            measure: Duration::from_secs_f64(self.duration_secs.max(0.001)),
            drain: Duration::from_millis(self.timeout_ms) * 2,
        }
    }

    fn baselines(&self) -> Vec<Baseline> {
        if self.no_baseline {
            Vec::new()
        } else if !self.baseline.is_empty() {
            self.baseline.clone()
        } else if self.scenario == Scenario::Get {
            let mut all = vec![Baseline::Tonic, Baseline::Sql];
            if self.redis_url.is_some() {
                all.insert(1, Baseline::Redis);
            }
            all
        } else if matches!(
            self.scenario,
            Scenario::Write | Scenario::ListSearch | Scenario::Analytics
        ) {
            vec![Baseline::Tonic, Baseline::Sql]
        } else {
            vec![Baseline::Tonic]
        }
    }
}

/// Runs the bench (reaching the fleet with `access`); `progress` hears how many conversations are
/// seeded so far.
pub async fn bench(
    args: &BenchArgs,
    etcd: &EtcdConfig,
    access: &crate::access::Access,
    progress: impl Fn(u64, u64),
) -> anyhow::Result<Report> {
    let discovery = if args.addr.is_empty() {
        Discovery::Etcd(etcd.clone())
    } else {
        Discovery::Static(args.addr.clone())
    };
    let mut config = access.with(ClientConfig {
        per_call_timeout: Duration::from_millis(args.timeout_ms),
        // Reads carry no token: a dashboard's reads, free to use every cache.
        session_consistency: false,
        ..ClientConfig::default()
    });
    config.balance.endpoint.connections = args.connections.max(1);
    // Every request in flight may wait in front of the balancer, rather than in the SDK.
    config.balance.queue_capacity = config.balance.queue_capacity.max(args.max_in_flight);
    let client = ConvoyClient::connect(discovery, config)?;

    let data = match DataSet::load(&args.data, args.conversations, args.teams) {
        Some(data) => data,
        None => {
            let total = args.conversations as u64;
            let data = convoy_loadgen::seed::seed(
                &client,
                "bench",
                args.conversations,
                args.teams,
                64,
                |done| progress(done, total),
            )
            .await
            .map_err(|status| anyhow::anyhow!("seeding failed: {status}"))?;
            data.save(&args.data)?;
            data
        }
    };
    anyhow::ensure!(
        !data.names.is_empty(),
        "the data set is empty: pass --conversations 1 or more"
    );
    let data = Arc::new(data);

    let mode = args.mode();
    let phases = args.phases();
    let mut summaries = Vec::new();
    let op = convoy_loadgen::scenario::op(args.scenario, &client, data.clone(), args.random_seed);
    summaries.push(drive(args.scenario.name(), op, mode, phases).await);

    let baselines = args.baselines();
    if !baselines.is_empty() {
        // The message the Get moves, for the baselines of its size.
        let sample = client
            .conversations()
            .get_conversation(pb::GetConversationRequest {
                name: data.names[0].clone(),
            })
            .await?
            .into_inner();
        for baseline in baselines {
            let op = match baseline {
                Baseline::Tonic => {
                    convoy_loadgen::baseline::tonic_floor(
                        sample.clone(),
                        data.clone(),
                        args.connections,
                    )
                    .await?
                }
                Baseline::Redis => {
                    let url = args
                        .redis_url
                        .as_deref()
                        .ok_or_else(|| anyhow::anyhow!("the redis baseline needs --redis-url"))?;
                    convoy_loadgen::baseline::redis_get(url, &sample).await?
                }
                Baseline::Sql => {
                    let map = shard_map(args, etcd).await?;
                    convoy_loadgen::baseline::sql(
                        &map,
                        args.scenario,
                        data.clone(),
                        args.random_seed,
                        crate::bench_sql::call(),
                    )
                    .await?
                }
            };
            summaries.push(drive(baseline.name(), op, mode, phases).await);
        }
    }
    let report = Report {
        scenario: args.scenario.name().to_owned(),
        summaries,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// Drives one target and summarises it, with the CPU this process spent meanwhile (the
/// tonic baseline's server included: it runs here).
async fn drive(target: &str, op: Op, mode: Mode, phases: Phases) -> Summary {
    let (cpu, started) = (cpu_time(), std::time::Instant::now());
    let recorded = convoy_loadgen::drive::run(op, mode, phases).await;
    let cores = cpu_time().saturating_sub(cpu).as_secs_f64()
        / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
    Summary::new(target, mode, &recorded, phases.measure, cores)
}

/// The shard map of `--shard-dsn`, else the one in etcd.
async fn shard_map(args: &BenchArgs, etcd: &EtcdConfig) -> anyhow::Result<ShardMap> {
    if !args.shard_dsn.is_empty() {
        return Ok(ShardMap::evenly(&args.shard_dsn)?);
    }
    let stored = ShardMapStore::connect(etcd)
        .await?
        .load()
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!("no shard map in etcd: pass --shard-dsn for the sql baseline")
        })?;
    Ok(stored.map)
}

/// Whether every target stayed within `--max-error-ratio`; the ones that did not, else.
pub fn over_error_ratio(report: &Report, max: f64) -> Vec<String> {
    report
        .summaries
        .iter()
        .filter(|s| s.error_ratio() > max)
        .map(|s| {
            format!(
                "{}: {:.4} of requests failed (max {max})",
                s.target,
                s.error_ratio()
            )
        })
        .collect()
}
