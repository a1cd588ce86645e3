//! A local `nats-server` with JetStream for `wallet dev --events nats`, tests
//! and the chaos harness: loopback only, its stream kept in `store_dir` (so a
//! restart keeps what was published, as a real broker's disk does), dying
//! with this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::start_listening;
use super::{free_port, LocalError};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    store_dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js` on `port` (a free one if 0), keeping its
    /// JetStream files in `store_dir`, and waits until it accepts.
    pub fn start(port: u16, store_dir: &Path) -> Result<NatsServer, LocalError> {
        let port = if port == 0 { free_port()? } else { port };
        std::fs::create_dir_all(store_dir)
            .map_err(|e| LocalError::io(format!("create {}", store_dir.display()), e))?;
        let mut server = NatsServer {
            port,
            store_dir: store_dir.to_path_buf(),
            child: None,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), LocalError> {
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(start_listening(
            command,
            self.port,
            "nats-server",
            || LocalError::NatsNotFound,
            READY_TIMEOUT,
        )?);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGSTOPs the broker: its connections stay open and nothing answers,
    /// so a publish hangs until its deadline instead of failing at once.
    /// Undo with [`NatsServer::resume`].
    pub fn pause(&self) -> Result<(), LocalError> {
        self.signal(libc::SIGSTOP, "SIGSTOP")
    }

    /// SIGCONTs the broker stopped by [`NatsServer::pause`].
    pub fn resume(&self) -> Result<(), LocalError> {
        self.signal(libc::SIGCONT, "SIGCONT")
    }

    fn signal(&self, sig: libc::c_int, what: &str) -> Result<(), LocalError> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| LocalError::NotRunning {
                name: "nats-server".into(),
            })?;
        super::process::signal_server(pid, sig)
            .map(drop)
            .map_err(|e| LocalError::io(format!("sending {what} to nats-server {pid}"), e))
    }

    /// kill -9, and reap: the broker is down until [`NatsServer::restart`].
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port with the same store (after a kill -9
    /// if it still runs).
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.kill9();
        self.launch()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
