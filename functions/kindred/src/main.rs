//! `kindred`: the local runner. `kindred serve` runs the Tracking, Profile
//! and admin routers and the identity worker in one process on the
//! embedded store; `kindred space create` makes a space offline;
//! `kindred bench` measures the whole pipeline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kindred::{backfill, bench, config, destinations, regulations, server, tokens};

/// mimalloc: the compute worker decodes and drops many small maps per
/// profile, where it is markedly faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kindred",
    version,
    about = "Kindred: an open-source customer profile engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Tracking, Profile and admin APIs with background workers.
    Serve(config::ServeArgs),
    /// Manage spaces.
    Space {
        #[command(subcommand)]
        command: SpaceCommand,
    },
    /// Measure ingest throughput, memory and Profile API latency.
    Bench(bench::BenchArgs),
    /// Rebuild a computed trait or audience from every profile's history,
    /// with a progress bar.
    Backfill(backfill::BackfillArgs),
    /// List a space's destinations with delivered / pending / retrying /
    /// dead counts, the last success and the last error.
    Destinations(destinations::DestinationsArgs),
    /// List, create and revoke a space's write keys, access tokens and
    /// admin tokens on a running Kindred.
    Tokens(tokens::TokensArgs),
    /// Delete and suppress people (GDPR, CCPA), or lift a suppression,
    /// on a running Kindred; list and show regulations.
    Regulations(regulations::RegulationsArgs),
    /// Take a consistent online snapshot of a data directory (a server
    /// may be running on it) into DEST, a new directory.
    Backup {
        dest: PathBuf,
        #[arg(long, env = "KINDRED_DATA_DIR", default_value = "./kindred-data")]
        data_dir: PathBuf,
    },
    /// Restore a snapshot taken by `kindred backup` into a new (empty)
    /// data directory; then start `kindred serve` on it.
    Restore {
        backup: PathBuf,
        #[arg(long, env = "KINDRED_DATA_DIR", default_value = "./kindred-data")]
        data_dir: PathBuf,
    },
    /// Bring the DynamoDB table of a deployment made by an older Kindred
    /// up to this version's layout (today: index its root profiles, one
    /// scan of the table). Safe to run again and while the functions run.
    Migrate {
        /// The stack's `TableName` output (credentials and region from the
        /// usual AWS environment).
        #[arg(long)]
        dynamodb_table: String,
    },
}

#[derive(Subcommand)]
enum SpaceCommand {
    /// Create a space offline and print its credentials as one JSON line.
    Create {
        space_id: String,
        #[arg(long, env = "KINDRED_DATA_DIR", default_value = "./kindred-data")]
        data_dir: PathBuf,
        /// Create it in this DynamoDB table of an AWS deployment instead
        /// (the stack's `TableName` output; credentials and region from the
        /// usual AWS environment).
        #[arg(long, conflicts_with = "data_dir")]
        dynamodb_table: Option<String>,
    },
}

/// Runs a command's future on a runtime of one thread.
fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            config::init_logging();
            let config = config::Config::load(args)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(server::serve(config))
        }
        Command::Space {
            command:
                SpaceCommand::Create {
                    space_id,
                    data_dir,
                    dynamodb_table,
                },
        } => {
            let created = match dynamodb_table {
                Some(table) => block_on(async {
                    let sdk = kindred_aws::lambda::sdk_config().await;
                    let store =
                        kindred_aws::DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table);
                    store.create_space(&space_id).await
                })?,
                None => kindred_sqlite::SqliteStore::open(&data_dir)
                    .with_context(|| format!("opening the store in {}", data_dir.display()))?
                    .create_space(&space_id),
            };
            match created {
                Ok(space) => {
                    println!("{}", serde_json::to_string(&space)?);
                    Ok(())
                }
                Err(kindred_store::StoreError::AlreadyExists) => {
                    anyhow::bail!("space {space_id:?} already exists")
                }
                Err(e) => Err(e).context("creating the space"),
            }
        }
        Command::Backup { dest, data_dir } => {
            let report = kindred_sqlite::backup::backup(&data_dir, &dest)
                .with_context(|| format!("backing up {}", data_dir.display()))?;
            for (name, bytes) in &report.files {
                println!("{name}: {bytes} bytes");
            }
            println!("backed up {} into {}", data_dir.display(), dest.display());
            Ok(())
        }
        Command::Restore { backup, data_dir } => {
            kindred_sqlite::backup::restore(&backup, &data_dir)
                .with_context(|| format!("restoring {}", backup.display()))?;
            println!(
                "restored {} into {}; start it with: kindred serve --data-dir {}",
                backup.display(),
                data_dir.display(),
                data_dir.display()
            );
            Ok(())
        }
        Command::Backfill(args) => block_on(backfill::run(args))?,
        Command::Destinations(args) => block_on(destinations::run(args))?,
        Command::Tokens(args) => block_on(tokens::run(args))?,
        Command::Regulations(args) => block_on(regulations::run(args))?,
        Command::Migrate { dynamodb_table } => block_on(async {
            let sdk = kindred_aws::lambda::sdk_config().await;
            let store =
                kindred_aws::DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), dynamodb_table);
            let indexed = store
                .index_roots()
                .await
                .context("indexing the root profiles")?;
            println!("{}", serde_json::json!({ "roots_indexed": indexed }));
            anyhow::Ok(())
        })?,
        Command::Bench(args) => {
            config::init_logging();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(bench::run(args))
        }
    }
}
