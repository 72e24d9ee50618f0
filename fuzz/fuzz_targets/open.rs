//! The `open` fuzz target: its logic is `vd_tests::fuzzing::open`, which CI compiles and runs on
//! every file of `fuzz/regressions/open/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::open(data));
