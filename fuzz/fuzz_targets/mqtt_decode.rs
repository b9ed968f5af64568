//! libFuzzer entry for `outpost_fuzz::mqtt_decode`; what it checks is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::mqtt_decode(data));
