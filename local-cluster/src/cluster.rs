//! Creating a cluster (`initdb` + our settings) and building the `postgres`
//! command line, kept apart from the running-server lifecycle in `server.rs`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::probe;
use super::process::{self, RunAs};
use super::{LocalError, PgServerConfig, TLS_CERT, TLS_HBA, TLS_KEY};

/// Lines of log quoted in errors.
pub(crate) const LOG_TAIL_LINES: usize = 20;

/// `<parent of data_dir>/<name>.log`: outside the data dir because initdb
/// insists on an empty directory, and so that wiping or re-initialising the
/// cluster keeps the history.
pub(crate) fn log_path_for(config: &PgServerConfig) -> PathBuf {
    let name: String = config
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() {
        "postgres".to_string()
    } else {
        name
    };
    let parent = config.data_dir.parent().unwrap_or(Path::new("/"));
    parent.join(format!("{name}.log"))
}

/// Runs `initdb` (as `run_as` if set; output appended to `log_path`) and
/// appends our settings to the new cluster's postgresql.conf, so a human can
/// also start the directory with a plain `pg_ctl start`.
pub(crate) fn initdb(
    config: &PgServerConfig,
    bindir: &Path,
    run_as: Option<RunAs>,
    log_path: &Path,
) -> Result<(), LocalError> {
    let began = Instant::now();
    let data_dir = &config.data_dir;
    process::prepare_data_dir(data_dir, run_as)?;
    let from = std::fs::metadata(log_path).map_or(0, |m| m.len());
    let initdb = bindir.join("initdb");
    let mut cmd = Command::new(&initdb);
    // -N (no fsync of the new files): saves most of initdb's time, and a
    // machine crash during initdb only costs a re-run.
    cmd.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "-N",
    ]);
    prepare_command(&mut cmd, data_dir, run_as, log_path)?;
    let status = cmd
        .status()
        .map_err(|e| LocalError::io(format!("running {}", initdb.display()), e))?;
    if !status.success() {
        return Err(LocalError::InitdbFailed {
            log: format!(
                "initdb {status}\n{}",
                probe::log_tail(log_path, from, LOG_TAIL_LINES)
            ),
        });
    }
    let conf_path = data_dir.join("postgresql.conf");
    let mut conf = String::from("\n# Added by shard-agent (local server launcher)\n");
    for (name, value) in config.settings() {
        conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
    }
    OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(|e| LocalError::io(format!("appending to {}", conf_path.display()), e))?;
    tracing::info!(
        name = %config.name,
        elapsed_ms = began.elapsed().as_millis() as u64,
        "initdb done"
    );
    Ok(())
}

/// `postgres -D DIR -p PORT -c ...` with every setting of `config` on the
/// command line (so config changes apply to an existing data dir too), ready
/// to be spawned on the supervisor thread.
pub(crate) fn postgres_command(
    config: &PgServerConfig,
    bindir: &Path,
    run_as: Option<RunAs>,
    log_path: &Path,
    port: u16,
) -> Result<Command, LocalError> {
    let mut cmd = Command::new(bindir.join("postgres"));
    cmd.arg("-D").arg(&config.data_dir);
    cmd.arg("-p").arg(port.to_string());
    for (name, value) in config.settings() {
        if name != "port" {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
    }
    prepare_command(&mut cmd, &config.data_dir, run_as, log_path)?;
    // Our own process group, so a terminal's Ctrl-C reaches only us and we
    // shut the server down ourselves (its children setsid() anyway).
    cmd.process_group(0);
    if config.die_with_parent {
        process::die_with_parent(&mut cmd);
    }
    Ok(cmd)
}

/// For a TLS server: copies its certificate and key into the data dir, owned
/// by the server's user (PostgreSQL refuses a key that others can read), and
/// writes an HBA file that admits TLS connections only. Done before every
/// start, so replaced certificates take effect on restart.
pub(crate) fn install_tls(
    config: &PgServerConfig,
    run_as: Option<RunAs>,
) -> Result<(), LocalError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(tls) = &config.tls else {
        return Ok(());
    };
    let hba = "# Written by shard-agent's local server launcher: TLS only.\n\
               hostssl all all 127.0.0.1/32 trust\n\
               hostssl all all ::1/128 trust\n";
    let files = [
        (TLS_CERT, std::fs::read(&tls.cert_file), 0o644),
        (TLS_KEY, std::fs::read(&tls.key_file), 0o600),
        (TLS_HBA, Ok(hba.as_bytes().to_vec()), 0o600),
    ];
    for (name, content, mode) in files {
        let path = config.data_dir.join(name);
        let content =
            content.map_err(|e| LocalError::io(format!("reading the TLS file for {name}"), e))?;
        std::fs::write(&path, content)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
            .and_then(|()| match run_as {
                Some(user) => std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid)),
                None => Ok(()),
            })
            .map_err(|e| LocalError::io(format!("installing {}", path.display()), e))?;
    }
    Ok(())
}

/// Working dir, stdio and user shared by initdb and postgres.
fn prepare_command(
    cmd: &mut Command,
    data_dir: &Path,
    run_as: Option<RunAs>,
    log_path: &Path,
) -> Result<(), LocalError> {
    let log = open_log(log_path)?;
    let log2 = log
        .try_clone()
        .map_err(|e| LocalError::io(format!("duplicating {}", log_path.display()), e))?;
    // The data dir is the one directory the postgres user can surely enter
    // (std changes directory after switching user).
    cmd.current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    Ok(())
}

/// Opened by us (possibly root), so the server needs no write access to it.
fn open_log(log_path: &Path) -> Result<File, LocalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| LocalError::io(format!("opening {}", log_path.display()), e))
}
