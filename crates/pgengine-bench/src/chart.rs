//! The PNG chart.
use std::path::Path;
use anyhow::Result;
use crate::report::Report;

pub fn draw(_report: &Report, _path: &Path) -> Result<()> { Ok(()) }
