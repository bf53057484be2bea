//! The chat's own options, defined once: the master's command line flattens them in, and so
//! does the hidden `worker` subcommand (exec'd workers), so the two cannot drift apart.

use std::time::Duration;

use protocol::duration::secs;

/// Default `--chat-soft-limit`: a client more than this behind for `--chat-soft-secs` goes.
pub const DEFAULT_SOFT_LIMIT: u64 = 1 << 20;
/// Default `--chat-soft-secs`.
pub const DEFAULT_SOFT_SECS: f64 = 10.0;
/// Default `--chat-hard-limit`: a client more than this behind goes at once.
pub const DEFAULT_HARD_LIMIT: u64 = 8 << 20;

/// `--service chat` options beyond `--max-line` and `--max-unsent`.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct ChatOptions {
    /// With --service chat: a client that stays more than this many bytes behind for
    /// --chat-soft-secs is disconnected (Redis' soft output-buffer limit). Only a client that
    /// stopped reading gets there: senders wait for one that reads (see --max-unsent).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SOFT_LIMIT,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 34)))]
    pub chat_soft_limit: u64,
    /// With --service chat: seconds a client may stay over --chat-soft-limit.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SOFT_SECS,
          value_parser = protocol::duration::parse_secs)]
    pub chat_soft_secs: f64,
    /// With --service chat: a client more than this many bytes behind is disconnected at once
    /// (Redis' hard output-buffer limit); bounds what one client may cost.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_HARD_LIMIT,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 34)))]
    pub chat_hard_limit: u64,
    /// With --service chat: pass clients' bytes to the others unchanged. Without it, control
    /// bytes (C0 but TAB, DEL, and so escape sequences and a bare CR) are shown as `^[`, `^M`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub chat_raw: bool,
    /// With --service chat: lines a client may send per second, beyond a burst of
    /// --chat-burst (IRC servers' flood control); past it, its socket is simply read more
    /// slowly. 0: no limit.
    #[arg(long, value_name = "LINES", default_value_t = 0.0,
          value_parser = parse_rate)]
    pub chat_rate: f64,
    /// With --service chat and --chat-rate: lines a client may send at once.
    #[arg(long, value_name = "LINES", default_value_t = DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub chat_burst: u32,
}

/// Default `--chat-burst`.
pub const DEFAULT_BURST: u32 = 20;

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e9).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a rate in lines per second (0 to 1e9; 0: none)"
        )),
    }
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            chat_soft_limit: DEFAULT_SOFT_LIMIT,
            chat_soft_secs: DEFAULT_SOFT_SECS,
            chat_hard_limit: DEFAULT_HARD_LIMIT,
            chat_raw: false,
            chat_rate: 0.0,
            chat_burst: DEFAULT_BURST,
        }
    }
}

impl ChatOptions {
    /// These options as command-line arguments (for an exec'd worker).
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--chat-soft-limit", self.chat_soft_limit.to_string()),
            ("--chat-soft-secs", self.chat_soft_secs.to_string()),
            ("--chat-hard-limit", self.chat_hard_limit.to_string()),
            ("--chat-raw", self.chat_raw.to_string()),
            ("--chat-rate", self.chat_rate.to_string()),
            ("--chat-burst", self.chat_burst.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// The flow-control limits, with `--max-unsent` as the mark senders wait at.
    pub fn limits(&self, max_unsent: usize) -> Limits {
        let hard = usize::try_from(self.chat_hard_limit).unwrap_or(usize::MAX);
        Limits {
            mark: max_unsent,
            soft: usize::try_from(self.chat_soft_limit).unwrap_or(usize::MAX),
            soft_for: secs(self.chat_soft_secs),
            // Never below the mark: senders must be held before anyone is dropped.
            hard: hard.max(max_unsent.saturating_mul(2)),
            rate: (self.chat_rate > 0.0).then(|| Rate {
                per_sec: self.chat_rate,
                burst: f64::from(self.chat_burst),
            }),
        }
    }
}

/// How far behind a client may fall, and for how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Owed bytes over which a reading client holds the senders (`--max-unsent`).
    pub mark: usize,
    /// Owed bytes a client may stay over for `soft_for` only.
    pub soft: usize,
    /// How long.
    pub soft_for: Duration,
    /// Owed bytes over which a client is dropped at once.
    pub hard: usize,
    /// Lines a client may send (`--chat-rate`), if limited.
    pub rate: Option<Rate>,
}

/// A rate of lines with a burst: a token bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Tokens held at most.
    pub burst: f64,
}
