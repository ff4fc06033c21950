//! `rl4pix-train eval` (in progress).

#[derive(clap::Args, Debug)]
pub struct EvalArgs {}

pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`eval` is not implemented yet")
}
