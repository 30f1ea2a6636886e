//! The loss curve of a run as a PNG (plotters, with a font compiled in so no system fonts are
//! needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

const FONT: &str = "lorq-mono";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Hack (MIT), shipped as bytes by the `epaint_default_fonts` crate.
        if plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .is_err()
        {
            tracing::warn!("the built-in font did not load; the loss curve will have no text");
        }
    });
}

/// Draws training loss (and eval loss, when logged) against the step from `metrics.jsonl`-style
/// lines into `path` (PNG, 900×500).
pub fn loss_curve(history: &[serde_json::Value], path: &Path) -> Result<()> {
    let series = |key: &str| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let train = series("loss");
    let eval = series("eval_loss");
    if train.is_empty() && eval.is_empty() {
        return Err(TrainError::Config(
            "no loss was logged; nothing to plot".into(),
        ));
    }
    register_font();
    let err = |e: String| TrainError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let all = train.iter().chain(&eval);
    let x_max = all.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let y_min = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("lorq train: loss", (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (mean NLL per trained token)")
        .label_style((FONT, 13))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|e| err(e.to_string()))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.clone(), &RED))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(eval.into_iter().map(|p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| err(e.to_string()))?
            .label("eval")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
