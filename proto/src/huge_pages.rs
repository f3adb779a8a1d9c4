//! Transparent huge pages for multi-megabyte buffers. A loader cuts every sample of a time
//! block at once: its writes land all over a gigabyte of sample buffers, and with 4 KiB pages
//! the translations of those pages miss the TLB and the first touch of each page is a fault
//! (docs/performance.md, "Huge pages for sample buffers"). Backed by 2 MiB pages, the same buffers
//! cost 512× fewer faults and TLB entries. Only these buffers are advised: the process's other
//! memory keeps 4 KiB pages, so small allocations do not make whole 2 MiB regions resident.

/// Bytes of a transparent huge page (x86-64, and aarch64 with 4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole huge pages inside `buffer`'s allocation (its capacity, not
/// only its length) with transparent huge pages, where the system allows them (`madvise` or
/// `always` in `/sys/kernel/mm/transparent_hugepage/enabled`). Call it before the buffer is
/// written: pages already faulted in are left for the kernel to collapse later, if at all.
/// Buffers too small to hold a whole aligned huge page are left alone. Returns the bytes
/// advised.
pub fn advise<T>(buffer: &Vec<T>) -> usize {
    let start = buffer.as_ptr() as usize;
    let end = start + buffer.capacity() * size_of::<T>();
    let (first, last) = (
        start.next_multiple_of(HUGE_PAGE),
        end / HUGE_PAGE * HUGE_PAGE,
    );
    if last <= first {
        return 0;
    }
    if madvise_huge(first, last - first) {
        last - first
    } else {
        0
    }
}

#[cfg(target_os = "linux")]
fn madvise_huge(addr: usize, len: usize) -> bool {
    // SAFETY: `addr..addr + len` lies inside one live allocation that the caller's `Vec` owns
    // (page-aligned, as madvise requires). MADV_HUGEPAGE is advice about how to back those
    // pages: it changes neither their contents nor whether they are mapped, so no reference
    // to them is invalidated. A kernel without THP answers EINVAL, which is ignored.
    #[allow(unsafe_code)]
    let status = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn madvise_huge(_addr: usize, _len: usize) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The system's THP mode, `[madvise]` or `[always]` when huge pages can be advised.
    fn thp_mode() -> String {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default()
    }

    /// `AnonHugePages` of the mapping holding `addr`, in KiB.
    fn anon_huge_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(rest) = line.strip_prefix("AnonHugePages:") {
                return rest.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn an_advised_buffer_is_backed_by_huge_pages_once_written() {
        let mode = thp_mode();
        if !(mode.contains("[madvise]") || mode.contains("[always]")) {
            eprintln!("transparent huge pages are off here ({mode:?}): nothing to check");
            return;
        }
        // 16 MiB: at least seven whole aligned huge pages wherever the allocator puts it.
        let mut buffer = vec![0.0f32; 4 << 20];
        let advised = advise(&buffer);
        assert!(advised >= 7 * HUGE_PAGE, "advised {advised} bytes");
        for (i, v) in buffer.iter_mut().enumerate() {
            *v = i as f32;
        }
        let first = (buffer.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let huge = anon_huge_kib(first);
        assert!(
            huge >= 2048,
            "{huge} KiB of huge pages where {advised} bytes were advised"
        );
        assert_eq!(buffer[(4 << 20) - 1], ((4 << 20) - 1) as f32);
    }

    #[test]
    fn buffers_without_a_whole_huge_page_are_left_alone() {
        assert_eq!(advise(&Vec::<f32>::new()), 0);
        assert_eq!(advise(&vec![0.0f32; 1000]), 0);
        assert_eq!(advise(&vec![0u8; 4000]), 0);
    }
}
