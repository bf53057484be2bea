//! Option negotiation (RFC 2347): `blksize` (RFC 2348), `timeout` and `tsize` (RFC 2349),
//! `windowsize` (RFC 7440). The server answers with an OACK naming only the options it took;
//! with none, the transfer starts as plain RFC 1350.

use std::time::Duration;

use super::packet::{Code, Mode, Refusal};

/// RFC 1350's block size.
pub const DEFAULT_BLKSIZE: usize = 512;
/// RFC 2348's largest block: a 65,535-byte IP datagram less its headers.
pub const MAX_BLKSIZE: usize = 65464;
/// Retransmission timeout unless the client asks for another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes a transfer may have in flight (windowsize × blksize): memory per transfer is bounded
/// by this, whatever the client asks for; the server may choose a smaller window (RFC 7440).
pub const MAX_WINDOW_BYTES: usize = 256 << 10;
/// Largest window the server takes.
pub const MAX_WINDOW: usize = 64;

/// What the transfer runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Bytes per DATA block.
    pub blksize: usize,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Blocks sent before an ACK is awaited.
    pub window: usize,
    /// The options taken, for the OACK; empty: no OACK.
    pub taken: Vec<(&'static str, String)>,
}

fn number(name: &str, value: &str) -> Result<u64, Refusal> {
    let digits = value.trim();
    match digits.parse::<u64>() {
        Ok(n) => Ok(n),
        // Digits too many for any counter are a very large number, not a malformed one: a
        // `blksize` of twenty nines is answered with the largest block, as a smaller large
        // one is; a limit still refuses it where the option has one.
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(u64::MAX),
        Err(_) => Err(Refusal::new(Code::Options, format!("bad {name} value"))),
    }
}

/// Negotiates the options of a request. `size` is the file's size for a read (`None` for a
/// write); `max_file` bounds what a write may announce with `tsize`.
pub fn negotiate(
    options: &[(String, &str)],
    mode: Mode,
    size: Option<u64>,
    max_file: u64,
) -> Result<Settings, Refusal> {
    let mut s = Settings {
        blksize: DEFAULT_BLKSIZE,
        timeout: DEFAULT_TIMEOUT,
        window: 1,
        taken: Vec::new(),
    };
    let mut window_asked = None;
    let mut seen: Vec<&str> = Vec::with_capacity(options.len());
    for (name, value) in options {
        // An option named twice: the first counts, the rest are ignored, so the OACK names
        // each once, with the value in force (a client may read either).
        if seen.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
        match name.as_str() {
            "blksize" => {
                let asked = number(name, value)?;
                if asked < 8 {
                    return Err(Refusal::new(Code::Options, "blksize below 8"));
                }
                // A larger request is answered with the largest block (RFC 2348 lets the
                // server choose a smaller value).
                s.blksize = asked.min(MAX_BLKSIZE as u64) as usize;
                s.taken.push(("blksize", s.blksize.to_string()));
            }
            "timeout" => {
                let asked = number(name, value)?;
                if !(1..=255).contains(&asked) {
                    return Err(Refusal::new(Code::Options, "timeout outside 1-255"));
                }
                s.timeout = Duration::from_secs(asked);
                s.taken.push(("timeout", asked.to_string()));
            }
            "tsize" => {
                let asked = number(name, value)?;
                match size {
                    // A netascii file's size on the wire is not its size on disk: the option
                    // is left unanswered rather than answered wrong. So is an empty file's:
                    // curl rejects "tsize 0" in an OACK as invalid and fails the download
                    // (as it does against tftpd-hpa), while leaving it out costs nothing.
                    Some(size) if mode == Mode::Octet && size > 0 => {
                        s.taken.push(("tsize", size.to_string()))
                    }
                    Some(_) => {}
                    None if asked > max_file => {
                        return Err(Refusal::new(Code::DiskFull, "file larger than allowed"));
                    }
                    None => s.taken.push(("tsize", asked.to_string())),
                }
            }
            "windowsize" => {
                let asked = number(name, value)?;
                if !(1..=65535).contains(&asked) {
                    return Err(Refusal::new(Code::Options, "windowsize outside 1-65535"));
                }
                window_asked = Some(asked as usize);
            }
            _ => {} // unknown options are ignored (RFC 2347)
        }
    }
    if let Some(asked) = window_asked {
        let fits = (MAX_WINDOW_BYTES / s.blksize).clamp(1, MAX_WINDOW);
        s.window = asked.min(fits);
        s.taken.push(("windowsize", s.window.to_string()));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn takes_what_it_can_and_names_it() {
        let s = negotiate(
            &opts(&[
                ("blksize", "1468"),
                ("tsize", "0"),
                ("windowsize", "16"),
                ("x", "1"),
            ]),
            Mode::Octet,
            Some(4096),
            0,
        )
        .unwrap();
        assert_eq!((s.blksize, s.window), (1468, 16));
        assert_eq!(
            s.taken,
            vec![
                ("blksize", "1468".to_string()),
                ("tsize", "4096".to_string()),
                ("windowsize", "16".to_string())
            ]
        );
        let none = negotiate(&[], Mode::Octet, Some(1), 0).unwrap();
        assert!(none.taken.is_empty());
        assert_eq!((none.blksize, none.window), (512, 1));
    }

    #[test]
    fn an_option_named_twice_counts_once_as_first_named() {
        let s = negotiate(
            &opts(&[
                ("blksize", "512"),
                ("windowsize", "4"),
                ("blksize", "1024"),
                ("windowsize", "8"),
                ("timeout", "x"),
                ("timeout", "3"),
            ]),
            Mode::Octet,
            Some(1),
            0,
        );
        // The first `timeout` is malformed: refused, whatever a second one says.
        assert_eq!(s.unwrap_err().code, Code::Options);
        let s = negotiate(
            &opts(&[("blksize", "512"), ("windowsize", "4"), ("blksize", "1024")]),
            Mode::Octet,
            Some(1),
            0,
        )
        .unwrap();
        assert_eq!((s.blksize, s.window), (512, 4));
        assert_eq!(
            s.taken,
            vec![
                ("blksize", "512".to_string()),
                ("windowsize", "4".to_string())
            ]
        );
    }

    #[test]
    fn bounds_blocks_windows_and_uploads() {
        let s = negotiate(
            &opts(&[("blksize", "99999"), ("windowsize", "65535")]),
            Mode::Octet,
            Some(1),
            0,
        )
        .unwrap();
        assert_eq!(s.blksize, MAX_BLKSIZE);
        assert!(s.window * s.blksize <= MAX_WINDOW_BYTES && s.window >= 1);
        let code = |o: &[(&str, &'static str)], size| {
            negotiate(&opts(o), Mode::Octet, size, 100)
                .unwrap_err()
                .code
        };
        assert_eq!(code(&[("blksize", "7")], Some(1)), Code::Options);
        assert_eq!(code(&[("blksize", "x")], Some(1)), Code::Options);
        assert_eq!(code(&[("timeout", "0")], Some(1)), Code::Options);
        assert_eq!(code(&[("windowsize", "0")], Some(1)), Code::Options);
        assert_eq!(code(&[("tsize", "101")], None), Code::DiskFull);
        let netascii = negotiate(&opts(&[("tsize", "0")]), Mode::Netascii, Some(9), 0).unwrap();
        assert!(netascii.taken.is_empty());
        let empty = negotiate(&opts(&[("tsize", "0")]), Mode::Octet, Some(0), 0).unwrap();
        assert!(empty.taken.is_empty());
    }

    #[test]
    fn a_number_too_long_for_any_counter_is_large_not_malformed() {
        let s = negotiate(
            &opts(&[("blksize", "99999999999999999999")]),
            Mode::Octet,
            Some(1000),
            1 << 20,
        )
        .unwrap();
        assert_eq!(s.blksize, MAX_BLKSIZE);
        for bad in [("timeout", "99999999999999999999"), ("blksize", "9x")] {
            assert!(
                negotiate(&opts(&[bad]), Mode::Octet, Some(1000), 1 << 20).is_err(),
                "{bad:?}"
            );
        }
    }
}
