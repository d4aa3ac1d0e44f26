//! The report: markdown table, targets, BENCHMARKS.md and JSON.
use serde::Serialize;

use crate::runner::{Outcome, Plan};
use crate::server::ServerInfo;

#[derive(Serialize)]
pub struct Report {
    pub plan: Plan,
    pub server: ServerInfo,
    pub command: String,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn new(plan: Plan, server: ServerInfo, command: String, outcomes: Vec<Outcome>) -> Self {
        Self {
            plan,
            server,
            command,
            outcomes,
        }
    }
    pub fn table(&self) -> String {
        String::new()
    }
    pub fn targets_section(&self) -> String {
        String::new()
    }
    pub fn benchmarks_md(&self) -> String {
        String::new()
    }
}
