//! libFuzzer entry for `outpost_fuzz::hub_machine`; what it checks is documented there.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::hub_machine(data));
