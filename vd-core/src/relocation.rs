//! Keeping data in place while it is read: the lock between readers that use file offsets and
//! the operations that move or cut data in an image file (compaction, shrinking, moving a
//! table).
//!
//! A read maps a range to file offsets and then reads those offsets, possibly in two calls
//! ([`Image::map_file`](crate::Image::map_file), then
//! [`Image::read_file_at`](crate::Image::read_file_at)). If a block moved in between, the read
//! would return whatever now lies at the old offset: another block's data, or nothing once the
//! file is truncated. Readers therefore hold the image's layout ([`Image::hold_layout`]) for
//! the whole request, and a backend moves data only under [`RelocationLock::relocate`], which
//! waits for every hold to end.
//!
//! [`Image::hold_layout`]: crate::Image::hold_layout

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A shared hold on an image's data placement: while it lives, the image moves no data.
///
/// Holds nest: a reader may take one while it already has one (the lock is taken recursively,
/// so a waiting mover cannot deadlock a reader that holds it twice).
#[must_use = "the layout is held only while the hold lives"]
pub struct LayoutHold<'a>(Option<RwLockReadGuard<'a, ()>>);

impl LayoutHold<'_> {
    /// A hold that holds nothing: for images that never move data.
    pub fn none() -> Self {
        Self(None)
    }

    /// Whether this hold keeps a lock (false for [`none`](Self::none)).
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for LayoutHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LayoutHold").field(&self.is_held()).finish()
    }
}

/// The lock a backend keeps when it can move data in its file: readers take shared
/// [`hold`](Self::hold)s, and the operation that moves data takes
/// [`relocate`](Self::relocate), exclusive.
#[derive(Debug, Default)]
pub struct RelocationLock(RwLock<()>);

impl RelocationLock {
    /// A new lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shared hold for one read request (recursive: a reader may already hold one).
    pub fn hold(&self) -> LayoutHold<'_> {
        LayoutHold(Some(self.0.read_recursive()))
    }

    /// Exclusive: waits until no read holds the layout, and keeps new reads out until the
    /// guard is dropped. Take it while nothing else of the image is read-locked by this thread.
    pub fn relocate(&self) -> RwLockWriteGuard<'_, ()> {
        self.0.write()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_mover_waits_for_every_hold() {
        let lock = RelocationLock::new();
        let moved = AtomicBool::new(false);
        std::thread::scope(|s| {
            let hold = lock.hold();
            let nested = lock.hold();
            assert!(hold.is_held() && nested.is_held());
            s.spawn(|| {
                let _g = lock.relocate();
                moved.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !moved.load(Ordering::SeqCst),
                "moved while a read held the layout"
            );
            // A nested hold while the mover waits does not deadlock.
            let third = lock.hold();
            drop((hold, nested, third));
        });
        assert!(moved.load(Ordering::SeqCst));
        assert!(!LayoutHold::none().is_held());
    }
}
