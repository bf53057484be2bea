//! The control protocol: one request line in, one JSON line out, both typed. [`Request`] is
//! what a client may ask; [`Response`] is every answer, serialized by the server and parsed
//! back by the client (`prefork-echo stats|reload|stop|scale`), so the two cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::signals::{self, Verb};
use crate::stats::Snapshot;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The stats snapshot as JSON.
    Stats,
    /// Reload; answered once the new generation serves (or the reload failed).
    Reload,
    /// Graceful stop; answered at once with the pid to wait for.
    Stop,
    /// Resize the pool to N workers.
    Scale(u32),
    /// Binary upgrade: start a new master from the binary on disk (answered at once).
    Upgrade,
    /// End the window after an upgrade: the old master retires now.
    UpgradeCommit,
}

impl Request {
    /// Its entry in the verb table.
    pub fn verb(&self) -> &'static Verb {
        let name = match self {
            Request::Stats => "stats",
            Request::Reload => "reload",
            Request::Stop => "stop",
            Request::Scale(_) => "scale",
            Request::Upgrade | Request::UpgradeCommit => "upgrade",
        };
        // Every variant is in the table (a test in `signals` checks it).
        signals::verb(name).unwrap_or(&signals::VERBS[0])
    }

    /// The request line that asks for it.
    pub fn line(&self) -> String {
        match self {
            Request::Scale(n) => format!("{} {n}", self.verb().name),
            Request::UpgradeCommit => format!("{} commit", self.verb().name),
            other => other.verb().name.to_string(),
        }
    }

    /// Parses one request line (without its newline); never panics.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
        let unknown = || format!("unknown request {:?}", truncate(text.trim(), 40));
        let mut words = text.split_whitespace();
        let verb = words.next().and_then(signals::verb).ok_or_else(unknown)?;
        let count = if verb.takes_count { words.next() } else { None };
        let req = match (verb.name, count) {
            ("stats", None) => Request::Stats,
            ("reload", None) => Request::Reload,
            ("stop", None) => Request::Stop,
            ("upgrade", None) => match words.next() {
                None => Request::Upgrade,
                Some("commit") => Request::UpgradeCommit,
                Some(_) => return Err(unknown()),
            },
            ("scale", Some(n)) => match n.parse::<u32>() {
                Ok(n) if (1..=4096).contains(&n) => Request::Scale(n),
                _ => {
                    return Err(format!(
                        "scale takes 1 to 4096 workers, not {:?}",
                        truncate(n, 20)
                    ));
                }
            },
            _ => return Err(unknown()),
        };
        if words.next().is_some() {
            return Err(unknown());
        }
        Ok(req)
    }
}

/// Every answer the control socket gives. Untagged: each shape is told apart by its fields,
/// which keeps the wire format the README documents (`stats --json` prints the snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    /// The request was refused or failed.
    Error {
        /// Why.
        error: String,
    },
    /// `stats`: the snapshot (schema in the README).
    Stats(Box<Snapshot>),
    /// `stop`: draining; wait for `pid` to exit, for up to the drain timeout.
    Stopping {
        /// Always true.
        ok: bool,
        /// The process to wait for.
        pid: u32,
        /// How long the drain may take.
        drain_timeout_secs: f64,
    },
    /// `reload`: the new generation serves.
    Reloaded {
        /// Always true.
        ok: bool,
        /// The generation now serving.
        generation: u32,
        /// Its size.
        workers: u32,
    },
    /// `scale`: the pool's new size.
    Scaled {
        /// Always true.
        ok: bool,
        /// The new size.
        workers: u32,
    },
    /// `upgrade`: a new master was started; it takes over once it serves.
    Upgrading {
        /// Always true.
        ok: bool,
        /// The new master's pid.
        new_master_pid: u32,
    },
    /// `upgrade commit`: the old master was told to retire now.
    Committed {
        /// Always true.
        ok: bool,
        /// The old master's pid.
        old_master_pid: u32,
    },
}

impl Response {
    /// A refusal or failure.
    pub fn error(why: impl Into<String>) -> Response {
        Response::Error { error: why.into() }
    }

    /// The answer as one line of JSON (without its newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the answer: {e}\"}}"))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_refuses_the_rest() {
        assert_eq!(Request::parse(b"stats"), Ok(Request::Stats));
        assert_eq!(Request::parse(b"  stats \r"), Ok(Request::Stats));
        assert_eq!(Request::parse(b"reload"), Ok(Request::Reload));
        assert_eq!(Request::parse(b"scale 3"), Ok(Request::Scale(3)));
        assert_eq!(Request::parse(b"upgrade"), Ok(Request::Upgrade));
        assert_eq!(
            Request::parse(b"upgrade commit"),
            Ok(Request::UpgradeCommit)
        );
        assert_eq!(Request::UpgradeCommit.line(), "upgrade commit");
        assert!(Request::parse(b"upgrade now").is_err());
        assert!(Request::parse(b"scale 0").is_err());
        assert!(Request::parse(b"scale").is_err());
        assert!(Request::parse(b"stop now").is_err());
        assert!(Request::parse(b"STATS please").is_err());
        assert!(Request::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn every_response_reads_back_as_itself() {
        for r in [
            Response::error("no"),
            Response::Stopping {
                ok: true,
                pid: 42,
                drain_timeout_secs: 1.5,
            },
            Response::Reloaded {
                ok: true,
                generation: 3,
                workers: 2,
            },
            Response::Scaled {
                ok: true,
                workers: 7,
            },
            Response::Upgrading {
                ok: true,
                new_master_pid: 9,
            },
            Response::Committed {
                ok: true,
                old_master_pid: 8,
            },
        ] {
            let back: Response = serde_json::from_str(&r.to_line()).unwrap();
            assert_eq!(back, r);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5000))]

            #[test]
            fn request_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = Request::parse(&bytes);
            }

            #[test]
            fn scale_accepts_exactly_one_to_4096(n in any::<i64>()) {
                let parsed = Request::parse(format!("scale {n}").as_bytes());
                prop_assert_eq!(parsed.is_ok(), (1..=4096).contains(&n));
            }
        }
    }
}
