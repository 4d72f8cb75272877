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
        Command::Cache {
            command: CacheCommand::Consistency { redis_url },
        } => {
            let report = convoyctl::cache::consistency(&redis_url).await?;
            print!("{}", report.render());
        }
    }
    Ok(())
}
