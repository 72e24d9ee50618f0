//! Reading an open image: each request is mapped block by block, under one layout snapshot,
//! to file ranges, zeros or "the parent" (through the sector bitmap for partially present
//! blocks), coalescing contiguous file ranges into one read.

use vd_core::{Error, ErrorKind, Extent, MappedExtent, Mapping, Result, check_range, push_extent};

use crate::bat::{BlockState, Layout};
use crate::engine::Engine;
use crate::error::io_err;

/// Where the bytes of a range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    File(u64),
    Zero,
    Parent,
}

impl Engine {
    /// Calls `f(disk_offset, length, source)` for the runs of `[offset, offset + len)`,
    /// neighbouring runs of one source merged.
    ///
    /// # Errors
    /// `OutOfRange` for a range outside the disk; what the BAT and `f` return.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "check_range at the top: offset <= pos < end = offset + len <= virtual_size \
                  <= 2^46, so disk offsets and run lengths cannot overflow; block_size (>= 1 MiB) \
                  and sector_size (512 or 4096) are never zero (Layout::from_parts); within < \
                  block_size and n <= block_size - within; a present block's file offset plus \
                  the part of it inside the disk is at most the file length (check_block), so \
                  file + within + n and merged file runs cannot overflow; bitmap_runs gives \
                  s + c <= last <= sectors_per_block"
    )]
    fn resolve(
        &self,
        layout: &Layout,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Source) -> Result<()>,
    ) -> Result<()> {
        check_range(offset, len, layout.virtual_size)?;
        let mut pending: Option<(u64, u64, Source)> = None;
        let mut emit = |off: u64,
                        n: u64,
                        src: Source,
                        f: &mut dyn FnMut(u64, u64, Source) -> Result<()>|
         -> Result<()> {
            if let Some((po, pn, ps)) = pending {
                let joins = match (ps, src) {
                    (Source::File(a), Source::File(b)) => a + pn == b,
                    (a, b) => a == b,
                };
                if joins && po + pn == off {
                    pending = Some((po, pn + n, ps));
                    return Ok(());
                }
                f(po, pn, ps)?;
            }
            pending = Some((off, n, src));
            Ok(())
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / layout.block_size;
            let within = pos % layout.block_size;
            let n = (layout.block_size - within).min(end - pos);
            match self.bat.block_in(layout, block)? {
                BlockState::NotPresent => {
                    emit(
                        pos,
                        n,
                        if layout.has_parent {
                            Source::Parent
                        } else {
                            Source::Zero
                        },
                        &mut f,
                    )?;
                }
                BlockState::Zero => emit(pos, n, Source::Zero, &mut f)?,
                BlockState::Full(file) => emit(pos, n, Source::File(file + within), &mut f)?,
                BlockState::Partial(file) => {
                    let ss = layout.sector_size;
                    let first = within / ss;
                    let last = (within + n).div_ceil(ss);
                    let block_start = block * layout.block_size;
                    let mut runs = Vec::new();
                    self.bat
                        .bitmap_runs(layout, block, first, last - first, |s, c, present| {
                            runs.push((s, c, present));
                        })?;
                    for (s, c, present) in runs {
                        let a = (block_start + s * ss).max(pos);
                        let b = (block_start + (s + c) * ss).min(pos + n);
                        if b > a {
                            let src = if present {
                                Source::File(file + (a - block_start))
                            } else {
                                Source::Parent
                            };
                            emit(a, b - a, src, &mut f)?;
                        }
                    }
                }
            }
            pos += n;
        }
        if let Some((po, pn, ps)) = pending {
            f(po, pn, ps)?;
        }
        Ok(())
    }

    /// Reads `buf` at `offset`: the request is resolved under one layout snapshot and each run
    /// read as soon as it is known, holding the layout (no block moves meanwhile) but no other
    /// lock during the read. Parent ranges read as zeros.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // This thread's shard: a lock word no other core writes (see the engine's locks).
        let _hold = self.read_holds.read();
        self.read_held(offset, buf)
    }

    /// [`read`](Self::read) for a caller that keeps blocks in place itself (one holding
    /// [`relocate`](Self::relocate), like a shrinking resize).
    pub(crate) fn read_held(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let layout = self.bat.layout();
        check_range(offset, buf.len() as u64, layout.virtual_size)?;
        self.resolve(&layout, offset, buf.len() as u64, |off, n, src| {
            let range = off
                .checked_sub(offset)
                .and_then(|a| usize::try_from(a).ok())
                .zip(usize::try_from(n).ok())
                .and_then(|(a, n)| Some(a..a.checked_add(n)?));
            let Some(part) = range.and_then(|r| buf.get_mut(r)) else {
                return Err(Error::new(ErrorKind::Corrupt, "internal mapping error"));
            };
            match src {
                Source::File(file) => self
                    .storage
                    .read_exact_at(file, part)
                    .map_err(|e| io_err("read failed", e).with_offset(file)),
                Source::Zero | Source::Parent => {
                    part.fill(0);
                    Ok(())
                }
            }
        })
    }

    /// `map_file` without file offsets, neighbouring runs of one kind merged.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "map_file's extents lie inside [offset, offset + len), which check_range bounds \
                  by the virtual size (at most 2^46)"
    )]
    pub(crate) fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for e in self.map_file(offset, len)? {
            let e = e.extent();
            match out.last_mut() {
                Some(last) if last.kind == e.kind && last.offset + last.length == e.offset => {
                    last.length += e.length;
                }
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// Where each run of `[offset, offset + len)` lives: data at its file offset (none while a
    /// log replayed in memory lies over the file), zeros, or unallocated (the parent's).
    pub(crate) fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        let _hold = self.relocation.hold();
        let layout = self.bat.layout();
        check_range(offset, len, layout.virtual_size)?;
        let mut out: Vec<MappedExtent> = Vec::new();
        self.resolve(&layout, offset, len, |off, n, src| {
            let mapping = match src {
                Source::File(file) => Mapping::Data {
                    file_offset: self.plain_file.then_some(file),
                },
                Source::Zero => Mapping::Zero,
                Source::Parent => Mapping::Unallocated,
            };
            push_extent(
                &mut out,
                MappedExtent {
                    offset: off,
                    length: n,
                    mapping,
                },
            );
            Ok(())
        })?;
        Ok(out)
    }

    /// A plain read of the image file (never through a log replayed in memory).
    pub(crate) fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        let _hold = self.relocation.hold();
        self.file
            .read_exact_at(file_offset, buf)
            .map_err(|e| io_err("read failed", e).with_offset(file_offset))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use vd_core::{
        CreateParams, Disk, ErrorKind, Extent, Image, ImageFlags, MappedExtent, Mapping,
        MemFileSystem, OpenFlags, Registry, StorageProvider,
    };

    const MIB: u64 = 1 << 20;

    /// `x` as an index (test sizes are small).
    fn us(x: u64) -> usize {
        usize::try_from(x).unwrap()
    }

    fn registry() -> (Arc<MemFileSystem>, Registry) {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        (fs, reg)
    }

    fn create(
        reg: &Registry,
        path: &str,
        flags: ImageFlags,
        parent: Option<(&Path, &dyn Image)>,
    ) -> Box<dyn Image> {
        let params = CreateParams {
            size: 4 * MIB,
            image_flags: flags,
            options: BTreeMap::from([("block_size".to_string(), "1M".to_string())]),
            ..CreateParams::default()
        };
        reg.create("vhdx", Path::new(path), &params, parent, false)
            .unwrap()
    }

    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8 ^ seed | 1).collect()
    }

    /// Every data run's file bytes are what `read_at` reads there.
    fn check_file_ranges(image: &dyn Image, map: &[MappedExtent]) {
        for e in map {
            if let Mapping::Data {
                file_offset: Some(f),
            } = e.mapping
            {
                let mut via_file = vec![0u8; usize::try_from(e.length).unwrap()];
                let mut via_image = via_file.clone();
                image.read_file_at(f, &mut via_file).unwrap();
                image.read_at(e.offset, &mut via_image).unwrap();
                assert_eq!(via_file, via_image, "run {e:?}");
            }
        }
    }

    #[test]
    fn map_file_of_a_differencing_image_follows_the_sector_bitmap() {
        let (_fs, reg) = registry();
        let base = create(&reg, "/base.vhdx", ImageFlags::empty(), None);
        base.write_at(0, &pattern(4 * MIB, 0x10)).unwrap();
        base.close(false).unwrap();
        let base = reg
            .open(Path::new("/base.vhdx"), OpenFlags::READ_ONLY)
            .unwrap();
        let child = create(
            &reg,
            "/child.vhdx",
            ImageFlags::DIFF,
            Some((Path::new("/base.vhdx"), base.as_ref())),
        );
        drop(base);
        // Block 0: sectors 1..3 and 8 present (partially present); block 2 whole (fully
        // present); blocks 1 and 3 not present.
        child.write_at(512, &pattern(1024, 0x20)).unwrap();
        child.write_at(4096, &pattern(512, 0x30)).unwrap();
        child.write_at(2 * MIB, &pattern(MIB, 0x40)).unwrap();
        let m = child.map_file(0, 4 * MIB).unwrap();
        let shape: Vec<(u64, u64, bool)> = m
            .iter()
            .map(|e| {
                (
                    e.offset,
                    e.length,
                    matches!(e.mapping, Mapping::Data { .. }),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 512, false),
                (512, 1024, true),
                (1536, 4096 - 1536, false),
                (4096, 512, true),
                (4608, 2 * MIB - 4608, false),
                (2 * MIB, MIB, true),
                (3 * MIB, MIB, false),
            ]
        );
        for e in &m {
            match e.mapping {
                Mapping::Data { file_offset } => assert!(file_offset.is_some(), "{e:?}"),
                other => assert_eq!(other, Mapping::Unallocated, "{e:?}"),
            }
        }
        // Both runs of block 0 lie in one payload block, at their offsets within it.
        let off = |i: usize| match m[i].mapping {
            Mapping::Data { file_offset } => file_offset.unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(off(3) - off(1), 4096 - 512);
        assert_eq!((off(1) - 512) % MIB, 0, "block 0 starts on a MiB boundary");
        check_file_ranges(child.as_ref(), &m);
        // A request inside one run maps to the matching part of it.
        assert_eq!(
            child.map_file(1024, 256).unwrap(),
            vec![MappedExtent {
                offset: 1024,
                length: 256,
                mapping: Mapping::Data {
                    file_offset: Some(off(1) + 512)
                }
            }]
        );
        // `map` is map_file without offsets.
        let kinds: Vec<Extent> = child.map(0, 4 * MIB).unwrap();
        assert_eq!(kinds.len(), m.len());
        assert!(kinds.iter().zip(&m).all(|(k, e)| *k == e.extent()));
        child.close(false).unwrap();
        // Through the chain: the child's sectors, the base elsewhere.
        let disk = Disk::from_layers(vec![
            reg.open(Path::new("/child.vhdx"), OpenFlags::READ_ONLY)
                .unwrap(),
            reg.open(Path::new("/base.vhdx"), OpenFlags::READ_ONLY)
                .unwrap(),
        ])
        .unwrap();
        let mut want = pattern(4 * MIB, 0x10);
        want[512..1536].copy_from_slice(&pattern(1024, 0x20));
        want[4096..4608].copy_from_slice(&pattern(512, 0x30));
        want[us(2 * MIB)..us(3 * MIB)].copy_from_slice(&pattern(MIB, 0x40));
        let mut got = vec![0u8; us(4 * MIB)];
        disk.read_at(0, &mut got).unwrap();
        assert!(got == want, "chain read differs");
        for (o, l) in [(0, 4096), (300, 5000), (MIB - 100, 200), (3 * MIB - 7, 14)] {
            let mut part = vec![0u8; l];
            disk.read_at(o, &mut part).unwrap();
            assert!(part == want[us(o)..us(o) + l], "{o:#x}+{l:#x}");
        }
    }

    #[test]
    fn map_file_of_fixed_and_dynamic_images() {
        let (_fs, reg) = registry();
        let fixed = create(&reg, "/fixed.vhdx", ImageFlags::FIXED, None);
        let m = fixed.map_file(0, 4 * MIB).unwrap();
        let mut covered = 0;
        for e in &m {
            assert!(
                matches!(
                    e.mapping,
                    Mapping::Data {
                        file_offset: Some(_)
                    }
                ),
                "{e:?}"
            );
            covered += e.length;
        }
        assert_eq!(covered, 4 * MIB);
        fixed.write_at(MIB + 5, &pattern(3000, 0x50)).unwrap();
        check_file_ranges(fixed.as_ref(), &fixed.map_file(0, 4 * MIB).unwrap());
        // A dynamic image: unwritten blocks read as zeros (no parent), written ones at offsets.
        let dynamic = create(&reg, "/dyn.vhdx", ImageFlags::empty(), None);
        dynamic.write_at(3 * MIB, &pattern(MIB, 0x60)).unwrap();
        let m = dynamic.map_file(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].mapping, Mapping::Zero);
        assert!(matches!(
            m[1].mapping,
            Mapping::Data {
                file_offset: Some(_)
            }
        ));
        check_file_ranges(dynamic.as_ref(), &m);
        assert_eq!(
            dynamic.map_file(4 * MIB, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn a_log_replayed_in_memory_hides_file_offsets() {
        let (fs, reg) = registry();
        let image = create(&reg, "/dirty.vhdx", ImageFlags::empty(), None);
        image.write_at(MIB, &pattern(MIB, 0x70)).unwrap();
        image.flush().unwrap();
        // Gone without closing: the header still names the session's log.
        drop(image);
        assert!(fs.exists(Path::new("/dirty.vhdx")));
        let image = reg
            .open(Path::new("/dirty.vhdx"), OpenFlags::READ_ONLY)
            .unwrap();
        let m = image.map_file(0, 4 * MIB).unwrap();
        assert!(
            m.iter()
                .any(|e| e.mapping == Mapping::Data { file_offset: None }),
            "{m:?}"
        );
        assert!(
            m.iter().all(|e| !matches!(
                e.mapping,
                Mapping::Data {
                    file_offset: Some(_)
                }
            )),
            "{m:?}"
        );
        // Readers fall back to read_at, and read what the log says.
        let disk = Disk::from_layers(vec![image]).unwrap();
        let mut got = vec![0u8; us(2 * MIB)];
        disk.read_at(0, &mut got).unwrap();
        assert!(got[..us(MIB)].iter().all(|&b| b == 0));
        assert!(got[us(MIB)..] == pattern(MIB, 0x70)[..]);
    }
}
