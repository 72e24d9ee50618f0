//! The `chain` fuzz target: its logic is `vd_tests::fuzzing::chain`, which CI compiles and runs on
//! every file of `fuzz/regressions/chain/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::chain(data));
