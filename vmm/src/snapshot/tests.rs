//! The state file: round trips and refusals.

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs, kvm_sregs};

use super::*;
use crate::devices::virtio::mmio::{QueueSaved, TransportState};

fn sample() -> SnapshotState {
    let regs = kvm_regs {
        rip: 0x20_0000,
        rax: 7,
        ..Default::default()
    };
    let sregs = kvm_sregs {
        cr0: 0x8000_0011,
        efer: 0x500,
        ..Default::default()
    };
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = 1;
    let vcpu = |id| VcpuState {
        id,
        cpuid: vec![Hex(vec![1; std::mem::size_of::<kvm_bindings::kvm_cpuid_entry2>()])],
        regs: Hex::of(&regs),
        sregs: Hex::of(&sregs),
        fpu: crate::vcpu::state::FpuSaved::default(),
        xsave: None,
        xcrs: Some(Hex::of(&kvm_bindings::kvm_xcrs::default())),
        msrs: vec![MsrValue {
            index: 0x10,
            data: 12345,
        }],
        lapic: Hex::of(&lapic),
        debug_regs: Hex::of(&kvm_bindings::kvm_debugregs::default()),
        vcpu_events: Hex::of(&kvm_bindings::kvm_vcpu_events::default()),
        mp_state: Hex::of(&kvm_bindings::kvm_mp_state::default()),
    };
    SnapshotState {
        vmm_version: "test".into(),
        config: SavedConfig {
            vcpus: 2,
            mem_mib: 64,
            cpu_template: CpuTemplate::Pvm,
            devices: crate::config::DeviceSet {
                disks: vec![crate::config::BlockConfig {
                    path: "/img/root.ext4".into(),
                    read_only: true,
                }],
                vsock: Some(crate::config::VsockConfig {
                    guest_cid: 3,
                    uds_path: "/run/v.sock".into(),
                }),
                rng: false,
            },
        },
        memory: vec![MemoryRegionState {
            guest_addr: 0,
            size: 64 << 20,
            file_offset: 0,
        }],
        vm: VmState {
            pic_master: Hex::of(&kvm_irqchip::default()),
            pic_slave: Hex::of(&kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            }),
            ioapic: Hex::of(&kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            }),
            pit: Hex::of(&kvm_pit_state2::default()),
            clock: Hex::of(&kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            }),
        },
        vcpus: vec![vcpu(0), vcpu(1)],
        serial: SerialSaved {
            line_control: 3,
            in_buffer: vec![b'x'],
            ..Default::default()
        },
        virtio: vec![
            TransportState {
                device_type: 2,
                device_features_sel: 1,
                driver_features_sel: 1,
                acked_features: 1 << 32,
                queue_sel: 0,
                status: 15,
                config_generation: 0,
                interrupt_status: 1,
                queues: vec![QueueSaved {
                    max_size: 256,
                    size: 256,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                    next_avail: 17,
                    next_used: 16,
                    event_idx_enabled: false,
                }],
            },
            TransportState {
                device_type: 19,
                device_features_sel: 0,
                driver_features_sel: 0,
                acked_features: 1 << 32,
                queue_sel: 2,
                status: 15,
                config_generation: 0,
                interrupt_status: 0,
                queues: vec![],
            },
        ],
    }
}

#[test]
fn every_component_round_trips() {
    let s = sample();
    let bytes = encode(&s).unwrap();
    assert_eq!(&bytes[..8], MAGIC);
    let back = decode(&bytes).unwrap();
    assert_eq!(back, s);
    // And the KVM structures come back bit for bit.
    let regs: kvm_regs = back.vcpus[1].regs.get("regs").unwrap();
    assert_eq!((regs.rip, regs.rax), (0x20_0000, 7));
    let sregs: kvm_sregs = back.vcpus[0].sregs.get("sregs").unwrap();
    assert_eq!(sregs.efer, 0x500);
    let lapic: kvm_lapic_state = back.vcpus[0].lapic.get("lapic").unwrap();
    assert_eq!(lapic.regs[0x20], 1);
    let clock: kvm_clock_data = back.vm.clock.get("clock").unwrap();
    assert_eq!(clock.clock, 987_654_321);
    let chip: kvm_irqchip = back.vm.ioapic.get("ioapic").unwrap();
    assert_eq!(chip.chip_id, 2);
    assert_eq!(back.virtio[0].queues[0].next_avail, 17);
    assert_eq!(back.serial.in_buffer, b"x");
}

#[test]
fn another_format_version_is_refused() {
    let mut bytes = encode(&sample()).unwrap();
    let other = FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&other.to_le_bytes());
    let e = decode(&bytes).unwrap_err();
    assert!(
        matches!(e, StateFileError::Version { found } if found == other),
        "{e:?}"
    );
    assert!(e.to_string().contains(&format!("format version {other}")), "{e}");
    assert!(e.to_string().contains(&format!("only version {FORMAT_VERSION}")), "{e}");
}

#[test]
fn a_flipped_payload_byte_fails_the_checksum() {
    let good = encode(&sample()).unwrap();
    // Every payload position, so no byte escapes the check.
    for i in (HEADER_LEN..good.len()).step_by(97) {
        let mut bytes = good.clone();
        bytes[i] ^= 0x01;
        let e = decode(&bytes).unwrap_err();
        assert!(matches!(e, StateFileError::Checksum { .. }), "byte {i}: {e:?}");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    let mut bytes = good.clone();
    bytes[21] ^= 0xff;
    assert!(matches!(decode(&bytes), Err(StateFileError::Checksum { .. })));
}

#[test]
fn truncated_padded_and_foreign_files_are_refused() {
    let good = encode(&sample()).unwrap();
    for cut in [0, 7, HEADER_LEN - 1] {
        let e = decode(&good[..cut]).unwrap_err();
        assert!(matches!(e, StateFileError::TooShort { .. }), "{e:?}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    let e = decode(&good[..good.len() - 1]).unwrap_err();
    assert!(matches!(e, StateFileError::Length { .. }), "{e:?}");
    assert!(e.to_string().contains("truncated"), "{e}");
    let mut padded = good.clone();
    padded.push(0);
    assert!(matches!(decode(&padded), Err(StateFileError::Length { .. })));
    let mut foreign = good.clone();
    foreign[0] = b'X';
    assert!(matches!(decode(&foreign), Err(StateFileError::BadMagic)));
    let mut huge = good;
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(decode(&huge), Err(StateFileError::TooLong(_))));
}

/// A payload with a valid checksum can still be wrong: it is checked too.
fn reencode(edit: impl FnOnce(&mut serde_json::Value)) -> Result<SnapshotState, StateFileError> {
    let mut v = serde_json::to_value(sample()).unwrap();
    edit(&mut v);
    let payload = serde_json::to_vec(&v).unwrap();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&checksum(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    decode(&bytes)
}

#[test]
fn inconsistent_payloads_are_refused() {
    let e = reencode(|v| v["config"]["vcpus"] = 3.into()).unwrap_err();
    assert!(e.to_string().contains("3 vCPUs configured but 2 saved"), "{e}");
    let e = reencode(|v| v["config"]["mem_mib"] = 128.into()).unwrap_err();
    assert!(e.to_string().contains("not the configured 128 MiB"), "{e}");
    let e = reencode(|v| v["config"]["devices"]["rng"] = true.into()).unwrap_err();
    assert!(e.to_string().contains("3 virtio devices configured but 2 saved"), "{e}");
    let e = reencode(|v| v["vcpus"][1]["id"] = 5.into()).unwrap_err();
    assert!(e.to_string().contains("saved with id 5"), "{e}");
    let e = reencode(|v| v["surprise"] = 1.into()).unwrap_err();
    assert!(matches!(e, StateFileError::Payload(_)), "{e:?}");
    let e = reencode(|v| v["vm"]["clock"] = "xyz".into()).unwrap_err();
    assert!(e.to_string().contains("hex"), "{e}");
}

#[test]
fn state_files_are_written_whole_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    write_state_file(dir.path(), &sample()).unwrap();
    assert_eq!(read_state_file(dir.path()).unwrap(), sample());
    assert!(!dir.path().join(".state.tmp").exists());
    let e = read_state_file(&dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
}

/// Sizes from a hostile state file: their sum, an address plus a size,
/// past 2^64. Refused with a reason, never an arithmetic panic.
#[test]
fn region_sizes_that_overflow_are_refused() {
    let mut s = sample();
    s.memory = vec![
        MemoryRegionState {
            guest_addr: 0,
            size: 1 << 63,
            file_offset: 0,
        },
        MemoryRegionState {
            guest_addr: 1 << 63,
            size: 1 << 63,
            file_offset: 1 << 63,
        },
    ];
    let e = decode(&encode(&s).unwrap()).unwrap_err().to_string();
    assert!(e.contains("more than 2^64"), "{e}");

    let mut s = sample();
    s.memory[0].guest_addr = u64::MAX - 0xfff;
    let e = decode(&encode(&s).unwrap()).unwrap_err().to_string();
    assert!(e.contains("memory region at 0xfffffffffffff000"), "{e}");
}

/// The fuzz target's tracked seeds (`fuzz/seeds/snapshot_state`) start
/// with mode byte 1, so the target wraps them in a valid header and they
/// reach the consistency checks: one valid state, one whose sizes overflow.
#[test]
fn the_fuzz_seeds_reach_the_consistency_checks() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/snapshot_state");
    let wrap = |name: &str| {
        let seed = std::fs::read(format!("{dir}/{name}")).unwrap();
        assert_eq!(seed[0], 1, "{name}: mode byte");
        let payload = &seed[1..];
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&checksum(payload).to_le_bytes());
        b.extend_from_slice(payload);
        decode(&b)
    };
    assert_eq!(wrap("valid").unwrap(), sample());
    let e = wrap("sizes-overflow").unwrap_err().to_string();
    assert!(e.contains("more than 2^64"), "{e}");
}
