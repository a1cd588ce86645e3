//! Operating-system plumbing: which user the server runs as, directory
//! ownership, the spawning thread, and signals.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;

use super::LocalError;

/// The unprivileged user the server runs as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// `None` when we are not root (the server runs as ourselves); otherwise the
/// `postgres` user, because PostgreSQL refuses to run as root.
pub(crate) fn run_as() -> Result<Option<RunAs>, LocalError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres").map(Some)
}

fn lookup_user(name: &str) -> Result<RunAs, LocalError> {
    let c_name = CString::new(name).expect("user names are literals without NUL bytes");
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf`'s
    // length is passed; the reentrant variant does not touch shared state.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(LocalError::NoPostgresUser);
    }
    Ok(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Creates `data_dir` (mode 0700, as PostgreSQL demands) and any missing
/// parents. When running as another user: hands the created directories to
/// it, and adds search (x, never read) permission for "others" to ancestors it
/// could not otherwise traverse — temp dirs are 0700 root-owned.
pub(crate) fn prepare_data_dir(data_dir: &Path, run_as: Option<RunAs>) -> Result<(), LocalError> {
    let missing: Vec<PathBuf> = data_dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(data_dir)
        .map_err(|e| LocalError::io(format!("creating {}", data_dir.display()), e))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| LocalError::io(format!("chmod 0700 {}", data_dir.display()), e))?;
    let Some(user) = run_as else {
        return Ok(());
    };
    let mut to_own = missing;
    if !to_own.iter().any(|p| p == data_dir) {
        // An existing, empty data dir (e.g. made by the caller) must be ours too.
        to_own.push(data_dir.to_path_buf());
    }
    for dir in &to_own {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
            .map_err(|e| LocalError::io(format!("chown {} to postgres", dir.display()), e))?;
    }
    let absolute = std::path::absolute(data_dir)
        .map_err(|e| LocalError::io(format!("resolving {}", data_dir.display()), e))?;
    for dir in absolute.ancestors().skip(1) {
        ensure_searchable(dir, user)?;
    }
    Ok(())
}

fn ensure_searchable(dir: &Path, user: RunAs) -> Result<(), LocalError> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(dir).map_err(|e| LocalError::io(format!("stat {}", dir.display()), e))?;
    let mode = meta.mode();
    let searchable = if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    if searchable {
        return Ok(());
    }
    tracing::debug!(dir = %dir.display(), "adding o+x so the postgres user can reach its data dir");
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode((mode | 0o001) & 0o7777),
    )
    .map_err(|e| LocalError::io(format!("chmod o+x {}", dir.display()), e))
}

/// A spawn request for the supervisor thread.
struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The supervisor's request channel, or why the thread could not be started.
static SUPERVISOR: OnceLock<Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();

/// Spawns `command` on one dedicated thread that never exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process; tests spawn from short-lived threads, so forking there
/// would kill the server as soon as that test thread ended.
pub(crate) fn spawn_on_supervisor(command: Command) -> io::Result<Child> {
    let sender = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-supervisor".into())
            .spawn(move || {
                for mut request in rx {
                    // The requester may have given up; nothing else to do then.
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .map(|_| tx)
            .map_err(|e| format!("starting the pg-supervisor thread: {e}"))
    });
    let sender = sender.as_ref().map_err(|e| io::Error::other(e.clone()))?;
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .send(SpawnRequest {
            command,
            reply: reply_tx,
        })
        .map_err(|_| io::Error::other("the pg-supervisor thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the pg-supervisor thread dropped a spawn request"))?
}

/// Makes the child get SIGINT (PostgreSQL's fast shutdown) when the spawning
/// thread — the supervisor, so in effect this process — dies.
pub(crate) fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl,
    // getppid) and allocates nothing on the success path. std runs it after
    // setuid, which matters because a credentials change clears pdeathsig.
    unsafe {
        command.pre_exec(move || {
            let sig = libc::SIGINT as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0 as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Converts a pid for `kill`, refusing 0 and 1 whose negation or use would
/// signal our own group or every process.
fn as_pid(pid: u32) -> io::Result<libc::pid_t> {
    match libc::pid_t::try_from(pid) {
        Ok(p) if p > 1 => Ok(p),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        )),
    }
}

fn kill(target: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions; `target` is checked by as_pid.
    if unsafe { libc::kill(target, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to `pid` only.
pub(crate) fn signal_pid(pid: u32, sig: libc::c_int) -> io::Result<()> {
    kill(as_pid(pid)?, sig)
}

/// Sends `sig` to the postmaster `pid` and all its children (backends and
/// auxiliary processes), returning the children signalled.
///
/// PostgreSQL children call `setsid()`, so a process-group signal would miss
/// them; we find them by parent pid instead. Unless resuming, the postmaster
/// is SIGSTOPped first so it cannot fork children we would miss, and so its
/// children are not reparented (hiding them) while we look.
pub(crate) fn signal_server(pid: u32, sig: libc::c_int) -> io::Result<Vec<u32>> {
    let p = as_pid(pid)?;
    if sig != libc::SIGCONT {
        kill(p, libc::SIGSTOP)?;
    }
    let children = children_of(pid);
    for &child in &children {
        // A child that has just exited is fine to miss.
        let _ = as_pid(child).and_then(|c| kill(c, sig));
    }
    kill(p, sig)?;
    Ok(children)
}

/// Live processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| proc_stat(child).is_some_and(|st| st.ppid == pid && st.state != 'Z'))
        .collect()
}

/// Whether `pid` exists and is not a zombie (a zombie holds no resources the
/// next server would need, and may never be reaped if it is not our child).
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(p) = as_pid(pid) else {
        return false;
    };
    match kill(p, 0) {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => return false,
        _ => {}
    }
    proc_stat(pid).is_none_or(|st| st.state != 'Z')
}

/// Reaps `pid` if it is our child that has exited; harmless otherwise. Only
/// for servers whose `Child` handle is gone (adopted ones).
pub(crate) fn try_reap(pid: u32) {
    if let Ok(p) = as_pid(pid) {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
        unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) };
    }
}

/// The fields of `/proc/PID/stat` we use.
struct ProcStat {
    state: char,
    ppid: u32,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: parse after the last ')'.
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid })
}

/// Whether live `pid` is a postmaster serving `data_dir`: its working directory
/// is the data dir (PostgreSQL chdirs there). Guards against a stale
/// `postmaster.pid` whose pid now belongs to an unrelated process.
pub(crate) fn is_postmaster_of(pid: u32, data_dir: &Path) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
    let want = std::fs::canonicalize(data_dir);
    match (cwd, want) {
        (Ok(cwd), Ok(want)) => cwd == want,
        // No /proc access: fall back to the process name.
        _ => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or(true, |comm| comm.trim() == "postgres"),
    }
}

/// Starts `command` (a loopback server that dies with this process) and
/// waits until it accepts connections on `port`, at most `within`. `what`
/// names it in errors; `missing` is the error when its binary is not found.
pub(crate) fn start_listening(
    mut command: Command,
    port: u16,
    what: &str,
    missing: fn() -> LocalError,
    within: std::time::Duration,
) -> Result<Child, LocalError> {
    die_with_parent(&mut command);
    let mut child = spawn_on_supervisor(command).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            missing()
        } else {
            LocalError::io(format!("starting {what}"), e)
        }
    })?;
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LocalError::io(
                format!("{what} exited at start ({status})"),
                io::Error::other("see its arguments"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(LocalError::io(
        format!("waiting for {what}"),
        io::Error::other("not accepting connections"),
    ))
}
