//! Stand-alone `actrix tune` for trying the tool without the appliance binary:
//! `cargo run -p actrix-tuning --example tune -- --listen 192.0.2.2`
//! (dry run by default; `--root tuning/tests/fixtures/big-2s-mlx5` replays a fixture).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tune",
    about = "Observe, plan and apply host tuning for actrix"
)]
struct Cli {
    #[command(flatten)]
    tune: actrix_tuning::TuneArgs,
}

fn main() -> anyhow::Result<()> {
    let code = actrix_tuning::run_cli(Cli::parse().tune)?;
    std::process::exit(code);
}
