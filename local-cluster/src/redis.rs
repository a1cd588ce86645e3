//! A local `redis-server` for `wallet dev --lock-mode redis`, tests and the chaos
//! harness: loopback only, nothing persisted (a restart drops every lock, which is
//! exactly what fencing must survive), dying with this process.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::start_listening;
use super::{free_port, LocalError};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on `port` (a free one if 0) and waits until it accepts.
    pub fn start(port: u16) -> Result<RedisServer, LocalError> {
        let port = if port == 0 { free_port()? } else { port };
        let mut server = RedisServer { port, child: None };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), LocalError> {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(start_listening(
            command,
            self.port,
            "redis-server",
            || LocalError::RedisNotFound,
            READY_TIMEOUT,
        )?);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, with nothing in memory.
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.kill9();
        self.launch()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
