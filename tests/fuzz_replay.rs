//! Replays every fuzz target's seeds and every crash it ever found (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`), then a few thousand inputs from a fixed pseudo-random
//! sequence, through the same checks libFuzzer runs (`fuzz/src/lib.rs`). The ordinary test run
//! catches a regression without a nightly toolchain; `fuzz/run` does the real fuzzing.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn seeds_and_regressions_pass_every_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for (name, check) in harness::TARGETS {
        for kind in ["seeds", "regressions"] {
            for f in files(&root.join(kind).join(name)) {
                let data = std::fs::read(&f).expect("readable");
                eprintln!("{}", f.display());
                check(&data);
                seen += 1;
            }
        }
    }
    assert!(seen > 50, "only {seen} seed files: fuzz/seeds is missing");
}

/// xorshift64*: the same inputs on every run.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn structured_machines_keep_their_invariants_on_fixed_noise() {
    for seed in 0..1500u64 {
        let data = noise(seed, 16 + (seed as usize % 400));
        harness::hub_machine(&data);
        harness::sn_machine(&data);
    }
}

#[test]
fn decoders_survive_fixed_noise() {
    for seed in 0..3000u64 {
        let data = noise(seed, seed as usize % 300);
        for (name, check) in harness::TARGETS {
            if !name.ends_with("machine") {
                check(&data);
            }
        }
    }
}

/// Debugging aid for a failure of the fixed-noise test: `FUZZ_TARGET=sn_machine cargo test
/// --test fuzz_replay shrink -- --ignored` (with `FUZZ_INPUT=<crash file>` to start from
/// libFuzzer's artifact) writes the smallest failing step sequence it finds to
/// `target/fuzz-shrunk`, ready to become a file in `fuzz/regressions/<target>/`.
#[test]
#[ignore]
fn shrink() {
    let name = std::env::var("FUZZ_TARGET").unwrap_or_else(|_| "hub_machine".into());
    let check = harness::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
        .expect("a target name");
    std::panic::set_hook(Box::new(|_| {}));
    let fails = |d: &[u8]| std::panic::catch_unwind(|| check(d)).is_err();
    // FUZZ_INPUT names a crash file to shrink; otherwise the first failing fixed-noise input.
    let start = match std::env::var("FUZZ_INPUT") {
        Ok(f) => std::fs::read(f).ok(),
        Err(_) => (0..1500u64)
            .map(|seed| noise(seed, 16 + (seed as usize % 400)))
            .find(|d| fails(d)),
    };
    let Some(mut d) = start else {
        return;
    };
    loop {
        let before = d.len();
        let mut i = 0;
        while i + 4 <= d.len() {
            let mut t = d.clone();
            t.drain(i..i + 4);
            if fails(&t) {
                d = t;
            } else {
                i += 4;
            }
        }
        if d.len() == before {
            break;
        }
    }
    let _ = std::panic::take_hook();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-shrunk");
    std::fs::write(&out, &d).expect("write");
    eprintln!("{} bytes in {}", d.len(), out.display());
    check(&d);
}
