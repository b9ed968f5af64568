//! libFuzzer entry for `outpost_fuzz::config`; what it checks is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::config(data));
