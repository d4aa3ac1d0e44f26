//! `EphemeralCluster`: a throwaway PostgreSQL cluster in a temp dir.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{Error, ErrorKind, find_bin_dir};

/// Prefix of every temp dir this crate creates (`$TMPDIR/pgengine-test-…`), so that CI
/// can check that none is left behind.
///
/// ```
/// assert_eq!(pgengine_testing::TEMP_DIR_PREFIX, "pgengine-test-");
/// ```
pub const TEMP_DIR_PREFIX: &str = "pgengine-test-";

/// Attempts to start on a fresh free port before giving up on port clashes.
const START_ATTEMPTS: usize = 5;

/// Settings applied to every cluster unless overridden with
/// [`EphemeralClusterBuilder::setting`]: durability off, for speed.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
];

/// The sh script of the reaper process. It blocks until its stdin (a pipe whose write
/// end only the owning test process holds) reaches EOF — i.e. the owner stopped the
/// cluster and closed it, or the owner died, even by SIGKILL — then does an immediate
/// shutdown of the postmaster (SIGQUIT, what `pg_ctl stop -m immediate` sends; SIGKILL
/// after 10 s) and removes the cluster's temp dir. Arguments: $1 data dir, $2 temp dir.
const REAPER_SCRIPT: &str = r#"
trap '' HUP INT TERM PIPE
while read -r _line; do :; done
data=$1; root=$2
pidfile="$data/postmaster.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile" 2>/dev/null)
  case "$pid" in ''|*[!0-9]*) pid= ;; esac
  # Make sure the pid is still our postmaster, not a recycled one.
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ]; then
    tr '\000' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$data" || pid=
  fi
  if [ -n "$pid" ]; then
    kill -QUIT "$pid" 2>/dev/null
    i=0
    while [ -f "$pidfile" ] && kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
      sleep 0.1; i=$((i+1))
    done
    if [ -f "$pidfile" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
  fi
fi
rm -rf -- "$root"
"#;

/// Builder for an [`EphemeralCluster`]; see [`EphemeralCluster::builder`].
///
/// ```no_run
/// use pgengine_testing::EphemeralCluster;
/// let cluster = EphemeralCluster::builder()
///     .setting("shared_buffers", "256MB")
///     .setting("max_connections", "500")
///     .start()?;
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct EphemeralClusterBuilder {
    settings: Vec<(String, String)>,
    bin_dir: Option<PathBuf>,
    /// Files written into the data directory: name, contents, mode.
    files: Vec<(String, String, u32)>,
    hba: Option<Vec<String>>,
    address: IpAddr,
    network_namespace: Option<String>,
}

impl Default for EphemeralClusterBuilder {
    fn default() -> Self {
        EphemeralClusterBuilder {
            settings: DEFAULT_SETTINGS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bin_dir: None,
            files: Vec::new(),
            hba: None,
            address: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            network_namespace: None,
        }
    }
}

impl EphemeralClusterBuilder {
    /// Sets a server setting (a `postgresql.conf` parameter), replacing the default or an
    /// earlier value of the same name. Defaults: `fsync=off`, `synchronous_commit=off`,
    /// `full_page_writes=off`, `max_connections=300`. `port`, `listen_addresses` and
    /// `unix_socket_directories` are managed by the cluster and cannot be overridden.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .setting("fsync", "on")
    ///     .setting("work_mem", "64MB")
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        match self
            .settings
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(slot) => slot.1 = value,
            None => self.settings.push((name, value)),
        }
        self
    }

    /// Turns TLS on with `certs`: the server certificate and key (mode 0600, owned by
    /// the server's user) and the CA (`ssl_ca_file`, for client certificates) go into
    /// the data directory, and `ssl = on`.
    ///
    /// ```no_run
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"])?;
    /// let cluster = pgengine_testing::EphemeralCluster::builder().tls(&certs).start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn tls(mut self, certs: &crate::TestCertificates) -> Self {
        self.files.extend([
            ("server.crt".into(), certs.server_cert_pem().into(), 0o644),
            ("server.key".into(), certs.server_key_pem().into(), 0o600),
            ("root.crt".into(), certs.ca_pem().into(), 0o644),
        ]);
        self.setting("ssl", "on")
            .setting("ssl_cert_file", "server.crt")
            .setting("ssl_key_file", "server.key")
            .setting("ssl_ca_file", "root.crt")
    }

    /// Replaces `pg_hba.conf` with `lines` (after `local all all trust`, which the
    /// harness itself uses over the unix socket), e.g. `hostssl all all 127.0.0.1/32
    /// scram-sha-256`. The default allows everyone over TCP without a password.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .setting("password_encryption", "scram-sha-256")
    ///     .hba(["host all all 127.0.0.1/32 scram-sha-256"])
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn hba<I, S>(mut self, lines: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.hba = Some(lines.into_iter().map(Into::into).collect());
        self
    }

    /// Listens on `address` instead of 127.0.0.1 (its URLs then name it). With an
    /// address other than 127.0.0.1, allow clients in with [`hba`](Self::hba).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .listen_on("10.0.0.2".parse().unwrap())
    ///     .hba(["host all all 10.0.0.0/24 trust"])
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn listen_on(mut self, address: IpAddr) -> Self {
        self.address = address;
        self
    }

    /// Runs the server inside the network namespace `name` (`ip netns exec`; needs
    /// root), e.g. that of a [`Blackhole`](crate::Blackhole), with
    /// [`listen_on`](Self::listen_on) an address of that namespace.
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .network_namespace(path.namespace())
    ///     .listen_on(path.server_address())
    ///     .hba(["host all all 0.0.0.0/0 trust"])
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn network_namespace(mut self, name: &str) -> Self {
        self.network_namespace = Some(name.to_owned());
        self
    }

    /// Uses the server binaries in `dir` instead of searching with [`find_bin_dir`].
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .bin_dir("/usr/lib/postgresql/15/bin")
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Runs `initdb` into a fresh temp dir and starts the server on a free port of
    /// 127.0.0.1 (blocking until it accepts connections).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder().start()?;
    /// println!("{}", cluster.url());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn start(self) -> Result<EphemeralCluster, Error> {
        for (name, _) in &self.settings {
            if ["port", "listen_addresses", "unix_socket_directories"]
                .iter()
                .any(|m| name.eq_ignore_ascii_case(m))
            {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("setting `{name}` is managed by EphemeralCluster"),
                ));
            }
        }
        let bin_dir = match self.bin_dir {
            Some(dir) => dir,
            None => find_bin_dir()?,
        };
        let run_as = run_as()?;
        let root = create_temp_dir(run_as)?;
        // From here on, `cluster` owns the dir: any early return drops it, which removes it.
        let mut cluster = EphemeralCluster {
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            bin_dir,
            run_as,
            port: 0,
            address: self.address,
            network_namespace: self.network_namespace.clone(),
            state: Mutex::new(State {
                stopped: false,
                reaper: None,
            }),
        };
        cluster.init(&self.settings)?;
        if let Some(lines) = &self.hba {
            let text = format!("local all all trust\n{}\n", lines.join("\n"));
            cluster.write_data_file("pg_hba.conf", &text, 0o600)?;
        }
        for (name, contents, mode) in &self.files {
            cluster.write_data_file(name, contents, *mode)?;
        }
        cluster.start_reaper()?;
        cluster.start_server()?;
        Ok(cluster)
    }
}

/// A throwaway PostgreSQL cluster: `initdb` into a fresh temp dir
/// (`$TMPDIR/pgengine-test-…`, trust auth, superuser `postgres`, UTF8, C locale),
/// a server on a free port of 127.0.0.1 with its unix socket in the temp dir, and
/// durability settings off for speed.
///
/// Dropping it stops the server (immediate shutdown) and removes the temp dir. Should
/// the owning process die without dropping it (panic=abort, SIGKILL), a small reaper
/// process notices and does the same.
///
/// When run as root, the server programs run as the `postgres` user, which owns the
/// temp dir.
///
/// ```no_run
/// use pgengine_testing::EphemeralCluster;
/// let cluster = EphemeralCluster::start()?;
/// assert!(cluster.url().starts_with("postgres://postgres@127.0.0.1:"));
/// drop(cluster); // server stopped, temp dir removed
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
pub struct EphemeralCluster {
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    address: IpAddr,
    network_namespace: Option<String>,
    state: Mutex<State>,
}

struct State {
    stopped: bool,
    reaper: Option<(Child, ChildStdin)>,
}

impl fmt::Debug for EphemeralCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralCluster")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("bin_dir", &self.bin_dir)
            .finish_non_exhaustive()
    }
}

impl EphemeralCluster {
    /// A builder to override or add server settings before starting.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::builder()
    ///     .setting("shared_buffers", "256MB")
    ///     .start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn builder() -> EphemeralClusterBuilder {
        EphemeralClusterBuilder::default()
    }

    /// Starts a cluster with the default settings (`builder().start()`).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn start() -> Result<EphemeralCluster, Error> {
        Self::builder().start()
    }

    /// URL of the `postgres` database as superuser `postgres` over TCP:
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// let url = cluster.url();
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of database `dbname` on this cluster (percent-encoded as needed).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert!(cluster.url_for("app").ends_with("/app"));
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn url_for(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{}",
            host_in_url(self.address),
            self.port,
            crate::server::percent_encode(dbname)
        )
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert_ne!(cluster.port(), 0);
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the server binaries in use.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert!(cluster.bin_dir().join("pg_ctl").exists());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's data directory (inside the temp dir).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert!(cluster.data_dir().join("PG_VERSION").exists());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temp dir holding the data dir, the server log (`postgres.log`) and the unix
    /// socket; removed when the cluster is stopped.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert!(cluster.temp_dir().join("postgres.log").exists());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn temp_dir(&self) -> &Path {
        &self.root
    }

    /// The unix socket directory (same as [`temp_dir`](Self::temp_dir)); usable as
    /// `host` in a key/value connection string.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// let conn = format!("host={} port={} user=postgres", cluster.socket_dir().display(), cluster.port());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server log file (inside the temp dir).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// let log = std::fs::read_to_string(cluster.log_file()).unwrap_or_default();
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The postmaster's process id, from `postmaster.pid`, while the server runs.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// assert!(cluster.postmaster_pid().is_some());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn postmaster_pid(&self) -> Option<u32> {
        read_postmaster_pid(&self.data_dir)
    }

    /// Stops the server (immediate shutdown, as a crash would) and keeps its data:
    /// connections fail until [`resume`](Self::resume).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// cluster.pause()?;
    /// cluster.resume()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn pause(&self) -> Result<(), Error> {
        self.stop_server()
    }

    /// Starts the server again on the same port after [`pause`](Self::pause),
    /// blocking until it accepts connections.
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// cluster.pause()?;
    /// cluster.resume()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn resume(&self) -> Result<(), Error> {
        let out = self
            .server_command()
            .arg("start")
            .args(["-w", "-t", "120", "-s"])
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .output()
            .map_err(|e| Error::io("could not run pg_ctl start", e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Startup,
            format!(
                "pg_ctl start (port {}) failed ({}): {}",
                self.port,
                out.status,
                output_text(&out)
            ),
        ))
    }

    /// Starts a hot standby of this cluster: a base backup (`pg_basebackup -R`, so it
    /// streams from this primary) in a temp dir of its own, a server on another free
    /// port; returns once this primary's `pg_stat_replication` shows it streaming. The
    /// standby keeps the primary's settings; it is stopped and removed like any cluster.
    ///
    /// ```no_run
    /// let primary = pgengine_testing::EphemeralCluster::start()?;
    /// let standby = primary.standby()?;
    /// standby.promote()?; // now a primary of its own
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn standby(&self) -> Result<EphemeralCluster, Error> {
        let root = create_temp_dir(self.run_as)?;
        let mut standby = EphemeralCluster {
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            bin_dir: self.bin_dir.clone(),
            run_as: self.run_as,
            port: 0,
            address: self.address,
            network_namespace: None,
            state: Mutex::new(State {
                stopped: false,
                reaper: None,
            }),
        };
        let out = standby
            .command("pg_basebackup")
            .arg("-D")
            .arg(&standby.data_dir)
            .arg("-h")
            .arg(self.address.to_string())
            // A fast checkpoint: after a large load, the default spread one takes minutes.
            .args([
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "--checkpoint=fast",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .map_err(|e| Error::io("could not run pg_basebackup", e))?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::Startup,
                format!(
                    "pg_basebackup from port {} failed ({}): {}",
                    self.port,
                    out.status,
                    output_text(&out)
                ),
            ));
        }
        // The copied configuration names the primary's socket directory: use our own.
        let conf = format!(
            "\n# --- pgengine-testing standby ---\nunix_socket_directories = '{}'\nhot_standby = on\n",
            quote_conf(&standby.root.to_string_lossy())
        );
        let path = standby.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("could not read {}", path.display()), e))?;
        text.push_str(&conf);
        standby.write_data_file("postgresql.conf", &text, 0o600)?;
        standby.start_reaper()?;
        standby.start_server()?;
        self.wait_until_streaming()?;
        Ok(standby)
    }

    /// Promotes this standby to a primary (`pg_ctl promote`), returning once it accepts
    /// writes. The new primary has no standby of its own, so a
    /// `synchronous_standby_names` copied from the old one is cleared (commits would
    /// otherwise wait for a standby forever), as an operator would.
    ///
    /// ```no_run
    /// # let primary = pgengine_testing::EphemeralCluster::start()?;
    /// let standby = primary.standby()?;
    /// primary.pause()?;   // the primary fails
    /// standby.promote()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn promote(&self) -> Result<(), Error> {
        let out = self
            .command("pg_ctl")
            .arg("promote")
            .args(["-w", "-t", "60", "-s"])
            .arg("-D")
            .arg(&self.data_dir)
            .output()
            .map_err(|e| Error::io("could not run pg_ctl promote", e))?;
        if out.status.success() {
            self.psql("ALTER SYSTEM SET synchronous_standby_names = ''")?;
            self.psql("SELECT pg_reload_conf()")?;
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Startup,
            format!(
                "pg_ctl promote (port {}) failed ({}): {}",
                self.port,
                out.status,
                output_text(&out)
            ),
        ))
    }

    /// The result of one SQL statement run with `psql` on this cluster, as text.
    fn psql(&self, sql: &str) -> Result<String, Error> {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(self.address.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-Atqc", sql])
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .map_err(|e| Error::io("could not run psql", e))?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::Database,
                format!(
                    "psql on port {} failed ({}): {}",
                    self.port,
                    out.status,
                    output_text(&out)
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits (at most 60 s) until a standby streams from this primary.
    fn wait_until_streaming(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let streaming =
                self.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")?;
            if streaming != "0" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Startup,
                    format!("no standby streams from port {} after 60 s", self.port),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server and removes the temp dir now, reporting failures (dropping the
    /// cluster does the same but can only log them to stderr).
    ///
    /// ```no_run
    /// let cluster = pgengine_testing::EphemeralCluster::start()?;
    /// cluster.stop()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn stop(self) -> Result<(), Error> {
        self.shutdown()
    }

    /// Idempotent: stop the server, remove the dir, release the reaper.
    pub(crate) fn shutdown(&self) -> Result<(), Error> {
        // Never block forever on the lock (this runs from an atexit hook too): if
        // another thread holds it, that thread is stopping the cluster (or the reaper will).
        let mut state = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        if state.stopped {
            return Ok(());
        }
        state.stopped = true;
        let stop_result = self.stop_server();
        let rm_result = match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(
                format!("could not remove {}", self.root.display()),
                e,
            )),
        };
        if let Some((mut child, stdin)) = state.reaper.take() {
            drop(stdin); // EOF: the reaper finds nothing left to do and exits
            let _ = child.wait();
        }
        stop_result.and(rm_result)
    }

    /// `pg_ctl`, run inside the cluster's network namespace when it has one (as root,
    /// dropping to the server's user inside).
    fn server_command(&self) -> Command {
        let Some(namespace) = &self.network_namespace else {
            return self.command("pg_ctl");
        };
        let mut inside = Command::new("ip");
        inside.args(["netns", "exec", namespace]);
        if let Some((uid, gid)) = self.run_as {
            inside.args([
                "setpriv".to_owned(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_owned(),
            ]);
        }
        inside.arg(self.bin_dir.join("pg_ctl"));
        self.in_cluster_dir(&mut inside);
        inside
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        self.in_cluster_dir(&mut cmd);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs `cmd` from the temp dir, with no stdin, the C locale and none of libpq's
    /// variables that would point it elsewhere.
    fn in_cluster_dir(&self, cmd: &mut Command) {
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env_remove("PGOPTIONS");
    }

    fn init(&mut self, settings: &[(String, String)]) -> Result<(), Error> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .map_err(|e| Error::io("could not run initdb", e))?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::Startup,
                format!(
                    "initdb -D {} failed ({}): {}",
                    self.data_dir.display(),
                    out.status,
                    output_text(&out)
                ),
            ));
        }
        let mut conf = String::from("\n# --- pgengine-testing ---\n");
        conf.push_str(&format!("listen_addresses = '{}'\n", self.address));
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            quote_conf(&self.root.to_string_lossy())
        ));
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", quote_conf(value)));
        }
        let path = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("could not read {}", path.display()), e))?;
        text.push_str(&conf);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("could not write {}", path.display()), e))
    }

    /// Writes a file into the data directory, owned by the server's user.
    fn write_data_file(&self, name: &str, contents: &str, mode: u32) -> Result<(), Error> {
        use std::os::unix::fs::{PermissionsExt, chown};
        let path = self.data_dir.join(name);
        let fail = |e| Error::io(format!("could not write {}", path.display()), e);
        std::fs::write(&path, contents).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        if let Some((uid, gid)) = self.run_as {
            chown(&path, Some(uid), Some(gid)).map_err(fail)?;
        }
        Ok(())
    }

    fn start_reaper(&mut self) -> Result<(), Error> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("pgengine-testing-reaper")
            .arg(&self.data_dir)
            .arg(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own session: a Ctrl-C or a process-group kill aimed at the tests must not
        // take the reaper down with them.
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
        self.state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .reaper = Some((child, stdin));
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), Error> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let log_start = std::fs::metadata(&self.log_file).map_or(0, |m| m.len());
            let out = self
                .server_command()
                .arg("start")
                .args(["-w", "-t", "120", "-s"])
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .arg("-o")
                .arg(format!("-p {port}"))
                .output()
                .map_err(|e| Error::io("could not run pg_ctl start", e))?;
            if out.status.success() {
                self.port = port;
                return Ok(());
            }
            // Make sure a half-started server does not linger before retrying.
            let _ = self.stop_server();
            let log = read_log_tail(&self.log_file, log_start);
            let clash = log.contains("could not bind")
                || log.contains("Address already in use")
                || log.contains("could not create any TCP/IP sockets");
            let err = Error::new(
                ErrorKind::Startup,
                format!(
                    "pg_ctl start (port {port}, data dir {}) failed ({}): {}\n--- server log tail ({}) ---\n{}",
                    self.data_dir.display(),
                    out.status,
                    output_text(&out),
                    self.log_file.display(),
                    log
                ),
            );
            if !clash {
                return Err(err);
            }
            last_error = Some(err);
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn stop_server(&self) -> Result<(), Error> {
        let pidfile = self.data_dir.join("postmaster.pid");
        if !pidfile.exists() {
            return Ok(());
        }
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .args(["-m", "immediate", "-w", "-t", "30", "-s"])
            .arg("-D")
            .arg(&self.data_dir)
            .output();
        if let Ok(out) = &out
            && out.status.success()
        {
            return Ok(());
        }
        // Fallback: signal the postmaster ourselves (SIGQUIT = immediate shutdown).
        let Some(pid) = read_postmaster_pid(&self.data_dir) else {
            return Ok(()); // the server is gone (or never wrote its pid)
        };
        let pid = pid as libc::pid_t;
        // SAFETY: plain kill(2) calls.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pidfile.exists() && unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match out {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::io("could not run pg_ctl stop", e)),
        }
    }
}

impl Drop for EphemeralCluster {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("pgengine-testing: stopping the cluster failed: {e}");
        }
    }
}

fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// `None` when not root; else the uid/gid of the `postgres` user (PostgreSQL refuses
/// to run as root).
pub(crate) fn run_as() -> Result<Option<(u32, u32)>, Error> {
    static RUN_AS: OnceLock<Result<Option<(u32, u32)>, Error>> = OnceLock::new();
    RUN_AS
        .get_or_init(|| {
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Ok(None);
            }
            lookup_user("postgres").map(Some).ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "running as root, but PostgreSQL refuses to run as root and there is no \
                     `postgres` user to run it as; create one (e.g. `useradd --system postgres`, \
                     or install the `postgresql` package), run the tests as a non-root user, \
                     or set DATABASE_URL to use an existing server",
                )
            })
        })
        .clone()
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both valid for the given sizes.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// A random-ish hex token (no rand dependency: std's RandomState is randomly keyed).
pub(crate) fn random_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:016x}", h.finish())
}

pub(crate) fn create_temp_dir(run_as: Option<(u32, u32)>) -> Result<PathBuf, Error> {
    use std::os::unix::fs::{DirBuilderExt, chown};
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let token = random_token();
        let dir = base.join(format!("{TEMP_DIR_PREFIX}{}", &token[..10]));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                if let Some((uid, gid)) = run_as
                    && let Err(e) = chown(&dir, Some(uid), Some(gid))
                {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(Error::io(
                        format!("could not hand {} to the postgres user", dir.display()),
                        e,
                    ));
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("could not create a temp dir in {}", base.display()),
                    e,
                ));
            }
        }
    }
    Err(Error::io(
        "could not create a unique temp dir",
        last.expect("attempted"),
    ))
}

pub(crate) fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("could not find a free port on 127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("could not find a free port on 127.0.0.1", e))
}

/// Escapes a value for a single-quoted `postgresql.conf` string.
fn quote_conf(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(err.trim());
    }
    s
}

/// The last ~40 lines written to the log since byte offset `from`.
pub(crate) fn read_log_tail(path: &Path, from: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    let start = (from as usize).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    if tail.is_empty() {
        "(empty)".to_string()
    } else {
        tail.join("\n")
    }
}

/// An address as the host part of a URL (IPv6 in brackets).
fn host_in_url(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
