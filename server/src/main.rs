//! `rl4pix-server`: placeholder until the edit-server issue lands.

fn main() {
    eprintln!("rl4pix-server: the HTTP server is not implemented yet; see the edit-server issue");
    std::process::exit(2);
}
