//! Length-prefixed frames: a big-endian u32 byte count, then that many
//! bytes of JSON. The count is checked before the payload is allocated.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame either side accepts. A create request with a full OCI
/// process (environment, mounts, rlimits) fits with room to spare.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(u32),
    #[error("empty frame")]
    Empty,
    #[error("the peer closed the connection")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Reads one frame's payload.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    w.write_all(&len.to_be_bytes())?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads and decodes one message.
pub fn recv<T: DeserializeOwned, R: Read>(r: &mut R) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(&read_frame(r)?)?)
}

/// Encodes and writes one message.
pub fn send<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    write_frame(w, &serde_json::to_vec(msg)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        send(&mut buf, &vec!["a", "b"]).unwrap();
        assert_eq!(&buf[..4], &9u32.to_be_bytes());
        let back: Vec<String> = recv(&mut Cursor::new(buf)).unwrap();
        assert_eq!(back, ["a", "b"]);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut wire = u32::MAX.to_be_bytes().to_vec();
        wire.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame(&mut Cursor::new(wire)),
            Err(FrameError::TooLarge(u32::MAX))
        ));
        let big = vec![b' '; MAX_FRAME_BYTES as usize + 1];
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn truncated_empty_and_closed() {
        let mut wire = 10u32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"{}");
        assert!(matches!(read_frame(&mut Cursor::new(wire)), Err(FrameError::Io(_))));
        assert!(matches!(
            read_frame(&mut Cursor::new(0u32.to_be_bytes().to_vec())),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(Vec::new())),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![0, 0])),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn garbage_json_is_a_decode_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{not json").unwrap();
        let r: Result<Vec<String>, _> = recv(&mut Cursor::new(buf));
        assert!(matches!(r, Err(FrameError::Decode(_))));
    }
}
