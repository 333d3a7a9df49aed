#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    actrix_proto::fuzzing::stun_decode(data);
});
