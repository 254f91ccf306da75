//! Compiles `proto/` with protox (pure Rust, no `protoc`) and prost-build.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "rumormill/v1/envelope.proto",
        "rumormill/v1/membership.proto",
        "rumormill/v1/dissemination.proto",
        "rumormill/v1/events.proto",
        "rumormill/v1/reserved.proto",
        "rumormill/v1/racks.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = match protox::compile(files, [&root]) {
        Ok(fds) => fds,
        Err(e) => panic!("proto/ does not compile: {e:?}"),
    };
    // Events are the largest message: boxed, they keep every envelope small.
    if let Err(e) = prost_build::Config::new()
        .boxed(".rumormill.v1.Envelope.body.event")
        .boxed(".rumormill.v1.Envelope.body.raft")
        .compile_fds(fds)
    {
        panic!("prost-build failed: {e}");
    }
}
