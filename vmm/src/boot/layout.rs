//! The guest-physical layout used at boot (x86_64).

/// Start of the GDT.
pub const GDT_START: u64 = 0x500;
/// The boot protocol's zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-map level 4, then the page-directory-pointer table, then the page
/// directory: an identity map of the first 1 GiB in 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
