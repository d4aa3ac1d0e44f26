//! `pgengine-ephemeral`: starts an ephemeral PostgreSQL cluster for tests written in
//! other languages (the Python package's pytest suite), prints its URL on one line, and
//! stops it (removing its files) when standard input closes. If this process is killed,
//! the cluster's reaper stops the server all the same.
//!
//! ```sh
//! coproc PG { pgengine-ephemeral; }
//! read -r DATABASE_URL <&"${PG[0]}"    # postgres://postgres@127.0.0.1:PORT/postgres
//! # ... run tests ...
//! exec {PG[1]}>&-                      # closing stdin stops the cluster
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;

use pgengine_testing::EphemeralCluster;

fn main() -> ExitCode {
    let cluster = match EphemeralCluster::start() {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("pgengine-ephemeral: could not start a cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", cluster.url())
        .and_then(|()| stdout.flush())
        .is_ok()
    {
        // Wait until the parent closes our stdin (or exits).
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    }
    match cluster.stop() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgengine-ephemeral: could not stop the cluster cleanly: {e}");
            ExitCode::FAILURE
        }
    }
}
