//! The control API's request parser and endpoints: bytes from a client on
//! the API socket, parsed request after request as on a keep-alive
//! connection, each answered. Nothing a client sends may panic the VMM or
//! make the parser claim bytes it does not have.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bulkhead_vmm::api::http::{parse, Parsed, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use bulkhead_vmm::api::{routes, ApiContext};
use bulkhead_vmm::vcpu::control::VcpuControl;
use libfuzzer_sys::fuzz_target;

fn ctx() -> &'static ApiContext {
    static CTX: OnceLock<ApiContext> = OnceLock::new();
    CTX.get_or_init(|| ApiContext {
        // No vCPUs: pause and resume complete at once, without signals.
        control: Arc::new(VcpuControl::new(0)),
        vcpus: 1,
        mem_mib: 32,
        started: Instant::now(),
        drives: None,
        snapshot: None,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match parse(rest) {
            Ok(Parsed::Complete(req, used)) => {
                assert!(used > 0 && used <= rest.len(), "used {used} of {}", rest.len());
                assert!(used <= MAX_HEAD_BYTES + MAX_BODY_BYTES);
                assert_eq!(req.body.len(), req.content_length.unwrap_or(0));
                let resp = routes::handle(ctx(), &req);
                let _ = resp.to_bytes();
                if resp.close || !req.keep_alive {
                    break;
                }
                rest = &rest[used..];
            }
            Ok(Parsed::Incomplete) => {
                assert!(rest.len() < MAX_HEAD_BYTES + MAX_BODY_BYTES);
                break;
            }
            Err(e) => {
                let _ = Response::from_error(&e).to_bytes();
                break;
            }
        }
    }
});
