//! `lorq`: serve many LoRA adapters on one quantized LLM, fine-tune adapters with QLoRA,
//! merge and re-quantize them.

use clap::{Parser, Subcommand};

mod cmd;
mod common;

#[derive(Parser)]
#[command(name = "lorq", version, about = "Many LoRA adapters on one (quantized) LLM: generate, score, quantize, merge, export, evaluate, plan", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Generate(cmd::generate::GenerateArgs),
    Score(cmd::score::ScoreArgs),
    ImportGguf(cmd::import_gguf::ImportGgufArgs),
    Pull(cmd::pull::PullArgs),
    Inspect(cmd::inspect::InspectArgs),
    Bench(cmd::bench::BenchArgs),
    Eval(cmd::eval::EvalArgs),
    QuantReport(cmd::quant_report::QuantReportArgs),
    Plan(cmd::plan::PlanArgs),
    Quantize(cmd::quantize::QuantizeArgs),
    Merge(cmd::merge::MergeArgs),
    Export(cmd::export::ExportArgs),
    Serve(cmd::serve::ServeArgs),
    Train(cmd::train::TrainArgs),
    Estimate(cmd::estimate::EstimateArgs),
}

fn main() {
    // candle runs element-wise CPU ops on a pool whose barrier spins; when the cores are busy (a
    // loaded machine, or gemm's own threads) the spinning costs more than the parallel work saves
    // (a QLoRA step ran 4x faster with one thread there). Matmuls keep all cores through gemm.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LORQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::ImportGguf(a) => cmd::import_gguf::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::QuantReport(a) => cmd::quant_report::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Estimate(a) => cmd::estimate::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
