//! The agent's message decoding: a frame from the host, decoded and
//! validated as a request. Nothing the host sends may panic the agent.
#![no_main]

use bulkhead_protocol::frame::{read_frame, FrameError};
use bulkhead_protocol::messages::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    loop {
        match read_frame(&mut cursor) {
            Ok(payload) => {
                if let Ok(req) = serde_json::from_slice::<Request>(&payload) {
                    let _ = req.validate();
                }
            }
            Err(FrameError::Closed) | Err(_) => break,
        }
    }
});
