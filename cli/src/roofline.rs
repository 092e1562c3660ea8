//! The roofline chart of `attngen bench --roofline`: the machine's FMA and bandwidth ceilings
//! and one point per (workload, backend) at its arithmetic intensity.

use plotters::prelude::*;

/// One measured point.
pub struct Point {
    /// e.g. `W1 jit`.
    pub label: String,
    /// FLOPs per byte of compulsory memory traffic.
    pub intensity: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
}

/// The chart as SVG text: log–log axes, one ceiling `min(peak, intensity ·
/// peak_gbs)` per `(ISA, FMA peak)` in `ceilings` (widest first), and the labelled
/// measurements.
pub fn draw(ceilings: &[(String, f64)], peak_gbs: f64, points: &[Point]) -> Result<String, String> {
    let mut svg = String::new();
    draw_into(&mut svg, ceilings, peak_gbs, points)?;
    Ok(svg)
}

/// [`draw`]'s body: the SVG backend borrows `svg` until it is dropped, at this function's end.
fn draw_into(
    svg: &mut String,
    ceilings: &[(String, f64)],
    peak_gbs: f64,
    points: &[Point],
) -> Result<(), String> {
    let peak_gflops = ceilings.iter().map(|c| c.1).fold(1.0, f64::max);
    let fail = |e: &dyn std::fmt::Display| format!("cannot draw the roofline: {e}");
    let root = SVGBackend::with_string(svg, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let lowest = points.iter().map(|p| p.intensity).fold(0.5, f64::min) / 2.0;
    let highest =
        points.iter().map(|p| p.intensity).fold(2.0 * peak_gflops / peak_gbs, f64::max) * 2.0;
    let floor = points.iter().map(|p| p.gflops).fold(peak_gflops / 100.0, f64::min).max(1e-3) / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("attngen roofline: {peak_gflops:.0} GFLOP/s widest FMA peak, {peak_gbs:.1} GB/s read bandwidth"),
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lowest..highest).log_scale(), (floor..peak_gflops * 2.0).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (FLOP per byte of compulsory traffic)")
        .y_desc("GFLOP/s")
        .draw()
        .map_err(|e| fail(&e))?;
    const COLOURS: [RGBColor; 4] = [BLUE, GREEN, MAGENTA, CYAN];
    for ((isa, peak), &colour) in ceilings.iter().zip(COLOURS.iter().cycle()) {
        let ceiling = (0..=200).map(|i| {
            let x = lowest * (highest / lowest).powf(f64::from(i) / 200.0);
            (x, (x * peak_gbs).min(*peak))
        });
        chart
            .draw_series(LineSeries::new(ceiling, colour.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(format!("{isa}: min({peak:.0} GFLOP/s, intensity x bandwidth)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .draw_series(points.iter().map(|p| Circle::new((p.intensity, p.gflops), 5, RED.filled())))
        .map_err(|e| fail(&e))?
        .label("measured")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    chart
        .draw_series(points.iter().map(|p| {
            Text::new(p.label.clone(), (p.intensity, p.gflops * 1.15), ("sans-serif", 14))
        }))
        .map_err(|e| fail(&e))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}
