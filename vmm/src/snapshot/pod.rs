//! KVM's structures as bytes, and bytes as hex strings in the JSON payload.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// A KVM ABI structure that can be copied to and from bytes.
///
/// # Safety
///
/// Implementors must be `repr(C)` plain data made only of integers (and
/// arrays and unions of them), with no implicit padding, so that every bit
/// pattern is a valid value and every byte of a value is initialised. The
/// kernel's KVM structures are built that way (their padding is explicit
/// fields, because they are copied to and from user space byte for byte),
/// and kvm-bindings generates them as such.
pub unsafe trait Pod: Sized {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        // SAFETY: each is a bindgen-generated KVM ABI struct: repr(C),
        // integers only, padding spelled out (see the trait's contract).
        $(unsafe impl Pod for $t {})*
    };
}

pod!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcrs,
    kvm_lapic_state,
    kvm_debugregs,
    kvm_vcpu_events,
    kvm_mp_state,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data,
    kvm_cpuid_entry2,
);

pub fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` has every byte initialised, and the slice borrows `v`
    // for exactly `size_of::<T>()` bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

/// The value whose bytes are `b`, which must be exactly `size_of::<T>()` long.
pub fn from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above, `read_unaligned` copes with any
    // alignment of the buffer, and `T: Pod` makes every bit pattern valid.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// Bytes that serialize as a lower-case hex string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Hex(pub Vec<u8>);

impl std::fmt::Debug for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hex({} bytes)", self.0.len())
    }
}

impl Hex {
    pub fn of<T: Pod>(v: &T) -> Hex {
        Hex(to_bytes(v))
    }

    /// The structure back, or an error naming `what` when the size is wrong.
    pub fn get<T: Pod>(&self, what: &str) -> Result<T, String> {
        from_bytes(&self.0).ok_or_else(|| {
            format!(
                "{what} is {} bytes, not the {} of this KVM's structure",
                self.0.len(),
                std::mem::size_of::<T>()
            )
        })
    }
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            text.push(char::from(DIGITS[usize::from(b >> 4)]));
            text.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s.serialize_str(&text)
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        let bytes = text.as_bytes();
        if !bytes.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("a hex string of odd length"));
        }
        bytes
            .chunks_exact(2)
            .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(Hex)
            .ok_or_else(|| serde::de::Error::custom("not a lower-case hex string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_round_trip_through_bytes_and_hex() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xffff_ffff_8100_0000,
            rflags: 2,
            ..Default::default()
        };
        let hex = Hex::of(&regs);
        let json = serde_json::to_string(&hex).unwrap();
        assert!(json.starts_with("\"8877665544332211"), "{json}");
        let back: Hex = serde_json::from_str(&json).unwrap();
        let r: kvm_regs = back.get("regs").unwrap();
        assert_eq!(r, regs);
    }

    #[test]
    fn wrong_sizes_and_bad_hex_are_refused() {
        let short = Hex(vec![0; 3]);
        let e = short.get::<kvm_regs>("regs").unwrap_err();
        assert!(e.contains("regs is 3 bytes"), "{e}");
        assert!(serde_json::from_str::<Hex>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Hex>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Hex>("\"AB\"").is_err());
    }
}
