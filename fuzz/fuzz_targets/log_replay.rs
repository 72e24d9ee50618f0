//! The `log_replay` fuzz target: its logic is `vd_tests::fuzzing::log_replay`, which CI compiles and runs on
//! every file of `fuzz/regressions/log_replay/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::log_replay(data));
