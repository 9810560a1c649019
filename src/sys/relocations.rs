//! Letting go of the binary's relocation table once start-up is over.
//!
//! A position-independent executable carries a table of relocations (`.rela.dyn`: here
//! ~300 KiB, about 12,000 entries, mostly the addresses inside vtables and static tables)
//! that the dynamic linker applies once, before `main`. Nothing reads it again, yet the
//! pages it was read through stay mapped, and counted in the daemon's RSS, for its whole
//! life. `MADV_DONTNEED` on them drops them from the page tables: the mapping is private
//! and read-only, so nothing is lost, and a later read would fault the same bytes in again
//! from the file.

#![allow(unsafe_code)]

/// Tags of the dynamic section (elf.h).
const DT_NULL: i64 = 0;
const DT_RELA: i64 = 7;
const DT_RELASZ: i64 = 8;

/// One entry of the dynamic section (elf.h's `Elf64_Dyn`).
#[repr(C)]
struct Dyn {
    tag: i64,
    value: u64,
}

/// The address range of this executable's relocation table, when it has one.
pub fn relocation_table() -> Option<std::ops::Range<usize>> {
    // SAFETY: getauxval only reads the auxiliary vector the kernel gave the process.
    let (phdr, phnum) = unsafe {
        (
            libc::getauxval(libc::AT_PHDR),
            libc::getauxval(libc::AT_PHNUM),
        )
    };
    let phdr = usize::try_from(phdr).ok().filter(|&address| address != 0)?;
    let phnum = usize::try_from(phnum).ok()?;
    // SAFETY: AT_PHDR and AT_PHNUM describe this executable's program headers, which the
    // kernel mapped with it and which stay mapped, unchanged, for the process's life.
    let headers = unsafe { std::slice::from_raw_parts(phdr as *const libc::Elf64_Phdr, phnum) };
    let own = headers.iter().find(|h| h.p_type == libc::PT_PHDR)?;
    let base = phdr.checked_sub(usize::try_from(own.p_vaddr).ok()?)?;
    let dynamic = headers.iter().find(|h| h.p_type == libc::PT_DYNAMIC)?;
    let mut entry = (base + usize::try_from(dynamic.p_vaddr).ok()?) as *const Dyn;
    let (mut table, mut size) = (None, None);
    loop {
        // SAFETY: PT_DYNAMIC is mapped for the process's life and ends with DT_NULL.
        let Dyn { tag, value } = unsafe { entry.read() };
        match tag {
            DT_NULL => break,
            DT_RELA => table = usize::try_from(value).ok(),
            DT_RELASZ => size = usize::try_from(value).ok(),
            _ => {}
        }
        entry = entry.wrapping_add(1);
    }
    let (table, size) = (table?, size?);
    // glibc rewrites DT_RELA in a writable dynamic section to the relocated address; the
    // file's value is an offset from the base (always below it in a PIE).
    let start = if table >= base { table } else { base + table };
    Some(start..start + size)
}

/// Drops this executable's relocation table from the page tables. Returns the bytes let
/// go (whole pages inside the table; the pages it shares with other sections are kept).
///
/// # Errors
/// The OS error of `madvise`.
pub fn release_relocation_table() -> std::io::Result<usize> {
    let Some(table) = relocation_table() else {
        return Ok(0);
    };
    // SAFETY: sysconf only reads a constant of the system.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let first = table.start.div_ceil(page) * page;
    let end = table.end / page * page;
    if end <= first {
        return Ok(0);
    }
    // SAFETY: [first, end) is whole pages inside the relocation table: read-only pages of
    // a private file mapping that nothing reads after start-up. MADV_DONTNEED only drops
    // their page-table entries; a read would fault the same bytes in again from the file.
    if unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end - first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    /// Whether each page of `range` is mapped (`/proc/self/pagemap`, bit 63).
    fn present(range: std::ops::Range<usize>) -> Vec<bool> {
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        (range.start / 4096..range.end.div_ceil(4096))
            .map(|page| {
                pagemap
                    .seek(SeekFrom::Start(page as u64 * 8))
                    .expect("seek");
                let mut entry = [0; 8];
                pagemap.read_exact(&mut entry).expect("read");
                u64::from_le_bytes(entry) >> 63 == 1
            })
            .collect()
    }

    #[test]
    fn the_relocation_table_is_found_and_let_go() {
        // The test binary is a PIE too: it has a table, read at its start.
        let table = relocation_table().expect("a relocation table");
        assert!(table.len() >= 24, "{table:?}");
        // Each entry is 24 bytes (Elf64_Rela: offset, info, addend); the low half of
        // `info` is the relocation's type.
        // SAFETY: the range was just read from the dynamic section; it is mapped.
        let info = unsafe { ((table.start + 8) as *const u64).read() };
        assert!(
            matches!(info & 0xffff_ffff, 1..=42),
            "a known relocation type, not {info:#x}"
        );
        let page = 4096;
        let inner = table.start.div_ceil(page) * page..table.end / page * page;
        // SAFETY: as above; `inner` lies inside the table.
        let read = || unsafe { (inner.start as *const u64).read() };
        let before = (!inner.is_empty()).then(read);
        let released = release_relocation_table().expect("madvise");
        assert_eq!(released, inner.len());
        if inner.is_empty() {
            return; // A table smaller than a page: nothing whole to let go.
        }
        assert!(
            present(inner.clone()).iter().all(|&mapped| !mapped),
            "no page of the table is mapped any more"
        );
        // Reading it again faults the same bytes back in from the file.
        assert_eq!(Some(read()), before);
    }
}
