//! Replays the committed fuzz seed corpus (and random inputs) through the fuzz entry points,
//! so every decoder and the TURN core are exercised on stable in the normal test run. The
//! coverage-guided runs themselves use `cargo fuzz` in `relay/fuzz` where the toolchain allows.

use proptest::prelude::*;
use std::path::Path;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        out.push(std::fs::read(e.unwrap().path()).unwrap());
    }
    assert!(!out.is_empty(), "empty corpus for {target}");
    out
}

#[test]
fn stun_decode_corpus() {
    for c in corpus("stun_decode") {
        actrix_proto::fuzzing::stun_decode(&c);
    }
}

#[test]
fn turn_unauthenticated_corpus() {
    for c in corpus("turn_unauthenticated") {
        actrix_proto::fuzzing::turn_core(&c, false);
    }
}

#[test]
fn turn_authenticated_corpus() {
    let mut total = actrix_proto::fuzzing::Outcome::default();
    for c in corpus("turn_authenticated") {
        let o = actrix_proto::fuzzing::turn_core(&c, true);
        total.successes += o.successes;
        total.relayed += o.relayed;
    }
    // The harness must get past authentication: allocations, permissions and channel binds
    // succeed, and ChannelData is relayed.
    assert!(total.successes >= 8, "{total:?}");
    assert!(total.relayed >= 1, "{total:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_inputs_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), auth in any::<bool>()) {
        actrix_proto::fuzzing::stun_decode(&data);
        actrix_proto::fuzzing::turn_core(&data, auth);
    }
}
