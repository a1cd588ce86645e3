//! Looking at a server from outside: does it answer on its port, what does its
//! `postmaster.pid` say, and what did it log.
//!
//! The readiness check speaks the first step of the wire protocol itself
//! instead of running `pg_isready`: no child process per poll, no dependency on
//! the client package, and no async runtime (callers may or may not be inside one).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// What a connection attempt to the server said, as in libpq's `PQping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ping {
    /// The server accepts connections.
    Ready,
    /// The server answers but refuses connections for now (starting up,
    /// recovering after a crash, or shutting down: SQLSTATE 57P03).
    Rejecting,
    /// Nothing answered (refused, timed out, or not the PostgreSQL protocol).
    NoResponse,
}

/// SQLSTATE `cannot_connect_now`.
const CANNOT_CONNECT_NOW: &str = "57P03";
/// Protocol version 3.0 as sent in the startup message.
const PROTOCOL_3_0: u32 = 196_608;

/// Sends a startup message to 127.0.0.1:`port` as user `postgres` and reads the first reply.
pub(crate) fn ping(port: u16, timeout: Duration) -> Ping {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return Ping::NoResponse;
    };
    let configured = stream.set_read_timeout(Some(timeout)).is_ok()
        && stream.set_write_timeout(Some(timeout)).is_ok();
    if !configured || stream.write_all(&startup_message()).is_err() {
        return Ping::NoResponse;
    }
    let mut header = [0u8; 5];
    if stream.read_exact(&mut header).is_err() {
        return Ping::NoResponse;
    }
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(64 * 1024)];
    if stream.read_exact(&mut body).is_err() {
        return Ping::NoResponse;
    }
    match tag {
        // An authentication request (trust: AuthenticationOk): the server is up.
        b'R' => {
            say_goodbye(stream);
            Ping::Ready
        }
        // Any error other than "cannot connect now" (unknown database, too
        // many clients, ...) still proves the server accepts connections.
        b'E' if sqlstate(&body) == Some(CANNOT_CONNECT_NOW) => Ping::Rejecting,
        b'E' => Ping::Ready,
        _ => Ping::NoResponse,
    }
}

fn startup_message() -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for part in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).expect("startup message is a few dozen bytes");
    let mut msg = len.to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

/// Sends Terminate and drains the session so the backend sees a clean
/// goodbye instead of logging a connection reset.
fn say_goodbye(mut stream: TcpStream) {
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
    let _ = stream.shutdown(Shutdown::Write);
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
}

/// The `C` (code) field of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<&str> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

/// The parts of `postmaster.pid` we use (see PostgreSQL's `pidfile.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PidFile {
    pub pid: u32,
    pub port: Option<u16>,
    /// `starting`, `stopping`, `ready` or `standby` (line 8, trimmed).
    pub status: Option<String>,
}

impl PidFile {
    pub fn is_ready(&self) -> bool {
        self.status.as_deref() == Some("ready")
    }
}

/// Reads `DIR/postmaster.pid`; `None` if it is missing or not yet fully written.
pub(crate) fn read_pid_file(data_dir: &Path) -> Option<PidFile> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let pid = lines.first()?.parse().ok()?;
    let port = lines.get(3).and_then(|l| l.parse().ok());
    let status = lines
        .get(7)
        .filter(|l| !l.is_empty())
        .map(|l| l.to_string());
    Some(PidFile { pid, port, status })
}

/// The last `max_lines` lines of `path` written at or after byte `from`, for
/// error messages; a note if the log cannot be read.
pub(crate) fn log_tail(path: &Path, from: u64, max_lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(from.min(len)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            let tail = lines[start..].join("\n");
            format!("(last lines of {})\n{tail}", path.display())
        }
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_is_found_among_other_error_fields() {
        let body = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0";
        assert_eq!(sqlstate(body), Some("57P03"));
        assert_eq!(sqlstate(b"SFATAL\0\0"), None);
    }

    #[test]
    fn a_closed_port_gives_no_response() {
        let port = super::super::free_port().expect("a free port");
        assert_eq!(ping(port, Duration::from_millis(200)), Ping::NoResponse);
    }
}
