//! Events to containerd (through the `TTRPC_ADDRESS` it gave the shim),
//! and the guest's OOM kills turned into TaskOOM.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bulkhead_protocol::messages::{Request, Response};
use bulkhead_runtime::sandbox::Sandbox;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::TaskOOM;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;

use crate::lock;

/// The current time as events carry it.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Publishes events in the shim's namespace; clones share the connection.
#[derive(Clone)]
pub struct Events {
    publisher: Arc<Mutex<RemotePublisher>>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Events {
            publisher: Arc::new(Mutex::new(publisher)),
            namespace: namespace.to_string(),
        }
    }

    /// A lost event is logged; containerd's own state stays authoritative.
    pub fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let r = lock(&self.publisher).publish(Context::default(), topic, &self.namespace, event);
        if let Err(e) = r {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    /// Turns the guest's OOM kills into TaskOOM for as long as the sandbox
    /// lives (a blocking `next_oom_event` on its own agent stream).
    pub fn watch_oom(&self, sb: &Arc<Sandbox>) {
        let sb = Arc::downgrade(sb);
        let events = self.clone();
        let spawned = std::thread::Builder::new().name("oom".into()).spawn(move || loop {
            let Some(s) = sb.upgrade() else { return };
            let Ok(mut c) = s.client() else { return };
            drop(s);
            match c.call(&Request::NextOomEvent) {
                Ok(Response::Oom { container_id }) => events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id,
                        ..Default::default()
                    }),
                ),
                Ok(other) => {
                    tracing::warn!("next_oom_event answered {other:?}");
                    return;
                }
                Err(_) => return,
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("no OOM watcher: {e}");
        }
    }
}
