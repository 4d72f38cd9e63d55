//! The bench chart: per-packet cost and short connections/s against the service count, one
//! line per contender.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::Value;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

type Series = Vec<(String, Vec<(f64, f64)>)>;

fn packet_series(report: &Value) -> Series {
    let rows = report["packet"].as_array().cloned().unwrap_or_default();
    [
        ("passthrough", "passthrough (ingress)"),
        ("passthrough_egress", "passthrough (egress)"),
        ("new_flow_syn", "new flow (SYN)"),
        ("established", "established"),
        ("reply_revnat", "reply reverse-NAT"),
        ("floor_tc", "TC floor"),
        ("floor_xdp", "XDP floor"),
    ]
    .iter()
    .map(|(case, label)| {
        let pts = rows
            .iter()
            .filter(|r| r["case"] == *case)
            .filter_map(|r| Some((r["services"].as_f64()?, r["ns_per_packet"].as_f64()?)))
            .collect();
        ((*label).to_owned(), pts)
    })
    .collect()
}

fn e2e_series(report: &Value) -> Series {
    let rows = report["e2e"].as_array().cloned().unwrap_or_default();
    ["direct", "vipx", "vipx_netfilter", "iptables", "nftables"]
        .iter()
        .map(|c| {
            let pts = rows
                .iter()
                .filter(|r| r["contender"] == *c && r["metric"] == "short_connections")
                .filter_map(|r| Some((r["services"].as_f64()?, r["median"].as_f64()?)))
                .collect();
            ((*c).to_owned(), pts)
        })
        .collect()
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &Series,
) -> Result<()> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min).min(1e9) / 2.0;
    let x_max = xs.iter().copied().fold(10.0, f64::max) * 2.0;
    let y_max = ys.iter().copied().fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min.max(0.5)..x_max).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("services (log scale)")
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (label, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(3)))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

pub fn draw(report: &Value, out: &Path) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("registering {FONT}"))?;
    let root = BitMapBackend::new(out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    panel(
        &left,
        "Per-packet cost (BPF_PROG_TEST_RUN)",
        "ns / packet",
        &packet_series(report),
    )?;
    panel(
        &right,
        "Short connections per second (lab)",
        "connections / s",
        &e2e_series(report),
    )?;
    root.present().context("writing the chart")?;
    Ok(())
}
