//! The receive side of the tunnel connection: what each frame from the peer does to the
//! connection and its streams, and the protocol rules checked before it does (a hello first,
//! windows respected, streams opened by the right side, frames for unknown streams). The
//! send side, timers and the application's calls are in the parent module.

use std::time::Instant;

use super::*;

impl Connection {
    /// Apply one frame from the peer: the protocol's rules for every frame type, checked
    /// before anything changes (a violation closes the connection with a reason).
    pub(super) fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), ConnError> {
        if self.peer_window.is_none() && !matches!(frame, Frame::Hello { .. }) {
            return Err(ConnError::Protocol(format!(
                "{} frame before hello",
                frame.name()
            )));
        }
        match frame {
            Frame::Hello {
                version,
                initial_window,
                max_frame,
            } => {
                if self.peer_window.is_some() {
                    return Err(ConnError::Protocol("second hello".into()));
                }
                if version != VERSION {
                    return Err(ConnError::Version(version));
                }
                if max_frame < 1024 {
                    return Err(ConnError::Protocol(format!(
                        "peer max_frame {max_frame} is below 1024"
                    )));
                }
                self.peer_window = Some(initial_window);
                self.peer_max_frame = max_frame.min(self.config.max_frame.max(1024));
                self.events.push_back(Event::Ready);
                // A first round-trip time for window auto-tuning, without waiting a ping
                // interval.
                self.send_ping(now);
            }
            Frame::Open {
                stream,
                target,
                metadata,
            } => {
                if !self.is_peer_stream(stream) || stream <= self.last_peer {
                    return Err(ConnError::Protocol(format!(
                        "peer opened stream {stream} out of order or with our parity"
                    )));
                }
                self.last_peer = stream;
                if self.going_away {
                    Frame::OpenErr {
                        stream,
                        code: code::GOING_AWAY,
                        message: "tunnel is draining".into(),
                    }
                    .encode(&mut self.out);
                } else if self
                    .streams
                    .keys()
                    .filter(|id| self.is_peer_stream(**id))
                    .count()
                    >= self.config.max_streams
                {
                    Frame::OpenErr {
                        stream,
                        code: code::TOO_MANY_STREAMS,
                        message: "too many streams".into(),
                    }
                    .encode(&mut self.out);
                } else {
                    let window = u64::from(self.peer_window.unwrap_or(0));
                    self.streams.insert(
                        stream,
                        Stream {
                            opening: false,
                            send_credit: window,
                            recv_window: u64::from(self.config.initial_window),
                            recv_unacked: 0,
                            window: u64::from(self.config.initial_window),
                            granted_at: None,
                            sent_fin: false,
                            recv_fin: false,
                            blocked: false,
                        },
                    );
                    self.events.push_back(Event::Incoming {
                        stream,
                        target,
                        metadata,
                    });
                }
            }
            Frame::OpenOk { stream } => match self.streams.get_mut(&stream) {
                Some(s) if s.opening => {
                    s.opening = false;
                    self.events.push_back(Event::Accepted { stream });
                }
                Some(_) => {
                    return Err(ConnError::Protocol(format!(
                        "open-ok for established stream {stream}"
                    )));
                }
                None => self.check_known(stream, "open-ok")?,
            },
            Frame::OpenErr {
                stream,
                code,
                message,
            } => match self.streams.get(&stream) {
                Some(s) if s.opening => {
                    self.remove_stream(stream);
                    self.events.push_back(Event::Rejected {
                        stream,
                        code,
                        message,
                    });
                }
                Some(_) => {
                    return Err(ConnError::Protocol(format!(
                        "open-err for established stream {stream}"
                    )));
                }
                None => self.check_known(stream, "open-err")?,
            },
            Frame::Data { stream, data } => {
                let len = data.len() as u64;
                match self.streams.get_mut(&stream) {
                    Some(s) => {
                        if s.opening {
                            return Err(ConnError::Protocol(format!(
                                "data on stream {stream} before open-ok"
                            )));
                        }
                        if s.recv_fin {
                            return Err(ConnError::Protocol(format!(
                                "data on stream {stream} after fin"
                            )));
                        }
                        if len > s.recv_window {
                            return Err(ConnError::Protocol(format!(
                                "flow control: {len} bytes on stream {stream} with a window of {}",
                                s.recv_window
                            )));
                        }
                        s.recv_window -= len;
                        if !data.is_empty() {
                            self.events.push_back(Event::Data { stream, data });
                        }
                    }
                    None => self.check_known(stream, "data")?,
                }
            }
            Frame::Window { stream, increment } => match self.streams.get_mut(&stream) {
                Some(s) => {
                    s.send_credit += u64::from(increment);
                    if s.send_credit > u64::from(u32::MAX) {
                        return Err(ConnError::Protocol(format!(
                            "window overflow on stream {stream}"
                        )));
                    }
                    if s.blocked && !s.sent_fin {
                        s.blocked = false;
                        self.events.push_back(Event::Writable { stream });
                    }
                }
                None => self.check_known(stream, "window")?,
            },
            Frame::Fin { stream } => match self.streams.get_mut(&stream) {
                Some(s) => {
                    if s.recv_fin {
                        return Err(ConnError::Protocol(format!(
                            "second fin on stream {stream}"
                        )));
                    }
                    s.recv_fin = true;
                    self.events.push_back(Event::Finished { stream });
                    self.maybe_remove(stream);
                }
                None => self.check_known(stream, "fin")?,
            },
            Frame::Reset { stream, code } => {
                if self.remove_stream(stream) {
                    self.events.push_back(Event::Reset { stream, code });
                } else {
                    self.check_known(stream, "reset")?;
                }
            }
            Frame::Ping { opaque } => Frame::Pong { opaque }.encode(&mut self.out),
            Frame::Pong { opaque } => {
                if let Some((expected, sent)) = self.ping_outstanding
                    && expected == opaque
                {
                    self.ping_outstanding = None;
                    let rtt = now.saturating_duration_since(sent);
                    self.srtt = Some(match self.srtt {
                        Some(srtt) => (srtt * 7 + rtt) / 8,
                        None => rtt,
                    });
                    self.rtt_sampled_at = Some(now);
                    self.events.push_back(Event::Pong { rtt });
                }
            }
            Frame::Heartbeat { inventory } => self.events.push_back(Event::Heartbeat { inventory }),
            Frame::GoAway { code, message, .. } => {
                self.peer_going_away = true;
                if code != code::NO_ERROR && code != code::GOING_AWAY {
                    let msg = format!("{message} (code {code})");
                    self.closed = Some(ConnError::PeerClosed(msg));
                    self.remove_all_streams();
                }
                self.events.push_back(Event::GoAway { code, message });
            }
        }
        Ok(())
    }

    /// A frame for a stream we do not hold: fine if it was closed already (frames cross on the
    /// wire), a protocol error if it was never opened.
    fn check_known(&self, stream: StreamId, what: &str) -> Result<(), ConnError> {
        let ever_opened = if self.is_peer_stream(stream) {
            stream <= self.last_peer
        } else {
            stream < self.next_local
        };
        if ever_opened {
            Ok(())
        } else {
            Err(ConnError::Protocol(format!(
                "{what} on stream {stream}, which was never opened"
            )))
        }
    }
}
