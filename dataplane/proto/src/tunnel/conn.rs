//! The tunnel connection state machine, sans-IO (in the manner of `quinn-proto`): the driver
//! feeds it bytes read from the transport and the current time, and takes from it the bytes to
//! write, the events for the application and the next deadline. It owns no socket and reads no
//! clock, so it is tested deterministically in memory.
//!
//! Flow control is per stream and credit based: each side announces its receive window in
//! `Hello`; a sender may have at most that many unacknowledged bytes in flight, and the receiver
//! returns credit with `Window` frames as its application consumes data. The queue of encoded
//! frames waiting for the transport is capped too: past `max_buffered` bytes, `send` accepts
//! nothing and the stream is told when it may write again. A slow reader therefore slows its
//! writer; memory never grows without bound.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::frame::{Frame, FrameError, HEADER_LEN, StreamId, VERSION};
use super::input::Input;

mod receive;

/// Error codes carried by `OpenErr`, `Reset` and `GoAway`.
pub mod code {
    pub const NO_ERROR: u16 = 0;
    pub const PROTOCOL: u16 = 1;
    pub const REFUSED: u16 = 2;
    pub const NOT_FOUND: u16 = 3;
    pub const ACCESS_DENIED: u16 = 4;
    pub const TOO_MANY_STREAMS: u16 = 5;
    pub const GOING_AWAY: u16 = 6;
    pub const UNAVAILABLE: u16 = 7;
    pub const CANCELLED: u16 = 8;
    pub const INTERNAL: u16 = 9;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that dialled (the agent): opens odd streams.
    Dialer,
    /// The side that accepted (the proxy): opens even streams.
    Listener,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Receive window per stream, announced to the peer.
    pub initial_window: u32,
    /// A stream's receive window grows (doubling) up to this while its application consumes
    /// faster than the peer could send within the window: a window is granted again less than
    /// two round trips after the last grant. Set it to `initial_window` for fixed windows.
    pub max_window: u32,
    /// How far the windows of all streams of this connection may grow beyond
    /// `initial_window`, together: what a tunnel may hold for fast streams whose readers stall.
    pub max_window_growth: u64,
    /// Largest frame payload accepted from the peer (and largest data frame sent).
    pub max_frame: u32,
    /// Streams the peer may have open at once; more are refused, not fatal.
    pub max_streams: usize,
    /// Encoded bytes that may wait for the transport before `send` pushes back.
    pub max_buffered: usize,
    pub ping_interval: Duration,
    /// Close the tunnel if nothing arrives for this long (pings keep a live peer talking).
    pub idle_timeout: Duration,
}

/// A window grant carries a ping (a round-trip sample under load) at most this often.
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

impl Default for Config {
    fn default() -> Self {
        Self {
            initial_window: 256 * 1024,
            max_window: 4 * 1024 * 1024,
            max_window_growth: 32 * 1024 * 1024,
            max_frame: 64 * 1024,
            max_streams: 4096,
            max_buffered: 512 * 1024,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

/// What happened, for the application. Not `#[non_exhaustive]`: every driver (`mux`, the
/// fuzz and model tests) must handle every event, and a new one should fail their match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's hello arrived: streams may be opened.
    Ready,
    /// The peer wants a stream to `target`; answer with `accept` or `reject`.
    Incoming {
        stream: StreamId,
        target: String,
        metadata: Bytes,
    },
    /// The peer accepted a stream we opened.
    Accepted {
        stream: StreamId,
    },
    /// The peer refused a stream we opened.
    Rejected {
        stream: StreamId,
        code: u16,
        message: String,
    },
    Data {
        stream: StreamId,
        data: Bytes,
    },
    /// The stream may accept more data from `send`.
    Writable {
        stream: StreamId,
    },
    /// The peer will send no more on this stream.
    Finished {
        stream: StreamId,
    },
    /// The peer reset the stream; it is gone.
    Reset {
        stream: StreamId,
        code: u16,
    },
    Heartbeat {
        inventory: Bytes,
    },
    /// The peer is draining: open no new streams on this connection.
    GoAway {
        code: u16,
        message: String,
    },
    Pong {
        rtt: Duration,
    },
}

/// Why the connection ended. The driver logs it and closes the transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("peer speaks protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    #[error("no frames from the peer for {0:?}")]
    IdleTimeout(Duration),
    #[error("the peer closed the tunnel: {0}")]
    PeerClosed(String),
}

/// Why a local stream operation was refused. Affects only the caller, not the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("the tunnel is not ready yet (no hello from the peer)")]
    NotReady,
    #[error("the tunnel is draining (go-away)")]
    GoingAway,
    #[error("the tunnel is closed")]
    Closed,
    #[error("no such stream {0}")]
    UnknownStream(StreamId),
    #[error("stream {0} is already finished for sending")]
    Finished(StreamId),
    #[error("target is longer than 1024 bytes")]
    TargetTooLong,
}

#[derive(Debug)]
struct Stream {
    /// We opened it and the peer has not answered yet.
    opening: bool,
    send_credit: u64,
    /// How much the peer may still send before we grant more.
    recv_window: u64,
    /// Consumed by the application, not yet granted back.
    recv_unacked: u64,
    /// The receive window this stream is granted up to: `initial_window`, grown while the
    /// application keeps up (see [`Config::max_window`]).
    window: u64,
    /// When window was last granted (none yet: no rate to judge growth by).
    granted_at: Option<Instant>,
    sent_fin: bool,
    recv_fin: bool,
    /// `send` was refused for lack of credit or buffer: tell the app when it may write.
    blocked: bool,
}

/// What [`Connection::send_framed`] did with a lent buffer.
#[derive(Debug)]
pub enum Framed<T> {
    /// `n` payload bytes went out in a frame; `rest` is the payload it left (empty when none).
    Sent { n: usize, rest: Bytes },
    /// No credit: the buffer, untouched.
    Blocked(T),
}

#[derive(Debug)]
pub struct Connection {
    side: Side,
    config: Config,
    peer_window: Option<u32>,
    peer_max_frame: u32,
    streams: HashMap<StreamId, Stream>,
    next_local: StreamId,
    /// Highest stream id the peer has opened.
    last_peer: StreamId,
    out: BytesMut,
    /// Data frames queued whole, without copying their payload (see [`Connection::send_framed`]);
    /// they go out before `out`, which holds what was queued after them.
    segments: VecDeque<Bytes>,
    segments_len: usize,
    inbuf: Input,
    events: VecDeque<Event>,
    last_rx: Instant,
    next_ping: Instant,
    ping_outstanding: Option<(u64, Instant)>,
    ping_counter: u64,
    /// Smoothed round-trip time from pings (the first is sent when the peer's hello arrives,
    /// more along with window grants: see [`Connection::consumed`]).
    srtt: Option<Duration>,
    /// When the last ping was answered.
    rtt_sampled_at: Option<Instant>,
    /// Sum over open streams of how far their windows grew beyond `initial_window`.
    window_growth: u64,
    going_away: bool,
    peer_going_away: bool,
    closed: Option<ConnError>,
}

impl Connection {
    /// A new connection; queues our hello at once.
    pub fn new(side: Side, config: Config, now: Instant) -> Self {
        let mut out = BytesMut::with_capacity(64);
        Frame::Hello {
            version: VERSION,
            initial_window: config.initial_window,
            max_frame: config.max_frame,
        }
        .encode(&mut out);
        Self {
            side,
            next_local: if side == Side::Dialer { 1 } else { 2 },
            last_peer: 0,
            peer_window: None,
            peer_max_frame: 16 * 1024,
            streams: HashMap::new(),
            out,
            segments: VecDeque::new(),
            segments_len: 0,
            inbuf: Input::default(),
            events: VecDeque::new(),
            last_rx: now,
            next_ping: now + config.ping_interval,
            ping_outstanding: None,
            ping_counter: 0,
            srtt: None,
            rtt_sampled_at: None,
            window_growth: 0,
            going_away: false,
            peer_going_away: false,
            closed: None,
            config,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.peer_window.is_some() && self.closed.is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Bytes of input buffer the connection holds (allocated, used or not).
    pub fn input_capacity(&self) -> usize {
        self.inbuf.capacity()
    }

    /// How often the input buffer needed a fresh allocation (see [`Input::allocations`]): a
    /// reader that keeps up lets reads reuse it.
    pub fn input_allocations(&self) -> u64 {
        self.inbuf.allocations()
    }

    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether the peer sent go-away (no new streams) or we did.
    pub fn is_draining(&self) -> bool {
        self.going_away || self.peer_going_away
    }

    fn is_peer_stream(&self, id: StreamId) -> bool {
        let odd = id % 2 == 1;
        match self.side {
            Side::Dialer => !odd,
            Side::Listener => odd,
        }
    }

    fn fail(&mut self, err: ConnError) -> ConnError {
        if self.closed.is_none() {
            let code = match &err {
                ConnError::IdleTimeout(_) => code::NO_ERROR,
                _ => code::PROTOCOL,
            };
            Frame::GoAway {
                last_stream: self.last_peer,
                code,
                message: err.to_string(),
            }
            .encode(&mut self.out);
            self.closed = Some(err.clone());
            self.remove_all_streams();
        }
        err
    }

    /// Feed bytes read from the transport. An error means the connection is over: write out
    /// what `poll_transmit` still holds (a go-away naming the reason), then close.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) -> Result<(), ConnError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        self.inbuf.extend(data);
        self.process_input(now)
    }

    /// Room for at least `room` more bytes in the connection's input buffer, initialized, for a
    /// transport that reads straight into it (then calls [`Connection::input_filled`] and
    /// [`Connection::process_input`]) instead of handing over a copy with
    /// [`Connection::handle_input`]. Worth it while streams are open, when the buffer is kept
    /// between reads anyway; an idle tunnel should read into a shared buffer and call
    /// `handle_input`, so that it holds no buffer of its own.
    pub fn input_buffer(&mut self, room: usize) -> &mut [u8] {
        self.inbuf.room(room)
    }

    /// The transport wrote `n` bytes at the front of [`Connection::input_buffer`].
    pub fn input_filled(&mut self, n: usize) {
        self.inbuf.filled(n);
    }

    /// Decode and handle the frames complete in the input buffer (after the transport wrote
    /// into [`Connection::input_buffer`]).
    pub fn process_input(&mut self, now: Instant) -> Result<(), ConnError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        self.last_rx = now;
        loop {
            let frame = match self.inbuf.decode(self.config.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            if let Err(e) = self.handle_frame(frame, now) {
                return Err(self.fail(e));
            }
            if let Some(e) = &self.closed {
                return Err(e.clone());
            }
        }
        self.release_idle_input();
        Ok(())
    }

    /// A tunnel without streams holds no input buffer (decoded frames share its allocation and
    /// free it when they are gone). With streams open an empty buffer is kept for the next read,
    /// unless a burst made it large. Called after input is processed, and by a transport whose
    /// read into [`Connection::input_buffer`] was waiting when the last stream ended.
    pub fn release_idle_input(&mut self) {
        if self.streams.is_empty() || self.inbuf.capacity() > 256 * 1024 {
            self.inbuf.release();
        }
    }

    fn maybe_remove(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.get(&stream)
            && s.sent_fin
            && s.recv_fin
        {
            self.remove_stream(stream);
        }
    }

    /// Forget `stream`, returning its window growth to the connection. Whether it was open.
    fn remove_stream(&mut self, stream: StreamId) -> bool {
        match self.streams.remove(&stream) {
            Some(s) => {
                let grown = s
                    .window
                    .saturating_sub(u64::from(self.config.initial_window));
                self.window_growth = self.window_growth.saturating_sub(grown);
                true
            }
            None => false,
        }
    }

    fn remove_all_streams(&mut self) {
        self.streams.clear();
        self.window_growth = 0;
    }

    /// Open a stream to `target` with JSON `metadata`. The answer arrives as `Accepted` or
    /// `Rejected`; data may be sent only after `Accepted`.
    pub fn open(&mut self, target: &str, metadata: Bytes) -> Result<StreamId, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::Closed);
        }
        let window = self.peer_window.ok_or(StreamError::NotReady)?;
        if self.is_draining() {
            return Err(StreamError::GoingAway);
        }
        if target.len() > 1024 {
            return Err(StreamError::TargetTooLong);
        }
        let stream = self.next_local;
        self.next_local = self
            .next_local
            .checked_add(2)
            .ok_or(StreamError::GoingAway)?;
        self.streams.insert(
            stream,
            Stream {
                opening: true,
                send_credit: u64::from(window),
                recv_window: u64::from(self.config.initial_window),
                recv_unacked: 0,
                window: u64::from(self.config.initial_window),
                granted_at: None,
                sent_fin: false,
                recv_fin: false,
                blocked: false,
            },
        );
        Frame::Open {
            stream,
            target: target.to_owned(),
            metadata,
        }
        .encode(&mut self.out);
        Ok(stream)
    }

    pub fn accept(&mut self, stream: StreamId) -> Result<(), StreamError> {
        if !self.streams.contains_key(&stream) {
            return Err(StreamError::UnknownStream(stream));
        }
        Frame::OpenOk { stream }.encode(&mut self.out);
        Ok(())
    }

    pub fn reject(&mut self, stream: StreamId, code: u16, message: &str) {
        if self.remove_stream(stream) {
            Frame::OpenErr {
                stream,
                code,
                message: message.to_owned(),
            }
            .encode(&mut self.out);
        }
    }

    /// How many bytes `send` would accept now.
    pub fn writable(&self, stream: StreamId) -> usize {
        match self.streams.get(&stream) {
            Some(s) if !s.opening && !s.sent_fin => {
                let room = self.config.max_buffered.saturating_sub(self.buffered());
                (s.send_credit as usize).min(room)
            }
            _ => 0,
        }
    }

    /// Queue as much of `data` as credit and buffer allow; returns how much was taken. When it
    /// takes less than offered, `Writable` follows once more may be sent.
    pub fn send(&mut self, stream: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let n = self.take_credit(stream, data.len(), usize::MAX)?;
        let max_frame = self.peer_max_frame as usize;
        for chunk in data.get(..n).unwrap_or_default().chunks(max_frame) {
            Frame::encode_data(stream, chunk, &mut self.out);
        }
        Ok(n)
    }

    /// How much of `wanted` bytes `stream` may send now (at most `cap`), as credit, the output
    /// buffer's room and the stream's state allow; the credit is taken. A stream given less
    /// than it wanted is marked blocked, to be told when it may write again.
    fn take_credit(
        &mut self,
        stream: StreamId,
        wanted: usize,
        cap: usize,
    ) -> Result<usize, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::Closed);
        }
        let room = self.config.max_buffered.saturating_sub(self.buffered());
        let s = self
            .streams
            .get_mut(&stream)
            .ok_or(StreamError::UnknownStream(stream))?;
        if s.sent_fin {
            return Err(StreamError::Finished(stream));
        }
        if s.opening {
            s.blocked = true;
            return Ok(0);
        }
        let n = wanted.min(s.send_credit as usize).min(room).min(cap);
        if n < wanted {
            s.blocked = true;
        }
        s.send_credit -= n as u64;
        Ok(n)
    }

    /// The largest data payload one frame may carry to the peer.
    pub fn max_payload(&self) -> usize {
        self.peer_max_frame as usize
    }

    /// [`send`](Self::send) without copying: up to one frame of `stream`'s data made in place in
    /// a buffer the caller lends: `buf[..HEADER_LEN]` is room for the header,
    /// `buf[HEADER_LEN..HEADER_LEN + len]` the payload. The frame queued is a view of the
    /// buffer (the payload is not copied), and so is the payload that credit or the peer's
    /// frame size left (`rest`, to go through [`Self::send`]); the buffer is released when the
    /// last view is. With no credit at all the buffer comes back untouched.
    pub fn send_framed<T>(
        &mut self,
        stream: StreamId,
        mut buf: T,
        len: usize,
    ) -> Result<Framed<T>, StreamError>
    where
        T: AsRef<[u8]> + AsMut<[u8]> + Send + 'static,
    {
        let payload = len.min(buf.as_ref().len().saturating_sub(HEADER_LEN));
        let n = self.take_credit(stream, payload, self.peer_max_frame as usize)?;
        if n == 0 {
            return Ok(Framed::Blocked(buf));
        }
        if let Some(header) = buf.as_mut().get_mut(..HEADER_LEN) {
            Frame::write_data_header(stream, n, header);
        }
        let whole = Bytes::from_owner(buf);
        let frame = whole.slice(..HEADER_LEN + n);
        let rest = whole.slice(HEADER_LEN + n..HEADER_LEN + payload);
        if !self.out.is_empty() {
            // What was queued before this frame goes before it.
            let earlier = self.out.split().freeze();
            self.segments_len += earlier.len();
            self.segments.push_back(earlier);
        }
        self.segments_len += frame.len();
        self.segments.push_back(frame);
        Ok(Framed::Sent { n, rest })
    }

    /// Bytes queued for the transport.
    fn buffered(&self) -> usize {
        self.out.len() + self.segments_len
    }

    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.buffered()
    }

    /// The application consumed `n` received bytes of `stream`: return credit to the peer in
    /// batches of half a window, so that a busy stream costs one window frame per half window.
    ///
    /// The window grows while the application keeps up: when half a window was consumed within
    /// two round trips of the last grant, the peer could have sent faster than the window let it
    /// (the rule of Chromium's QUIC receive-window auto-tuning), so the window doubles, up to
    /// [`Config::max_window`] and within the connection's [`Config::max_window_growth`].
    pub fn consumed(&mut self, stream: StreamId, n: usize, now: Instant) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        s.recv_unacked += n as u64;
        if s.recv_unacked < (s.window / 2).max(1) || s.recv_fin {
            return;
        }
        let mut grow = 0;
        if let (Some(rtt), Some(last)) = (self.srtt, s.granted_at)
            && now.saturating_duration_since(last) < 2 * rtt
        {
            grow = s
                .window
                .min(u64::from(self.config.max_window).saturating_sub(s.window))
                .min(
                    self.config
                        .max_window_growth
                        .saturating_sub(self.window_growth),
                );
            s.window += grow;
            self.window_growth += grow;
        }
        s.granted_at = Some(now);
        // Growth is granted like consumed bytes; what one frame cannot carry waits for the next.
        let inc = (s.recv_unacked + grow).min(u64::from(u32::MAX));
        s.recv_unacked = s.recv_unacked + grow - inc;
        s.recv_window += inc;
        Frame::Window {
            stream,
            increment: inc as u32,
        }
        .encode(&mut self.out);
        // Sample the round trip while data flows: it includes what queues at the sender, which
        // is what the window must cover (an idle ping, such as the first one, sees less).
        if self.ping_outstanding.is_none()
            && self
                .rtt_sampled_at
                .is_none_or(|t| now.saturating_duration_since(t) >= RTT_SAMPLE_INTERVAL)
        {
            self.send_ping(now);
        }
    }

    /// Half-close: we send no more on `stream`.
    pub fn finish(&mut self, stream: StreamId) -> Result<(), StreamError> {
        let s = self
            .streams
            .get_mut(&stream)
            .ok_or(StreamError::UnknownStream(stream))?;
        if s.sent_fin {
            return Ok(());
        }
        s.sent_fin = true;
        s.blocked = false;
        Frame::Fin { stream }.encode(&mut self.out);
        self.maybe_remove(stream);
        Ok(())
    }

    /// Abort `stream` in both directions.
    pub fn reset(&mut self, stream: StreamId, code: u16) {
        if self.remove_stream(stream) && self.closed.is_none() {
            Frame::Reset { stream, code }.encode(&mut self.out);
        }
    }

    pub fn send_heartbeat(&mut self, inventory: Bytes) {
        if self.closed.is_none() {
            Frame::Heartbeat { inventory }.encode(&mut self.out);
        }
    }

    /// Start draining: the peer opens nothing new; existing streams finish.
    pub fn go_away(&mut self, code: u16, message: &str) {
        if !self.going_away && self.closed.is_none() {
            self.going_away = true;
            Frame::GoAway {
                last_stream: self.last_peer,
                code,
                message: message.to_owned(),
            }
            .encode(&mut self.out);
        }
    }

    /// Bytes to write to the transport, if any. Also wakes streams that may write again.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.segments.pop_front() {
            self.segments_len -= frame.len();
            self.wake_blocked();
            return Some(frame);
        }
        if self.out.is_empty() {
            if self.streams.is_empty() {
                // Nothing to send and no stream to send it: drop what is left of the last
                // chunk's allocation, so an idle tunnel holds no output buffer.
                self.out = BytesMut::new();
            }
            return None;
        }
        let out = self.out.split().freeze();
        self.wake_blocked();
        Some(out)
    }

    fn wake_blocked(&mut self) {
        if self.buffered() >= self.config.max_buffered {
            return;
        }
        for (id, s) in self.streams.iter_mut() {
            if s.blocked && !s.opening && !s.sent_fin && s.send_credit > 0 {
                s.blocked = false;
                self.events.push_back(Event::Writable { stream: *id });
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front();
        if ev.is_none() && self.events.capacity() > 0 && self.streams.is_empty() {
            // Drained, and no stream to bring more soon: an idle tunnel keeps no event queue.
            self.events = VecDeque::new();
        }
        ev
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        Some(self.next_ping.min(self.last_rx + self.config.idle_timeout))
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if now.saturating_duration_since(self.last_rx) >= self.config.idle_timeout {
            return Err(self.fail(ConnError::IdleTimeout(self.config.idle_timeout)));
        }
        if now >= self.next_ping {
            self.send_ping(now);
        }
        Ok(())
    }

    fn send_ping(&mut self, now: Instant) {
        self.ping_counter += 1;
        self.ping_outstanding = Some((self.ping_counter, now));
        Frame::Ping {
            opaque: self.ping_counter,
        }
        .encode(&mut self.out);
        self.next_ping = now + self.config.ping_interval;
    }

    /// The smoothed round-trip time, once a ping was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Memory held by this connection's buffers (for the idle-tunnel budget).
    pub fn buffered_bytes(&self) -> usize {
        self.out.capacity() + self.segments_len + self.inbuf.capacity()
    }
}
