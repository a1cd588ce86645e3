//! Real local PostgreSQL servers for the dev cluster (`wallet dev`), the tests
//! and the chaos harness.
//!
//! Everything here is about *processes*: finding the server binaries, running
//! `initdb`, spawning `postgres` as our own child (so we can reap it after a
//! `kill -9` and restart at once), waiting until it accepts connections, and
//! signalling it (kill -9, SIGSTOP/SIGCONT, fast shutdown). The only SQL here
//! creates databases: [`create_database`], and [`provision`], which makes (and
//! migrates) the databases of one wallet cluster on running servers, because
//! every user of these servers needs exactly that.
//!
//! This is tooling: production crates take it only as a dev-dependency. It
//! depends on shard-agent (for the migrations), never the other way round.
//!
//! All functions block, except [`create_database`] and [`provision`]; async
//! callers wrap the blocking ones in `spawn_blocking`.

mod cluster;
mod database;
mod nats;
mod probe;
mod process;
mod provision;
mod redis;
mod server;
pub mod testing;

pub use database::create_database;
pub use nats::NatsServer;
pub use provision::provision;
pub use redis::RedisServer;

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use server::PgServer;

/// Why a local server could not be found, prepared, started or signalled.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// No directory holding both `initdb` and `postgres` was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; install them with \
         `apt-get install postgresql` or set PG_BINDIR to the directory holding them"
    )]
    BinariesNotFound,
    /// `redis-server` is not on the PATH (needed by the Redis-lock mode).
    #[error("redis-server not found; install it with `apt-get install redis-server`")]
    RedisNotFound,
    /// `nats-server` is not on the PATH (needed by `--events nats`).
    #[error("nats-server not found; install it with `apt-get install nats-server`")]
    NatsNotFound,
    /// PostgreSQL refuses to run as root and there is no `postgres` user to switch to.
    #[error(
        "running as root but there is no `postgres` user to run the server as; \
         create one (`useradd --system postgres`, or install the postgresql package) \
         or run as a non-root user"
    )]
    NoPostgresUser,
    /// An operating-system call failed; `context` says which and on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// `initdb` exited unsuccessfully; `log` is the tail of its output.
    #[error("initdb failed:\n{log}")]
    InitdbFailed { log: String },
    /// The postmaster exited before it became ready; `log` is the tail of its log.
    #[error("PostgreSQL server `{name}` exited during startup:\n{log}")]
    StartFailed { name: String, log: String },
    /// The postmaster kept running but did not accept connections in time.
    #[error(
        "PostgreSQL server `{name}` did not accept connections on 127.0.0.1:{port} \
         within {waited:?}:\n{log}"
    )]
    NotReady {
        name: String,
        port: u16,
        waited: Duration,
        log: String,
    },
    /// A signal-sending operation was asked of a server that is not running.
    #[error("PostgreSQL server `{name}` is not running")]
    NotRunning { name: String },
}

impl LocalError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        LocalError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How to create and run one local server.
///
/// Settings are written to `postgresql.conf` at `initdb` time (so a human can
/// `pg_ctl start` the directory later) *and* passed with `-c` on every start,
/// so that changing the config for an existing data dir takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgServerConfig {
    /// Used in error messages and to name the log file `<parent of data_dir>/<name>.log`.
    pub name: String,
    /// The cluster directory; created (and `initdb`ed) if it has no `PG_VERSION`.
    pub data_dir: PathBuf,
    /// TCP port on 127.0.0.1; the server opens no unix socket.
    pub port: u16,
    /// Default 200: the wallet keeps pools to every shard.
    pub max_connections: u32,
    /// Default = `max_connections` (as set by [`PgServerConfig::new`]): every
    /// connection may hold a prepared 2PC leg.
    pub max_prepared_transactions: u32,
    /// Default 64.
    pub shared_buffers_mb: u32,
    /// More `(name, value)` settings; values are written quoted, so pass them unquoted.
    pub extra_settings: Vec<(String, String)>,
    /// When set, the postmaster gets SIGINT (fast shutdown) as soon as this
    /// process dies, however it dies, so tests and `wallet dev` leave no servers behind.
    pub die_with_parent: bool,
    /// When set, the server speaks TLS and accepts TLS connections only.
    pub tls: Option<ServerTls>,
}

/// The certificate a local server presents, and the CA its clients trust.
///
/// With it, [`PgServer::dsn`] asks for `sslmode=verify-full` against `ca_file`,
/// and the server's `pg_hba.conf` has `hostssl` lines only, so a plaintext
/// connection is refused: what works against such a server surely went over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate chain, PEM.
    pub cert_file: PathBuf,
    /// The server's private key, PEM. Copied into the data dir with the owner
    /// and mode (0600) PostgreSQL insists on.
    pub key_file: PathBuf,
    /// The CA certificate clients verify the server with, PEM.
    pub ca_file: PathBuf,
}

/// Where a TLS server's files are copied to inside its data dir.
pub(crate) const TLS_CERT: &str = "server.crt";
pub(crate) const TLS_KEY: &str = "server.key";
pub(crate) const TLS_HBA: &str = "pg_hba_tls_only.conf";

impl PgServerConfig {
    /// A config with the defaults documented on the fields; `die_with_parent` is off.
    pub fn new(name: impl Into<String>, data_dir: PathBuf, port: u16) -> Self {
        let max_connections = 200;
        PgServerConfig {
            name: name.into(),
            data_dir,
            port,
            max_connections,
            max_prepared_transactions: max_connections,
            shared_buffers_mb: 64,
            extra_settings: Vec::new(),
            die_with_parent: false,
            tls: None,
        }
    }

    /// Every setting we impose, in the order written; `port` included.
    pub(crate) fn settings(&self) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("port", self.port.to_string()),
            // TCP only: a socket path would have to be writable by the
            // `postgres` user and short enough for sun_path.
            ("unix_socket_directories", String::new()),
            ("max_connections", self.max_connections.to_string()),
            (
                "max_prepared_transactions",
                self.max_prepared_transactions.to_string(),
            ),
            // Durability is what the chaos tests check, so never turn it off.
            ("fsync", "on".to_string()),
            ("synchronous_commit", "on".to_string()),
            ("shared_buffers", format!("{}MB", self.shared_buffers_mb)),
            ("logging_collector", "off".to_string()),
            ("log_min_messages", "warning".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if self.tls.is_some() {
            let in_data_dir = |name: &str| self.data_dir.join(name).display().to_string();
            settings.extend([
                ("ssl".to_string(), "on".to_string()),
                ("ssl_cert_file".to_string(), in_data_dir(TLS_CERT)),
                ("ssl_key_file".to_string(), in_data_dir(TLS_KEY)),
                ("hba_file".to_string(), in_data_dir(TLS_HBA)),
            ]);
        }
        settings.extend(self.extra_settings.iter().cloned());
        settings
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, chosen below the
/// kernel's ephemeral range.
///
/// Ports from the ephemeral range (what binding port 0 gives) are also the
/// local ports of outgoing connections: while a test has a server down on
/// purpose, any client connecting anywhere can be handed that server's port,
/// and the restart then fails with "could not bind". Below the range only
/// another explicit bind can take it. The first of up to [`PORT_TRIES`] random
/// candidates that binds wins; if none does (or the range leaves no room below
/// it) we fall back to port 0.
///
/// A port is never handed out twice by one process: between the check and
/// the server's own bind (an `initdb` away for PostgreSQL), and while a
/// server is down on purpose before its restart on the same port, the port
/// looks free, and the concurrent tests of one test binary would otherwise
/// take it. Another process may still take the port before the server binds
/// it; startup then fails with a clear "could not bind" log tail rather than
/// silently using the wrong server.
pub fn free_port() -> Result<u16, LocalError> {
    use std::hash::{BuildHasher, Hasher};
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let low = ephemeral_low().unwrap_or(32768);
    if low > PORT_FLOOR + 1000 {
        let span = u64::from(low - PORT_FLOOR);
        // RandomState is seeded per process, so parallel test processes start
        // their search at different places.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let start = hasher.finish();
        for i in 0..PORT_TRIES {
            let port = PORT_FLOOR + ((start.wrapping_add(i * 7919)) % span) as u16;
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LocalError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LocalError::io("reading the address of a bound socket", e))?;
    handed_out.insert(addr.port());
    Ok(addr.port())
}

/// The ports [`free_port`] has handed out in this process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The lowest port [`free_port`] hands out: above the well-known and most
/// registered service ports.
const PORT_FLOOR: u16 = 20000;

/// How many random candidates [`free_port`] tries before falling back to port 0.
const PORT_TRIES: u64 = 64;

/// The first port of the kernel's ephemeral range, if the system says.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// The directory holding `initdb` and `postgres`, honouring `PG_BINDIR`.
///
/// Order: `PG_BINDIR`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`,
/// then the directory `initdb` on `PATH` resolves to.
pub fn pg_bindir() -> Result<PathBuf, LocalError> {
    let env = std::env::var_os("PG_BINDIR").filter(|v| !v.is_empty());
    pg_bindir_in(env.as_deref().map(Path::new))
}

/// [`pg_bindir`] with the value of `PG_BINDIR` passed in, so it can be tested
/// without touching the process-global environment.
///
/// An explicit override is final: if it lacks the binaries we fail rather than
/// silently run some other PostgreSQL version.
pub fn pg_bindir_in(env_override: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(dir) = env_override {
        return if has_server_binaries(dir) {
            Ok(dir.to_path_buf())
        } else {
            tracing::warn!(dir = %dir.display(), "PG_BINDIR has no initdb and postgres");
            Err(LocalError::BinariesNotFound)
        };
    }
    let candidates = pg_config_bindir()
        .into_iter()
        .chain(newest_debian_bindir())
        .chain(initdb_on_path());
    for dir in candidates {
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    Err(LocalError::BinariesNotFound)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "postgres"]
        .iter()
        .all(|bin| is_executable(&dir.join(bin)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `pg_config --bindir`, if `pg_config` is on PATH. It may come from a
/// client-only package, so the caller still checks for the server binaries.
fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Debian/Ubuntu install each major version in `/usr/lib/postgresql/<major>/bin`.
fn newest_debian_bindir() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server_binaries(bin))
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// The real directory of `initdb` on PATH: `/usr/local/bin/initdb` is often a
/// symlink, and `postgres` must be found next to the real file.
fn initdb_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("initdb"))
        .find(|p| is_executable(p))
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_distinct_and_below_the_ephemeral_range() {
        let low = ephemeral_low().unwrap_or(32768);
        let ports: Vec<u16> = (0..20).map(|_| free_port().expect("a free port")).collect();
        for &port in &ports {
            if low > PORT_FLOOR + 1000 {
                assert!(
                    (PORT_FLOOR..low).contains(&port),
                    "{port} is outside {PORT_FLOOR}..{low}"
                );
            }
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "a port repeats: {ports:?}");
    }

    /// Concurrent tests of one binary ask at once, and nobody binds the ports
    /// (as while their servers run `initdb`): 400 ports among the ~12,000
    /// below the ephemeral range would almost surely repeat one if
    /// `free_port` only checked that a port binds.
    #[test]
    fn concurrent_callers_never_get_the_same_port() {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..50)
                        .map(|_| free_port().expect("a free port"))
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        let mut ports: Vec<u16> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("a caller thread"))
            .collect();
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "some port was handed out twice");
    }
}
