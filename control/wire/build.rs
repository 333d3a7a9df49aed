//! Generates the message types from the vendored `.proto` files with protox (a protobuf
//! compiler written in Rust, so the build needs no `protoc`) and prost-build, and the
//! `ks.v1.KeyServer` service with tonic-prost-build. Each actr protocol version goes to its own
//! directory because both define the packages `actr`, `signaling` and `webrtc`.

use std::path::{Path, PathBuf};

fn compile(dir: &Path, files: &[&str]) -> prost_types::FileDescriptorSet {
    match protox::compile(files, [dir]) {
        Ok(fds) => fds,
        Err(e) => panic!("{}: {e:?}", dir.display()),
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    for (dir, sub) in [("actr-0.1.7", "v1"), ("actr-0.4.21", "v4")] {
        let fds = compile(
            &root.join(dir),
            &["actr.proto", "signaling.proto", "webrtc.proto"],
        );
        let target = out.join(sub);
        std::fs::create_dir_all(&target).expect("create the output directory");
        let mut config = prost_build::Config::new();
        config.out_dir(&target);
        if sub == "v1" {
            // 0.4's SessionDescription is 0.1.7's plus one optional field (sdp_exchange_id);
            // using it for both keeps that field through the hub, which translates 0.4
            // envelopes to the 0.1.7 types (see lib.rs).
            config.extern_path(
                ".webrtc.SessionDescription",
                "crate::v4::webrtc::SessionDescription",
            );
        }
        config
            .compile_fds(fds)
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
    let fds = compile(&root.join("actrix-ks-v1"), &["keyserver.proto"]);
    let target = out.join("ks");
    std::fs::create_dir_all(&target).expect("create the output directory");
    tonic_prost_build::configure()
        .out_dir(&target)
        .build_transport(false)
        .compile_fds(fds)
        .expect("ks.v1");
    println!("cargo:rerun-if-changed=proto");
    for entry in std::fs::read_dir(&root).expect("proto directory").flatten() {
        if let Ok(files) = std::fs::read_dir(entry.path()) {
            for f in files.flatten() {
                println!("cargo:rerun-if-changed={}", f.path().display());
            }
        }
    }
}
