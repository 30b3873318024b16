//! KVM's structures as bytes, and bytes as hex strings in the JSON payload.
//! The byte views come from kvm-bindings' zerocopy derives (its `serde`
//! feature), not from our own unsafe code. Its serde implementations are
//! not used: their deserializers zero-fill a short input and cut a long
//! one, where a snapshot must refuse a structure of the wrong size.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Bytes that serialize as a lower-case hex string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Hex(pub Vec<u8>);

impl std::fmt::Debug for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hex({} bytes)", self.0.len())
    }
}

impl Hex {
    pub fn of<T: IntoBytes + Immutable>(v: &T) -> Hex {
        Hex(v.as_bytes().to_vec())
    }

    /// The structure back, or an error naming `what` when the size is wrong.
    pub fn get<T: FromBytes>(&self, what: &str) -> Result<T, String> {
        T::read_from_bytes(&self.0).map_err(|_| {
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
    use kvm_bindings::kvm_regs;

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
