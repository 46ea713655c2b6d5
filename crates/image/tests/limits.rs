//! The pixel limit is enforced from the header, before the decoder allocates the image.
//!
//! This binary counts the bytes allocated by the test thread through a wrapping global
//! allocator, so it holds this one test only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use visenc_image::{decode_named, ImageError, Limits};

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.with(|a| a.set(a.get() + layout.size()));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated_while<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

#[test]
fn oversized_headers_are_rejected_before_allocating_pixels() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/preprocess/bad");
    for (file, (w, h)) in [
        ("huge_header.png", (100_000, 100_000)),
        ("huge_screen.gif", (65_535, 65_535)),
    ] {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let (result, bytes_allocated) =
            allocated_while(|| decode_named(&bytes, file, &Limits::default()));
        match result {
            Err(ImageError::TooLarge { width, height, .. }) => assert_eq!((width, height), (w, h)),
            other => panic!("{file}: expected TooLarge, got {other:?}"),
        }
        // A decoded image would need 30 GB (PNG) or 12 GB (GIF); the check costs kilobytes.
        assert!(
            bytes_allocated < 1 << 20,
            "{file}: {bytes_allocated} bytes allocated"
        );
        println!("{file}: rejected after {bytes_allocated} bytes of allocation");
    }
}
