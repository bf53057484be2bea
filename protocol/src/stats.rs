//! A worker's traffic counters: what it reports to the master and what the master adds up.
//!
//! Every counter except `active` is cumulative since the worker started, so a report that is
//! lost or coalesced loses nothing: the next one carries the same totals and more.

/// Counters of one worker (or one acceptor thread in thread mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open right now (a gauge, not cumulative).
    pub active: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written back to clients.
    pub bytes_out: u64,
    /// `accept` failures other than "nothing to accept" (EMFILE, ECONNABORTED, ...).
    pub accept_errors: u64,
    /// Connections ended by a reset, broken pipe or other I/O error.
    pub io_errors: u64,
    /// Connections the server closed because a limit was reached (drain timeout, ...).
    pub closed_by_limit: u64,
    /// UDP datagrams received.
    pub datagrams_in: u64,
    /// UDP datagrams echoed back.
    pub datagrams_out: u64,
    /// UDP datagrams not echoed because their source could start an echo loop (see
    /// `loops_back` in the worker's `udp` module).
    pub datagrams_refused: u64,
}

impl Counters {
    /// Number of `u64` fields in the wire form.
    pub const FIELDS: usize = 10;

    /// The counters in wire order.
    pub fn to_array(&self) -> [u64; Self::FIELDS] {
        [
            self.accepted,
            self.active,
            self.bytes_in,
            self.bytes_out,
            self.accept_errors,
            self.io_errors,
            self.closed_by_limit,
            self.datagrams_in,
            self.datagrams_out,
            self.datagrams_refused,
        ]
    }

    /// Adds `other` field by field (the gauge `active` too: callers add only live workers').
    pub fn add(&mut self, other: &Counters) {
        let mut a = self.to_array();
        for (x, y) in a.iter_mut().zip(other.to_array()) {
            *x = x.wrapping_add(y);
        }
        *self = Counters::from_array(a);
    }

    /// The counters from wire order.
    pub fn from_array(a: [u64; Self::FIELDS]) -> Self {
        Counters {
            accepted: a[0],
            active: a[1],
            bytes_in: a[2],
            bytes_out: a[3],
            accept_errors: a[4],
            io_errors: a[5],
            closed_by_limit: a[6],
            datagrams_in: a[7],
            datagrams_out: a[8],
            datagrams_refused: a[9],
        }
    }
}
