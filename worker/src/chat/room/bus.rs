//! A room's side of the bus: what it publishes (lines, who is here, name claims) and what it
//! reads and acts on (the other processes' lines and states, `Gone`, the hub's answers).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use protocol::bus::Frame;

use super::{BUS_LOW, LocalRoom};
use crate::chat::{Floor, in_use, left};

impl LocalRoom {
    pub(super) fn publish(&mut self, frame: Frame<'_>) {
        if let Some(bus) = self.bus.as_mut() {
            bus.out.push(frame);
            self.tally.bus_out += 1;
        }
    }

    pub(super) fn publish_state(&mut self, serial: u64, body: &[u8]) {
        self.publish(Frame::State {
            origin: 0,
            key: serial,
            body,
        });
    }

    pub(super) fn publish_claim(&mut self, serial: u64, body: &[u8]) {
        self.publish(Frame::Claim {
            origin: 0,
            key: serial,
            body,
        });
    }

    /// Sends what waits for the bus, as far as it takes it; wakes paused sessions once it
    /// has drained. `Err`: the bus is gone.
    pub(super) fn flush_bus(&mut self) -> io::Result<()> {
        let Some(bus) = self.bus.as_mut() else {
            return Ok(());
        };
        bus.out.flush(&mut bus.stream)?;
        if bus.out.backlog() < BUS_LOW {
            self.bus_gate = false;
        }
        self.release(Instant::now());
        Ok(())
    }

    /// Reads what the bus brought and acts on it, until the socket is empty or senders are
    /// held (then it is read again once they are not). `Err`: the bus is gone.
    pub(super) fn read_bus(&mut self) -> io::Result<()> {
        // Until the socket is empty: it is edge-triggered, and the hub may send nothing more
        // to announce what is left. Each read's frames are applied before the next read, so
        // what is held stays one read's worth.
        loop {
            if self.holding(Instant::now()) {
                self.bus_unread = true;
                return Ok(());
            }
            let Some(bus) = self.bus.as_mut() else {
                return Ok(());
            };
            match io::Read::read(&mut bus.stream, &mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => bus.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
            self.apply_received()?;
        }
    }

    /// Acts on every whole frame the bus has brought.
    fn apply_received(&mut self) -> io::Result<()> {
        let Some(bus) = self.bus.as_mut() else {
            return Ok(());
        };
        // Frames are applied from a copy of the decoder, as applying one needs the room.
        let mut decoder = std::mem::take(&mut bus.decoder);
        let applied = (|| {
            while let Some(frame) = decoder.next_frame().map_err(io::Error::other)? {
                self.tally.bus_in += 1;
                self.apply(frame);
            }
            Ok(())
        })();
        if let Some(bus) = self.bus.as_mut() {
            bus.decoder = decoder;
        }
        applied
    }

    fn apply(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Cast { body, .. } => self.deliver_all(None, &Arc::from(body)),
            Frame::State { origin, key, body } => {
                let old = self.remote.remove(&(origin, key));
                if let Some(old) = &old {
                    self.roster.remove(old);
                }
                if !body.is_empty() {
                    let name = String::from_utf8_lossy(body).into_owned();
                    self.roster.add(&name);
                    self.remote.insert((origin, key), name);
                }
            }
            Frame::Gone { origin } => {
                let gone: Vec<(u32, u64)> = self
                    .remote
                    .keys()
                    .filter(|(pid, _)| *pid == origin)
                    .copied()
                    .collect();
                for k in gone {
                    if let Some(name) = self.remote.remove(&k) {
                        self.roster.remove(&name);
                        self.deliver_all(None, &left(&name));
                    }
                }
            }
            Frame::Granted { key, body, .. } | Frame::Refused { key, body, .. } => {
                let granted = matches!(frame, Frame::Granted { .. });
                self.answered(key, body, granted);
            }
            // Only the hub is asked for claims.
            Frame::Claim { .. } => {}
        }
    }

    /// The hub answered the claim of `name` by the client `serial`.
    fn answered(&mut self, serial: u64, name: &[u8], granted: bool) {
        let me = self.by_serial.get(&serial).copied();
        let Some(m) = me.and_then(|me| self.members.get_mut(&me)) else {
            if granted {
                // It left meanwhile (its release may have crossed this answer).
                self.publish_claim(serial, b"");
            }
            return;
        };
        let Some(name) = m.claim.take_if(|c| c.as_bytes() == name) else {
            return;
        };
        let me = me.unwrap_or_default();
        self.woken.push(me as usize);
        if granted {
            self.rename(me, &name);
        } else {
            self.tell(me, in_use(&name));
        }
    }
}
