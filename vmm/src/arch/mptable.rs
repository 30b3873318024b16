//! Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, the guest finds its CPUs and its I/O APIC through this
//! table in the EBDA. The layout is the spec's; the code is a byte writer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
/// I/O APIC pins routed 1:1 from ISA IRQs.
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const SPEC_REVISION: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// The table must fit between the EBDA start and the legacy hole at 0xa0000.
const EBDA_BYTES: usize = 0x400;

/// Largest vCPU count whose table fits in the EBDA.
pub const MAX_CPUS: u8 =
    ((EBDA_BYTES - FLOATING_POINTER_LEN - HEADER_LEN - SMALL_ENTRY_LEN * (2 + IOAPIC_PINS as usize + 2))
        / PROCESSOR_ENTRY_LEN) as u8;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (1 to {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `num_cpus`
/// CPUs (APIC IDs 0..n, CPU 0 is the boot CPU) placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        // Signature family 6 and FPU/APIC feature flags, as firmware reports them.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes the legacy PIC (ExtINT), LINT1 takes NMI, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"BULKHEAD");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REVISION);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = a configuration table is present
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&header);
    Ok(fp)
}

/// Writes the table into the guest's EBDA.
pub fn setup<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for n in [1u8, 2, 8, MAX_CPUS] {
            let t = build(n, EBDA_START).unwrap();
            assert!(t.len() <= EBDA_BYTES, "{n} cpus: {} bytes", t.len());
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(phys, EBDA_START + 16);
            let hdr = &t[16..];
            assert_eq!(&hdr[0..4], b"PCMP");
            let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
            assert_eq!(len, hdr.len());
            assert_eq!(sum(hdr), 0);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_with_one_bsp() {
        let t = build(4, EBDA_START).unwrap();
        let hdr = &t[16..];
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        let mut off = HEADER_LEN;
        let (mut cpus, mut bsps, mut seen) = (vec![], 0, 0);
        while off < hdr.len() {
            seen += 1;
            match hdr[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(hdr[off + 1]);
                    if hdr[off + 3] & CPU_BSP != 0 {
                        bsps += 1;
                    }
                    off += PROCESSOR_ENTRY_LEN;
                }
                ENTRY_IOAPIC => {
                    assert_eq!(hdr[off + 1], 4, "I/O APIC id follows the CPUs");
                    off += SMALL_ENTRY_LEN;
                }
                1..=4 => off += SMALL_ENTRY_LEN,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(cpus, vec![0, 1, 2, 3]);
        assert_eq!(bsps, 1);
        assert_eq!(seen, count);
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
        const { assert!(MAX_CPUS >= 32) };
    }

    #[test]
    fn written_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
