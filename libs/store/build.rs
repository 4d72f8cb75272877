//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the folder at
//! compile time and does not notice new files by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
