//! The `write_model` fuzz target: its logic is `vd_tests::fuzzing::write_model`, which CI compiles and runs on
//! every file of `fuzz/regressions/write_model/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::write_model(data));
