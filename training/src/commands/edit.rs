//! `rl4pix-train edit` (in progress).

#[derive(clap::Args, Debug)]
pub struct EditArgs {}

pub fn run(_args: EditArgs) -> anyhow::Result<()> {
    anyhow::bail!("`edit` is not implemented yet")
}
