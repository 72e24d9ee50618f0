//! `-p`: progress on stderr. A bar when stderr is a terminal; otherwise plain lines (one a
//! second while the position moves, and one at the end), so that `-p` also shows something in
//! a log file or behind a pipe, as asked.

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::render::human_size;

/// How often a plain progress line is printed.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Progress of one long operation, in bytes.
pub struct Progress {
    /// Counts the bytes; draws itself only on a terminal.
    bar: ProgressBar,
    /// Without a terminal: the thread printing lines, and the channel that stops it.
    lines: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Progress {
    /// Progress towards `total` bytes: nothing when `enabled` is false, a bar when stderr is a
    /// terminal, plain lines otherwise.
    pub fn new(enabled: bool, total: u64) -> Self {
        if !enabled {
            return Self {
                bar: ProgressBar::hidden(),
                lines: None,
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:40}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            return Self { bar, lines: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let (stop, stopped) = mpsc::channel::<()>();
        let counter = bar.clone();
        let printer = std::thread::spawn(move || {
            let mut last = None;
            loop {
                let done = !matches!(
                    stopped.recv_timeout(LINE_INTERVAL),
                    Err(RecvTimeoutError::Timeout)
                );
                let pos = counter.position();
                if done || last != Some(pos) {
                    print_line(pos, total);
                    last = Some(pos);
                }
                if done {
                    break;
                }
            }
        });
        Self {
            bar,
            lines: Some((stop, printer)),
        }
    }

    /// `n` more bytes are done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The operation is over: the bar disappears; plain lines end with a last one.
    pub fn finish_and_clear(&mut self) {
        self.bar.finish_and_clear();
        if let Some((stop, printer)) = self.lines.take() {
            // The printer ends whether this send arrives or the channel closes.
            let _ = stop.send(());
            let _ = printer.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish_and_clear();
    }
}

/// One plain progress line: `progress: 512 MiB of 1 GiB (50%)`.
fn print_line(pos: u64, total: u64) {
    let percent = if total == 0 {
        100
    } else {
        u128::from(pos) * 100 / u128::from(total)
    };
    let short = |bytes| {
        let s = human_size(bytes);
        s.split(" (").next().unwrap_or(&s).to_string()
    };
    // Progress is best effort: a closed stderr must not fail the operation.
    let _ = writeln!(
        std::io::stderr().lock(),
        "progress: {} of {} ({percent}%)",
        short(pos),
        short(total)
    );
}
