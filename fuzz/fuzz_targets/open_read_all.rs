//! The `open_read_all` fuzz target: its logic is `vd_tests::fuzzing::open_read_all`, which CI compiles and runs on
//! every file of `fuzz/regressions/open_read_all/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vd_tests::fuzzing::open_read_all(data));
