//! libFuzzer entry for `outpost_fuzz::sn_machine`; what it checks is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::sn_machine(data));
