//! Helpers shared by backend-vhdx's integration tests that run on an in-memory file system:
//! vd-core's crash-test helpers, which every format with differencing images uses.

pub use vd_core::testing::crash::{assert_checks_clean, open_rw};
