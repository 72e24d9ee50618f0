//! Data safety through the library, on real files: image locks taken by `FileStorage` for every
//! layer of a chain, staged creation that leaves the destination alone until it succeeds, and
//! chains that cannot contain themselves.

use std::path::{Path, PathBuf};

use backend_raw as _;
use backend_vhdx as _;
use vd_core::{CreateParams, Disk, DiskOptions, ErrorKind, ImageFlags, OpenFlags, Registry};

fn params(size: u64) -> CreateParams {
    CreateParams {
        size,
        ..CreateParams::default()
    }
}

fn new_vhdx(registry: &Registry, path: &Path, size: u64, fill: u8) {
    let img = registry
        .create("vhdx", path, &params(size), None, false)
        .unwrap();
    img.write_at(0, &vec![fill; 1 << 20]).unwrap();
    img.close(false).unwrap();
}

fn new_child(registry: &Registry, parent: &Path, child: &Path) {
    let p = registry.open(parent, OpenFlags::READ_ONLY).unwrap();
    let c = registry
        .create(
            "vhdx",
            child,
            &CreateParams {
                size: p.size(),
                image_flags: ImageFlags::DIFF,
                ..CreateParams::default()
            },
            Some((parent, p.as_ref())),
            false,
        )
        .unwrap();
    c.close(false).unwrap();
}

/// `p.vhdx` (8 MiB, its first MiB 0x5a) and its differencing child `c.vhdx` in `dir`.
fn parent_and_child(registry: &Registry, dir: &Path) -> (PathBuf, PathBuf) {
    let parent = dir.join("p.vhdx");
    let child = dir.join("c.vhdx");
    new_vhdx(registry, &parent, 8 << 20, 0x5a);
    new_child(registry, &parent, &child);
    (parent, child)
}

fn kind<T>(r: vd_core::Result<T>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

#[test]
fn writers_exclude_writers_and_readers_but_shared_readers_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.vhdx");
    let registry = Registry::builtin();
    new_vhdx(&registry, &path, 8 << 20, 0x11);

    let writer = registry.open(&path, OpenFlags::empty()).unwrap();
    let e = registry.open(&path, OpenFlags::empty()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked);
    let text = vd_core::error_chain(&e);
    assert!(
        text.contains("a.vhdx") && text.contains("another process"),
        "{text}"
    );
    assert_eq!(
        kind(registry.open(&path, OpenFlags::READ_ONLY)),
        ErrorKind::Locked
    );
    assert_eq!(kind(registry.probe(&path)), ErrorKind::Locked);
    let shared = registry
        .open(&path, OpenFlags::READ_ONLY | OpenFlags::FORCE_SHARE)
        .unwrap();
    let mut b = vec![0u8; 4096];
    shared.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    assert_eq!(
        kind(registry.open(&path, OpenFlags::FORCE_SHARE)),
        ErrorKind::InvalidArgument,
        "force-share is for read-only opens"
    );
    drop(shared);
    writer.close(false).unwrap();

    // Readers share with readers, and keep writers out until the last one closes.
    let r1 = registry.open(&path, OpenFlags::READ_ONLY).unwrap();
    let r2 = registry
        .open_as("vhdx", &path, OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(
        kind(registry.open(&path, OpenFlags::empty())),
        ErrorKind::Locked
    );
    drop(r1);
    assert_eq!(
        kind(registry.open(&path, OpenFlags::empty())),
        ErrorKind::Locked
    );
    drop(r2);
    registry
        .open(&path, OpenFlags::empty())
        .unwrap()
        .close(false)
        .unwrap();
}

#[test]
fn every_layer_of_a_chain_is_locked_for_what_is_done_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("child.vhdx"));
    let registry = Registry::builtin();
    new_vhdx(&registry, &base, 8 << 20, 0x22);
    new_child(&registry, &base, &child);

    // Writing the child reads the parent: the parent is shared with readers, not writers.
    let disk = Disk::open(
        &registry,
        &child,
        &DiskOptions {
            flags: OpenFlags::empty(),
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        kind(registry.open(&base, OpenFlags::empty())),
        ErrorKind::Locked
    );
    registry.open(&base, OpenFlags::READ_ONLY).unwrap();
    disk.close().unwrap();

    // Commit opens the parent for writing inside the chain, so no second open conflicts.
    let disk = Disk::open(
        &registry,
        &child,
        &DiskOptions {
            writable_parent: true,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        kind(registry.open(&base, OpenFlags::READ_ONLY)),
        ErrorKind::Locked
    );
    let parent = &disk.layers()[1];
    parent.write_at(0, &[0x33; 4096]).unwrap();
    assert!(
        disk.layers()[0].write_at(0, &[1; 4096]).is_err(),
        "the child is read-only"
    );
    disk.close().unwrap();
}

#[test]
fn a_staged_image_replaces_its_destination_only_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.vhdx");
    std::fs::write(&dst, b"old").unwrap();
    let registry = Registry::builtin();

    let staged = registry
        .create_staged("vhdx", &dst, &params(4 << 20), None)
        .unwrap();
    staged.image().write_at(0, &[9; 4096]).unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    drop(staged);
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp removed"
    );

    let staged = registry
        .create_staged("vhdx", &dst, &params(4 << 20), None)
        .unwrap();
    staged.image().write_at(0, &[9; 4096]).unwrap();
    staged.commit().unwrap();
    let img = registry.open(&dst, OpenFlags::READ_ONLY).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at(0, &mut b).unwrap();
    assert_eq!(b, vec![9; 4096]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_new_image_cannot_be_its_own_parent_and_a_hard_linked_loop_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let registry = Registry::builtin();
    new_vhdx(&registry, &base, 8 << 20, 0x44);
    let link = dir.path().join("link.vhdx");
    std::fs::hard_link(&base, &link).unwrap();
    let before = std::fs::read(&base).unwrap();
    let parent = registry.open(&base, OpenFlags::READ_ONLY).unwrap();
    let diff = CreateParams {
        size: 8 << 20,
        image_flags: ImageFlags::DIFF,
        ..CreateParams::default()
    };
    for target in [&base, &link] {
        let e = registry
            .create_staged("vhdx", target, &diff, Some((&base, parent.as_ref())))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("its own parent"), "{e}");
    }
    drop(parent);
    assert_eq!(std::fs::read(&base).unwrap(), before);

    // A child whose parent locator leads back to itself through a hard link is a loop.
    let child = dir.path().join("child.vhdx");
    new_child(&registry, &base, &child);
    let child_link = dir.path().join("child-link.vhdx");
    std::fs::hard_link(&child, &child_link).unwrap();
    let e = Disk::open(
        &registry,
        &child,
        &DiskOptions {
            parents: vec![child_link],
            ..DiskOptions::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadChain, "{e}");
}

#[test]
fn metadata_edits_keep_children_valid_and_a_data_change_is_a_precise_mismatch() {
    let registry = Registry::builtin();
    let dir = tempfile::tempdir().unwrap();
    let (parent, child) = parent_and_child(&registry, dir.path());
    let read_chain = || {
        let disk = Disk::open(&registry, &child, &DiskOptions::default())?;
        let mut buf = vec![0u8; 4096];
        disk.read_at(0, &mut buf)?;
        Ok::<_, vd_core::Error>(buf)
    };
    let id = |p: &Path| {
        registry
            .open(p, OpenFlags::READ_ONLY)
            .unwrap()
            .modification_uuid()
            .unwrap()
    };
    let before = id(&parent);
    type Edit<'a> = &'a dyn Fn(&dyn vd_core::Image) -> vd_core::Result<()>;
    let edits: [(&str, Edit<'_>); 5] = [
        ("comment", &|i| i.set_comment(Some("base"))),
        ("pchs", &|i| {
            i.set_pchs_geometry(vd_core::Geometry {
                cylinders: 100,
                heads: 16,
                sectors: 63,
            })
        }),
        ("lchs", &|i| {
            i.set_lchs_geometry(vd_core::Geometry {
                cylinders: 100,
                heads: 16,
                sectors: 63,
            })
        }),
        ("uuid", &|i| i.set_uuid(uuid::Uuid::new_v4())),
        ("compact", &|i| i.compact(&mut |_, _| {})),
    ];
    for (what, edit) in edits {
        let img = registry.open(&parent, OpenFlags::empty()).unwrap();
        edit(img.as_ref()).unwrap();
        img.close(false).unwrap();
        assert_eq!(id(&parent), before, "{what} changed the DataWriteGuid");
        assert_eq!(read_chain().unwrap(), vec![0x5a; 4096], "after {what}");
    }

    // A write changes it, and the child then names the parent, both ids and itself.
    let img = registry.open(&parent, OpenFlags::empty()).unwrap();
    img.write_at(0, &[0x11; 4096]).unwrap();
    img.close(false).unwrap();
    let after = id(&parent);
    assert_ne!(after, before);
    let e = read_chain().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ParentMismatch);
    let m = e.linkage_mismatch().expect("a linkage mismatch");
    assert_eq!((m.found, m.expected), (after, before));
    assert_eq!(
        (m.child.as_path(), m.parent.as_path()),
        (child.as_path(), parent.as_path())
    );
    // Relinking (a metadata edit of the child) makes the chain whole again.
    let c = registry.open(&child, OpenFlags::empty()).unwrap();
    c.set_parent_uuid(after).unwrap();
    c.close(false).unwrap();
    assert_eq!(read_chain().unwrap(), vec![0x11; 4096]);
}

#[test]
fn a_refused_write_into_a_differencing_image_changes_no_byte() {
    let registry = Registry::builtin();
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhdx");
    let child = dir.path().join("c.vhdx");
    new_vhdx(&registry, &parent, 8 << 20, 0x5a);
    let p = registry.open(&parent, OpenFlags::READ_ONLY).unwrap();
    let params = CreateParams {
        size: p.size(),
        image_flags: ImageFlags::DIFF,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    };
    let c = registry
        .create("vhdx", &child, &params, Some((&parent, p.as_ref())), false)
        .unwrap();
    // Block 0 partly present (sectors tracked one by one), block 1 not present.
    c.write_at(0, &[7; 512]).unwrap();
    c.close(false).unwrap();
    drop(p);
    let before = std::fs::read(&child).unwrap();
    let img = registry.open(&child, OpenFlags::empty()).unwrap();
    for (offset, len, what) in [
        (100, 10, "inside a partly present block"),
        (
            (1 << 20) + 100,
            10,
            "inside a block the child does not hold",
        ),
        // Aligned in block 0, unaligned in block 1: block 0 is not written either.
        ((1 << 20) - 512, 600, "across two blocks"),
    ] {
        let e = img.write_at(offset, &vec![1; len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}");
    }
    img.close(false).unwrap();
    assert!(std::fs::read(&child).unwrap() == before, "the file changed");
    let mut buf = vec![0u8; 1024];
    let disk = Disk::open(&registry, &child, &DiskOptions::default()).unwrap();
    disk.read_at((1 << 20) - 512, &mut buf).unwrap();
    // The parent's last 512 bytes of data, then its zeros: nothing of the refused writes.
    assert!(buf[..512].iter().all(|&b| b == 0x5a) && buf[512..].iter().all(|&b| b == 0));
}

#[test]
fn a_file_that_is_not_vhdx_is_never_used_as_a_vhdx_parent() {
    let registry = Registry::builtin();
    let dir = tempfile::tempdir().unwrap();
    let (parent, child) = parent_and_child(&registry, dir.path());
    // The parent overwritten by something else (it probes as raw): refused, not read as data.
    std::fs::write(&parent, vec![0xee; 8 << 20]).unwrap();
    let e = Disk::open(&registry, &child, &DiskOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ParentMismatch, "{e}");
    let text = vd_core::error_chain(&e);
    assert!(
        text.contains(&format!("found at {}", parent.display())),
        "{text}"
    );
    assert!(
        text.contains("is not a VHDX image (it opens as raw)"),
        "{text}"
    );
}
