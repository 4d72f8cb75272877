//! `convoyctl`: convoy's operator CLI.

use clap::{Parser, Subcommand};
use convoy_discovery::{EtcdConfig, EtcdTlsArgs};

/// Operate a convoy fleet.
#[derive(Debug, Parser)]
#[command(name = "convoyctl", version, about)]
struct Cli {
    /// etcd endpoints of the fleet (repeat, or comma-separate in the variable).
    #[arg(
        long = "etcd-endpoint",
        env = "CONVOY_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true
    )]
    etcd_endpoints: Vec<String>,

    /// TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,

    /// The token and mutual TLS convoyctl's service calls use.
    #[command(flatten)]
    access: convoyctl::access::AccessArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every registered instance with its address, version, zone and gRPC health.
    Status,
    /// The shard map, with every node's health and replica lag (from the shard-router).
    Shards,
    /// Moves slots START..=END to shard TO online, with a progress bar (adds TO first with
    /// --add-primary).
    Reshard {
        /// First slot to move.
        #[arg(long)]
        start: u16,
        /// Last slot to move, inclusive.
        #[arg(long)]
        end: u16,
        /// The shard that receives them.
        #[arg(long)]
        to: String,
        /// Add TO as a new shard first, with this primary `host:port`.
        #[arg(long)]
        add_primary: Option<String>,
        /// The new shard's replicas, `host:port` (repeat).
        #[arg(long)]
        add_replica: Vec<String>,
    },
    /// Drives a load scenario against the fleet (open loop at --rate, or closed loop with
    /// --clients) through the SDK, then its baselines the same way, and reports them side
    /// by side.
    Bench(Box<convoyctl::bench::BenchArgs>),
    /// Key pairs and tokens for local set-ups (`keygen`, `mint`; see docs/security.md).
    Token {
        #[command(subcommand)]
        command: convoyctl::token::TokenCommand,
    },
    /// Imports transcripts into conversations (re-running imports only what is new).
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// The cache tier.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Each shard's slowest statements (pg_stat_statements) and sequential scans of large
    /// tables (pg_stat_user_tables), on the shards of the map in etcd or those named.
    Queries {
        /// Statements (and tables) shown per shard.
        #[arg(long, default_value_t = 10)]
        top: u32,
        /// Rank statements by mean time per call, or by total time.
        #[arg(long, value_enum, default_value_t = convoyctl::queries::Ranking::Mean)]
        by: convoyctl::queries::Ranking,
        /// Show sequential scans only of tables with at least this many live rows.
        #[arg(long, default_value_t = 10_000)]
        min_rows: i64,
        /// A shard's primary DSN, instead of the map in etcd (repeat, in shard order, as
        /// the services take them).
        #[arg(long = "shard-dsn", env = "CONVOY_SHARD_DSNS", value_delimiter = ',')]
        shard_dsn: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImportSource {
    /// Claude Code sessions (`~/.claude/projects/<project>/<session>.jsonl`): one
    /// conversation per session, titled by its summary or first prompt, with its project
    /// and branch as metadata; a progress bar, then a summary.
    ClaudeCode(convoyctl::import::ClaudeCodeArgs),
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Writes consistent within each sampled delay, fleet-wide (the consistency sampler's
    /// tally), as a ratio and in nines, with the layers that contradicted writes.
    Consistency {
        /// The cache tier's Redis.
        #[arg(
            long,
            env = "CONVOY_REDIS_URL",
            default_value = "redis://127.0.0.1:23379"
        )]
        redis_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let etcd = EtcdConfig {
        endpoints: cli.etcd_endpoints,
        tls: cli.etcd_tls.tls(),
        ..EtcdConfig::default()
    };
    let access = cli.access.load()?;
    match cli.command {
        Command::Token { command } => convoyctl::token::run(&command)?,
        Command::Status => {
            let rows = convoyctl::status::status(&etcd, access.tls.as_ref()).await?;
            print!("{}", convoyctl::status::render(&rows));
        }
        Command::Shards => {
            let shards = convoyctl::shards::shards(&etcd, &access).await?;
            print!("{}", convoyctl::shards::render(&shards));
        }
        Command::Reshard {
            start,
            end,
            to,
            add_primary,
            add_replica,
        } => {
            let plan = convoyctl::reshard::Reshard {
                start,
                end,
                to,
                add_primary,
                add_replicas: add_replica,
            };
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:40}] {pos}/{len} rows {msg}",
                )
                .expect("a valid template"),
            );
            let done = convoyctl::reshard::reshard(&etcd, &access, &plan, |op| {
                bar.set_length(op.rows_total.max(op.rows_copied).max(0) as u64);
                bar.set_position(op.rows_copied.max(0) as u64);
                bar.set_message(convoyctl::reshard::phase(op));
            })
            .await?;
            bar.finish_and_clear();
            println!("{}", convoyctl::reshard::summary(&done));
            if !matches!(convoyctl::reshard::phase(&done), "done") {
                std::process::exit(1);
            }
        }
        Command::Bench(args) => {
            let bar = indicatif::ProgressBar::hidden().with_style(
                indicatif::ProgressStyle::with_template(
                    "seeding {bar:40} {pos}/{len} conversations ({per_sec}, {eta})",
                )
                .expect("a valid template"),
            );
            let report = convoyctl::bench::bench(&args, &etcd, &access, |done, total| {
                if bar.is_hidden() {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    bar.set_length(total);
                }
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            print!("{}", report.render());
            let over = convoyctl::bench::over_error_ratio(&report, args.max_error_ratio);
            if !over.is_empty() {
                eprintln!("{}", over.join("\n"));
                std::process::exit(1);
            }
        }
        Command::Queries {
            top,
            by,
            min_rows,
            shard_dsn,
        } => {
            let targets = if shard_dsn.is_empty() {
                convoyctl::queries::targets_from_etcd(&etcd).await?
            } else {
                convoyctl::queries::targets_from_dsns(&shard_dsn)?
            };
            let options = convoyctl::queries::QueriesOptions { top, by, min_rows };
            let shards = convoyctl::queries::queries(&targets, &options).await;
            print!("{}", convoyctl::queries::render(&shards, &options));
        }
        Command::Import {
            source: ImportSource::ClaudeCode(args),
        } => import_claude_code(&args, &etcd, &access).await?,
        Command::Cache {
            command: CacheCommand::Consistency { redis_url },
        } => {
            let report = convoyctl::cache::consistency(&redis_url).await?;
            print!("{}", report.render());
        }
    }
    Ok(())
}

async fn import_claude_code(
    args: &convoyctl::import::ClaudeCodeArgs,
    etcd: &EtcdConfig,
    access: &convoyctl::access::Access,
) -> anyhow::Result<()> {
    let discovery = if args.addr.is_empty() {
        convoy_client::Discovery::Etcd(etcd.clone())
    } else {
        convoy_client::Discovery::Static(args.addr.clone())
    };
    let client = convoyctl::import::client(&discovery, access);
    let mut importer = convoyctl::import::Importer::new(client, args.options())?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "importing {bar:40} {pos}/{len} lines ({per_sec}, {eta})",
        )
        .expect("a valid template"),
    );
    importer
        .pass(|sent, total| {
            bar.set_length(total);
            bar.set_position(sent);
        })
        .await?;
    bar.finish_and_clear();
    print!("{}", importer.summary().render());
    if args.follow {
        eprintln!("following {} (Ctrl-C to stop)", args.path.display());
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        importer.follow(stop).await?;
        print!("{}", importer.summary().render());
    }
    Ok(())
}
