//! libFuzzer entry for `outpost_fuzz::frames`; what it checks is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::frames(data));
