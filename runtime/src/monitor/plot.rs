//! The end-of-run plot: loss (train, and eval when there is any) over step on top, learning
//! rate over step below, sharing the step axis. A few hundred lines of rasterizing (filled
//! rectangles, thick polylines, a bitmap font) encoded with the `png` crate: a plotting
//! library would bring fonts and far more code than two panels of lines need.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::font::{descends, glyph, DESCENT, GLYPH_H, GLYPH_W};
use crate::error::{Error, Result};

pub(crate) const WIDTH: usize = 960;
pub(crate) const HEIGHT: usize = 720;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [30, 30, 30];
const GRID: Rgb = [225, 225, 225];
const TRAIN: Rgb = [31, 119, 180];
const EVAL: Rgb = [230, 115, 0];
const LR: Rgb = [44, 160, 44];
const TEXT_SCALE: usize = 2;
/// Pixels kept free inside each panel's left and right edge, so end points are not drawn on the frame.
const PAD: i64 = 8;

/// An RGB8 raster, row-major, origin top-left.
pub(crate) struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: WHITE.repeat(w * h) }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.put(x, y, c);
            }
        }
    }

    /// Bresenham, stamping a `t`×`t` square at each point for thickness.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), t: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let lo = -(t - 1) / 2;
        loop {
            self.rect(x + lo, y + lo, x + lo + t - 1, y + lo + t - 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text_width(s: &str) -> i64 {
        (s.chars().count() * (GLYPH_W + 1) * TEXT_SCALE) as i64
    }

    /// Draws `s` with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        let cell = ((GLYPH_W + 1) * TEXT_SCALE) as i64;
        for (i, ch) in s.chars().enumerate() {
            let Some(rows) = glyph(ch) else { continue };
            let drop = if descends(ch.to_ascii_lowercase()) { DESCENT } else { 0 };
            for (r, row) in rows.iter().enumerate() {
                for (col, bit) in row.bytes().enumerate() {
                    if bit == b'#' {
                        let px = x + i as i64 * cell + (col * TEXT_SCALE) as i64;
                        let py = y + ((r + drop) * TEXT_SCALE) as i64;
                        let s = TEXT_SCALE as i64;
                        self.rect(px, py, px + s - 1, py + s - 1, c);
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn pixels(&self) -> &[u8] {
        &self.px
    }
}

/// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten, the one
/// nearest (in ratio) to an `n`-way split.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let off = |s: f64| (s / raw).ln().abs();
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .min_by(|a, b| off(*a).total_cmp(&off(*b)))
        .unwrap_or(mag);
    let mut ticks = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 && ticks.len() < 4 * n {
        ticks.push(k * step);
        k += 1.0;
    }
    (ticks, step)
}

/// Tick labels: plain decimals with as many places as the tick step needs, scientific
/// notation (`2.0e-4`) for very small or very large values, as learning rates usually are.
fn tick_label(v: f64, step: f64, max_abs: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-2..1e6).contains(&max_abs) {
        return format!("{v:.1e}");
    }
    let places = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.places$}")
}

/// A value range to draw: finite min..max, widened when flat, padded 5% each side.
fn value_range(values: impl Iterator<Item = f64>, include_zero: bool) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1e-300) {
        let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
        return Some((lo - pad, hi + pad));
    }
    let pad = (hi - lo) * 0.05;
    Some((if include_zero && lo == 0.0 { 0.0 } else { lo - pad }, hi + pad))
}

struct Panel {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    steps: (f64, f64),
    values: (f64, f64),
}

impl Panel {
    fn map(&self, step: f64, v: f64) -> (i64, i64) {
        let fx = (step - self.steps.0) / (self.steps.1 - self.steps.0);
        let fy = (v - self.values.0) / (self.values.1 - self.values.0);
        let x = (self.x0 + PAD) as f64 + fx * (self.x1 - self.x0 - 2 * PAD) as f64;
        let y = self.y1 as f64 - fy * (self.y1 - self.y0) as f64;
        (x.round() as i64, y.round() as i64)
    }

    fn frame(&self, c: &mut Canvas, title: &str) {
        let th = (GLYPH_H * TEXT_SCALE) as i64;
        c.text(self.x0, self.y0 - th - 10, title, BLACK);
        let (yt, ystep) = nice_ticks(self.values.0, self.values.1, 5);
        let max_abs = self.values.0.abs().max(self.values.1.abs());
        for v in yt {
            let (_, y) = self.map(self.steps.0, v);
            c.line((self.x0, y), (self.x1, y), 1, GRID);
            c.line((self.x0 - 5, y), (self.x0, y), 1, BLACK);
            let label = tick_label(v, ystep, max_abs);
            c.text(self.x0 - 10 - Canvas::text_width(&label), y - th / 2, &label, BLACK);
        }
        let (xt, xstep) = nice_ticks(self.steps.0, self.steps.1, 8);
        for s in xt {
            let (x, _) = self.map(s, self.values.0);
            c.line((x, self.y0), (x, self.y1), 1, GRID);
            c.line((x, self.y1), (x, self.y1 + 5), 1, BLACK);
            let label = tick_label(s, xstep.max(1.0), self.steps.1.abs().max(1.0));
            c.text(x - Canvas::text_width(&label) / 2, self.y1 + 10, &label, BLACK);
        }
        c.line((self.x0, self.y0), (self.x0, self.y1), 1, BLACK);
        c.line((self.x0, self.y1), (self.x1, self.y1), 1, BLACK);
        c.line((self.x0, self.y0), (self.x1, self.y0), 1, BLACK);
        c.line((self.x1, self.y0), (self.x1, self.y1), 1, BLACK);
    }

    /// A polyline through the finite points; a non-finite value breaks the line.
    fn series(&self, c: &mut Canvas, points: &[(u64, f64)], color: Rgb, markers: bool) {
        let mut prev: Option<(i64, i64)> = None;
        for &(step, v) in points {
            if !v.is_finite() {
                prev = None;
                continue;
            }
            let p = self.map(step as f64, v);
            if let Some(q) = prev {
                c.line(q, p, 2, color);
            }
            if markers || (prev.is_none() && points.len() == 1) {
                c.rect(p.0 - 3, p.1 - 3, p.0 + 3, p.1 + 3, color);
            }
            prev = Some(p);
        }
    }
}

/// Renders the two panels. Points are (step, value) in step order.
pub(crate) fn render(train_loss: &[(u64, f64)], eval_loss: &[(u64, f64)], lr: &[(u64, f64)]) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    let all_steps = train_loss.iter().chain(eval_loss).chain(lr).map(|p| p.0 as f64);
    let (mut s0, mut s1) = all_steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), s| (a.min(s), b.max(s)));
    if s0 > s1 {
        (s0, s1) = (0.0, 1.0);
    } else if s0 == s1 {
        (s0, s1) = ((s0 - 1.0).max(0.0), s1 + 1.0);
    }
    let (left, right) = (110, WIDTH as i64 - 30);

    let loss_values = train_loss.iter().chain(eval_loss).map(|p| p.1);
    let loss_range = value_range(loss_values, false).unwrap_or((0.0, 1.0));
    let top = Panel { x0: left, y0: 50, x1: right, y1: 360, steps: (s0, s1), values: loss_range };
    top.frame(&mut c, "loss");
    top.series(&mut c, train_loss, TRAIN, false);
    top.series(&mut c, eval_loss, EVAL, true);
    // Legend, top right, above the panel.
    let mut x = right - Canvas::text_width("train") - 40;
    if !eval_loss.is_empty() {
        x -= Canvas::text_width("eval") + 50;
    }
    let ly = top.y0 - (GLYPH_H * TEXT_SCALE) as i64 - 10;
    let mid = ly + (GLYPH_H * TEXT_SCALE) as i64 / 2;
    c.line((x, mid), (x + 24, mid), 3, TRAIN);
    c.text(x + 32, ly, "train", BLACK);
    if !eval_loss.is_empty() {
        let x = x + 32 + Canvas::text_width("train") + 20;
        c.line((x, mid), (x + 24, mid), 3, EVAL);
        c.rect(x + 9, mid - 3, x + 15, mid + 3, EVAL);
        c.text(x + 32, ly, "eval", BLACK);
    }

    let lr_range = value_range(lr.iter().map(|p| p.1), true).unwrap_or((0.0, 1.0));
    let bottom = Panel { x0: left, y0: 440, x1: right, y1: 650, steps: (s0, s1), values: lr_range };
    bottom.frame(&mut c, "learning rate");
    bottom.series(&mut c, lr, LR, false);
    let label = "step";
    c.text((left + right) / 2 - Canvas::text_width(label) / 2, bottom.y1 + 40, label, BLACK);
    if train_loss.is_empty() && eval_loss.is_empty() {
        c.text(left + 20, top.y0 + 20, "no data", BLACK);
    }
    c
}

/// `rewards.png`: the reward margin (chosen − rejected) and the accuracy (share of pairs whose
/// chosen reply scores higher) over step, train and eval, from TRL's `rewards/margins` and
/// `rewards/accuracies` (preference runs) or `margin` and `accuracy` (reward models).
pub(crate) fn render_rewards(series: &std::collections::BTreeMap<String, Vec<(u64, f64)>>) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    let get = |a: &str, b: &str| series.get(a).or_else(|| series.get(b)).map(Vec::as_slice).unwrap_or(&[]);
    // RL runs (a `reward` series): mean reward (train: sampled, eval: greedy on held-out prompts)
    // and the KL to the reference; preference runs: reward margin and accuracy.
    let rl = series.contains_key("reward") || series.contains_key("eval_reward");
    let panels = if rl {
        // The KL panel when the run has a KL term; else the mean completion length (β = 0 GRPO).
        let kl = get("kl", "objective/kl");
        let second = if kl.is_empty() {
            ("mean completion length (tokens)", get("completions/mean_length", "completions/mean_length"), get("eval_completions/mean_length", "eval_completions/mean_length"))
        } else {
            ("KL to the reference", kl, get("eval_kl", "eval_kl"))
        };
        [("mean reward (eval: greedy, held out)", get("reward", "reward"), get("eval_reward", "eval_reward")), second]
    } else {
        [
            ("reward margin (chosen - rejected)", get("rewards/margins", "margin"), get("eval_rewards/margins", "eval_margin")),
            ("accuracy (chosen ranked first)", get("rewards/accuracies", "accuracy"), get("eval_rewards/accuracies", "eval_accuracy")),
        ]
    };
    let all = series.values().flatten().map(|p| p.0 as f64);
    let (mut s0, mut s1) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), s| (a.min(s), b.max(s)));
    if s0 > s1 {
        (s0, s1) = (0.0, 1.0);
    } else if s0 == s1 {
        (s0, s1) = ((s0 - 1.0).max(0.0), s1 + 1.0);
    }
    let (left, right) = (110, WIDTH as i64 - 30);
    for (i, (title, train, eval)) in panels.iter().enumerate() {
        let (y0, y1) = if i == 0 { (50, 330) } else { (410, 650) };
        let range = if i == 1 && !rl { Some((0.0, 1.05)) } else { value_range(train.iter().chain(eval.iter()).map(|p| p.1), true) };
        let p = Panel { x0: left, y0, x1: right, y1, steps: (s0, s1), values: range.unwrap_or((0.0, 1.0)) };
        p.frame(&mut c, title);
        p.series(&mut c, train, TRAIN, false);
        p.series(&mut c, eval, EVAL, true);
    }
    let ly = 50 - (GLYPH_H * TEXT_SCALE) as i64 - 10;
    let mid = ly + (GLYPH_H * TEXT_SCALE) as i64 / 2;
    let x = right - Canvas::text_width("train") - Canvas::text_width("eval") - 110;
    c.line((x, mid), (x + 24, mid), 3, TRAIN);
    c.text(x + 32, ly, "train", BLACK);
    let x = x + 32 + Canvas::text_width("train") + 20;
    c.line((x, mid), (x + 24, mid), 3, EVAL);
    c.rect(x + 9, mid - 3, x + 15, mid + 3, EVAL);
    c.text(x + 32, ly, "eval", BLACK);
    c.text((left + right) / 2 - Canvas::text_width("step") / 2, 690, "step", BLACK);
    c
}

/// Encodes the canvas as an RGB8 PNG at `path`, written beside it first and renamed into
/// place so an error never leaves a half-written image under the final name.
pub(crate) fn write_png(canvas: &Canvas, path: &Path) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut out = BufWriter::new(file);
    let to_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(io) => Error::io(&tmp, io),
        other => Error::format(&tmp, format!("encoding PNG: {other}")),
    };
    {
        let mut enc = png::Encoder::new(&mut out, canvas.w as u32, canvas.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(to_err)?;
        writer.write_image_data(&canvas.px).map_err(to_err)?;
        writer.finish().map_err(to_err)?;
    }
    let file = out.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers_inside_the_range() {
        let (t, step) = nice_ticks(0.13, 2.9, 5);
        assert_eq!(step, 0.5);
        assert_eq!(t, vec![0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(tick_label(2e-4, 5e-5, 3e-4), "2.0e-4");
        assert_eq!(tick_label(1.5, 0.5, 3.0), "1.5");
        assert_eq!(tick_label(200.0, 50.0, 300.0), "200");
    }

    #[test]
    fn every_printable_label_character_has_a_glyph() {
        for ch in "0123456789.-+e learning rate loss train eval step no data".chars() {
            assert!(ch == ' ' || glyph(ch).is_some(), "{ch:?}");
        }
    }

    #[test]
    fn render_draws_each_series_in_its_colour() {
        let train: Vec<(u64, f64)> = (1..=20).map(|s| (s, 3.0 / s as f64)).collect();
        let lr: Vec<(u64, f64)> = (1..=20).map(|s| (s, 2e-4 * s as f64 / 20.0)).collect();
        let c = render(&train, &[(10, 0.5), (20, 0.3)], &lr);
        let has = |rgb: Rgb| c.pixels().chunks(3).any(|p| p == rgb);
        assert!(has(TRAIN) && has(EVAL) && has(LR) && has(BLACK));
    }
}
