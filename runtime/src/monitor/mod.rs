//! Watching a training run: a progress display, `metrics.jsonl`, TensorBoard event files and a
//! loss/learning-rate plot at the end.
//!
//! One [`Monitor`] per run writes into its output folder:
//! - `metrics.jsonl`: one JSON object per logged step or eval, appended and handed to the OS
//!   row by row. Train rows hold `step`, `loss`, `lr`, `tokens_per_s` and any extra scalars
//!   (`grad_norm`, `ce`, `kl`, ...) in the order given; eval rows hold `step`, `eval_loss`,
//!   `eval_ppl` and any extras as `eval_<name>`. JSON has no NaN or infinity: a non-finite
//!   value is written as `null`.
//! - `events.out.tfevents.<secs>.<host>.<pid>.temper`: TensorBoard scalars `train/<name>` and
//!   `eval/<name>`, and text from [`Monitor::log_text`], one record written per call.
//! - `loss.png` at [`Monitor::finish`]: loss (train, and eval if any) and learning rate over step.
//!
//! ```
//! use temper_runtime::monitor::{Monitor, MonitorOptions, Progress};
//! # fn main() -> temper_runtime::Result<()> {
//! let dir = std::env::temp_dir().join(format!("temper-monitor-doc-{}", std::process::id()));
//! let opts = MonitorOptions { progress: Progress::Off, ..Default::default() };
//! let mut mon = Monitor::new(&dir, 2, opts)?;
//! mon.log_train(1, &[("loss", 2.5), ("lr", 1e-4), ("tokens_per_s", 900.0), ("grad_norm", 1.2)])?;
//! mon.log_train(2, &[("loss", 2.1), ("lr", 2e-4), ("tokens_per_s", 950.0)])?;
//! mon.log_eval(2, &[("loss", 2.3)])?; // eval_ppl = exp(2.3) unless a "ppl" is given
//! let png = mon.finish()?;
//! assert!(png.ends_with("loss.png"));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

mod font;
mod metrics;
mod plot;
mod tfevents;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result};
use metrics::{History, MetricsFile};
use tfevents::EventWriter;

/// How progress is shown on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// A bar when stderr is a terminal, plain lines otherwise (logs, CI).
    #[default]
    Auto,
    /// A bar (`indicatif`); like any terminal bar it is drawn only when stderr is a terminal.
    Bar,
    /// One line per logged step:
    /// `step 10/300 loss 1.2340 lr 2.0e-4 tokens/s 1234 eta 1m02s`.
    Lines,
    /// Nothing on stderr; the files are still written.
    Off,
}

/// Options for [`Monitor::new`].
///
/// ```
/// use temper_runtime::monitor::{MonitorOptions, Progress};
/// let opts = MonitorOptions { progress: Progress::Lines, resume_from_step: Some(100) };
/// # let _ = opts;
/// ```
#[derive(Clone, Debug, Default)]
pub struct MonitorOptions {
    /// How progress is shown.
    pub progress: Progress,
    /// When resuming from a checkpoint at this step: rows of `metrics.jsonl` with a larger
    /// step are dropped (so the resumed run does not log them twice), and the new event file
    /// starts with a TensorBoard restart marker at the next step.
    pub resume_from_step: Option<u64>,
}

enum Display {
    Bar(ProgressBar),
    Lines,
    Off,
}

/// The monitor of one training run. See the [module docs](self) for the files it writes.
///
/// ```
/// use temper_runtime::monitor::{Monitor, MonitorOptions, Progress};
/// # fn main() -> temper_runtime::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("temper-monitor-doc2-{}", std::process::id()));
/// let mut mon = Monitor::new(&dir, 100, MonitorOptions { progress: Progress::Off, ..Default::default() })?;
/// mon.log_text(0, "sample", "Once upon a time")?;
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
pub struct Monitor {
    dir: PathBuf,
    total_steps: u64,
    metrics: MetricsFile,
    events: EventWriter,
    history: History,
    display: Display,
    started: Instant,
    start_step: u64,
}

impl Monitor {
    /// Creates `output_dir` if needed and opens the run's files there; `metrics.jsonl` is
    /// appended to, so logs of earlier runs in the folder stay (see
    /// [`MonitorOptions::resume_from_step`] for resuming). `total_steps` sizes the progress
    /// display and its ETA.
    pub fn new(output_dir: &Path, total_steps: u64, opts: MonitorOptions) -> Result<Monitor> {
        std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
        let metrics_path = output_dir.join("metrics.jsonl");
        let history = match opts.resume_from_step {
            Some(step) => metrics::truncate_after(&metrics_path, step)?,
            None => History::default(),
        };
        let metrics = MetricsFile::open_append(&metrics_path)?;
        let mut events = EventWriter::create(output_dir, wall_time())?;
        if let Some(step) = opts.resume_from_step {
            events.write_event(&tfevents::session_start_event(wall_time(), step + 1))?;
        }
        let start_step = opts.resume_from_step.unwrap_or(0);
        let progress = match opts.progress {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Lines,
            p => p,
        };
        let display = match progress {
            Progress::Bar => {
                let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_position(start_step);
                Display::Bar(bar)
            }
            Progress::Lines => Display::Lines,
            Progress::Auto | Progress::Off => Display::Off,
        };
        Ok(Monitor {
            dir: output_dir.to_path_buf(),
            total_steps,
            metrics,
            events,
            history,
            display,
            started: Instant::now(),
            start_step,
        })
    }

    /// Logs a training step. `scalars` must hold `loss`, `lr` and `tokens_per_s`; any others
    /// (`grad_norm`, `ce`, `kl`, ...) are logged too. Writes a `metrics.jsonl` row, TensorBoard
    /// scalars `train/<name>`, and updates the progress display.
    pub fn log_train(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        check_names("log_train", step, scalars)?;
        let mut fields = Vec::with_capacity(scalars.len());
        for required in ["loss", "lr", "tokens_per_s"] {
            let v = lookup(scalars, required).ok_or_else(|| {
                Error::Input(format!(
                    "monitor: log_train at step {step} needs `loss`, `lr` and `tokens_per_s`; `{required}` is missing"
                ))
            })?;
            fields.push((required.to_string(), v));
        }
        for (name, v) in scalars {
            if !matches!(*name, "loss" | "lr" | "tokens_per_s") {
                fields.push((name.to_string(), *v));
            }
        }
        self.metrics.append(&metrics::row_json(step, &fields))?;
        let tb: Vec<(String, f64)> = fields.iter().map(|(k, v)| (format!("train/{k}"), *v)).collect();
        self.events.write_event(&tfevents::scalars_event(wall_time(), step, &tb))?;
        for (k, v) in &fields {
            self.history.record(step, k, Some(*v));
        }
        self.show_train(step, &fields);
        Ok(())
    }

    /// Logs an evaluation: `loss` (with `ppl` defaulting to `exp(loss)`) when the run has one (RL
    /// evaluations report rewards instead). Writes a row `{"step","eval_loss","eval_ppl",...}`
    /// (extras as `eval_<name>`) and TensorBoard scalars `eval/loss`, `eval/ppl`, `eval/<name>`.
    pub fn log_eval(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        check_names("log_eval", step, scalars)?;
        if scalars.is_empty() || (lookup(scalars, "ppl").is_some() && lookup(scalars, "loss").is_none()) {
            return Err(Error::Input(format!("monitor: log_eval at step {step} needs `loss` with `ppl`, or other values")));
        }
        let mut fields = Vec::new();
        if let Some(loss) = lookup(scalars, "loss") {
            fields.push(("loss".to_string(), loss));
            fields.push(("ppl".to_string(), lookup(scalars, "ppl").unwrap_or_else(|| loss.exp())));
        }
        for (name, v) in scalars {
            if !matches!(*name, "loss" | "ppl") {
                fields.push((name.to_string(), *v));
            }
        }
        let row: Vec<(String, f64)> = fields.iter().map(|(k, v)| (format!("eval_{k}"), *v)).collect();
        self.metrics.append(&metrics::row_json(step, &row))?;
        let tb: Vec<(String, f64)> = fields.iter().map(|(k, v)| (format!("eval/{k}"), *v)).collect();
        self.events.write_event(&tfevents::scalars_event(wall_time(), step, &tb))?;
        for (k, v) in &fields {
            self.history.record(step, &format!("eval_{k}"), Some(*v));
        }
        let shown: Vec<String> = fields.iter().take(4).map(|(k, v)| format!("{k} {}", fmt_value(*v))).collect();
        let line = format!("eval step {step}/{} {}", self.total_steps, shown.join(" "));
        self.print(&line);
        Ok(())
    }

    /// Shows free text (a sample generation, say) on the progress display as
    /// `[step 10] tag: text`, and writes it to TensorBoard's text tab under `tag`.
    pub fn log_text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.events.write_event(&tfevents::text_event(wall_time(), step, tag, text))?;
        self.print(&format!("[step {step}] {tag}: {text}"));
        Ok(())
    }

    /// Puts the logs on disk, writes `loss.png` (loss and learning rate over step, including
    /// the rows kept from before a resume) and, for preference and reward-model runs,
    /// `rewards.png` (reward margin and accuracy, train and eval), and closes the progress bar.
    /// Returns the path of `loss.png`.
    pub fn finish(&mut self) -> Result<PathBuf> {
        self.metrics.sync()?;
        self.events.sync()?;
        let png = write_plots(&mut self.history, &self.dir)?;
        if let Display::Bar(bar) = &self.display {
            bar.finish();
        }
        Ok(png)
    }

    /// Draws `loss.png` (and `rewards.png` where the run logged rewards) again from a run
    /// folder's `metrics.jsonl`, e.g. after a change to the plots or for a run that was stopped.
    /// Returns the paths written.
    pub fn replot(output_dir: &Path) -> Result<Vec<PathBuf>> {
        let path = output_dir.join("metrics.jsonl");
        if !path.exists() {
            return Err(Error::Input(format!("{}: no metrics.jsonl to plot", output_dir.display())));
        }
        let mut history = metrics::truncate_after(&path, u64::MAX)?;
        let png = write_plots(&mut history, output_dir)?;
        let rewards = output_dir.join("rewards.png");
        Ok(if has_rewards(&history) { vec![png, rewards] } else { vec![png] })
    }

    /// The `metrics.jsonl` being appended to.
    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// The TensorBoard event file this monitor writes.
    pub fn event_file_path(&self) -> &Path {
        self.events.path()
    }

    fn show_train(&mut self, step: u64, fields: &[(String, f64)]) {
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map_or(f64::NAN, |f| f.1);
        let mut msg = format!(
            "loss {} lr {:.1e} tokens/s {:.0}",
            fmt_value(get("loss")),
            get("lr"),
            get("tokens_per_s")
        );
        for (k, v) in &fields[3..] {
            msg.push_str(&format!(" {k} {}", fmt_value(*v)));
        }
        msg.push_str(&format!(" eta {}", self.eta(step)));
        match &self.display {
            Display::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            Display::Lines => eprintln!("step {step}/{} {msg}", self.total_steps),
            Display::Off => {}
        }
    }

    /// Time left, extrapolating the mean time per step since the monitor was created.
    fn eta(&self, step: u64) -> String {
        let done = step.saturating_sub(self.start_step);
        let left = self.total_steps.saturating_sub(step);
        if left == 0 {
            return "0s".into();
        }
        if done == 0 {
            return "?".into();
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        fmt_duration(Duration::from_secs_f64(per_step * left as f64))
    }

    fn print(&self, line: &str) {
        match &self.display {
            Display::Bar(bar) => bar.println(line),
            Display::Lines => eprintln!("{line}"),
            Display::Off => {}
        }
    }
}

fn lookup(scalars: &[(&str, f64)], name: &str) -> Option<f64> {
    scalars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// Names must be non-empty, unique, and not `step` (the row's own key).
fn check_names(call: &str, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
    for (i, (name, _)) in scalars.iter().enumerate() {
        if name.is_empty() || *name == "step" || scalars[..i].iter().any(|(k, _)| k == name) {
            return Err(Error::Input(format!(
                "monitor: {call} at step {step}: scalar name `{name}` is empty, `step` or repeated"
            )));
        }
    }
    Ok(())
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Four decimals for values of ordinary size, scientific notation otherwise.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || !v.is_finite() || (1e-3..1e5).contains(&a) {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}

/// `45s`, `1m02s`, `3h05m`.
fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Whether a run logged preference or RL rewards (the KL and completion length alone do not make one).
fn has_rewards(history: &History) -> bool {
    history.rewards.keys().any(|k| !k.ends_with("kl") && !k.ends_with("mean_length"))
}

/// `loss.png` and, for runs with rewards, `rewards.png` in `dir`; returns the path of `loss.png`.
fn write_plots(history: &mut History, dir: &Path) -> Result<PathBuf> {
    let sort = |v: &mut Vec<(u64, f64)>| v.sort_by_key(|p| p.0);
    sort(&mut history.train_loss);
    sort(&mut history.eval_loss);
    sort(&mut history.lr);
    let png = dir.join("loss.png");
    plot::write_png(&plot::render(&history.train_loss, &history.eval_loss, &history.lr), &png)?;
    if has_rewards(history) {
        history.rewards.values_mut().for_each(sort);
        plot::write_png(&plot::render_rewards(&history.rewards), &dir.join("rewards.png"))?;
    }
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(fmt_duration(Duration::from_secs(45)), "45s");
        assert_eq!(fmt_duration(Duration::from_secs(62)), "1m02s");
        assert_eq!(fmt_duration(Duration::from_secs(3 * 3600 + 5 * 60 + 9)), "3h05m");
    }

    #[test]
    fn values_switch_to_scientific_outside_ordinary_sizes() {
        assert_eq!(fmt_value(1.234), "1.2340");
        assert_eq!(fmt_value(2e-4), "2.00e-4");
        assert_eq!(fmt_value(f64::NAN), "NaN");
    }

    #[test]
    fn finish_writes_a_png_that_decodes_to_a_drawn_plot() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch/monitor-unit-png");
        let _ = std::fs::remove_dir_all(&dir);
        let mut mon = Monitor::new(&dir, 20, MonitorOptions { progress: Progress::Off, ..Default::default() }).unwrap();
        for step in 1..=20u64 {
            let s = step as f64;
            mon.log_train(step, &[("loss", 3.0 / s), ("lr", 1e-5 * s), ("tokens_per_s", 1e3)]).unwrap();
        }
        mon.log_eval(10, &[("loss", 0.4)]).unwrap();
        mon.log_eval(20, &[("loss", 0.2)]).unwrap();
        let path = mon.finish().unwrap();

        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (plot::WIDTH as u32, plot::HEIGHT as u32));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let px = &buf[..info.buffer_size()];
        let white = px.chunks(3).filter(|p| *p == [255, 255, 255]).count();
        let total = px.len() / 3;
        assert!(white < total * 98 / 100 && white > total / 2, "{white} of {total} pixels white");
        let colours: std::collections::HashSet<&[u8]> = px.chunks(3).collect();
        assert!(colours.len() >= 5, "axes, grid, three series: {} colours", colours.len());
    }

    #[test]
    fn repeated_or_reserved_names_are_rejected() {
        assert!(check_names("t", 1, &[("loss", 1.0), ("loss", 2.0)]).is_err());
        assert!(check_names("t", 1, &[("step", 1.0)]).is_err());
        assert!(check_names("t", 1, &[("loss", 1.0), ("lr", 2.0)]).is_ok());
    }
}
