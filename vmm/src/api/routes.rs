//! The control API's endpoints: what each request does and answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_vmm_api::control::{DriveUpdate, Metrics, RunState, SnapshotCreate, TargetState, VmInfo, VmStateChange};
use tracing::{info, warn};

use super::http::{Request, Response};
use crate::devices::virtio::block::{DriveError, Drives};
use crate::snapshot::create::Snapshotter;
use crate::snapshot::SnapshotError;
use crate::vcpu::control::{ControlError, VcpuControl};

/// How long a pause or resume may take before it is undone and reported;
/// parking takes microseconds, so this only catches a wedged vCPU thread.
pub const STATE_CHANGE_WITHIN: Duration = Duration::from_secs(10);

/// What the endpoints see of the VM.
pub struct ApiContext {
    pub control: Arc<VcpuControl>,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// When the vCPUs were started.
    pub started: Instant,
    /// The disks, whose images `PATCH /drives/{index}` replaces; `None`
    /// in tests without a VM.
    pub drives: Option<Arc<Drives>>,
    /// Takes snapshots; `None` where this VMM cannot (tests).
    pub snapshot: Option<Arc<Snapshotter>>,
}

/// Answers one request. Errors that leave the connection in step (unknown
/// path, wrong method, a bad JSON body) keep it open.
pub fn handle(ctx: &ApiContext, req: &Request) -> Response {
    let method = req.method.as_str();
    match req.target.as_str() {
        "/" => match method {
            "GET" => Response::json(200, &vm_info(ctx)),
            _ => not_allowed("GET"),
        },
        "/vm" => match method {
            "PATCH" => patch_vm(ctx, req),
            _ => not_allowed("PATCH"),
        },
        "/metrics" => match method {
            "GET" => Response::json(200, &metrics(ctx)),
            _ => not_allowed("GET"),
        },
        "/snapshot/create" => match method {
            "PUT" => create_snapshot(ctx, req),
            _ => not_allowed("PUT"),
        },
        other => match other.strip_prefix("/drives/") {
            Some(index) => match method {
                "PATCH" => patch_drive(ctx, index, req),
                _ => not_allowed("PATCH"),
            },
            None => Response::fault(404, format!("no resource at {other}")),
        },
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response {
        allow: Some(allow),
        ..Response::fault(405, format!("this resource only takes {allow}"))
    }
}

pub fn vm_info(ctx: &ApiContext) -> VmInfo {
    VmInfo {
        state: if ctx.control.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        },
        vcpus: ctx.vcpus,
        mem_mib: ctx.mem_mib,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Pauses or resumes. Both are idempotent: pausing a paused VM (or resuming
/// a running one) answers 204 as well, so a client can retry safely.
fn patch_vm(ctx: &ApiContext, req: &Request) -> Response {
    if req.content_length.is_none() {
        // Whatever body follows is unframed: the connection is out of step.
        return Response {
            close: true,
            ..Response::fault(411, "PATCH /vm needs a JSON body and its Content-Length")
        };
    }
    let change: VmStateChange = match parse_json(&req.body) {
        Ok(c) => c,
        Err(message) => return Response::fault(400, message),
    };
    let result = match change.state {
        TargetState::Paused => ctx.control.pause(STATE_CHANGE_WITHIN),
        TargetState::Resumed => ctx.control.resume(STATE_CHANGE_WITHIN),
    };
    match result {
        Ok(()) => {
            info!("VM {:?} through the API", change.state);
            Response::no_content()
        }
        Err(e) => {
            warn!("{e}");
            Response::fault(500, e.to_string())
        }
    }
}

/// Writes a snapshot of the paused VM; a running VM is refused (400), since
/// its memory would change under the copy.
fn create_snapshot(ctx: &ApiContext, req: &Request) -> Response {
    if req.content_length.is_none() {
        return Response {
            close: true,
            ..Response::fault(411, "PUT /snapshot/create needs a JSON body and its Content-Length")
        };
    }
    let body: SnapshotCreate = match parse_json(&req.body) {
        Ok(b) => b,
        Err(message) => return Response::fault(400, message),
    };
    if !ctx.control.is_paused() {
        return Response::fault(
            400,
            "the VM must be paused before a snapshot (PATCH /vm {\"state\":\"Paused\"})",
        );
    }
    let Some(snapshotter) = &ctx.snapshot else {
        return Response::fault(501, "this VMM cannot take snapshots");
    };
    if body.snapshot_path.as_os_str().is_empty() {
        return Response::fault(400, "invalid body: snapshot_path is empty");
    }
    match snapshotter.create(&body.snapshot_path) {
        Ok(()) => Response::no_content(),
        Err(e @ SnapshotError::Control(ControlError::NotPaused | ControlError::NotParked(_))) => {
            Response::fault(400, e.to_string())
        }
        Err(e) => {
            warn!("snapshot failed: {e}");
            Response::fault(500, format!("snapshot failed: {e}"))
        }
    }
}

/// Gives a disk a new image while the guest runs; the guest is told
/// through a configuration-change interrupt.
fn patch_drive(ctx: &ApiContext, index: &str, req: &Request) -> Response {
    if req.content_length.is_none() {
        return Response {
            close: true,
            ..Response::fault(411, "PATCH /drives/{index} needs a JSON body and its Content-Length")
        };
    }
    let Some(drives) = &ctx.drives else {
        return Response::fault(501, "this VMM cannot change drives");
    };
    // Digits only: `usize::from_str` would also take a leading '+'.
    let index = match index.parse::<usize>() {
        Ok(i) if index.bytes().all(|b| b.is_ascii_digit()) => i,
        _ => return Response::fault(404, format!("no drive {index:?}: drives are numbered from 0")),
    };
    let body: DriveUpdate = match parse_json(&req.body) {
        Ok(b) => b,
        Err(message) => return Response::fault(400, message),
    };
    if body.path_on_host.as_os_str().is_empty() {
        return Response::fault(400, "invalid body: path_on_host is empty");
    }
    match drives.replace(index, &body.path_on_host) {
        Ok(cfg) => {
            info!(index, path = %cfg.path.display(), "drive image replaced through the API");
            Response::no_content()
        }
        Err(e @ DriveError::NoSuchDrive { .. }) => Response::fault(404, e.to_string()),
        Err(e) => Response::fault(400, e.to_string()),
    }
}

/// A body that must be a JSON object (serde would take a struct from an
/// array too); the message says what is wrong with it.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("invalid body (a JSON object is expected): {e}"))?;
    serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| format!("invalid body: {e}"))
}

pub fn metrics(ctx: &ApiContext) -> Metrics {
    Metrics {
        uptime_ms: u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        paused: ctx.control.is_paused(),
        vcpu_exits: ctx.control.exit_counts(),
        rss_bytes: own_rss(),
    }
}

/// /proc/self/statm, opened before the jail hides /proc.
static STATM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Opens what [`own_rss`] reads; `main` calls it before entering the jail.
pub fn open_statm() {
    STATM.get_or_init(|| std::fs::File::open("/proc/self/statm").ok());
}

/// Resident pages from /proc/self/statm (its second field), in bytes.
fn own_rss() -> Option<u64> {
    use std::io::{Read, Seek};
    open_statm();
    let mut f = STATM.get()?.as_ref()?;
    f.rewind().ok()?;
    let mut statm = String::new();
    f.read_to_string(&mut statm).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{parse, Parsed};

    fn ctx() -> ApiContext {
        ApiContext {
            // No vCPUs: pausing succeeds at once.
            control: Arc::new(VcpuControl::new(0)),
            vcpus: 2,
            mem_mib: 64,
            started: Instant::now(),
            drives: None,
            snapshot: None,
        }
    }

    fn call(ctx: &ApiContext, raw: &str) -> (Response, serde_json::Value) {
        let Ok(Parsed::Complete(req, _)) = parse(raw.as_bytes()) else {
            panic!("not a request: {raw:?}");
        };
        let resp = handle(ctx, &req);
        let body = resp
            .body
            .as_deref()
            .map(|b| serde_json::from_slice(b).unwrap())
            .unwrap_or(serde_json::Value::Null);
        (resp, body)
    }

    fn patch(ctx: &ApiContext, body: &[u8]) -> (Response, serde_json::Value) {
        let mut raw = format!("PATCH /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(body);
        let Ok(Parsed::Complete(req, _)) = parse(&raw) else {
            panic!("not a request");
        };
        let resp = handle(ctx, &req);
        let json = resp
            .body
            .as_deref()
            .map(|b| serde_json::from_slice(b).unwrap())
            .unwrap_or(serde_json::Value::Null);
        (resp, json)
    }

    #[test]
    fn info_reports_state_and_shape() {
        let ctx = ctx();
        let (r, body) = call(&ctx, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(body["state"], "Running");
        assert_eq!(body["vcpus"], 2);
        assert_eq!(body["mem_mib"], 64);
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn pause_and_resume_are_idempotent() {
        let ctx = ctx();
        for _ in 0..2 {
            assert_eq!(patch(&ctx, br#"{"state":"Paused"}"#).0.status, 204);
            assert_eq!(call(&ctx, "GET / HTTP/1.1\r\n\r\n").1["state"], "Paused");
            assert_eq!(call(&ctx, "GET /metrics HTTP/1.1\r\n\r\n").1["paused"], true);
        }
        for _ in 0..2 {
            assert_eq!(patch(&ctx, br#"{"state":"Resumed"}"#).0.status, 204);
            assert_eq!(call(&ctx, "GET / HTTP/1.1\r\n\r\n").1["state"], "Running");
        }
    }

    #[test]
    fn bad_patch_bodies_are_refused_with_a_reason() {
        let ctx = ctx();
        let cases: [(&[u8], &str); 5] = [
            (br#"{"state":"Paused","force":true}"#, "unknown field `force`"),
            (br#"{"state":"Stopped"}"#, "unknown variant `Stopped`"),
            (b"{\"state\":\"Paus\xffed\"}", "not UTF-8"),
            (b"", "EOF"),
            (br#"["Paused"]"#, "invalid body"),
        ];
        for (body, says) in cases {
            let (r, json) = patch(&ctx, body);
            assert_eq!(r.status, 400, "{body:?}");
            assert!(!r.close, "the connection stays in step");
            let msg = json["fault_message"].as_str().unwrap();
            assert!(msg.contains(says), "{body:?}: {msg}");
        }
        assert!(!ctx.control.is_paused());
        let (r, json) = call(&ctx, "PATCH /vm HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 411);
        assert!(r.close);
        assert!(json["fault_message"].as_str().unwrap().contains("Content-Length"));
    }

    fn patch_drive(ctx: &ApiContext, target: &str, body: &str) -> (u16, String) {
        let raw = format!(
            "PATCH {target} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (r, json) = call(ctx, &raw);
        (r.status, json["fault_message"].as_str().unwrap_or("").to_string())
    }

    #[test]
    fn drives_get_new_images_and_bad_requests_a_reason() {
        use crate::devices::virtio::block::drives::tests::{drives, image};
        let (a, b) = (image(4096, 1), image(8192, 2));
        let ctx = ApiContext {
            drives: Some(Arc::new(drives(a.path()))),
            ..ctx()
        };
        let body = |p: &std::path::Path| serde_json::json!({ "path_on_host": p }).to_string();
        assert_eq!(patch_drive(&ctx, "/drives/0", &body(b.path())), (204, String::new()));
        let d = ctx.drives.as_ref().unwrap();
        assert_eq!(d.configs()[0].path, b.path());
        for (target, body, status, says) in [
            ("/drives/1", body(a.path()), 404, "no drive 1: this VM has 1"),
            ("/drives/+0", body(a.path()), 404, "numbered from 0"),
            ("/drives/x", body(a.path()), 404, "numbered from 0"),
            ("/drives/0", r#"{"path_on_host":""}"#.to_string(), 400, "empty"),
            (
                "/drives/0",
                r#"{"path_on_host":"/a","read_only":false}"#.to_string(),
                400,
                "unknown field",
            ),
            (
                "/drives/0",
                r#"{"path_on_host":"/nonexistent"}"#.to_string(),
                400,
                "cannot open",
            ),
        ] {
            let (s, msg) = patch_drive(&ctx, target, &body);
            assert_eq!(s, status, "{target} {body}: {msg}");
            assert!(msg.contains(says), "{target} {body}: {msg}");
        }
        assert_eq!(d.configs()[0].path, b.path(), "refused requests change nothing");
        let (r, _) = call(&ctx, "GET /drives/0 HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.allow), (405, Some("PATCH")));
        let (status, _) = patch_drive(&self::ctx(), "/drives/0", &body(a.path()));
        assert_eq!(status, 501, "no drives in this context");
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let ctx = ctx();
        let (r, json) = call(&ctx, "GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 404);
        assert!(json["fault_message"].as_str().unwrap().contains("/nope"));
        for (raw, allow) in [
            ("DELETE / HTTP/1.1\r\n\r\n", "GET"),
            ("GET /vm HTTP/1.1\r\n\r\n", "PATCH"),
            ("POST /metrics HTTP/1.1\r\n\r\n", "GET"),
            ("GET /snapshot/create HTTP/1.1\r\n\r\n", "PUT"),
        ] {
            let (r, _) = call(&ctx, raw);
            assert_eq!((r.status, r.allow), (405, Some(allow)), "{raw}");
        }
    }

    #[test]
    fn snapshot_requests_are_checked_before_anything_is_written() {
        let ctx = ctx();
        let put = |body: &str| {
            call(
                &ctx,
                &format!(
                    "PUT /snapshot/create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
            )
        };
        let (r, json) = put("{}");
        assert_eq!(r.status, 400);
        assert!(
            json["fault_message"].as_str().unwrap().contains("snapshot_path"),
            "{json}"
        );
        let (r, json) = put(r#"{"snapshot_path":"/tmp/x","extra":1}"#);
        assert_eq!(r.status, 400, "{json}");
        let (r, json) = put(r#"{"snapshot_path":"/tmp/x"}"#);
        assert_eq!(r.status, 400);
        assert!(
            json["fault_message"].as_str().unwrap().contains("must be paused"),
            "{json}"
        );
        ctx.control.pause(STATE_CHANGE_WITHIN).unwrap();
        let (r, json) = put(r#"{"snapshot_path":"/tmp/x"}"#);
        assert_eq!(r.status, 501, "no snapshotter in this context: {json}");
        let (r, _) = call(&ctx, "PUT /snapshot/create HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 411);
    }

    #[test]
    fn metrics_have_every_field() {
        let (r, json) = call(&ctx(), "GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
        assert!(json["uptime_ms"].is_u64());
        assert_eq!(json["paused"], false);
        for kind in ["io", "mmio", "hlt", "other"] {
            assert_eq!(json["vcpu_exits"][kind], 0, "{kind}");
        }
        assert!(json["rss_bytes"].as_u64().unwrap() > 0);
    }
}
