//! A pgbouncer in transaction mode in front of a test server: [`PgBouncer`].

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cluster::{create_temp_dir, free_port, read_log_tail, run_as};
use crate::error::{Error, ErrorKind};

/// Where Debian's `pgbouncer` package installs the binary.
const DEFAULT_BINARY: &str = "/usr/sbin/pgbouncer";

/// How long pgbouncer may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The sh script of the reaper process: blocks until its stdin reaches EOF (the owner
/// stopped pgbouncer, or died, even by SIGKILL), then stops the pgbouncer whose pid
/// file is $1 (if its command line still names config $2) and removes the temp dir $3.
const REAPER_SCRIPT: &str = r#"
trap '' HUP INT TERM PIPE
while read -r _line; do :; done
pidfile=$1; ini=$2; root=$3
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile" 2>/dev/null)
  case "$pid" in ''|*[!0-9]*) pid= ;; esac
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ]; then
    tr '\000' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$ini" || pid=
  fi
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf -- "$root"
"#;

/// A pgbouncer (Debian's `/usr/sbin/pgbouncer`, or `$PGBOUNCER`) in transaction mode in
/// front of a PostgreSQL server, on a free port of 127.0.0.1, with `trust` auth for the
/// server's user and a small server pool per database and user. It runs as user
/// `postgres` when the tests run as root. Stopped, and its temp dir removed, on drop;
/// a reaper process does it if the test process dies first.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use pgengine_testing::{PgBouncer, TestDatabase};
/// let db = TestDatabase::new().await?;
/// let bouncer = PgBouncer::in_front_of(db.url(), 5)?;
/// let client_url = bouncer.url_for(db.name());
/// # Ok(()) }
/// ```
pub struct PgBouncer {
    child: Mutex<Option<Child>>,
    reaper: Mutex<Option<(Child, ChildStdin)>>,
    root: PathBuf,
    port: u16,
    user: String,
}

impl std::fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("root", &self.root)
            .finish()
    }
}

impl PgBouncer {
    /// Starts pgbouncer in front of the server of `server_url` (any database on it),
    /// with `pool_size` server connections per database and user.
    ///
    /// ```no_run
    /// let bouncer = pgengine_testing::PgBouncer::in_front_of("postgres://postgres@127.0.0.1:5432/app", 5)?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn in_front_of(server_url: &str, pool_size: usize) -> Result<PgBouncer, Error> {
        let config = tokio_postgres::Config::from_str(server_url).map_err(|e| {
            Error::with_source(ErrorKind::Config, "invalid server URL for pgbouncer", e)
        })?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(dir)) => dir.to_string_lossy().into_owned(),
            None => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let binary = std::env::var_os("PGBOUNCER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
        if !binary.exists() {
            return Err(Error::new(
                ErrorKind::BinariesNotFound,
                format!(
                    "pgbouncer not found at {} (install Debian's `pgbouncer` package, or set PGBOUNCER)",
                    binary.display()
                ),
            ));
        }
        let run_as = run_as()?;
        let root = create_temp_dir(run_as)?;
        let mut bouncer = PgBouncer {
            child: Mutex::new(None),
            reaper: Mutex::new(None),
            root,
            port: 0,
            user,
        };
        let ini = bouncer.root.join("pgbouncer.ini");
        let pidfile = bouncer.root.join("pgbouncer.pid");
        bouncer.start_reaper(&pidfile, &ini)?;
        let users = bouncer.root.join("userlist.txt");
        write_file(&users, &format!("\"{}\" \"\"\n", bouncer.user), run_as)?;
        let mut last_error = None;
        for _ in 0..5 {
            bouncer.port = free_port()?;
            let conf = format!(
                "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                 default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n\
                 max_client_conn = 1000\nmax_db_connections = 0\n\
                 ignore_startup_parameters = extra_float_digits,options,search_path\n\
                 logfile = {}\npidfile = {}\nserver_reset_query =\n",
                bouncer.port,
                users.display(),
                bouncer.root.join("pgbouncer.log").display(),
                pidfile.display(),
            );
            write_file(&ini, &conf, run_as)?;
            match bouncer.start_process(&binary, &ini, run_as) {
                Ok(()) => return Ok(bouncer),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The port pgbouncer listens on (127.0.0.1).
    ///
    /// ```no_run
    /// # fn f(bouncer: pgengine_testing::PgBouncer) { println!("{}", bouncer.port()); }
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `dbname` through pgbouncer, as the server's user.
    ///
    /// ```no_run
    /// # fn f(bouncer: pgengine_testing::PgBouncer) { let url = bouncer.url_for("app"); }
    /// ```
    pub fn url_for(&self, dbname: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{dbname}", self.user, self.port)
    }

    /// Stops pgbouncer and removes its temp dir now (dropping it does the same).
    ///
    /// ```no_run
    /// # fn f(bouncer: pgengine_testing::PgBouncer) { bouncer.stop(); }
    /// ```
    pub fn stop(self) {
        self.shutdown();
    }

    fn start_process(
        &mut self,
        binary: &Path,
        ini: &Path,
        run_as: Option<(u32, u32)>,
    ) -> Result<(), Error> {
        let log = self.root.join("pgbouncer.log");
        let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
        let mut cmd = Command::new(binary);
        cmd.arg(ini)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("could not run {}", binary.display()), e))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                return Ok(());
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::new(
                    ErrorKind::Startup,
                    format!(
                        "pgbouncer on port {} did not start ({}):\n{}",
                        self.port,
                        exited.map_or("timed out".to_owned(), |s| s.to_string()),
                        read_log_tail(&log, log_start)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_reaper(&mut self, pidfile: &Path, ini: &Path) -> Result<(), Error> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("pgengine-testing-reaper")
            .arg(pidfile)
            .arg(ini)
            .arg(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("could not spawn the cleanup process (/bin/sh)", e))?;
        let stdin = child.stdin.take().expect("piped stdin");
        *self.reaper.get_mut().unwrap_or_else(|p| p.into_inner()) = Some((child, stdin));
        Ok(())
    }

    /// Idempotent: stops pgbouncer (SIGTERM, then SIGKILL after 10 s), removes the dir,
    /// releases the reaper.
    fn shutdown(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: plain kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        if let Some((mut child, stdin)) =
            self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn write_file(path: &Path, text: &str, run_as: Option<(u32, u32)>) -> Result<(), Error> {
    let mut file = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("could not write {}", path.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("could not write {}", path.display()), e))?;
    if let Some((uid, gid)) = run_as {
        chown(path, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("could not hand {} to postgres", path.display()), e))?;
    }
    Ok(())
}
