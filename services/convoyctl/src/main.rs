//! `convoyctl`: convoy's operator CLI.

use clap::{Parser, Subcommand};
use convoy_discovery::EtcdConfig;

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
    /// The cache tier.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
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
            default_value = "redis://127.0.0.1:53379"
        )]
        redis_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let etcd = EtcdConfig {
        endpoints: cli.etcd_endpoints,
        ..EtcdConfig::default()
    };
    match cli.command {
        Command::Status => {
            let rows = convoyctl::status::status(&etcd).await?;
            print!("{}", convoyctl::status::render(&rows));
        }
        Command::Shards => {
            let shards = convoyctl::shards::shards(&etcd).await?;
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
            let done = convoyctl::reshard::reshard(&etcd, &plan, |op| {
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
        Command::Cache {
            command: CacheCommand::Consistency { redis_url },
        } => {
            let report = convoyctl::cache::consistency(&redis_url).await?;
            print!("{}", report.render());
        }
    }
    Ok(())
}
