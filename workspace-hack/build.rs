// A build script, so that cargo builds this crate's build-dependencies (the host-side crates
// whose features hakari unifies).
fn main() {}
