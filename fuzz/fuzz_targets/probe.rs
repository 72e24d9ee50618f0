//! The `probe` fuzz target: its logic is `vd_tests::fuzzing::probe`, which CI compiles and runs on
//! every file of `fuzz/regressions/probe/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::probe(data));
