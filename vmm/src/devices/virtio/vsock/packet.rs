//! The virtio-vsock packet header (virtio 1.2, 5.10.6), parsed by hand from
//! its 44 little-endian bytes so that nothing depends on struct layout.

/// Bytes in `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload we accept or send (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = PacketError;
    fn try_from(v: u16) -> Result<Self, PacketError> {
        Ok(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => return Err(PacketError::BadOp(other)),
        })
    }
}

/// A validated stream-socket header; `type` is always STREAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes following the header (at most `MAX_PKT_PAYLOAD`).
    pub len: u32,
    pub op: Op,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("header is {0} bytes, {HDR_LEN} needed")]
    Truncated(usize),
    #[error("socket type {0} is not STREAM")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("payload length {0} exceeds {MAX_PKT_PAYLOAD}")]
    Oversized(u32),
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and validates the first `HDR_LEN` bytes of `bytes` (trailing bytes
/// are ignored). Addressing (CIDs, ports) is the caller's to check.
pub fn parse_header(bytes: &[u8]) -> Result<PacketHeader, PacketError> {
    if bytes.len() < HDR_LEN {
        return Err(PacketError::Truncated(bytes.len()));
    }
    let b = &bytes[..HDR_LEN];
    let type_ = le_u16(b, 28);
    if type_ != TYPE_STREAM {
        return Err(PacketError::BadType(type_));
    }
    let op = Op::try_from(le_u16(b, 30))?;
    let len = le_u32(b, 24);
    if len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::Oversized(len));
    }
    Ok(PacketHeader {
        src_cid: le_u64(b, 0),
        dst_cid: le_u64(b, 8),
        src_port: le_u32(b, 16),
        dst_port: le_u32(b, 20),
        len,
        op,
        flags: le_u32(b, 32),
        buf_alloc: le_u32(b, 36),
        fwd_cnt: le_u32(b, 40),
    })
}

impl PacketHeader {
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 4096,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(parse_header(&b), Ok(h));
        // Field offsets of struct virtio_vsock_hdr.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        let mut longer = b.to_vec();
        longer.extend_from_slice(&[0xff; 10]);
        assert_eq!(parse_header(&longer), Ok(h), "trailing bytes are payload");
        for op in 1..=7u16 {
            let mut b = sample().to_bytes();
            b[30..32].copy_from_slice(&op.to_le_bytes());
            assert_eq!(parse_header(&b).unwrap().op as u16, op);
        }
    }

    #[test]
    fn truncated() {
        let b = sample().to_bytes();
        for n in [0, 1, 43] {
            assert_eq!(parse_header(&b[..n]), Err(PacketError::Truncated(n)));
        }
    }

    #[test]
    fn bad_type_and_op() {
        let mut b = sample().to_bytes();
        b[28] = 2; // SEQPACKET
        assert_eq!(parse_header(&b), Err(PacketError::BadType(2)));
        let mut b = sample().to_bytes();
        b[30] = 0;
        assert_eq!(parse_header(&b), Err(PacketError::BadOp(0)));
        b[30] = 8;
        assert_eq!(parse_header(&b), Err(PacketError::BadOp(8)));
    }

    #[test]
    fn oversized_len() {
        let mut h = sample();
        h.len = MAX_PKT_PAYLOAD as u32;
        assert!(parse_header(&h.to_bytes()).is_ok());
        h.len = MAX_PKT_PAYLOAD as u32 + 1;
        assert_eq!(parse_header(&h.to_bytes()), Err(PacketError::Oversized(h.len)));
        h.len = u32::MAX;
        assert_eq!(parse_header(&h.to_bytes()), Err(PacketError::Oversized(u32::MAX)));
    }
}
