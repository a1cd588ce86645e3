//! [`PgServer`]: one local postmaster that we spawned (or adopted) and control.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::cluster;
use super::probe::{self, Ping};
use super::process::{self, RunAs};
use super::{pg_bindir, LocalError, PgServerConfig};

/// How long a starting (or crash-recovering) server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before we escalate to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long SIGKILLed server processes may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// A running local PostgreSQL server.
///
/// We spawn `postgres` directly (not via `pg_ctl`) so that we are its parent:
/// after a `kill -9` we reap it at once, otherwise the zombie would keep
/// `postmaster.pid` "alive" and the restart would fail.
///
/// Dropping it does a fast shutdown (SIGINT, at most ~10 s, then SIGKILL),
/// adopted servers included, unless [`PgServer::detach`] was called.
#[derive(Debug)]
pub struct PgServer {
    config: PgServerConfig,
    bindir: PathBuf,
    run_as: Option<RunAs>,
    log_path: PathBuf,
    /// `None` when stopped, or when adopted from an earlier run.
    child: Option<Child>,
    /// The postmaster's pid while we believe it runs.
    pid: Option<u32>,
    port: u16,
    detached: bool,
}

impl PgServer {
    /// Runs `initdb` if the data dir has no `PG_VERSION`, then starts the
    /// server and waits until it accepts connections.
    ///
    /// If `postmaster.pid` names a live postmaster of this data dir (left
    /// running by an earlier run), waits for it to be ready and *adopts* it
    /// instead: no child handle, its pid and the port it actually listens on.
    pub fn start(mut config: PgServerConfig) -> Result<PgServer, LocalError> {
        config.data_dir = std::path::absolute(&config.data_dir)
            .map_err(|e| LocalError::io(format!("resolving {}", config.data_dir.display()), e))?;
        let mut server = PgServer {
            bindir: pg_bindir()?,
            run_as: process::run_as()?,
            log_path: cluster::log_path_for(&config),
            child: None,
            pid: None,
            port: config.port,
            detached: false,
            config,
        };
        if !server.config.data_dir.join("PG_VERSION").exists() {
            cluster::initdb(
                &server.config,
                &server.bindir,
                server.run_as,
                &server.log_path,
            )?;
        }
        server.launch()?;
        Ok(server)
    }

    /// The port the server listens on (for an adopted server, the one it really uses).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid, `None` after [`stop`](Self::stop) or [`kill9`](Self::kill9).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &PgServerConfig {
        &self.config
    }

    /// Where the server's stdout/stderr (and initdb's output) are appended.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A tokio-postgres / libpq key-value connection string for `dbname` as the
    /// superuser; for a TLS server, with `sslmode=verify-full` against its CA.
    pub fn dsn(&self, dbname: &str) -> String {
        let plain = format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        );
        match &self.config.tls {
            None => plain,
            Some(tls) => {
                let ca = tls.ca_file.display().to_string();
                format!(
                    "{plain} sslmode=verify-full sslrootcert='{}'",
                    ca.replace('\\', "\\\\").replace('\'', "\\'")
                )
            }
        }
    }

    /// Whether the postmaster process exists (and is not a zombie).
    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(process::is_alive)
    }

    /// Simulates a crash: SIGKILLs the postmaster and all its children (every
    /// backend too, as if the machine lost power but not its page cache),
    /// reaps the postmaster and waits until the children are gone, so a
    /// [`restart`](Self::restart) right after does not trip over the old
    /// shared memory. Prepared transactions survive, as their state is in the WAL.
    pub fn kill9(&mut self) -> Result<(), LocalError> {
        let pid = self.running_pid()?;
        let children = match process::signal_server(pid, libc::SIGKILL) {
            Ok(children) => children,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Vec::new(),
            Err(e) => return Err(LocalError::io(format!("kill -9 {pid}"), e)),
        };
        let gone = self.wait_exit(pid, KILL_TIMEOUT);
        let deadline = Instant::now() + KILL_TIMEOUT;
        while children.iter().any(|&c| process::is_alive(c)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child = None;
        self.pid = None;
        if !gone {
            return Err(LocalError::io(
                format!("waiting for SIGKILLed postmaster {pid} to exit"),
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        Ok(())
    }

    /// Starts the server again on the same port and data dir and waits until
    /// it accepts connections (after a kill9 this includes crash recovery).
    /// A server that is still running is stopped first.
    pub fn restart(&mut self) -> Result<(), LocalError> {
        if self.is_running() {
            self.stop()?;
        }
        self.child = None;
        self.pid = None;
        self.launch()
    }

    /// Fast shutdown (SIGINT: abort open transactions, keep prepared ones,
    /// checkpoint) and wait for the postmaster to exit; after ~10 s it is
    /// SIGKILLed instead. Does nothing if the server is not running.
    pub fn stop(&mut self) -> Result<(), LocalError> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        match process::signal_pid(pid, libc::SIGINT) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                return Err(LocalError::io(format!("kill -INT {pid}"), e));
            }
            _ => {}
        }
        // A paused server cannot act on SIGINT until it is continued.
        let _ = process::signal_server(pid, libc::SIGCONT);
        if self.wait_exit(pid, STOP_TIMEOUT) {
            self.child = None;
            self.pid = None;
            return Ok(());
        }
        tracing::warn!(name = %self.config.name, pid, "fast shutdown timed out; sending SIGKILL");
        self.kill9()
    }

    /// SIGSTOPs the postmaster and all its children: the postmaster and every
    /// backend freeze, so both new and existing connections hang (TCP connects
    /// still complete in the kernel, but nothing answers). Simulates a hung
    /// node; undo with [`resume`](Self::resume).
    pub fn pause(&self) -> Result<(), LocalError> {
        self.signal_server(libc::SIGSTOP, "SIGSTOP")
    }

    /// SIGCONTs the processes stopped by [`pause`](Self::pause) (and any
    /// children started since, which is harmless).
    pub fn resume(&self) -> Result<(), LocalError> {
        self.signal_server(libc::SIGCONT, "SIGCONT")
    }

    /// Leaves the server running after this handle is dropped; a later
    /// [`PgServer::start`] on the same data dir adopts it. The postmaster
    /// still gets SIGINT when this process exits if `die_with_parent` was set.
    pub fn detach(mut self) {
        self.detached = true;
    }

    fn running_pid(&self) -> Result<u32, LocalError> {
        self.pid.ok_or_else(|| LocalError::NotRunning {
            name: self.config.name.clone(),
        })
    }

    fn signal_server(&self, sig: libc::c_int, what: &str) -> Result<(), LocalError> {
        let pid = self.running_pid()?;
        process::signal_server(pid, sig)
            .map(drop)
            .map_err(|e| LocalError::io(format!("sending {what} to postmaster {pid}"), e))
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path).map_or(0, |m| m.len())
    }

    fn log_tail(&self, from: u64) -> String {
        probe::log_tail(&self.log_path, from, cluster::LOG_TAIL_LINES)
    }

    /// Adopts a live postmaster of this data dir, or spawns a new one.
    fn launch(&mut self) -> Result<(), LocalError> {
        if let Some(pid_file) = self.live_postmaster()? {
            let port = pid_file.port.unwrap_or(self.port);
            if port != self.port {
                tracing::warn!(name = %self.config.name, port, wanted = self.port,
                    "adopted server listens on another port than configured");
            }
            tracing::info!(name = %self.config.name, pid = pid_file.pid, port, "adopted running server");
            self.pid = Some(pid_file.pid);
            self.port = port;
            return Ok(());
        }
        self.spawn_and_wait()
    }

    /// The data dir's live, ready postmaster, waiting for it to finish
    /// starting up; `None` if there is none. A `postmaster.pid` naming a dead
    /// or unrelated process is removed: PostgreSQL itself would refuse to
    /// start if that pid had been reused by an unrelated live process.
    fn live_postmaster(&self) -> Result<Option<probe::PidFile>, LocalError> {
        let data_dir = &self.config.data_dir;
        let Some(first) = probe::read_pid_file(data_dir) else {
            return Ok(None);
        };
        let began = Instant::now();
        loop {
            if !process::is_postmaster_of(first.pid, data_dir) {
                process::try_reap(first.pid);
                if probe::read_pid_file(data_dir).is_some_and(|now| now.pid == first.pid) {
                    let _ = std::fs::remove_file(data_dir.join("postmaster.pid"));
                }
                return Ok(None);
            }
            if let Some(now) = probe::read_pid_file(data_dir) {
                let port = now.port.unwrap_or(self.port);
                if now.pid == first.pid
                    && now.is_ready()
                    && probe::ping(port, PING_TIMEOUT) == Ping::Ready
                {
                    return Ok(Some(now));
                }
            }
            if began.elapsed() > READY_TIMEOUT {
                return Err(LocalError::NotReady {
                    name: self.config.name.clone(),
                    port: first.port.unwrap_or(self.port),
                    waited: began.elapsed(),
                    log: format!(
                        "(running postmaster {} never became ready)\n{}",
                        first.pid,
                        self.log_tail(0)
                    ),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn spawn_and_wait(&mut self) -> Result<(), LocalError> {
        let began = Instant::now();
        cluster::install_tls(&self.config, self.run_as)?;
        let from = self.log_len();
        let cmd = cluster::postgres_command(
            &self.config,
            &self.bindir,
            self.run_as,
            &self.log_path,
            self.port,
        )?;
        let postgres = self.bindir.join("postgres");
        let child = process::spawn_on_supervisor(cmd)
            .map_err(|e| LocalError::io(format!("spawning {}", postgres.display()), e))?;
        self.pid = Some(child.id());
        self.child = Some(child);
        if let Err(e) = self.wait_ready(from) {
            if self.pid.is_some() {
                let _ = self.kill9();
            }
            return Err(e);
        }
        tracing::info!(name = %self.config.name, port = self.port, pid = self.pid,
            elapsed_ms = began.elapsed().as_millis() as u64, "postgres ready");
        Ok(())
    }

    /// Polls until our child's `postmaster.pid` says ready and the port answers.
    fn wait_ready(&mut self, log_from: u64) -> Result<(), LocalError> {
        let began = Instant::now();
        loop {
            let child = self
                .child
                .as_mut()
                .expect("wait_ready runs right after spawning");
            let pid = child.id();
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.pid = None;
                return Err(LocalError::StartFailed {
                    name: self.config.name.clone(),
                    log: format!("postgres {status}\n{}", self.log_tail(log_from)),
                });
            }
            let ours_ready = probe::read_pid_file(&self.config.data_dir)
                .is_some_and(|f| f.pid == pid && f.is_ready());
            if ours_ready && probe::ping(self.port, PING_TIMEOUT) == Ping::Ready {
                return Ok(());
            }
            if began.elapsed() > READY_TIMEOUT {
                return Err(LocalError::NotReady {
                    name: self.config.name.clone(),
                    port: self.port,
                    waited: began.elapsed(),
                    log: self.log_tail(log_from),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits up to `timeout` for `pid` to exit, reaping it; true if it did.
    fn wait_exit(&mut self, pid: u32, timeout: Duration) -> bool {
        let began = Instant::now();
        loop {
            let exited = match self.child.as_mut() {
                // An error means it was already reaped elsewhere.
                Some(child) => !matches!(child.try_wait(), Ok(None)),
                None => {
                    process::try_reap(pid);
                    !process::is_alive(pid)
                }
            };
            if exited {
                return true;
            }
            if began.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.detached || self.pid.is_none() {
            return;
        }
        if let Err(e) = self.stop() {
            tracing::warn!(name = %self.config.name, error = %e, "stopping local PostgreSQL on drop failed");
        }
    }
}
