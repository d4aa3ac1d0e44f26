//! The PNG chart: one panel per workload, one bar per system.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend takes its bytes,
//! so the system's DejaVu Sans is loaded at run time (no font library needed).
//! Without it the chart is skipped with a message.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::report::{Report, thousands};
use crate::systems::System;

/// Fonts tried, in order.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Draws `report` into a PNG at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<()> {
    load_font()?;
    let workloads = &report.plan.workloads;
    let rows = workloads.len().div_ceil(2) as u32;
    let root = BitMapBackend::new(path, (1200, 60 + 300 * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (title, body) = root.split_vertically(60);
    title
        .titled(
            "pgengine vs peers: throughput (median), higher is better",
            ("sans-serif", 24),
        )
        .map_err(plot_err)?;
    let panels = body.split_evenly((rows as usize, 2));
    for (workload, panel) in workloads.iter().zip(panels.iter()) {
        let bars: Vec<(System, f64)> = report
            .results
            .iter()
            .filter(|s| s.workload == *workload)
            .filter_map(|s| Some((s.system, s.throughput?)))
            .collect();
        let caption = format!("{} ({})", workload.title(), workload.unit());
        draw_panel(panel, &caption, &bars)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One workload's bars.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    bars: &[(System, f64)],
) -> Result<()> {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(25)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..max * 1.15)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| short(b.0).into()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| compact(*v))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (system, value))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *value),
                ],
                color(*system).filled(),
            );
            bar.set_margin(0, 0, 6, 6);
            bar
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
            Text::new(
                thousands(*value),
                (SegmentValue::CenterOf(i), *value + max * 0.02),
                ("sans-serif", 11)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))
        .map_err(plot_err)?;
    Ok(())
}

fn load_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVuSans.ttf found for the chart's text")?;
    let bytes: &'static [u8] = std::fs::read(path)?.leak();
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))
}

fn short(system: System) -> &'static str {
    match system {
        System::Pgengine => "pgengine",
        System::PgengineMultiplexed => "pgengine mux",
        System::TokioPostgres => "tokio-pg",
        System::Deadpool => "deadpool",
        System::Sqlx => "sqlx",
        System::Piccolo => "piccolo",
        System::PiccoloPgengine => "piccolo/pge",
        System::Asyncpg => "asyncpg",
        System::Pgbench => "pgbench",
        System::Copy => "COPY",
        System::PgengineReplica => "pgengine→replica",
        System::PgengineBoth => "pgengine→both",
    }
}

fn color(system: System) -> RGBColor {
    match system {
        System::Pgengine => RGBColor(214, 39, 40),
        System::PgengineMultiplexed => RGBColor(255, 152, 150),
        System::TokioPostgres => RGBColor(31, 119, 180),
        System::Deadpool => RGBColor(44, 160, 44),
        System::Sqlx => RGBColor(255, 127, 14),
        System::Piccolo => RGBColor(148, 103, 189),
        System::PiccoloPgengine => RGBColor(197, 176, 213),
        System::Asyncpg => RGBColor(140, 86, 75),
        System::Pgbench => RGBColor(127, 127, 127),
        System::Copy => RGBColor(23, 190, 207),
        System::PgengineReplica => RGBColor(240, 120, 120),
        System::PgengineBoth => RGBColor(160, 20, 20),
    }
}

/// 12345 → "12k", 1234567 → "1.2M".
fn compact(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart failed: {e:?}")
}
