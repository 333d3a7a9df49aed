//! Replays the committed seed corpus of the `signaling_envelope` fuzz target (and random
//! scripts) through the harness on stable, so the hub's invariants are checked in every test
//! run; the coverage-guided runs use `cargo fuzz` in `relay/fuzz` (`scripts/fuzz.sh`).

// Tests drive real servers in real time; the purity rule of clippy.toml is the hub's.
#![allow(clippy::disallowed_methods)]

use proptest::prelude::*;
use std::path::Path;

#[test]
fn signaling_envelope_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/fuzz/corpus/signaling_envelope");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        actrix_signaling::fuzzing::script(&std::fs::read(e.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 5, "the seed corpus has {n} files");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_scripts(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        actrix_signaling::fuzzing::script(&data);
    }
}
