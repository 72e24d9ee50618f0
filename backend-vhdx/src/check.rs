//! Checking an open image: every BAT entry (states, reserved bits, offsets inside the file and
//! outside the other structures, no two blocks sharing space), the log state, and the tolerated
//! deviations found at open.

use vd_core::{CheckReport, Finding, Result, Severity, error_chain};

use crate::bat::BlockState;
use crate::engine::Engine;

impl Engine {
    /// Checks every BAT entry and reports the log state and the warnings of the open. A dirty
    /// log counts as repaired when the image was opened read-write (the open replayed it).
    ///
    /// A truncated file is an error per missing structure and per missing block, and is never
    /// repaired: nothing is written, and the file is not extended to make missing data read as
    /// zeros.
    pub(crate) fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for w in &self.warnings {
            let truncated = self.truncated.contains(w);
            report.findings.push(Finding {
                severity: if truncated {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                message: w.clone(),
                repaired: false,
            });
        }
        if self.log.dirty {
            report.findings.push(Finding {
                severity: Severity::Error,
                message: format!(
                    "the log holds {} entries that had not been replayed",
                    self.log.entries
                ),
                repaired: self.log.replay == "file",
            });
        }
        let layout = self.bat.layout();
        let mut used: Vec<(u64, u64, String)> = Vec::new();
        for b in 0..layout.data_blocks {
            match self.bat.block(b) {
                Ok(BlockState::Full(off) | BlockState::Partial(off)) => {
                    used.push((off, layout.block_size, format!("payload block {b}")));
                }
                Ok(_) => {}
                Err(e) => report.findings.push(Finding {
                    severity: Severity::Error,
                    message: error_chain(&e),
                    repaired: false,
                }),
            }
        }
        for c in 0..layout.data_blocks.div_ceil(layout.chunk_ratio) {
            if layout.has_parent {
                match self.bat.bitmap(c) {
                    Ok(Some(off)) => {
                        used.push((off, crate::format::MIB, format!("sector bitmap {c}")));
                    }
                    Ok(None) => {}
                    Err(e) => report.findings.push(Finding {
                        severity: Severity::Error,
                        message: error_chain(&e),
                        repaired: false,
                    }),
                }
            } else if self
                .bat
                .entry(layout.bitmap_index(c))
                .is_ok_and(|e| e != crate::format::BatEntry::EMPTY)
                && layout.bitmap_index(c) < layout.entries
            {
                report.findings.push(Finding {
                    severity: Severity::Warning,
                    message: format!(
                        "sector bitmap entry of chunk {c} is set in an image without a parent"
                    ),
                    repaired: false,
                });
            }
        }
        used.sort_by_key(|u| u.0);
        for w in used.windows(2) {
            if let [a, b] = w
                && a.0 + a.1 > b.0
            {
                report.findings.push(Finding {
                    severity: Severity::Error,
                    message: format!("{} at {:#x} overlaps {} at {:#x}", a.2, a.0, b.2, b.0),
                    repaired: false,
                });
            }
        }
        Ok(report)
    }
}
