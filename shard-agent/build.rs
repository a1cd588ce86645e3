//! `refinery::embed_migrations!` reads `sql/` when this crate compiles, and
//! Cargo does not see a migration file that is new: without this, an
//! incremental build would leave a new migration out of the binary.
fn main() {
    println!("cargo:rerun-if-changed=../sql");
}
