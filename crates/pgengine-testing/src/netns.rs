//! `Blackhole`: a network path that can be cut silently, for tests of a server that
//! vanishes without closing its sockets.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, ErrorKind};

/// A MAC address no interface has: frames sent to it are dropped.
const NOWHERE: &str = "02:00:00:00:00:01";

/// A network namespace joined to this one by a veth pair, on a /30 of its own: a server
/// started in the namespace ([`EphemeralClusterBuilder::network_namespace`]) is reached
/// over the pair. [`cut`](Self::cut) makes each side send to a MAC address no one has,
/// so that every packet vanishes in both directions — no FIN, no RST, as when a host
/// or a network dies — and [`restore`](Self::restore) heals the path.
///
/// Needs root and iproute2 (`ip`). Everything is removed on drop.
///
/// [`EphemeralClusterBuilder::network_namespace`]: crate::EphemeralClusterBuilder::network_namespace
///
/// ```no_run
/// let path = pgengine_testing::Blackhole::new()?;
/// path.cut()?;      // the server's packets vanish
/// path.restore()?;  // and flow again
/// # Ok::<(), pgengine_testing::Error>(())
/// ```
#[derive(Debug)]
pub struct Blackhole {
    namespace: String,
    host_link: String,
    inside_link: String,
    host_address: Ipv4Addr,
    server_address: Ipv4Addr,
}

impl Blackhole {
    /// Creates the namespace and the veth pair, both up.
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// println!("the server side is {}", path.server_address());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn new() -> Result<Blackhole, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 100 + n % 100;
        // A /30 per path: 10.231.0.0/16 holds 16,384 of them.
        let block = (id % 16_384) * 4;
        let subnet = |last: u32| {
            Ipv4Addr::new(
                10,
                231,
                (block >> 8) as u8,
                (block & 0xff) as u8 + last as u8,
            )
        };
        let path = Blackhole {
            namespace: format!("pgengine-bh-{id}"),
            host_link: format!("pgbh{id}a"),
            inside_link: format!("pgbh{id}b"),
            host_address: subnet(1),
            server_address: subnet(2),
        };
        // Leftovers of a killed run with the same id go first.
        let _ = ip(&["link", "del", &path.host_link]);
        let _ = ip(&["netns", "del", &path.namespace]);
        path.create()?;
        Ok(path)
    }

    fn create(&self) -> Result<(), Error> {
        let (ns, host, inside) = (&self.namespace, &self.host_link, &self.inside_link);
        let host_cidr = format!("{}/30", self.host_address);
        let inside_cidr = format!("{}/30", self.server_address);
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", host, "type", "veth", "peer", "name", inside])?;
        ip(&["link", "set", inside, "netns", ns])?;
        ip(&["addr", "add", &host_cidr, "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        ip(&["-n", ns, "addr", "add", &inside_cidr, "dev", inside])?;
        ip(&["-n", ns, "link", "set", inside, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// The namespace's name, for `ip netns exec` and
    /// [`EphemeralClusterBuilder::network_namespace`](crate::EphemeralClusterBuilder::network_namespace).
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// assert!(path.namespace().starts_with("pgengine-bh-"));
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The address inside the namespace, for the server to listen on.
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// assert!(path.server_address().is_ipv4());
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn server_address(&self) -> IpAddr {
        IpAddr::V4(self.server_address)
    }

    /// Cuts the path: from now on every packet either way is dropped silently.
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// path.cut()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn cut(&self) -> Result<(), Error> {
        let (server, host) = (
            self.server_address.to_string(),
            self.host_address.to_string(),
        );
        ip(&[
            "neigh",
            "replace",
            &server,
            "lladdr",
            NOWHERE,
            "dev",
            &self.host_link,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n",
            &self.namespace,
            "neigh",
            "replace",
            &host,
            "lladdr",
            NOWHERE,
            "dev",
            &self.inside_link,
            "nud",
            "permanent",
        ])
    }

    /// Heals the path after [`cut`](Self::cut): the neighbours are looked up again.
    ///
    /// ```no_run
    /// let path = pgengine_testing::Blackhole::new()?;
    /// path.cut()?;
    /// path.restore()?;
    /// # Ok::<(), pgengine_testing::Error>(())
    /// ```
    pub fn restore(&self) -> Result<(), Error> {
        let (server, host) = (
            self.server_address.to_string(),
            self.host_address.to_string(),
        );
        ip(&["neigh", "del", &server, "dev", &self.host_link])?;
        ip(&[
            "-n",
            &self.namespace,
            "neigh",
            "del",
            &host,
            "dev",
            &self.inside_link,
        ])
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes the other; then the namespace.
        let _ = ip(&["link", "del", &self.host_link]);
        if let Err(e) = ip(&["netns", "del", &self.namespace]) {
            eprintln!(
                "pgengine-testing: could not remove network namespace {}: {e}",
                self.namespace
            );
        }
    }
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::io("could not run `ip` (install iproute2)", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    ))
}
