//! Signaling envelope decoding and dispatch through the sans-IO hub, driven by a script: see
//! `actrix_signaling::fuzzing` for the script format and the invariants checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    actrix_signaling::fuzzing::script(data);
});
