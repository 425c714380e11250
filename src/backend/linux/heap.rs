//! Giving the C allocator's freed memory back to the kernel.
//!
//! glibc keeps what a thread freed in that thread's arena for its next allocations; a
//! burst of small allocations that is freed all at once (loading the TAP guard parses the
//! kernel's BTF, 5.5 MB of it here, into many small allocations on a blocking thread)
//! then stays resident for the broker's whole life: 15 MiB of a 23 MiB RSS right after
//! start, before [`release_freed`] (docs/benchmarks.md, the N-clients rows).

/// Returns the free pages of every malloc arena to the kernel. Cheap for a heap the size
/// of the broker's (a walk of its free lists); called after a one-off burst, never on an
/// acquire's path.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the arenas' own locks and touches only memory malloc
    // owns and has freed; it has no preconditions on its caller.
    unsafe {
        libc::malloc_trim(0);
    }
}
