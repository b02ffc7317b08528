//! PNG plots of the benchmark (plotters' bitmap backend; text drawn with DejaVu Sans
//! from fonts-dejavu-core, read at run time).
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::bench_net::{NetReport, Test, Variant};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the font once; an error says how to get it.
pub fn init_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes =
            std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core)"))?;
        register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{FONT}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn color(v: Variant) -> RGBColor {
    match v {
        Variant::Direct => RGBColor(60, 60, 60),
        Variant::Iptables => RGBColor(214, 39, 40),
        Variant::Nftables => RGBColor(255, 127, 14),
        Variant::Lb => RGBColor(44, 160, 44),
        Variant::LbXdp => RGBColor(31, 119, 180),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn size_label(n: usize) -> String {
    if n >= 1_000 {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// One panel per test: each variant's median relative to direct, against the number of
/// other Services, for `clients` clients.
pub fn datapath(path: &Path, report: &NetReport, sizes: &[usize], clients: usize) -> Result<()> {
    init_font()?;
    let root = BitMapBackend::new(path, (1400, 1450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (title, body) = root.split_vertically(50);
    title
        .titled(
            &format!(
                "Same Service, five ways: median relative to direct (pod IP), {clients} client(s)"
            ),
            ("sans-serif", 26),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let k = sizes.len();
    for (area, test) in body.split_evenly((3, 2)).iter().zip(Test::ALL) {
        let series: Vec<(Variant, Vec<(f64, f64)>)> = Variant::ALL
            .iter()
            .map(|&v| {
                let pts = sizes
                    .iter()
                    .enumerate()
                    .filter_map(|(x, &n)| {
                        let d = median(report.samples.get(&(n, test, clients, Variant::Direct))?);
                        let y = median(report.samples.get(&(n, test, clients, v))?);
                        (d > 0.0).then_some((x as f64, y / d))
                    })
                    .collect();
                (v, pts)
            })
            .collect();
        let ymax = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .fold(1.2f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} ({})", test.name(), test.unit()),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.3f64..(k as f64 - 0.7), 0f64..ymax)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_labels(k)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < k {
                    size_label(sizes[i as usize])
                } else {
                    String::new()
                }
            })
            .x_desc("other Services loaded")
            .y_desc("x direct")
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (v, pts) in series {
            let c = color(v);
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
                .map_err(|e| anyhow!("{e}"))?
                .label(v.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A control-plane series: its name and points (Services, milliseconds).
pub struct Series {
    /// Legend.
    pub name: &'static str,
    /// (Services, ms); missing points are left out.
    pub points: Vec<(f64, f64)>,
}

/// Two log-log panels: full sync and one change, time against Services.
pub fn control_plane(path: &Path, full: &[Series], change: &[Series]) -> Result<()> {
    init_font()?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (title, body) = root.split_vertically(50);
    title
        .titled(
            "Control plane: Services x 10 endpoints (log-log; lower is better)",
            ("sans-serif", 26),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let colors = [
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
    ];
    for (area, (caption, series)) in body.split_evenly((1, 2)).iter().zip([
        ("full sync (ms)", full),
        ("one endpoint change (ms)", change),
    ]) {
        let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.clone()).collect();
        if all.is_empty() {
            continue;
        }
        let xmin = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.5;
        let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.5;
        let ymin = all
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .max(1e-3)
            / 2.0;
        let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("Services")
            .y_desc("ms")
            .x_label_formatter(&|x| size_label(*x as usize))
            .y_label_formatter(&|y| format!("{y}"))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (s, &c) in series.iter().zip(&colors) {
            chart
                .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(3)))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, c.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
