//! Build, run and test automation for leak: `cargo xtask run` and `cargo xtask test`.

mod bench;
mod bootstrap;
mod cpio;
mod debs;
mod fuzz;
mod guest;
mod image;
mod kernels;
mod lint;
mod musl;
mod run;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "leak's build, run and test automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build leak in release and run it as root (default subcommand: trace).
    Run(run::Options),
    /// Run the whole test suite as CI does.
    Test(test::Options),
    /// Build the agent's image offline with buildah: a static binary and an OCI archive per
    /// architecture, target/image/leak-<arch>.oci.tar (run as root).
    Image(image::Options),
    /// Benchmark the tracer: overhead per charge-path mode and kill-to-metrics latency.
    Bench(bench::Options),
    /// Run the end-to-end tests inside Debian kernels under QEMU, in every attach mode.
    Vm(vm::Options),
    /// Only the lint stage of `test`: rustfmt and clippy (warnings denied), workspace, fuzz
    /// crate and kernel programs.
    #[command(hide = true)]
    Lint,
    /// Only the fuzz stage of `test`: every fuzz target for a bounded time from its seeds.
    #[command(hide = true)]
    Fuzz,
    /// Install or build every missing tool (nightly rust-src, rustfmt and clippy, bpf-linker,
    /// cargo-fuzz, Debian packages).
    Bootstrap,
    /// Download Debian kernel packages for SERIES (e.g. 5.10, 6.1) and extract their BTF.
    KernelBtf {
        /// The kernels' architecture.
        #[arg(long, value_enum, default_value_t = musl::Arch::Amd64)]
        arch: musl::Arch,
        #[arg(required = true)]
        series: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(options) => run::run(options),
        Command::Test(options) => test::run(options),
        Command::Vm(options) => vm::run(options),
        Command::Bench(options) => bench::run(options),
        Command::Image(options) => image::run(options),
        Command::Lint => lint::run_alone(),
        Command::Fuzz => fuzz::run_alone(),
        Command::Bootstrap => bootstrap::all(),
        Command::KernelBtf { arch, series } => {
            for series in series {
                let kernel = kernels::fetch_arch(arch, &series)?;
                println!("{}: {}", kernel.release, kernel.btf.display());
            }
            Ok(())
        }
    }
}
