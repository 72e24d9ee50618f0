//! Where an image keeps each range of the virtual disk: [`Image::map_file`]'s answer.
//!
//! [`Image::map_file`]: crate::Image::map_file

use serde::Serialize;

use crate::image::{Extent, ExtentKind};

/// Where the bytes of a mapped range live, as far as this one image knows ([`Image::map_file`](crate::Image::map_file)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mapping {
    /// Data stored in this image. `file_offset` is where the range starts in the image file when
    /// it is a plain range of that file (read it with [`Image::read_file_at`](crate::Image::read_file_at), or copy it as a
    /// file range); `None` when the image cannot say (the data is transformed, or held in memory
    /// as after a read-only log replay), and then the range is read with [`Image::read_at`](crate::Image::read_at).
    Data {
        /// Start of the range in the image file, if it is a plain file range.
        file_offset: Option<u64>,
    },
    /// Reads as zeros and is not stored as data in this image.
    Zero,
    /// Not in this image: a differencing image's reads fall through to the parent; in a base
    /// image it reads as zeros.
    Unallocated,
}

impl Mapping {
    /// The [`ExtentKind`] of this mapping (the file offset dropped).
    pub fn kind(self) -> ExtentKind {
        match self {
            Self::Data { .. } => ExtentKind::Data,
            Self::Zero => ExtentKind::Zero,
            Self::Unallocated => ExtentKind::Unallocated,
        }
    }
}

/// A run of the virtual disk with one [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct MappedExtent {
    /// Start in bytes (virtual disk offset).
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where the run's bytes live.
    pub mapping: Mapping,
}

impl MappedExtent {
    /// The run without its file offset.
    pub fn extent(&self) -> Extent {
        Extent {
            offset: self.offset,
            length: self.length,
            kind: self.mapping.kind(),
        }
    }

    /// Whether `next` continues this run: it starts where this one ends, has the same kind,
    /// and, for data, its file range continues this one's (or neither has a file offset).
    pub fn joins(&self, next: &MappedExtent) -> bool {
        if self.offset.checked_add(self.length) != Some(next.offset) {
            return false;
        }
        match (self.mapping, next.mapping) {
            (
                Mapping::Data {
                    file_offset: Some(a),
                },
                Mapping::Data {
                    file_offset: Some(b),
                },
            ) => a.checked_add(self.length) == Some(b),
            (a, b) => a == b,
        }
    }
}

/// Appends `e` to `out`, extending the last run instead when `e` [joins](MappedExtent::joins)
/// it; empty runs are dropped.
pub fn push_extent(out: &mut Vec<MappedExtent>, e: MappedExtent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.joins(&e)
        && let Some(length) = last.length.checked_add(e.length)
    {
        last.length = length;
        return;
    }
    out.push(e);
}

/// Merges adjacent runs that [join](MappedExtent::joins) (same kind, contiguous on the disk,
/// and for data contiguous in the file) and drops empty ones, keeping the order.
pub fn merge_extents(extents: impl IntoIterator<Item = MappedExtent>) -> Vec<MappedExtent> {
    let mut out = Vec::new();
    for e in extents {
        push_extent(&mut out, e);
    }
    out
}

/// What [`Image::map`](crate::Image::map) reports for the runs `map_file` found: their kinds,
/// adjacent runs of one kind merged whatever their file offsets. A backend whose `map_file` is
/// its primary map derives `map` from it with this.
pub fn kind_runs(mapped: impl IntoIterator<Item = MappedExtent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in mapped {
        let e = e.extent();
        match out.last_mut() {
            // Runs of one map tile its range, so their sum fits in u64.
            Some(last) if last.kind == e.kind => {
                last.length = last.length.saturating_add(e.length);
            }
            _ => out.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, length: u64, file: Option<u64>) -> MappedExtent {
        MappedExtent {
            offset,
            length,
            mapping: Mapping::Data { file_offset: file },
        }
    }

    fn of(offset: u64, length: u64, mapping: Mapping) -> MappedExtent {
        MappedExtent {
            offset,
            length,
            mapping,
        }
    }

    #[test]
    fn merge_extents_joins_only_what_continues() {
        // One row per rule: (input, expected).
        let rows: Vec<(Vec<MappedExtent>, Vec<MappedExtent>)> = vec![
            (vec![], vec![]),
            // Contiguous file offsets merge.
            (
                vec![data(0, 10, Some(100)), data(10, 5, Some(110))],
                vec![data(0, 15, Some(100))],
            ),
            // A gap in the file (or a step back) does not.
            (
                vec![data(0, 10, Some(100)), data(10, 5, Some(111))],
                vec![data(0, 10, Some(100)), data(10, 5, Some(111))],
            ),
            (
                vec![data(0, 10, Some(100)), data(10, 5, Some(90))],
                vec![data(0, 10, Some(100)), data(10, 5, Some(90))],
            ),
            // Data without offsets merges with its kind; with and without never mix.
            (
                vec![data(0, 1, None), data(1, 2, None)],
                vec![data(0, 3, None)],
            ),
            (
                vec![data(0, 1, None), data(1, 2, Some(1))],
                vec![data(0, 1, None), data(1, 2, Some(1))],
            ),
            (
                vec![data(0, 1, Some(0)), data(1, 2, None)],
                vec![data(0, 1, Some(0)), data(1, 2, None)],
            ),
            // Zero and unallocated merge with their own kind only.
            (
                vec![
                    of(0, 4, Mapping::Zero),
                    of(4, 4, Mapping::Zero),
                    of(8, 4, Mapping::Unallocated),
                    of(12, 4, Mapping::Unallocated),
                    of(16, 4, Mapping::Zero),
                ],
                vec![
                    of(0, 8, Mapping::Zero),
                    of(8, 8, Mapping::Unallocated),
                    of(16, 4, Mapping::Zero),
                ],
            ),
            // Runs that are not adjacent on the disk stay apart, even with file continuity.
            (
                vec![data(0, 10, Some(100)), data(11, 5, Some(110))],
                vec![data(0, 10, Some(100)), data(11, 5, Some(110))],
            ),
            // Empty runs vanish, and do not block a merge around them.
            (
                vec![
                    of(0, 0, Mapping::Zero),
                    data(0, 4, Some(8)),
                    of(4, 0, Mapping::Zero),
                    data(4, 4, Some(12)),
                ],
                vec![data(0, 8, Some(8))],
            ),
            // Overflow at the ends never merges (and never panics).
            (
                vec![data(0, 10, Some(u64::MAX - 5)), data(10, 5, Some(4))],
                vec![data(0, 10, Some(u64::MAX - 5)), data(10, 5, Some(4))],
            ),
            (
                vec![of(u64::MAX - 1, 1, Mapping::Zero), of(0, 1, Mapping::Zero)],
                vec![of(u64::MAX - 1, 1, Mapping::Zero), of(0, 1, Mapping::Zero)],
            ),
        ];
        for (i, (input, want)) in rows.into_iter().enumerate() {
            assert_eq!(merge_extents(input), want, "row {i}");
        }
    }

    #[test]
    fn joins_is_the_merge_rule() {
        assert!(data(0, 512, Some(4096)).joins(&data(512, 1, Some(4608))));
        assert!(!data(0, 512, Some(4096)).joins(&data(512, 1, Some(4609))));
        assert!(!data(0, 512, Some(4096)).joins(&of(512, 1, Mapping::Zero)));
        assert!(!of(0, 512, Mapping::Zero).joins(&of(513, 1, Mapping::Zero)));
    }

    #[test]
    fn extent_drops_the_file_offset() {
        assert_eq!(
            data(7, 9, Some(3)).extent(),
            Extent {
                offset: 7,
                length: 9,
                kind: ExtentKind::Data
            }
        );
        assert_eq!(Mapping::Unallocated.kind(), ExtentKind::Unallocated);
        assert_eq!(Mapping::Zero.kind(), ExtentKind::Zero);
        assert_eq!(
            serde_json::to_value(data(0, 1, Some(2)).mapping).unwrap(),
            serde_json::json!({"kind": "data", "file_offset": 2})
        );
    }
}
