//! What cwm refuses to do for one client, and how often it refused: the limits on work and
//! memory per request that are not part of the wire decoders (those live in
//! `connector_protocol`), one counter per limit (exported at `/metrics` as
//! `cwm_refused_total{limit="..."}`), and the one way untrusted text reaches the log.
//! docs/SECURITY.md says why each limit is what it is.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

/// Block ids one `POST /cache/checksums` may ask for. Every id is a block of every layer
/// hashed (100,000 ids took 20 s of CPU); LMCache's bench asks for one request's blocks.
pub const MAX_CHECKSUM_BLOCKS: usize = 16_384;
/// Concurrent MCP sessions over HTTP (each holds a worker and ~54 KB; idle ones expire).
pub const MAX_MCP_SESSIONS: usize = 256;
/// Replies queued for one MP client that does not read them; further replies to it are
/// dropped (and counted) instead of growing memory.
pub const MP_SEND_HWM: i32 = 10_000;
/// Uid and op frames longer than this are not echoed back in a failure reply (a real
/// client's are msgpack ints of at most 9 bytes).
pub const MAX_ECHOED_FRAME: usize = 64;
/// Open `lm://` connections (a thread each; LMCache opens one per vLLM worker). Further
/// connections are closed at once.
pub const LM_MAX_CONNECTIONS: usize = 256;
/// Seconds an `lm://` client may leave a request half sent (a header or a payload) or a reply
/// unread before it is dropped. Between requests it may stay idle for ever.
pub const LM_STALL_SECS: u64 = 60;
/// Characters of an untrusted string (op names, salts, model names, decode errors quoting
/// them) that reach the log.
pub const LOG_CHARS: usize = 256;

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// An HTTP request whose `Host` was not a loopback name while bound to loopback.
    HttpHost,
    /// An HTTP request from another web origin.
    HttpOrigin,
    /// An HTTP request without the bearer token.
    HttpToken,
    /// `/cache/checksums` asking for more than `MAX_CHECKSUM_BLOCKS` ids.
    ChecksumBlocks,
    /// A new MCP session while `MAX_MCP_SESSIONS` are open.
    McpSessions,
    /// An MP reply dropped because its client had `MP_SEND_HWM` unread replies.
    MpReplyQueue,
    /// An undecodable MP message whose uid or op frame was too long to echo.
    MpEcho,
    /// An `lm://` connection beyond `LM_MAX_CONNECTIONS`.
    LmConnections,
    /// An `lm://` client dropped for a malformed, truncated or stalled request.
    LmFrame,
    /// An `lm://` PUT larger than L1 (its payload is read and dropped).
    LmObjectSize,
}

const ALL: [Limit; 10] = [
    Limit::HttpHost,
    Limit::HttpOrigin,
    Limit::HttpToken,
    Limit::ChecksumBlocks,
    Limit::McpSessions,
    Limit::MpReplyQueue,
    Limit::MpEcho,
    Limit::LmConnections,
    Limit::LmFrame,
    Limit::LmObjectSize,
];

static REFUSED: [AtomicU64; ALL.len()] = [const { AtomicU64::new(0) }; ALL.len()];

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::HttpHost => "http_host",
            Limit::HttpOrigin => "http_origin",
            Limit::HttpToken => "http_token",
            Limit::ChecksumBlocks => "checksum_blocks",
            Limit::McpSessions => "mcp_sessions",
            Limit::MpReplyQueue => "mp_reply_queue",
            Limit::MpEcho => "mp_echo",
            Limit::LmConnections => "lm_connections",
            Limit::LmFrame => "lm_frame",
            Limit::LmObjectSize => "lm_object_size",
        }
    }

    /// Count one refusal.
    pub fn refused(self) {
        REFUSED[self as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals since the process started.
    pub fn count(self) -> u64 {
        REFUSED[self as usize].load(Ordering::Relaxed)
    }

    pub fn all() -> [Limit; ALL.len()] {
        ALL
    }
}

/// `value` as it may appear in the log: at most `LOG_CHARS` characters, control characters
/// escaped (no forged log lines), and the length of what was cut.
pub fn for_log(value: impl Display) -> String {
    let full = value.to_string();
    let mut out = String::with_capacity(full.len().min(LOG_CHARS + 32));
    let mut chars = full.char_indices();
    for (_, c) in chars.by_ref().take(LOG_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if let Some((at, _)) = chars.next() {
        out.push_str(&format!("… ({} more bytes)", full.len() - at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_untrusted_text_is_cut_and_control_characters_escaped() {
        let op = "x".repeat(8 << 20);
        let logged = for_log(format!("unknown op {op}"));
        assert!(logged.len() < 400, "{} bytes logged", logged.len());
        assert!(logged.ends_with(&format!("… ({} more bytes)", 8 * (1 << 20) + 11 - 256)));
        assert_eq!(for_log("a\nb"), "a\\nb");
        assert_eq!(for_log("short"), "short");
    }

    #[test]
    fn every_limit_has_its_own_counter_and_name() {
        let before = Limit::MpEcho.count();
        Limit::MpEcho.refused();
        assert!(Limit::MpEcho.count() > before);
        let names: std::collections::HashSet<_> = Limit::all().iter().map(|l| l.name()).collect();
        assert_eq!(names.len(), Limit::all().len());
        for (i, l) in Limit::all().iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?}");
        }
    }
}
