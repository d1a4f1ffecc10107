//! `kindred bench` (built in the next step).

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("kindred bench is not built yet")
}
