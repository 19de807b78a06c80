//! A tunnel's events for its owner (streams the peer opened, heartbeats, go-away), in a queue
//! that holds no allocation while idle: most of a proxy's tunnels are idle most of the time.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use gatehouse_proto::tunnel::StreamId;
use tokio::sync::Notify;

/// What a tunnel tells its owner (besides stream data, which goes to the streams).
#[derive(Debug)]
pub enum TunnelEvent {
    /// The peer opened a stream: answer with [`super::Tunnel::accept`] or [`super::Tunnel::reject`].
    Incoming {
        stream: StreamId,
        target: String,
        metadata: Bytes,
    },
    Heartbeat(Bytes),
    GoAway {
        code: u16,
        message: String,
    },
}

/// Events of one tunnel, for its owner. Unlike a tokio mpsc channel (which allocates a block of
/// 32 slots up front), an idle tunnel's queue holds no allocation at all.
#[derive(Default)]
struct EventQueue {
    queue: VecDeque<TunnelEvent>,
    /// The tunnel is gone: no more events will come.
    closed: bool,
}

pub(super) struct EventSender {
    shared: Rc<RefCell<EventQueue>>,
    notify: Rc<Notify>,
}

/// The receiving end of a tunnel's events (see [`TunnelEvent`]); ends when the tunnel is dropped.
pub struct Events {
    shared: Rc<RefCell<EventQueue>>,
    notify: Rc<Notify>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

pub(super) fn event_queue() -> (EventSender, Events) {
    let shared = Rc::new(RefCell::new(EventQueue::default()));
    let notify = Rc::new(Notify::new());
    (
        EventSender {
            shared: Rc::clone(&shared),
            notify: Rc::clone(&notify),
        },
        Events { shared, notify },
    )
}

impl EventSender {
    pub(super) fn send(&self, ev: TunnelEvent) {
        self.shared.borrow_mut().queue.push_back(ev);
        self.notify.notify_one();
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.shared.borrow_mut().closed = true;
        self.notify.notify_one();
    }
}

impl Events {
    /// The next event, or `None` once the tunnel is gone and every event was taken.
    pub async fn recv(&mut self) -> Option<TunnelEvent> {
        loop {
            {
                let mut q = self.shared.borrow_mut();
                if let Some(ev) = q.queue.pop_front() {
                    if q.queue.is_empty() {
                        // Give the memory back: most tunnels see an event every few seconds.
                        q.queue = VecDeque::new();
                    }
                    return Some(ev);
                }
                if q.closed {
                    return None;
                }
            }
            self.notify.notified().await;
        }
    }
}
