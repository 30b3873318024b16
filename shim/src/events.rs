//! Events to containerd (through the `TTRPC_ADDRESS` it gave the shim),
//! and the guest's OOM kills turned into TaskOOM.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// The pod's containers: the only ones the guest may report an OOM for.
    owned: Arc<Mutex<HashSet<String>>>,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Events {
            publisher: Arc::new(Mutex::new(publisher)),
            namespace: namespace.to_string(),
            owned: Arc::default(),
        }
    }

    pub fn own(&self, container_id: &str) {
        lock(&self.owned).insert(container_id.to_string());
    }

    pub fn disown(&self, container_id: &str) {
        lock(&self.owned).remove(container_id);
    }

    fn owns(&self, container_id: &str) -> bool {
        lock(&self.owned).contains(container_id)
    }

    /// A lost event is logged; containerd's own state stays authoritative.
    pub fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let r = lock(&self.publisher).publish(Context::default(), topic, &self.namespace, event);
        if let Err(e) = r {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    /// Turns the guest's OOM kills into TaskOOM for as long as the sandbox
    /// lives (a blocking `next_oom_event` on its own agent stream). The
    /// guest sets the pace, so it is held to [`OOM_EVENTS`] per
    /// [`OOM_WINDOW`]: a guest answering at once, again and again, neither
    /// floods containerd nor spins this thread.
    pub fn watch_oom(&self, sb: &Arc<Sandbox>) {
        let sb = Arc::downgrade(sb);
        let events = self.clone();
        let spawned = std::thread::Builder::new().name("oom".into()).spawn(move || {
            let mut limit = RateLimit::new(OOM_EVENTS, OOM_WINDOW);
            loop {
                let Some(s) = sb.upgrade() else { return };
                let Ok(mut c) = s.client() else { return };
                drop(s);
                let event = c.call(&Request::NextOomEvent);
                if let Ok(Response::Oom { container_id }) = event {
                    match limit.admit(Instant::now()) {
                        Admit::Yes { dropped } => {
                            if dropped > 0 {
                                tracing::warn!(dropped, "OOM events from the guest over the rate limit were dropped");
                            }
                            if !events.owns(&container_id) {
                                // Another pod's container would be marked
                                // OOM-killed in containerd.
                                tracing::warn!(%container_id, "the guest reported an OOM for no container of this pod");
                                continue;
                            }
                            events.publish(
                                topics::TASK_OOM_EVENT_TOPIC,
                                Box::new(TaskOOM {
                                    container_id,
                                    ..Default::default()
                                }),
                            );
                        }
                        Admit::No { retry_in } => std::thread::sleep(retry_in),
                    }
                    continue;
                }
                match event {
                    Ok(other) => {
                        tracing::warn!("next_oom_event answered {other:?}");
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("no OOM watcher: {e}");
        }
    }
}

/// TaskOOM events a sandbox may cause per [`OOM_WINDOW`].
pub const OOM_EVENTS: u32 = 20;
pub const OOM_WINDOW: Duration = Duration::from_secs(1);

pub enum Admit {
    /// `dropped`: events refused since the last one admitted.
    Yes {
        dropped: u64,
    },
    No {
        retry_in: Duration,
    },
}

/// At most `per_window` admissions in each fixed window.
pub struct RateLimit {
    per_window: u32,
    window: Duration,
    started: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    pub fn new(per_window: u32, window: Duration) -> Self {
        RateLimit {
            per_window,
            window,
            started: None,
            used: 0,
            dropped: 0,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        let started = match self.started {
            Some(s) if now.saturating_duration_since(s) < self.window => s,
            _ => {
                self.used = 0;
                self.started = Some(now);
                now
            }
        };
        if self.used < self.per_window {
            self.used += 1;
            return Admit::Yes {
                dropped: std::mem::take(&mut self.dropped),
            };
        }
        self.dropped += 1;
        Admit::No {
            retry_in: self.window.saturating_sub(now.saturating_duration_since(started)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_limit_and_the_next_window_reports_the_dropped() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(3, Duration::from_secs(1));
        let admitted = (0..10)
            .filter(|i| matches!(limit.admit(t0 + Duration::from_millis(*i)), Admit::Yes { .. }))
            .count();
        assert_eq!(admitted, 3);
        match limit.admit(t0 + Duration::from_millis(400)) {
            Admit::No { retry_in } => assert_eq!(retry_in, Duration::from_millis(600)),
            Admit::Yes { .. } => panic!("admitted over the limit"),
        }
        match limit.admit(t0 + Duration::from_millis(1000)) {
            Admit::Yes { dropped } => assert_eq!(dropped, 8),
            Admit::No { .. } => panic!("a new window admits again"),
        }
    }
}
